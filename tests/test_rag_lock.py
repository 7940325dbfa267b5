"""The embedded store's writer lock, with real processes: one writer at a time, no lost update, readers never wait."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lmforge.rag import Chunker, Document, EmbeddedStore, HashingEmbedder, IndexManifest, Indexer
from lmforge.rag.store import LOCK_FILE, IndexBusyError

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

# argv: index dir, first doc number, number of docs, commit_every, "hold" (wait for a line on stdin, lock held)
WRITER = textwrap.dedent("""
    import sys
    from lmforge.rag import Chunker, Document, EmbeddedStore, HashingEmbedder, IndexManifest, Indexer
    emb = HashingEmbedder(dim=64)
    chunker = Chunker.for_embedder(emb, max_tokens=16, overlap_tokens=0)
    store = EmbeddedStore.create(sys.argv[1], IndexManifest.new(emb, chunker), lock_timeout=60)
    start, n = int(sys.argv[2]), int(sys.argv[3])
    docs = [Document(id=f"doc{i}", text=f"Document {i} says word{i}. " * 6, source=str(i))
            for i in range(start, start + n)]
    print("locked", flush=True)
    if sys.argv[5] == "hold":
        sys.stdin.readline()
    Indexer(store, emb, chunker, commit_every=int(sys.argv[4])).index(docs)
    store.close()
    print("done", flush=True)
""")


def _emb_chunker():
    emb = HashingEmbedder(dim=64)
    return emb, Chunker.for_embedder(emb, max_tokens=16, overlap_tokens=0)


@pytest.fixture()
def writer(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = []

    def start(idx, first, n, commit_every=1000, hold=True):
        p = subprocess.Popen([sys.executable, str(script), str(idx), str(first), str(n), str(commit_every),
                              "hold" if hold else "go"], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lmforge", "rag", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _docs_dir(tmp_path, name, ids):
    d = tmp_path / name
    d.mkdir()
    for i in ids:
        (d / f"b{i}.txt").write_text(f"File {i} is about walrus{i}. " * 4)
    return d


def _doc_ids(idx) -> set[str]:
    store = EmbeddedStore.open(idx)
    try:
        assert store.count() == len(store.chunks()) == store.vectors.shape[0]
        return set(store.doc_hashes())
    finally:
        store.close()


def test_second_writer_fails_at_once_naming_the_first(tmp_path, writer):
    idx = tmp_path / "idx"
    a = writer(idx, 0, 5)
    assert a.stdout.readline().strip() == "locked"
    r = _cli("index", str(_docs_dir(tmp_path, "b", range(3))), "--index", str(idx), "--embedder", "hashing:64",
             "--chunk-tokens", "16", "--overlap", "0", "--lock-timeout", "0")
    assert r.returncode == 1
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("error: ") and "another process is writing this index" in err
    assert f"pid {a.pid} " in err and "writer.py" in err
    a.stdin.write("go\n")
    a.stdin.flush()
    assert a.stdout.readline().strip() == "done" and a.wait(timeout=60) == 0
    assert _doc_ids(idx) == {f"doc{i}" for i in range(5)}  # the refused writer changed nothing
    assert (idx / LOCK_FILE).read_text() == ""  # released: nobody named in it


def test_second_writer_waits_then_builds_on_the_first(tmp_path, writer):
    idx = tmp_path / "idx"
    a = writer(idx, 0, 5)
    assert a.stdout.readline().strip() == "locked"
    b = subprocess.Popen([sys.executable, "-m", "lmforge", "rag", "index", str(_docs_dir(tmp_path, "b", range(3))),
                          "--index", str(idx), "--embedder", "hashing:64", "--chunk-tokens", "16", "--overlap", "0",
                          "--lock-timeout", "60"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [b.stderr.readline()]
        while "waiting" not in lines[-1] and lines[-1] and len(lines) < 50:  # skip any import warnings
            lines.append(b.stderr.readline())
        assert "waiting up to 60 s for the writer" in lines[-1] and f"pid {a.pid} " in lines[-1], lines
        # Readers never wait for the lock: an ingest holds it, and a query still answers at once.
        t = time.perf_counter()
        assert _doc_ids(idx) == set()
        assert time.perf_counter() - t < 5
        assert b.poll() is None  # still waiting
        a.stdin.write("go\n")
        a.stdin.flush()
        assert a.wait(timeout=60) == 0
        out, err = b.communicate(timeout=120)
        assert b.returncode == 0, err
    finally:
        if b.poll() is None:
            b.kill()
    ids = _doc_ids(idx)
    assert {f"doc{i}" for i in range(5)} <= ids  # the first writer's documents survived the second's commit
    assert sum(i.endswith(".txt") for i in ids) == 3 and len(ids) == 8


def test_two_writers_at_once_lose_no_update(tmp_path, writer):
    """Two ingests started together, committing every few chunks: all documents of both are in the index."""
    idx = tmp_path / "idx"
    emb, chunker = _emb_chunker()
    EmbeddedStore.create(idx, IndexManifest.new(emb, chunker)).close()
    a, b = writer(idx, 0, 60, commit_every=5, hold=False), writer(idx, 1000, 60, commit_every=5, hold=False)
    for p in (a, b):
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    assert _doc_ids(idx) == {f"doc{i}" for i in list(range(60)) + list(range(1000, 1060))}
    store = EmbeddedStore.open(idx)
    assert sorted(p.name for p in idx.iterdir()) == sorted(["index.json", LOCK_FILE, store.raw["vectors"],
                                                            store.raw["meta"]])


def test_lock_in_one_process_and_begin_write_moves_to_the_newest_generation(tmp_path):
    emb, chunker = _emb_chunker()
    idx = tmp_path / "idx"
    reader = None
    with EmbeddedStore.create(idx, IndexManifest.new(emb, chunker)) as first:
        assert first.writing
        with pytest.raises(IndexBusyError, match=f"pid {os.getpid()} "):
            EmbeddedStore.open(idx, writer=True, lock_timeout=0.2)
        reader = EmbeddedStore.open(idx)  # a reader opens while the writer holds the lock
        assert not reader.writing
        Indexer(first, emb, chunker).index([Document(id="a", text="alpha beta gamma", source="a")])
    # `reader` saw generation g; the writer moved on. Its first write takes the lock and builds on the newest.
    assert reader.doc_hashes() == {}
    reader.upsert("b", "b", "h", [], emb.embed([])[:0])
    assert reader.writing and set(reader.doc_hashes()) == {"a"}
    reader.commit()
    reader.close()
    assert _doc_ids(idx) == {"a", "b"}
    assert not EmbeddedStore.open(idx).writing


def test_lock_timeout_flag_is_checked(tmp_path):
    r = _cli("index", str(tmp_path), "--index", str(tmp_path / "idx"), "--embedder", "hashing",
             "--lock-timeout", "-1")
    assert r.returncode == 1 and "--lock-timeout must be >= 0" in r.stderr
