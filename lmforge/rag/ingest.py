"""Ingest: documents -> chunks -> vectors -> store, incrementally.

Re-embedding a whole corpus because one file changed is the slow path every RAG user hits. Each document here has a
stable id and a content hash (SHA-256 of its text, source and metadata); ingest compares the hash with the one the
store holds and

- skips the document when the hash is unchanged (no chunking, no embedding),
- replaces all its chunks when the hash differs (an update is a delete plus an add, in one commit),
- adds it when the id is new, and
- with `prune=True`, deletes documents the store holds that this run did not see.

Long runs print progress (documents, chunks embedded per second, ETA) and commit every `commit_every` chunks, so an
interrupted ingest keeps what it finished; each commit is atomic (see store.py). Before it reads the store's hashes,
ingest takes the store's writer lock, so two ingests into one index run one after the other, never interleaved.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from lmforge.rag.chunker import Chunk, Chunker
from lmforge.rag.embedders import Embedder, info_of
from lmforge.rag.loaders import Document
from lmforge.rag.store import Store, check_query


def content_hash(doc: Document) -> str:
    """SHA-256 over what ingest would store for the document; equal hash -> nothing to redo."""
    h = hashlib.sha256()
    for part in (doc.text, doc.source, json.dumps(doc.meta, sort_keys=True, default=str), json.dumps(doc.pages)):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), from the loader
    chunks: int = 0
    embed_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def summary(self) -> str:
        s = (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
             f"{len(self.deleted)} deleted; {self.chunks} chunks embedded")
        if self.chunks:
            s += f" ({self.chunks_per_second:.1f} chunks/s)"
        if self.skipped:
            s += f"; {len(self.skipped)} skipped"
        return s


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Indexer:
    """Keep a store in step with a set of documents: `Indexer(store, embedder, chunker).index(docs)`."""

    def __init__(self, store: Store, embedder: Embedder, chunker: Chunker, batch_size: int = 64,
                 commit_every: int = 4096, progress: Callable[[str], None] | None = None,
                 progress_every: float = 2.0):
        check_query(store.manifest, info_of(embedder), "the index")
        self.store, self.embedder, self.chunker = store, embedder, chunker
        self.batch_size, self.commit_every = int(batch_size), int(commit_every)
        self.progress, self.progress_every = progress, progress_every

    def index(self, docs: Iterable[Document], prune: bool = False) -> IngestReport:
        t0 = time.perf_counter()
        docs = list(docs)
        seen: dict[str, Document] = {}
        for d in docs:  # a later document with the same id wins, as it would on a second run
            seen[d.id] = d
        docs = list(seen.values())
        report = IngestReport()
        self._begin_write()
        have = self.store.doc_hashes()
        todo = []
        for d in docs:
            h = content_hash(d)
            if have.get(d.id) == h:
                report.unchanged.append(d.id)
            else:
                todo.append((d, h))
                (report.updated if d.id in have else report.added).append(d.id)
        if prune:
            report.deleted = sorted(set(have) - set(seen))
            self.store.delete(report.deleted)
        chunked = [(d, h, self.chunker.chunk(d)) for d, h in todo]
        total = sum(len(c) for _, _, c in chunked)
        done, since_commit, last = 0, 0, time.perf_counter()
        # Documents are embedded in groups of about batch_size chunks, across document boundaries: a corpus of
        # one-paragraph documents would otherwise run the model on batches of one or two chunks.
        group: list[tuple[Document, str, list[Chunk]]] = []
        for i, item in enumerate(chunked):
            group.append(item)
            if sum(len(c) for _, _, c in group) < self.batch_size and i < len(chunked) - 1:
                continue
            t = time.perf_counter()
            vectors = self.embed_chunks([c for _, _, cs in group for c in cs])
            report.embed_seconds += time.perf_counter() - t
            row = 0
            for d, h, chunks in group:
                self.store.upsert(d.id, d.source, h, chunks, vectors[row:row + len(chunks)])
                row += len(chunks)
                done += len(chunks)
                since_commit += len(chunks)
            group = []
            if since_commit >= self.commit_every:
                self.store.commit()
                since_commit = 0
            now = time.perf_counter()
            if self.progress and (now - last >= self.progress_every or done == total):
                rate = done / report.embed_seconds if report.embed_seconds else 0.0
                eta = (total - done) / rate if rate else 0.0
                self.progress(f"embedded {done}/{total} chunks ({rate:.1f} chunks/s, ETA {eta:.0f} s)")
                last = now
        self.store.commit()
        report.chunks = done
        report.seconds = time.perf_counter() - t0
        return report

    def embed_chunks(self, chunks: list[Chunk]) -> np.ndarray:
        if not chunks:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        parts = [self.embedder.embed([c.text for c in chunks[i:i + self.batch_size]])
                 for i in range(0, len(chunks), self.batch_size)]
        return np.concatenate(parts, axis=0).astype(np.float32, copy=False)

    def _begin_write(self) -> None:
        """Take the store's writer lock before reading what it holds (the embedded store has one; PostgreSQL
        orders concurrent writers itself), so the hashes compared below are the newest and no update is lost."""
        begin = getattr(self.store, "begin_write", None)
        if begin is not None:
            begin()

    def delete(self, doc_ids: Sequence[str]) -> list[str]:
        self._begin_write()
        have = self.store.doc_hashes()
        gone = [d for d in doc_ids if d in have]
        self.store.delete(gone)
        self.store.commit()
        return gone
