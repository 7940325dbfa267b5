"""PostgreSQL + pgvector: the store for indexes that outgrow one process.

The embedded store lives in one directory and one process writes it. When several services ingest and query at
once, or the index no longer fits one machine's memory, a database is the next step. pgvector adds a `vector(d)`
column type and distance operators to PostgreSQL (`<#>` is the *negative* inner product, so `ORDER BY e <#> q`
lists the largest dot products first), plus an HNSW index (`USING hnsw (embedding vector_ip_ops)`).

Tables (prefix = collection name, default "lmforge"):

    <c>_meta    key/value: the index manifest (embedder, chunker), as in the embedded store's index.json
    <c>_docs    doc_id, source, hash
    <c>_chunks  id, doc_id, idx, source, start, end, page, n_tokens, text, meta jsonb, embedding vector(d)

Writes are transactional: `upsert` and `delete` run in the open transaction and `commit()` makes them visible at
once; a crash or `kill -9` rolls them back, which is the same guarantee the embedded store gives.

Filtered approximate search has a classic trap: HNSW returns its `ef_search` best candidates *first* and the WHERE
clause filters them *afterwards*, so a selective filter can return fewer than k rows although k rows match.
pgvector 0.8's iterative index scans fix that: with `hnsw.iterative_scan = relaxed_order` the scan keeps walking the
graph until k rows pass the filter (or `hnsw.max_scan_tuples` is reached). We turn it on for every query
(`SET LOCAL`, so it changes nothing outside our transaction). `exact=True` disables index scans for the query,
which makes PostgreSQL compute every distance: the same top-k as the embedded store's flat search.

Connection settings come from a URL: postgresql://user[:password]@host[:port]/db or
postgresql://user@/db?host=/path/to/socket-dir; a password may also come from $PGPASSWORD or ~/.pgpass.
"""

from __future__ import annotations

import json
import re
from typing import Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from lmforge.errors import ConfigError, DataError, NetworkError
from lmforge.rag.chunker import Chunk
from lmforge.rag.store import FORMAT, VERSION, Hit, IndexManifest, filter_sql


def redact(url: str) -> str:
    """The URL without its password: postgresql://u:secret@h/db -> postgresql://u@h/db."""
    p = urlsplit(url)
    if p.password is None:
        return url
    netloc = (p.username or "") + "@" + (p.hostname or "") + (f":{p.port}" if p.port else "")
    return urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))


