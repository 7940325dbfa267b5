"""RAG benchmarks: retrieval quality on the SQuAD v2 sample, ingest throughput, and query latency at ~100k chunks.

    .venv/bin/python benchmarks/bench_rag.py                  # all three parts
    .venv/bin/python benchmarks/bench_rag.py --part quality   # or: throughput, latency

quality     Every paragraph of /work/shared/data/squad/squad2-dev-sample.json is a document; each answerable
            question's gold document is its paragraph. recall@1, recall@5 and MRR (over the first 10 hits) for BM25,
            dense (all-MiniLM-L6-v2 run by lmforge's own encoder) and hybrid (RRF).
            The questions are split by passage exactly as the extractive reader of bench_rag_answers.py is trained
            (lmforge.recipes.encoder_finetune.split_by_context, [0.7, 0, 0.3], seed 123): the fusion settings
            (k_rrf, weights, fetch_k) are chosen on the 70% ("val") and reported on the 30% ("test"), which no
            choice saw. The same run embeds every chunk and question with sentence-transformers too and reports how
            far the two encoders' vectors (and dense top-5 lists) differ. Also: at a dense-score threshold, the
            share of unanswerable questions refused and of answerable ones wrongly refused.
throughput  Chunks embedded per second at ingest (lmforge MiniLM, the SQuAD contexts chunked at 128 tokens), 3 runs.
latency     p50/p95 query latency of the embedded store on 100k chunks with SYNTHETIC unit vectors (dim 384, random
            normal), exact search, against faiss-cpu's exact IndexFlatIP on the same vectors in the same run (top-10
            must agree), and the optional HNSW mode (with its recall@10 against exact). Also the full dense query
            (lmforge MiniLM embeds the SQuAD questions, then exact search of the 100k vectors).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.rag import (BM25Retriever, Chunker, DenseRetriever, EmbeddedStore, HybridRetriever,  # noqa: E402
                         IndexManifest, Indexer, Loader, rrf)
from lmforge.rag.chunker import Chunk  # noqa: E402
from lmforge.rag.embedders import LmforgeEmbedder  # noqa: E402

SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "squad2-dev-sample.json"
SPLIT, SPLIT_SEED = (0.7, 0.0, 0.3), 123  # = configs/finetune/minilm-squad.yaml, the reader's split


def load_avg() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def minilm() -> LmforgeEmbedder:
    """all-MiniLM-L6-v2 through lmforge.load (the library's own BERT encoder and WordPiece tokenizer)."""
    return LmforgeEmbedder(None)


class Memo:
    """An embedder that remembers the vectors of texts it has embedded (the questions are asked many times here)."""

    def __init__(self, emb):
        self.emb, self.seen = emb, {}
        for a in ("name", "source", "dim", "normalize", "max_tokens"):
            setattr(self, a, getattr(emb, a))

    def count_tokens(self, text):
        return self.emb.count_tokens(text)

    def embed(self, texts):
        new = [t for t in dict.fromkeys(texts) if t not in self.seen]
        if new:
            self.seen.update(zip(new, self.emb.embed(new)))
        return np.stack([self.seen[t] for t in texts]) if len(texts) else self.emb.embed([])


def squad():
    """(documents, questions); a question is (text, gold doc id, is_impossible, split) with split 'val' or 'test'."""
    from lmforge.recipes.encoder_finetune import split_by_context
    from lmforge.tasks.question_answering import read_squad

    data = json.loads(SQUAD.read_text())
    docs = Loader().load([SQUAD]).documents
    examples = read_squad(data)
    train, _, test = split_by_context(examples, SPLIT, SPLIT_SEED)
    where = {e["id"]: "val" for e in train} | {e["id"]: "test" for e in test}
    qs = []
    for art in data["data"]:
        for i, p in enumerate(art["paragraphs"]):
            for q in p["qas"]:
                qs.append((q["question"], f"{SQUAD}#{art['title']}/{i}", bool(q.get("is_impossible")),
                           where[q["id"]]))
    return docs, qs


def metrics_of(ranked: list[list[str]], golds: list[str]) -> tuple[float, float, float]:
    """recall@1, recall@5 and MRR@10 of ranked doc-id lists against the gold doc ids."""
    r1 = r5 = mrr = 0.0
    for ids, gold in zip(ranked, golds):
        ranks = [i for i, d in enumerate(ids[:10], 1) if d == gold]
        if ranks:
            r1 += ranks[0] == 1
            r5 += ranks[0] <= 5
            mrr += 1 / ranks[0]
    n = len(golds)
    return r1 / n, r5 / n, mrr / n


def fuse(dense: list, bm25: list, k_rrf: float, w_dense: float, fetch_k: int) -> list[str]:
    return [h.chunk.doc_id for h in rrf([dense[:fetch_k], bm25[:fetch_k]], 10, k_rrf, [w_dense, 1.0])]


def margin(hyb, dense, bm25) -> float:
    """Smallest lead of hybrid over the better single retriever, across recall@1, recall@5 and MRR."""
    return min(h - max(d, b) for h, d, b in zip(hyb, dense, bm25))


def encoder_agreement(emb, store, questions: list[str]) -> None:
    """lmforge's MiniLM vectors against sentence-transformers' on the same texts, in this run."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(emb.source, device="cpu")
    texts = [c.text for c in store.chunks()]
    ours_c, ours_q = np.asarray(store.vectors), emb.embed(questions)
    theirs_c = st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    theirs_q = st.encode(questions, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    diff = max(np.abs(ours_c - theirs_c).max(), np.abs(ours_q - theirs_q).max())
    cos = min((ours_c * theirs_c).sum(1).min(), (ours_q * theirs_q).sum(1).min())
    top_ours = np.argsort(-(ours_q @ ours_c.T), axis=1, kind="stable")[:, :5]
    top_theirs = np.argsort(-(theirs_q @ theirs_c.T), axis=1, kind="stable")[:, :5]
    same = np.mean([(a == b).all() for a, b in zip(top_ours, top_theirs)])
    print(f"lmforge vs sentence-transformers {st.__class__.__module__.split('.')[0]} on {len(texts)} chunks + "
          f"{len(questions)} questions: max |diff| {diff:.2e}, min cosine {cos:.6f}, "
          f"identical dense top-5 for {same * 100:.1f}% of questions")


def part_quality(emb, tmp, agreement: bool = True):
    docs, qs = squad()
    chunker = Chunker.for_embedder(emb, max_tokens=min(256, emb.max_tokens), overlap_tokens=32)
    store = EmbeddedStore.create(Path(tmp) / "squad", IndexManifest.new(emb, chunker))
    rep = Indexer(store, emb, chunker).index(docs)
    answerable = [q for q in qs if not q[2]]
    n_val = sum(q[3] == "val" for q in answerable)
    print(f"SQuAD sample: {len(docs)} documents -> {rep.chunks} chunks; {len(answerable)} answerable questions "
          f"({n_val} val, {len(answerable) - n_val} test, split by passage)")
    if agreement:
        encoder_agreement(emb, store, [q[0] for q in qs])
    emb = Memo(emb)
    emb.embed([q[0] for q in qs])  # one batched pass over the questions; every retrieval below reuses it
    dense_r, bm25_r = DenseRetriever(store, emb), BM25Retriever(store)
    n = store.count()
    runs = {q: (dense_r.retrieve(q, n), bm25_r.retrieve(q, n)) for q, *_ in answerable}  # full rankings, once
    subsets = {"val": [q for q in answerable if q[3] == "val"], "test": [q for q in answerable if q[3] == "test"],
               "all": answerable}

    def scores(subset, ranker):
        return metrics_of([ranker(*runs[q]) for q, *_ in subset], [g for _, g, *_ in subset])

    singles = {"bm25": lambda d, b: [h.chunk.doc_id for h in b[:10]],
               "dense": lambda d, b: [h.chunk.doc_id for h in d[:10]],
               "hybrid (RRF k 60, weights 1:1, fetch 50)": lambda d, b: fuse(d, b, 60, 1.0, 50)}
    table = {name: {s: scores(sub, f) for s, sub in subsets.items()} for name, f in singles.items()}
    # Fusion settings, chosen on the validation questions only: the largest worst-case lead over the better single
    # retriever (recall@1, recall@5, MRR), then the best MRR.
    grid = list(itertools.product((1, 2, 5, 10, 20, 30, 60, 100), (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5),
                                  (10, 20, 50, n)))
    val = subsets["val"]
    best, best_key = None, None
    for k_rrf, w, fk in grid:
        m = scores(val, lambda d, b: fuse(d, b, k_rrf, w, fk))
        key = (round(margin(m, table["dense"]["val"], table["bm25"]["val"]), 9), round(m[2], 9))
        if best_key is None or key > best_key:
            best, best_key = (k_rrf, w, fk), key
    k_rrf, w, fk = best
    print(f"fusion chosen on {len(val)} val questions over {len(grid)} settings: k_rrf {k_rrf}, weights dense {w} : "
          f"bm25 1, fetch_k {fk}  (val lead over the better single retriever, worst metric: {best_key[0]:+.3f})")
    chosen = HybridRetriever([dense_r, bm25_r], fetch_k=fk, k_rrf=k_rrf, weights=[w, 1.0])
    table[f"hybrid (chosen: k {k_rrf}, dense {w}, fetch {fk})"] = {
        s: metrics_of([[h.chunk.doc_id for h in chosen.retrieve(q, 10)] for q, *_ in sub], [g for _, g, *_ in sub])
        for s, sub in subsets.items()}
    default = HybridRetriever.default(dense_r, bm25_r)
    same_depth = default.fetch_k == fk or min(default.fetch_k, fk) >= n
    if (default.k_rrf, default.weights) != (k_rrf, [w, 1.0]) or not same_depth:
        print(f"note: HybridRetriever.default is k_rrf {default.k_rrf}, weights {default.weights}, fetch_k "
              f"{default.fetch_k}, not this run's choice")
    for s in ("test", "val", "all"):
        print(f"\n{s} questions ({len(subsets[s])}){' <- reported' if s == 'test' else ''}")
        print(f"  {'retriever':44s} {'recall@1':>9s} {'recall@5':>9s} {'MRR@10':>7s}")
        for name, row in table.items():
            r1, r5, m = row[s]
            print(f"  {name:44s} {r1:9.3f} {r5:9.3f} {m:7.3f}")
    # Refusal by retrieval threshold: best dense cosine below t -> "not found".
    best_scores = [(dense_r.retrieve(q, 1)[0].score, imp) for q, _, imp, _ in qs]
    print()
    for t in (0.3, 0.4, 0.5, 0.6):
        imp = [s < t for s, i in best_scores if i]
        ans = [s < t for s, i in best_scores if not i]
        print(f"threshold {t:.1f}: refused {np.mean(imp):.3f} of {len(imp)} unanswerable, "
              f"{np.mean(ans):.3f} of {len(ans)} answerable (wrongly)")


def part_throughput(emb, tmp):
    docs, _ = squad()
    chunker = Chunker.for_embedder(emb, max_tokens=128, overlap_tokens=16)
    rates = []
    for run in range(3):
        store = EmbeddedStore.create(Path(tmp) / f"tp{run}", IndexManifest.new(emb, chunker))
        rep = Indexer(store, emb, chunker).index(docs)
        rates.append(rep.chunks_per_second)
    print(f"ingest: {rep.chunks} chunks of <=128 tokens, {statistics.median(rates):.1f} chunks/s median "
          f"(runs: {', '.join(f'{r:.1f}' for r in rates)}); {load_avg()}")


def part_latency(tmp, emb=None, n=100_000, dim=384, n_queries=200):
    import faiss

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

    class Fixed:  # hands the synthetic vectors to the store through the normal ingest path
        name, source, dim, normalize, max_tokens = "synthetic-384", "synthetic", 384, True, 512

        def count_tokens(self, t):
            return 1

    manifest = IndexManifest.new(Fixed(), Chunker(lambda t: 1, 512, 0))
    store = EmbeddedStore.create(Path(tmp) / "lat", manifest)
    t0 = time.perf_counter()
    per_doc = 100
    for d in range(n // per_doc):
        chunks = [Chunk(doc_id=f"d{d}", source=f"s{d}", index=i, start=0, end=10, text=f"chunk {d}-{i}")
                  for i in range(per_doc)]
        store.upsert(f"d{d}", f"s{d}", "h", chunks, vecs[d * per_doc:(d + 1) * per_doc])
    store.commit()
    print(f"latency index: {store.count()} chunks (synthetic vectors), commit {time.perf_counter() - t0:.1f} s")
    qs = rng.standard_normal((n_queries, dim)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(dim)
    flat.add(vecs)

    def timed_each(fn, items):
        out, ts = [], []
        for q in items:
            t = time.perf_counter()
            out.append(fn(q))
            ts.append((time.perf_counter() - t) * 1000)
        return out, np.percentile(ts, 50), np.percentile(ts, 95)

    def timed(fn):
        return timed_each(fn, qs)

    ours, p50, p95 = timed(lambda q: [int(h.chunk.doc_id[1:]) * per_doc + h.chunk.index for h in store.search(q, 10)])
    theirs, f50, f95 = timed(lambda q: flat.search(q[None], 10)[1][0].tolist())
    agree = np.mean([a == b for a, b in zip(ours, theirs)])
    print(f"exact search, ours (numpy + SQLite rows): p50 {p50:.2f} ms, p95 {p95:.2f} ms; {load_avg()}")
    print(f"exact search, faiss IndexFlatIP (ids only): p50 {f50:.2f} ms, p95 {f95:.2f} ms")
    print(f"top-10 identical between the two on {agree * 100:.1f}% of {n_queries} queries")
    if emb is not None:  # the whole dense query: lmforge MiniLM embeds a real question, then exact search
        _, sq = squad()
        texts = [q for q, *_ in sq[:n_queries]]
        emb.embed(texts[:8])  # warm-up
        _, e50, e95 = timed_each(lambda q: store.search(emb.embed([q])[0], 10), texts)
        print(f"dense query = lmforge MiniLM embeds the question + exact search ({len(texts)} SQuAD questions): "
              f"p50 {e50:.2f} ms, p95 {e95:.2f} ms; {load_avg()}")
    hnsw_store = EmbeddedStore.open(Path(tmp) / "lat", search="hnsw")
    t = time.perf_counter()
    hnsw_store._hnsw_index()
    build = time.perf_counter() - t
    approx, h50, h95 = timed(lambda q: [int(h.chunk.doc_id[1:]) * per_doc + h.chunk.index
                                        for h in hnsw_store.search(q, 10, exact=False)])
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, theirs)])
    print(f"optional HNSW (faiss, M=32, efSearch=128; build {build:.1f} s): p50 {h50:.2f} ms, p95 {h95:.2f} ms, "
          f"recall@10 vs exact {recall:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["quality", "throughput", "latency", "all"], default="all")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own); 1 is much faster on a box other jobs load")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}")
    import torch

    print(f"start: {load_avg()}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        if not SQUAD.exists():
            sys.exit(f"SQuAD sample not found at {SQUAD}")
        emb = minilm()
        print(f"embedder: all-MiniLM-L6-v2 via lmforge.load ({emb.source}); {load_avg()}")
        if args.part in ("quality", "all"):
            part_quality(emb, tmp)
        if args.part in ("throughput", "all"):
            part_throughput(emb, tmp)
        if args.part in ("latency", "all"):
            part_latency(tmp, emb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
