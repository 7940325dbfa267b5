"""Vector stores: where chunk vectors and their metadata live, and how the nearest ones are found.

A *vector database* answers one question fast: which stored vectors are nearest to this query vector? With unit
vectors, "nearest" = largest dot product (= cosine similarity). Two ways to answer it:

- **Exact (flat) search** scores every stored vector: one matrix-vector product, (N, d) @ (d,) -> (N,), then the
  top k. It is always right and, for N up to a few hundred thousand, fast: 100k x 384 floats is 150 MB of memory
  traffic, tens of milliseconds on one core. This is the default here.
- **Approximate (ANN) search** trades a little recall for sub-linear time. HNSW (Malkov & Yashunin 2016) links every
  vector to a few near neighbours on several layers and walks that graph greedily from an entry point; it is what
  pgvector, FAISS, Qdrant and others use. `EmbeddedStore(search="hnsw")` builds a FAISS HNSW graph in memory
  (optional, needs faiss-cpu); `PgVectorStore` keeps an HNSW index inside PostgreSQL.

Both stores implement one interface (`Store`), so the retrievers and the CLI do not care which they talk to.

**The embedded store** is a directory:

    index.json            manifest: format version, embedder (name, dim, normalize), chunker settings, generation g,
                          and the two file names below; replaced atomically, so it always names a complete pair
    vectors-<g>.npy       (N, dim) float32, row i is chunk i
    meta-<g>.sqlite       tables docs(doc_id, source, hash, ...) and chunks(row, doc_id, idx, start, end, page, text)
    write.lock            the writer lock (below); empty or naming the process that writes now

Writes are copy-on-write, as in LSM trees or Lucene's segments_N files: a commit writes generation g+1 beside g
(fsynced), then atomically replaces index.json to point at it, and only then deletes generation g. A `kill -9` at any
moment therefore leaves index.json naming generation g, which is whole; stray files of the unfinished generation
are removed by the next writer. Readers open the files named in the manifest and are never blocked.

**One writer at a time.** Two processes that ingest into one index at once would both build generation g+1 from
generation g: the second switch would silently drop the first one's documents (a *lost update*), and each would
delete the other's half-written files as strays. So a writer first takes an exclusive lock, `fcntl.flock` on
DIR/write.lock (Lucene's write.lock, SQLite's and git's lock files do the same job), and only then reads the newest
generation and builds on it. flock belongs to the open file, so the kernel releases it when the holder exits or is
killed; a stale lock cannot outlive its process, and the file itself is never deleted (a deleted lock file would
let two processes lock two different files). A second writer waits for it up to `lock_timeout` seconds (0: not at
all), then fails with a one-line `IndexBusyError` naming the holder (pid, host, command, since when), which the
holder wrote into the lock file. Readers never take the lock: they read whatever generation index.json names.

**The index records its embedder.** Searching with a query vector from another embedder (other name, dimension or
normalization) is a one-line `ConfigError`, never silently wrong neighbours.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.utils import atomic_write_json
from lmforge.rag.chunker import Chunk, ChunkerSettings
from lmforge.rag.embedders import EmbedderInfo

FORMAT = "lmforge-rag-index"
VERSION = 1
FILTER_COLUMNS = ("doc_id", "source", "page")
LOCK_FILE = "write.lock"
LOCK_TIMEOUT = 60.0  # seconds a second writer waits for the first by default


@dataclass
class Hit:
    """One retrieved chunk and its score (higher is better; what the score means depends on the retriever)."""

    chunk: Chunk
    score: float

    @property
    def key(self) -> tuple[str, int]:
        return (self.chunk.doc_id, self.chunk.index)

    def to_dict(self) -> dict:
        c = self.chunk
        return {"source": c.source, "start": c.start, "end": c.end, "page": c.page, "score": self.score,
                "doc_id": c.doc_id, "chunk": c.index, "text": c.text}


@dataclass
class IndexManifest:
    embedder: EmbedderInfo
    embedder_source: str
    chunker: ChunkerSettings
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"embedder": self.embedder.to_dict(), "embedder_source": self.embedder_source,
                "chunker": {"max_tokens": self.chunker.max_tokens, "overlap_tokens": self.chunker.overlap_tokens},
                **self.extra}

    @classmethod
    def new(cls, embedder, chunker) -> "IndexManifest":
        from lmforge.rag.embedders import info_of

        return cls(info_of(embedder), getattr(embedder, "source", embedder.name), chunker.settings)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexManifest":
        return cls(EmbedderInfo.from_dict(d["embedder"]), str(d.get("embedder_source", d["embedder"]["name"])),
                   ChunkerSettings(int(d["chunker"]["max_tokens"]), int(d["chunker"]["overlap_tokens"])))


class Store(Protocol):
    """The interface both stores implement."""

    manifest: IndexManifest

    def doc_hashes(self) -> dict[str, str]: ...
    def upsert(self, doc_id: str, source: str, content_hash: str, chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def delete(self, doc_ids: Sequence[str]) -> None: ...
    def commit(self) -> None: ...
    def search(self, query: np.ndarray, k: int, filter: dict | None = None, exact: bool = True) -> list[Hit]: ...
    def chunks(self) -> list[Chunk]: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


def check_query(manifest: IndexManifest, info: EmbedderInfo, where: str) -> None:
    manifest.embedder.check_same(info, where)


def filter_sql(filter: dict | None, meta_expr, placeholder: str = "?") -> tuple[str, list]:
    """{'source': 'a.md', 'title': ['X', 'Y']} -> ('source = ? AND <meta title> IN (?, ?)', ['a.md', 'X', 'Y']).

    Keys doc_id, source and page are columns; any other key is looked up in the chunk's metadata.
    `meta_expr(key)` returns the SQL expression for a metadata key in the store's dialect.
    """
    if not filter:
        return "TRUE" if placeholder == "%s" else "1", []
    clauses, params = [], []
    for key, value in filter.items():
        if not isinstance(key, str) or not key.replace("_", "").isalnum():
            raise ConfigError(f"filter key {key!r} must be a plain name (letters, digits, _)")
        col = f'"{key}"' if key in FILTER_COLUMNS else meta_expr(key)
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        if not values:
            raise ConfigError(f"filter {key!r} has an empty list of values")
        if col != f'"{key}"':
            values = [str(v) for v in values]
        clauses.append(f"{col} IN ({', '.join([placeholder] * len(values))})")
        params += values
    return " AND ".join(clauses), params


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (ties: lower index first). [0.1, 0.9, 0.5], 2 -> [1, 2]."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return idx[np.lexsort((idx, -scores[idx]))]


# ---------------------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (doc_id TEXT PRIMARY KEY, source TEXT NOT NULL, hash TEXT NOT NULL,
                                 n_chunks INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (row INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, idx INTEGER NOT NULL,
                                   source TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
                                   page INTEGER, n_tokens INTEGER NOT NULL, text TEXT NOT NULL, meta TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
"""


