"""Retrievers: a question -> the k chunks most likely to hold its answer.

- `DenseRetriever`: embed the question with the index's own embedder and ask the store for the nearest chunk
  vectors. Finds paraphrases ("When did the Normans reach Italy?" ~ "... arrived in the Mezzogiorno in 999").
- `BM25Retriever`: lexical scores (bm25.py) over the same chunks. Finds exact rare words, names and numbers.
- `HybridRetriever`: reciprocal-rank fusion (Cormack, Clarke & Buettcher 2009) of several retrievers' rankings:

      rrf(d) = sum over retrievers r of w_r / (k_rrf + rank_r(d))       rank from 1; a retriever that did not
                                                                         return d among its fetch_k adds nothing

  RRF uses ranks only, so it needs no calibration between a cosine in [-1, 1] and an unbounded BM25 score, and a
  chunk ranked high by either retriever rises. It is the fusion Elasticsearch, OpenSearch and Vespa ship (with
  per-retriever weights w_r in Elasticsearch's and Vespa's). Three knobs:
  * `k_rrf` sets how much the top ranks dominate: with k_rrf = 60 (the paper's value, tuned on TREC runs of 1000
    documents) ranks 1 and 2 score 1/61 and 1/62, nearly the same, so the fused order is decided by agreement
    between the lists; a small k_rrf (1/2 vs 1/3) lets one retriever's confident first place win.
  * the weights w_r say which retriever to trust when they disagree;
  * `fetch_k` is how deep each list is read.
  They are corpus-dependent: set them on validation questions, never on the ones you report (benchmarks/bench_rag.py
  does this on SQuAD). `HybridRetriever.default` uses what that validation chose: k_rrf = 30, BM25 weight 1,
  dense 0.2, fetch_k 20. With the paper's (60, 1:1) hybrid lost to BM25 alone at recall@1 there: MiniLM is weaker
  than BM25 on SQuAD questions, which reuse the passage's words, so on a tie it should defer to BM25 and only break
  BM25's near-ties (its ranks 1 and 2 differ by 1/31 - 1/32 = 0.001; dense's first place adds 0.2/31 = 0.006).
- `RerankingRetriever`: fetch many candidates cheaply, then re-order them with a cross-encoder, a model that reads
  question and passage *together* (more accurate than comparing two separate vectors, too slow for a whole corpus).
  `CrossEncoderReranker` runs one with lmforge's own encoder (no transformers needed).

All return `Hit`s (store.py), best first. `filter` restricts results to chunks whose metadata match
(e.g. {"source": "/docs/a.md"} or {"title": "Normans"}).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from lmforge.errors import ConfigError
from lmforge.rag.bm25 import BM25, bm25_tokenize
from lmforge.rag.embedders import Embedder, info_of
from lmforge.rag.store import Hit, Store, check_query, top_k


class Retriever(Protocol):
    def retrieve(self, query: str, k: int = 5, filter: dict | None = None) -> list[Hit]: ...


def _matches(chunk, filter: dict | None) -> bool:
    if not filter:
        return True
    for key, value in filter.items():
        have = getattr(chunk, key) if key in ("doc_id", "source", "page") else chunk.meta.get(key)
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        if have not in values and str(have) not in [str(v) for v in values]:
            return False
    return True


class DenseRetriever:
    """Nearest chunk vectors to the embedded question. The embedder must be the one the index was built with."""

    def __init__(self, store: Store, embedder: Embedder, exact: bool | None = None):
        check_query(store.manifest, info_of(embedder), "the index")
        self.store, self.embedder, self.exact = store, embedder, exact

    def retrieve(self, query: str, k: int = 5, filter: dict | None = None) -> list[Hit]:
        q = self.embedder.embed([query])[0]
        if self.exact is None:  # the store's default: exact for the embedded store, HNSW for pgvector
            return self.store.search(q, k, filter=filter)
        return self.store.search(q, k, filter=filter, exact=self.exact)


class BM25Retriever:
    """BM25 over the store's chunks (built once, on first use, from the chunk texts)."""

    def __init__(self, store_or_chunks, k1: float = 1.5, b: float = 0.75, idf: str = "lucene", tokenize=bm25_tokenize):
        self.source, self.tokenize, self.params = store_or_chunks, tokenize, dict(k1=k1, b=b, idf=idf)
        self._bm25: BM25 | None = None

    def _index(self) -> BM25:
        if self._bm25 is None:
            src = self.source
            self.chunks = list(src.chunks()) if hasattr(src, "chunks") else list(src)
            self._bm25 = BM25([self.tokenize(c.text) for c in self.chunks], **self.params)
        return self._bm25

    def retrieve(self, query: str, k: int = 5, filter: dict | None = None) -> list[Hit]:
        bm = self._index()
        scores = bm.scores(self.tokenize(query))
        if filter:
            allowed = np.asarray([_matches(c, filter) for c in self.chunks], dtype=bool)
            scores = np.where(allowed, scores, -np.inf)
        return [Hit(self.chunks[i], float(scores[i])) for i in top_k(scores, k)
                if scores[i] > 0 and np.isfinite(scores[i])]


