"""Opening an index by where it lives: a directory (embedded store) or a PostgreSQL URL (pgvector store).

`open_store(location)` opens an existing index; `open_store(location, manifest=...)` creates it when missing.
A PostgreSQL index can also be reached through a directory: `lmforge rag index --index DIR --store postgres://...`
writes DIR/index.json with `"store": "postgres"` and the URL without its password (give that in $PGPASSWORD or
~/.pgpass), so later commands only need `--index DIR`.

`open_index(location, embedder=None)` also rebuilds the embedder the index records (or checks the one given), and
returns ready retrievers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmforge.errors import DataError
from lmforge.utils import atomic_write_json
from lmforge.rag.embedders import Embedder, info_of, make_embedder
from lmforge.rag.retrievers import BM25Retriever, DenseRetriever, HybridRetriever
from lmforge.rag.store import FORMAT, LOCK_TIMEOUT, VERSION, EmbeddedStore, IndexManifest, Store


def is_pg_url(location: str) -> bool:
    return str(location).startswith(("postgres://", "postgresql://"))


def _pointer(path: Path) -> dict | None:
    f = path / "index.json"
    if not f.is_file():
        return None
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) and raw.get("store") == "postgres" else None


def open_store(location: str | os.PathLike, manifest: IndexManifest | None = None, store_url: str | None = None,
               search: str = "exact", writer: bool = False, lock_timeout: float = LOCK_TIMEOUT,
               on_wait: Callable[[str], None] | None = None) -> Store:
    """Open (or, given `manifest`, create) the index at a directory, optionally backed by PostgreSQL `store_url`.

    An embedded index opened to write (`manifest` given, or `writer=True`) holds its writer lock; a second writer
    waits up to `lock_timeout` seconds for it (telling `on_wait`), then fails with a one-line IndexBusyError."""
    location = str(location)
    if is_pg_url(location):
        from lmforge.rag.pgstore import PgVectorStore

        return PgVectorStore(location, manifest=manifest)
    path = Path(location)
    pointer = _pointer(path)
    if store_url and store_url not in ("sqlite", "embedded") or pointer:
        from lmforge.rag.pgstore import PgVectorStore, redact

        url = store_url if store_url and is_pg_url(store_url) else (pointer or {}).get("url")
        if not url or not is_pg_url(url):
            raise DataError(f"--store must be 'sqlite' or a postgres:// URL, got {store_url!r}")
        collection = (pointer or {}).get("collection") or path.resolve().name
        store = PgVectorStore(url, manifest=manifest, collection=collection)
        if pointer is None:
            if path.exists() and any(path.iterdir()):
                raise DataError(f"{path}: exists, is not empty and is not an lmforge RAG index")
            atomic_write_json(path / "index.json", {"format": FORMAT, "version": VERSION, "store": "postgres",
                                                    "url": redact(url), "collection": collection})
        return store
    if manifest is None:
        return EmbeddedStore.open(path, search=search, writer=writer, lock_timeout=lock_timeout, on_wait=on_wait)
    return EmbeddedStore.create(path, manifest, search=search, lock_timeout=lock_timeout, on_wait=on_wait)


@dataclass
class OpenIndex:
    store: Store
    embedder: Embedder

    def retriever(self, kind: str = "hybrid"):
        dense = DenseRetriever(self.store, self.embedder)
        if kind == "dense":
            return dense
        bm25 = BM25Retriever(self.store)
        if kind == "bm25":
            return bm25
        if kind == "hybrid":
            return HybridRetriever.default(dense, bm25)
        raise DataError(f"retriever must be dense, bm25 or hybrid, got {kind!r}")


def open_index(location: str | os.PathLike, embedder: Embedder | str | None = None, api_key: str | None = None,
               search: str = "exact") -> OpenIndex:
    store = open_store(location, search=search)
    if embedder is None or isinstance(embedder, str):
        embedder = make_embedder(embedder or store.manifest.embedder_source, api_key=api_key)
    store.manifest.embedder.check_same(info_of(embedder), f"index {location}")
    return OpenIndex(store, embedder)