def is_index_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "index.json").is_file()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IndexBusyError(LmforgeError):
    """Another process holds the index's writer lock and did not let go within the timeout."""


class WriterLock:
    """The exclusive writer lock of an index directory: `fcntl.flock` on DIR/write.lock (see the module docstring).

    `acquire(timeout)` polls a non-blocking flock every 50 ms until `timeout` seconds have passed, so it can give up
    and name the holder; `release()` lets go. The holder writes who it is (pid, host, command, since) into the file.
    """

    def __init__(self, directory: Path):
        self.file = Path(directory) / LOCK_FILE
        self.fd: int | None = None

    def holder(self) -> str:
        """'pid 123 on host (lmforge rag index docs), since 07:40:01 UTC' from the lock file, as far as it is known."""
        try:
            info = json.loads(self.file.read_text(encoding="utf-8"))
            return f"pid {info['pid']} on {info['host']} ({info['command']}), since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not written its name yet"

    def acquire(self, timeout: float = LOCK_TIMEOUT, on_wait: Callable[[str], None] | None = None) -> "WriterLock":
        if self.fd is not None:
            return self
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, told = time.monotonic() + max(0.0, float(timeout)), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise IndexBusyError(
                        f"{self.file.parent}: another process is writing this index: {self.holder()}; "
                        f"{'waited ' + format(timeout, 'g') + ' s; ' if timeout > 0 else ''}try again when it has "
                        f"finished (or wait longer: --lock-timeout SECONDS)") from None
                if on_wait is not None and not told:
                    on_wait(f"{self.file.parent}: waiting up to {timeout:g} s for the writer {self.holder()}")
                    told = True
                time.sleep(0.05)
        command = " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"] + sys.argv[1:])
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command[:200],
              "since": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # nobody holds it now
        finally:
            os.close(fd)  # closing the file releases the flock

    @property
    def held(self) -> bool:
        return self.fd is not None