def rrf(rankings: Sequence[Sequence[Hit]], k: int, k_rrf: float = 60, weights: Sequence[float] | None = None
        ) -> list[Hit]:
    """Fuse rankings by reciprocal rank: a chunk 1st in one list and 3rd in another scores 1/61 + 1/63 (weights 1).

    `weights[i]` multiplies list i's contributions. Ties go to the chunk that comes first by (doc_id, index).
    """
    weights = [1.0] * len(rankings) if weights is None else [float(w) for w in weights]
    if len(weights) != len(rankings):
        raise ConfigError(f"rrf: {len(rankings)} rankings but {len(weights)} weights")
    fused: dict[tuple, float] = {}
    first: dict[tuple, Hit] = {}
    for ranking, w in zip(rankings, weights):
        for rank, hit in enumerate(ranking, 1):
            fused[hit.key] = fused.get(hit.key, 0.0) + w / (k_rrf + rank)
            first.setdefault(hit.key, hit)
    order = sorted(fused, key=lambda key: (-fused[key], key))
    return [Hit(first[key].chunk, fused[key]) for key in order[:k]]


class HybridRetriever:
    """Reciprocal-rank fusion of several retrievers (default: dense + BM25), each asked for `fetch_k` hits.

    `weights`: one per retriever (default: all 1). `HybridRetriever.default(dense, bm25)` uses the settings the
    SQuAD validation questions chose (see the module docstring).
    """

    DEFAULT_K_RRF, DEFAULT_WEIGHTS, DEFAULT_FETCH_K = 30.0, (0.2, 1.0), 20  # (dense, bm25); see bench_rag.py

    def __init__(self, retrievers: Sequence[Retriever], fetch_k: int = 50, k_rrf: float = 60,
                 weights: Sequence[float] | None = None):
        if not retrievers:
            raise ConfigError("HybridRetriever needs at least one retriever")
        if k_rrf < 0 or int(fetch_k) < 1:
            raise ConfigError(f"HybridRetriever needs k_rrf >= 0 and fetch_k >= 1, got {k_rrf} and {fetch_k}")
        if weights is not None and (len(weights) != len(retrievers) or any(w < 0 for w in weights)):
            raise ConfigError(f"HybridRetriever needs one non-negative weight per retriever, got {list(weights)}")
        self.retrievers, self.fetch_k, self.k_rrf = list(retrievers), int(fetch_k), float(k_rrf)
        self.weights = None if weights is None else [float(w) for w in weights]

    @classmethod
    def default(cls, dense: Retriever, bm25: Retriever) -> "HybridRetriever":
        return cls([dense, bm25], fetch_k=cls.DEFAULT_FETCH_K, k_rrf=cls.DEFAULT_K_RRF, weights=cls.DEFAULT_WEIGHTS)

    def retrieve(self, query: str, k: int = 5, filter: dict | None = None) -> list[Hit]:
        rankings = [r.retrieve(query, max(k, self.fetch_k), filter=filter) for r in self.retrievers]
        return rrf(rankings, k, self.k_rrf, self.weights)


class Reranker(Protocol):
    def score(self, query: str, passages: Sequence[str]) -> list[float]: ...


class CrossEncoderReranker:
    """A cross-encoder directory (a BertForSequenceClassification, e.g. cross-encoder/ms-marco-MiniLM-L-6-v2) run
    by lmforge's own encoder: `lmforge.load(dir)` gives an EncoderLM, and each (query, passage) pair is read as one
    input "[CLS] query [SEP] passage [SEP]" by `lmforge.tasks.text_classification`.

    The score is the model's raw relevance logit for the pair (no sigmoid; sentence-transformers' CrossEncoder
    gives the same numbers); higher is more relevant. A head with several labels is scored by its last label's
    logit (the "relevant" class of a 2-way classifier).
    """

    def __init__(self, model_dir: str, batch_size: int = 32):
        import lmforge  # lmforge.rag itself stays free of torch until a model is used (as LmforgeEmbedder)
        from lmforge.tasks.common import labels_of, task_model

        self.lm = lmforge.load(model_dir)
        if not getattr(self.lm, "is_encoder", False):
            raise ConfigError(f"{model_dir}: a cross-encoder must be an encoder with a sequence-classification head, "
                              f"not a decoder")
        self.model = task_model(self.lm, "sequence_classification")  # one-line error when there is no such head
        head = self.model.head
        n_labels = (head.classifier if hasattr(head, "classifier") else head.out_proj).out_features
        self.label = (labels_of(self.lm) or [f"LABEL_{i}" for i in range(n_labels)])[n_labels - 1]
        self.batch_size = int(batch_size)

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        from lmforge.tasks.text_classification import text_classification

        if not passages:
            return []
        results = text_classification(self.lm, [query] * len(passages), list(passages), top_k=None,
                                      function_to_apply="none", batch_size=self.batch_size, model=self.model)
        return [next(r["score"] for r in ranked if r["label"] == self.label) for ranked in results]


class RerankingRetriever:
    """Candidates from `base` (fetch_k of them), re-ordered by `reranker` scores."""

    def __init__(self, base: Retriever, reranker: Reranker, fetch_k: int = 30):
        self.base, self.reranker, self.fetch_k = base, reranker, int(fetch_k)

    def retrieve(self, query: str, k: int = 5, filter: dict | None = None) -> list[Hit]:
        cands = self.base.retrieve(query, max(k, self.fetch_k), filter=filter)
        if not cands:
            return []
        scores = self.reranker.score(query, [h.chunk.text for h in cands])
        order = sorted(range(len(cands)), key=lambda i: (-scores[i], i))
        return [Hit(cands[i].chunk, float(scores[i])) for i in order[:k]]