class PgVectorStore:
    """A RAG index in PostgreSQL with pgvector. `manifest` creates the tables when they do not exist."""

    def __init__(self, url: str, manifest: IndexManifest | None = None, collection: str = "lmforge",
                 ef_search: int = 100, connect_timeout: int = 10):
        try:
            import psycopg
            from pgvector.psycopg import register_vector
        except ImportError:
            raise ConfigError("the PostgreSQL store needs psycopg and pgvector (pip install 'lmforge[rag]')") from None
        self.collection = re.sub(r"[^a-z0-9_]", "_", collection.lower())[:40] or "lmforge"
        if not self.collection[0].isalpha():
            self.collection = "c_" + self.collection
        self.url, self.ef_search, self._psycopg = url, int(ef_search), psycopg
        try:
            self.conn = psycopg.connect(url, connect_timeout=connect_timeout)
        except psycopg.Error as e:
            msg = " ".join(str(e).split())
            raise NetworkError(f"cannot connect to PostgreSQL at {redact(url)}: {msg[:200]}") from None
        try:
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            self.conn.commit()
        except psycopg.Error as e:
            self.conn.rollback()
            raise DataError(f"{redact(url)}: pgvector extension unavailable ({' '.join(str(e).split())[:160]})") \
                from None
        register_vector(self.conn)
        t = self.collection
        self.t_meta, self.t_docs, self.t_chunks = f"{t}_meta", f"{t}_docs", f"{t}_chunks"
        stored = self._read_manifest()
        if stored is None:
            if manifest is None:
                raise DataError(f"{redact(url)}: no lmforge RAG index named {self.collection!r} (no table "
                                f"{self.t_meta}); build one with `lmforge rag index ... --store URL`")
            self._create(manifest)
            stored = manifest
        elif manifest is not None:
            stored.embedder.check_same(manifest.embedder, f"index {self.collection!r} at {redact(url)}")
        self.manifest = stored

    # -- schema ------------------------------------------------------------------------------------------------

    def _read_manifest(self) -> IndexManifest | None:
        exists = self.conn.execute("SELECT to_regclass(%s)", (self.t_meta,)).fetchone()[0]
        if exists is None:
            self.conn.rollback()
            return None
        row = self.conn.execute(f"SELECT value FROM {self.t_meta} WHERE key = 'manifest'").fetchone()
        self.conn.rollback()
        if row is None:
            raise DataError(f"{redact(self.url)}: table {self.t_meta} has no manifest; not an lmforge RAG index")
        raw = row[0] if isinstance(row[0], dict) else json.loads(row[0])
        if raw.get("format") != FORMAT or int(raw.get("version", 0)) > VERSION:
            raise DataError(f"{redact(self.url)}: {self.t_meta} is not an lmforge RAG index of version <= {VERSION}")
        return IndexManifest.from_dict(raw)

    def _create(self, manifest: IndexManifest) -> None:
        d = manifest.embedder.dim
        raw = {"format": FORMAT, "version": VERSION, "store": "postgres", **manifest.to_dict()}
        with self.conn.transaction():
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {self.t_meta} (key text PRIMARY KEY, value jsonb)")
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {self.t_docs} (doc_id text PRIMARY KEY, source text, "
                              f"hash text NOT NULL)")
            self.conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.t_chunks} (id bigserial PRIMARY KEY, doc_id text NOT NULL, "
                f"idx int NOT NULL, source text NOT NULL, start int NOT NULL, \"end\" int NOT NULL, page int, "
                f"n_tokens int NOT NULL, text text NOT NULL, meta jsonb NOT NULL, embedding vector({d}) NOT NULL)")
            self.conn.execute(f"CREATE INDEX IF NOT EXISTS {self.t_chunks}_doc ON {self.t_chunks} (doc_id)")
            self.conn.execute(f"CREATE INDEX IF NOT EXISTS {self.t_chunks}_hnsw ON {self.t_chunks} "
                              f"USING hnsw (embedding vector_ip_ops) WITH (m = 16, ef_construction = 64)")
            self.conn.execute(f"INSERT INTO {self.t_meta} VALUES ('manifest', %s)", (json.dumps(raw),))

    # -- reading -------------------------------------------------------------------------------------------------

    def count(self) -> int:
        n = self.conn.execute(f"SELECT COUNT(*) FROM {self.t_chunks}").fetchone()[0]
        return int(n)

    def doc_hashes(self) -> dict[str, str]:
        return dict(self.conn.execute(f"SELECT doc_id, hash FROM {self.t_docs}").fetchall())

    _COLS = 'doc_id, idx, source, start, "end", page, n_tokens, text, meta'

    @staticmethod
    def _chunk(r) -> Chunk:
        return Chunk(doc_id=r[0], index=r[1], source=r[2], start=r[3], end=r[4], page=r[5], n_tokens=r[6], text=r[7],
                     meta=r[8] if isinstance(r[8], dict) else json.loads(r[8]))

    def chunks(self) -> list[Chunk]:
        return [self._chunk(r) for r in self.conn.execute(f"SELECT {self._COLS} FROM {self.t_chunks} ORDER BY id")]

    def search(self, query: np.ndarray, k: int, filter: dict | None = None, exact: bool = False) -> list[Hit]:
        from pgvector import Vector

        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.manifest.embedder.dim:
            raise ConfigError(f"query vector has dim {q.shape[0]} but index {self.collection!r} holds dim "
                              f"{self.manifest.embedder.dim} ({self.manifest.embedder.name})")
        where, params = filter_sql(filter, lambda key: f"(meta ->> '{key}')", placeholder="%s")
        sql = (f"SELECT {self._COLS}, -(embedding <#> %s) AS score FROM {self.t_chunks} WHERE {where} "
               f"ORDER BY embedding <#> %s, id LIMIT %s")
        with self.conn.transaction():
            self.conn.execute("SET LOCAL hnsw.iterative_scan = 'relaxed_order'")
            self.conn.execute(f"SET LOCAL hnsw.ef_search = {max(self.ef_search, int(k))}")
            if exact:
                self.conn.execute("SET LOCAL enable_indexscan = off")
            rows = self.conn.execute(sql, [Vector(q), *params, Vector(q), int(k)]).fetchall()
        hits = [Hit(self._chunk(r[:9]), float(r[9])) for r in rows]
        if not exact:  # relaxed order: rows come nearly sorted; sort the k we got
            hits.sort(key=lambda h: -h.score)
        return hits

    # -- writing -------------------------------------------------------------------------------------------------

    def upsert(self, doc_id: str, source: str, content_hash: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self.manifest.embedder.dim):
            raise ConfigError(f"{doc_id}: {len(chunks)} chunks but vectors of shape {vectors.shape}")
        self.delete([doc_id])
        self.conn.execute(f"INSERT INTO {self.t_docs} VALUES (%s, %s, %s)", (doc_id, source, content_hash))
        with self.conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {self.t_chunks} (doc_id, idx, source, start, \"end\", page, n_tokens, text, meta, "
                f"embedding) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(c.doc_id, c.index, c.source, c.start, c.end, c.page, c.n_tokens, c.text,
                  json.dumps(c.meta, ensure_ascii=False), v) for c, v in zip(chunks, vectors)])

    def delete(self, doc_ids: Sequence[str]) -> None:
        if doc_ids:
            ids = list(doc_ids)
            self.conn.execute(f"DELETE FROM {self.t_chunks} WHERE doc_id = ANY(%s)", (ids,))
            self.conn.execute(f"DELETE FROM {self.t_docs} WHERE doc_id = ANY(%s)", (ids,))

    def commit(self) -> None:
        self.conn.commit()

    def drop(self) -> None:
        """Remove this collection's tables."""
        with self.conn.transaction():
            for t in (self.t_chunks, self.t_docs, self.t_meta):
                self.conn.execute(f"DROP TABLE IF EXISTS {t}")

    def close(self) -> None:
        self.conn.close()