class EmbeddedStore:
    """The default store: numpy vectors + SQLite metadata in one directory, copy-on-write commits.

    `EmbeddedStore.open(dir)` opens an existing index (one-line DataError if `dir` is not one);
    `EmbeddedStore.create(dir, manifest)` starts a new one (or opens it when it exists with the same manifest).
    Changes (`upsert`, `delete`) are staged in memory and become visible, atomically, at `commit()`.
    One process writes an index at a time (readers are unlimited): `create`, `open(writer=True)`, `begin_write()`
    and the first `upsert`/`delete`/`commit` take the writer lock, and `close()` (or leaving a `with` block)
    releases it. A commit removes files a dead writer left.
    `search="hnsw"` answers `exact=False` queries from an in-memory FAISS HNSW graph (needs faiss-cpu).
    """

    def __init__(self, path: Path, raw: dict, search: str = "exact", lock_timeout: float = LOCK_TIMEOUT,
                 on_wait: Callable[[str], None] | None = None):
        self.path = path
        self.raw = raw
        self.manifest = IndexManifest.from_dict(raw)
        self.generation = int(raw["generation"])
        if search not in ("exact", "hnsw"):
            raise ConfigError(f"search must be 'exact' or 'hnsw', got {search!r}")
        self.search_mode = search
        self.lock_timeout, self.on_wait = float(lock_timeout), on_wait
        self._lock = WriterLock(path)
        self._pending_delete: set[str] = set()
        self._pending_add: dict[str, tuple[str, str, list[Chunk], np.ndarray]] = {}
        self._load()

    # -- opening -------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, search: str = "exact", writer: bool = False,
             lock_timeout: float = LOCK_TIMEOUT, on_wait: Callable[[str], None] | None = None) -> "EmbeddedStore":
        """Open an existing index to read it (never blocks), or with `writer=True` holding the writer lock."""
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: no such index directory (build one with `lmforge rag index DOCS --index {path}`)")
        if not is_index_dir(path):
            raise DataError(f"{path}: not an lmforge RAG index (no index.json)")
        lock = WriterLock(path).acquire(lock_timeout, on_wait) if writer else None
        try:
            for attempt in range(5):
                raw = _read_manifest(path)
                try:
                    store = cls(path, raw, search=search, lock_timeout=lock_timeout, on_wait=on_wait)
                    break
                except DataError:
                    # A writer may have switched to a newer generation and deleted this one between our reading
                    # index.json and opening its files: read index.json again. Damage that stays is reported.
                    if attempt == 4 or _read_manifest(path).get("generation") == raw.get("generation"):
                        raise
            if lock is not None:
                store._lock = lock
            return store
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def create(cls, path: str | os.PathLike, manifest: IndexManifest, search: str = "exact",
               lock_timeout: float = LOCK_TIMEOUT, on_wait: Callable[[str], None] | None = None) -> "EmbeddedStore":
        """Start a new index at `path`, or open the one there (same embedder and chunking required), as its writer."""
        path = Path(path)
        if not is_index_dir(path) and path.exists() and any(f.name != LOCK_FILE for f in path.iterdir()):
            raise DataError(f"{path}: exists, is not empty and is not an lmforge RAG index; choose another --index")
        path.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(path).acquire(lock_timeout, on_wait)
        try:
            if is_index_dir(path):  # it was there, or another writer created it while we waited for the lock
                store = cls.open(path, search=search, lock_timeout=lock_timeout, on_wait=on_wait)
                store._lock = lock
                store.manifest.embedder.check_same(manifest.embedder, f"index {path}")
                if store.manifest.chunker != manifest.chunker:
                    raise ConfigError(f"index {path} was chunked with max_tokens={store.manifest.chunker.max_tokens}"
                                      f", overlap={store.manifest.chunker.overlap_tokens}; use the same settings or a "
                                      f"new index directory")
                return store
            raw = {"format": FORMAT, "version": VERSION, "store": "embedded", "generation": 0, **manifest.to_dict(),
                   "vectors": None, "meta": None, "n_chunks": 0, "n_docs": 0}
            store = cls(path, raw, search=search, lock_timeout=lock_timeout, on_wait=on_wait)
            store._lock = lock
            store.commit(force=True)
            return store
        except BaseException:
            lock.release()
            raise

    # -- the writer lock -----------------------------------------------------------------------------------------

    def begin_write(self, timeout: float | None = None) -> None:
        """Take the writer lock (waiting up to `timeout` s, default `lock_timeout`) and move to the newest
        generation, so what this process writes builds on what the previous writer committed. Staged changes are
        kept. Idempotent."""
        if self._lock.held:
            return
        self._lock.acquire(self.lock_timeout if timeout is None else timeout, self.on_wait)
        raw = _read_manifest(self.path)
        if int(raw["generation"]) != self.generation:
            self.db.close()
            self.raw, self.generation = raw, int(raw["generation"])
            self._load()

    def end_write(self) -> None:
        """Release the writer lock (staged changes not yet committed stay staged; committing takes it again)."""
        self._lock.release()

    @property
    def writing(self) -> bool:
        return self._lock.held

    def __enter__(self) -> "EmbeddedStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _load(self) -> None:
        dim = self.manifest.embedder.dim
        if self.raw.get("vectors"):
            try:
                self.vectors = np.load(self.path / self.raw["vectors"], mmap_mode="r")
                uri = f"file:{self.path / self.raw['meta']}?mode=ro"
                self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
                n = self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
            except (OSError, ValueError, sqlite3.DatabaseError) as e:
                raise DataError(f"{self.path}: index files are damaged ({type(e).__name__}: {e})") from None
            if self.vectors.shape != (n, dim):
                raise DataError(f"{self.path}: index vectors {self.vectors.shape} do not match {n} chunks of dim {dim}")
        else:
            self.vectors = np.zeros((0, dim), dtype=np.float32)
            self.db = sqlite3.connect(":memory:", check_same_thread=False)
            self.db.executescript(_SCHEMA)
        self._hnsw = None
        self._filter_cache: dict[str, np.ndarray] = {}

    # -- reading -------------------------------------------------------------------------------------------------

    def count(self) -> int:
        return int(self.vectors.shape[0])

    def doc_hashes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT doc_id, hash FROM docs").fetchall())

    def _rows_to_chunks(self, rows) -> list[Chunk]:
        return [Chunk(doc_id=r[0], index=r[1], source=r[2], start=r[3], end=r[4], page=r[5], n_tokens=r[6], text=r[7],
                      meta=json.loads(r[8])) for r in rows]

    _COLS = 'doc_id, idx, source, start, "end", page, n_tokens, text, meta'

    def chunks(self) -> list[Chunk]:
        """All chunks, in row order (row i <-> vector i)."""
        return self._rows_to_chunks(self.db.execute(f"SELECT {self._COLS} FROM chunks ORDER BY row"))

    def get_rows(self, rows: Sequence[int]) -> list[Chunk]:
        if not len(rows):
            return []
        found = {}
        for i in range(0, len(rows), 500):
            part = [int(r) for r in rows[i:i + 500]]
            q = f"SELECT row, {self._COLS} FROM chunks WHERE row IN ({','.join('?' * len(part))})"
            for r in self.db.execute(q, part):
                found[r[0]] = self._rows_to_chunks([r[1:]])[0]
        return [found[int(r)] for r in rows]

    def _allowed_rows(self, filter: dict) -> np.ndarray:
        where, params = filter_sql(filter, lambda k: f"json_extract(meta, '$.{k}')")
        key = json.dumps([where, params], default=str)
        if key not in self._filter_cache:
            rows = [r[0] for r in self.db.execute(f"SELECT row FROM chunks WHERE {where}", params)]
            self._filter_cache[key] = np.asarray(rows, dtype=np.int64)
        return self._filter_cache[key]

    def search(self, query: np.ndarray, k: int, filter: dict | None = None, exact: bool = True) -> list[Hit]:
        """Top-k chunks by dot product with `query` (cosine for unit vectors), optionally filtered by metadata."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.manifest.embedder.dim:
            raise ConfigError(f"query vector has dim {q.shape[0]} but index {self.path} holds dim "
                              f"{self.manifest.embedder.dim} ({self.manifest.embedder.name})")
        if self.count() == 0 or k <= 0:
            return []
        if not exact and self.search_mode == "hnsw" and not filter:
            scores, idx = self._hnsw_index().search(q[None, :], min(k, self.count()))
            pairs = [(int(i), float(s)) for i, s in zip(idx[0], scores[0]) if i >= 0]
        elif filter:
            rows = self._allowed_rows(filter)
            scores = np.asarray(self.vectors[rows] @ q) if len(rows) else np.zeros(0, np.float32)
            pairs = [(int(rows[i]), float(scores[i])) for i in top_k(scores, k)]
        else:
            scores = np.asarray(self.vectors @ q)  # (N, d) @ (d,) -> (N,)
            pairs = [(int(i), float(scores[i])) for i in top_k(scores, k)]
        chunks = self.get_rows([r for r, _ in pairs])
        return [Hit(c, s) for c, (_, s) in zip(chunks, pairs)]

    def _hnsw_index(self):
        if self._hnsw is None:
            try:
                import faiss
            except ImportError:
                raise ConfigError("search='hnsw' needs faiss-cpu (pip install faiss-cpu)") from None
            index = faiss.IndexHNSWFlat(self.manifest.embedder.dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = 128
            index.add(np.ascontiguousarray(self.vectors, dtype=np.float32))
            self._hnsw = index
        return self._hnsw

    # -- writing -------------------------------------------------------------------------------------------------

    def upsert(self, doc_id: str, source: str, content_hash: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self.manifest.embedder.dim):
            raise ConfigError(f"{doc_id}: {len(chunks)} chunks but vectors of shape {vectors.shape}; expected "
                              f"({len(chunks)}, {self.manifest.embedder.dim})")
        self.begin_write()
        self._pending_add[doc_id] = (source, content_hash, chunks, vectors)
        self._pending_delete.discard(doc_id)

    def delete(self, doc_ids: Sequence[str]) -> None:
        self.begin_write()
        for d in doc_ids:
            self._pending_add.pop(d, None)
            self._pending_delete.add(d)

    @property
    def pending(self) -> int:
        return len(self._pending_add) + len(self._pending_delete)

    def commit(self, force: bool = False) -> None:
        """Write generation g+1 (vectors, then SQLite), fsync, switch index.json to it, delete generation g.
        Only the holder of the writer lock commits (or removes strays): this takes it if needed."""
        self.begin_write()
        if not self.pending and not force:
            self._remove_strays(keep=set())  # leftovers of a writer that died mid-commit
            return
        g = self.generation + 1
        vec_name, db_name = f"vectors-{g}.npy", f"meta-{g}.sqlite"
        self._remove_strays(keep=set())
        gone = self._pending_delete | set(self._pending_add)
        old_rows = np.asarray([r[0] for r in self.db.execute("SELECT row, doc_id FROM chunks ORDER BY row")
                               if r[1] not in gone], dtype=np.int64)
        new_vecs = [v for (_, _, _, v) in self._pending_add.values()]
        vectors = np.concatenate([np.asarray(self.vectors[old_rows], dtype=np.float32)] + new_vecs, axis=0) \
            if len(old_rows) or new_vecs else np.zeros((0, self.manifest.embedder.dim), np.float32)
        tmp_vec = self.path / f".{vec_name}.tmp"
        with open(tmp_vec, "wb") as f:
            np.save(f, vectors)
            f.flush()
            os.fsync(f.fileno())
        tmp_db = self.path / f".{db_name}.tmp"
        db = sqlite3.connect(tmp_db)
        try:
            db.executescript(_SCHEMA)
            self._copy_kept(db, gone)
            row = len(old_rows)
            for doc_id, (source, h, chunks, _) in self._pending_add.items():
                db.execute("INSERT INTO docs VALUES (?, ?, ?, ?)", (doc_id, source, h, len(chunks)))
                db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               [(row + i, c.doc_id, c.index, c.source, c.start, c.end, c.page, c.n_tokens, c.text,
                                 json.dumps(c.meta, ensure_ascii=False)) for i, c in enumerate(chunks)])
                row += len(chunks)
            db.commit()
            n_docs = db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
        finally:
            db.close()
        with open(tmp_db, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_vec, self.path / vec_name)
        os.replace(tmp_db, self.path / db_name)
        _fsync_dir(self.path)
        raw = dict(self.raw, generation=g, vectors=vec_name, meta=db_name, n_chunks=int(vectors.shape[0]),
                   n_docs=int(n_docs), updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        atomic_write_json(self.path / "index.json", raw)  # the switch: readers now see generation g
        _fsync_dir(self.path)
        self.db.close()
        self.raw, self.generation = raw, g
        self._pending_add.clear()
        self._pending_delete.clear()
        self._load()
        self._remove_strays(keep={vec_name, db_name})

    def _copy_kept(self, db: sqlite3.Connection, gone: set[str]) -> None:
        """Kept docs and chunks of the current generation into `db`, chunk rows renumbered 0..n-1 in order."""
        docs = [r for r in self.db.execute("SELECT doc_id, source, hash, n_chunks FROM docs") if r[0] not in gone]
        db.executemany("INSERT INTO docs VALUES (?, ?, ?, ?)", docs)
        new_row = 0
        cur = self.db.execute(f"SELECT doc_id, idx, source, start, \"end\", page, n_tokens, text, meta FROM chunks "
                              f"ORDER BY row")
        while True:
            batch = cur.fetchmany(2000)
            if not batch:
                break
            kept = [r for r in batch if r[0] not in gone]
            db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(new_row + i, *r) for i, r in enumerate(kept)])
            new_row += len(kept)

    def _remove_strays(self, keep: set[str]) -> None:
        """Delete generation files that index.json does not name (left by an earlier commit or a crash), and the
        temporary file of an index.json switch that a killed writer never finished."""
        named = {self.raw.get("vectors"), self.raw.get("meta")} | keep
        for f in self.path.iterdir():
            n = f.name
            is_gen = (n.startswith(("vectors-", "meta-", ".vectors-", ".meta-")) and
                      n.endswith((".npy", ".sqlite", ".tmp", "-journal")))
            half_switch = n.startswith(".index.json.") and n.endswith(".tmp")  # killed inside atomic_write_json
            if (is_gen or half_switch) and n not in named:
                f.unlink(missing_ok=True)

    def close(self) -> None:
        self.db.close()
        self._lock.release()


def _read_manifest(path: Path) -> dict:
    """index.json of an embedded index, checked (one-line DataError when it is not one, or corrupt)."""
    try:
        raw = json.loads((path / "index.json").read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT:
            raise DataError(f"{path}: index.json is not an lmforge RAG index (format {raw.get('format')!r})")
        if int(raw.get("version", 0)) > VERSION:
            raise DataError(f"{path}: index version {raw['version']} is newer than this lmforge ({VERSION})")
        IndexManifest.from_dict(raw)
        int(raw["generation"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: index.json is corrupt ({type(e).__name__}: {e})") from None
    return raw
