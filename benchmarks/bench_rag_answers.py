"""End-to-end RAG on the SQuAD v2 sample: are the *answers* right, and are unanswerable questions refused?

    .venv/bin/python benchmarks/bench_rag_answers.py --reader runs/minilm-qa --threads 1
    .venv/bin/python benchmarks/bench_rag_answers.py --reader runs/minilm-qa --generator-url http://127.0.0.1:8000/v1#m

Questions: those of the sample's passages that the reader did NOT train on: the 30% ("test") part of
lmforge.recipes.encoder_finetune.split_by_context([0.7, 0, 0.3], seed 123), answerable and unanswerable alike. The
script re-creates the reader's own split from its finetune_config.json (split, split_seed, same SQuAD file) and
stops if any of its training passages would be scored ([0.6, 0.1, 0.3] with seed 123 has the same test part). Retrieval always searches all 87 passages (the index holds the training passages too, as a real
corpus would), with lmforge's MiniLM and HybridRetriever.default (the fusion chosen on the other 70%, bench_rag.py).

Scored the official SQuAD v2 way (lmforge.tasks.question_answering.squad_v2_metrics): exact match and token F1 of
the answer against the gold answers; for an unanswerable question only "" is right. A refusal (the pipeline says it
found no answer) is the prediction "". So NoAns exact = the rate of correct refusals, and 100 - HasAns-with-"" is
how often an answerable question was wrongly refused.

Rows:
  reader, gold passage       the reader alone on the question's own passage: the ceiling retrieval can reach
  reader, RAG top-k          Answerer(hybrid retriever, reader=QAReader): the best span over the k retrieved
                             chunks; refused when the reader says "no answer" in every one of them
  best span, ...             the same reader forced to answer (null score ignored): its HasAns F1 is the quality
                             of its spans, which a reader that mostly says "no answer" hides
  generator, RAG top-k       Answerer(hybrid retriever, generator): the grounded prompt with numbered sources; the
                             answer with its [n] citations removed; refused when it says it does not know. Offline
                             the only generator is llama2.c's stories260K (a 260K-parameter TinyStories model, 512
                             tokens of context, prompt cut to its last 511 tokens): it measures the pipeline, not a
                             useful model. Point --generator-url at a real instruction model for a real figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_rag import SPLIT, SPLIT_SEED, SQUAD, load_avg, minilm  # noqa: E402

from lmforge.rag import (Answerer, BM25Retriever, Chunker, DenseRetriever, EmbeddedStore, HybridRetriever,  # noqa: E402
                         IndexManifest, Indexer, LmforgeGenerator, Loader, OpenAIGenerator)
from lmforge.rag.answer import QAReader  # noqa: E402
from lmforge.recipes.encoder_finetune import split_by_context  # noqa: E402
from lmforge.tasks.question_answering import question_answering, read_squad, squad_v2_metrics  # noqa: E402

STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "stories260K" / "stories260K.bin"
_CITE = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")


def reader_settings(path: Path, examples: list[dict], scored: list[dict]) -> dict:
    """The reader's finetune_config.json, checked: it trained on this SQuAD file, split by passage, and none of the
    passages it trained on holds a question scored here (its own split is re-created from its split and seed)."""
    found = sorted(path.rglob("finetune_config.json"), key=lambda p: len(p.parts))
    if not found:
        sys.exit(f"{path}: no finetune_config.json; cannot check which passages the reader trained on")
    cfg = json.loads(found[0].read_text())
    if Path(str(cfg.get("data"))).name != SQUAD.name or cfg.get("val_data") or cfg.get("test_data"):
        sys.exit(f"{path}: the reader trained on {cfg.get('data')} (val/test files {cfg.get('val_data')}, "
                 f"{cfg.get('test_data')}), not on {SQUAD.name} split by passage; cannot tell which questions it saw")
    try:
        trained = split_by_context(examples, [float(x) for x in cfg["split"]], int(cfg["split_seed"]))[0]
    except (KeyError, TypeError, ValueError) as e:
        sys.exit(f"{path}: finetune_config.json has no usable split/split_seed ({e})")
    seen = {e["context"] for e in trained} & {e["context"] for e in scored}
    if seen:
        sys.exit(f"{path}: the reader trained on {len(seen)} of the passages scored here (its split {cfg['split']} "
                 f"seed {cfg['split_seed']}); this benchmark scores split {list(SPLIT)} seed {SPLIT_SEED}'s test part")
    print(f"reader {path}: trained on split {cfg['split']} seed {cfg['split_seed']} of {cfg['data']} "
          f"(max_seq_len {cfg.get('max_seq_len')}, doc_stride {cfg.get('doc_stride')}, epochs {cfg.get('epochs')}, "
          f"lr {cfg.get('lr')}); none of its {len({e['context'] for e in trained})} training passages is scored "
          f"here - verified")
    return cfg


def row(name: str, examples: list[dict], preds: dict[str, str], seconds: float, extra: str = "") -> dict:
    m = squad_v2_metrics(examples, preds)
    has = [e for e in examples if e["answers"] and not e["is_impossible"]]
    wrongly = sum(preds[e["id"]] == "" for e in has) / max(1, len(has))
    print(f"{name:34s} EM {m['exact']:5.1f}  F1 {m['f1']:5.1f} | HasAns EM {m.get('HasAns_exact', 0):5.1f} "
          f"F1 {m.get('HasAns_f1', 0):5.1f} | correct refusals {m.get('NoAns_exact', 0):5.1f}% of "
          f"{m.get('NoAns_total', 0)} | answerable refused {100 * wrongly:5.1f}% | {seconds:6.1f} s{extra}")
    return dict(m, answerable_refused=100 * wrongly, seconds=seconds)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reader", default="runs/minilm-qa", help="encoder dir with a QA head (lmforge finetune qa)")
    ap.add_argument("--generator", default=str(STORIES), help="lmforge model for the generator rows")
    ap.add_argument("--generator-url", default=None, help="instead: an OpenAI-compatible endpoint, URL#MODEL")
    ap.add_argument("--generator-k", type=int, default=1, help="sources in the generator's prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("-k", type=int, default=3, help="chunks the reader reads")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test questions (quick runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"start: {load_avg()}; torch threads {torch.get_num_threads()}; {time.strftime('%Y-%m-%d %H:%M UTC')}")
    reader_dir = Path(args.reader)
    if not reader_dir.exists():
        sys.exit(f"{reader_dir}: no such reader; train one with `lmforge finetune qa <minilm dir> --config "
                 f"configs/finetune/minilm-squad.yaml --data {SQUAD} --out {reader_dir}`")
    examples = read_squad(json.loads(SQUAD.read_text()))
    _, _, test = split_by_context(examples, SPLIT, SPLIT_SEED)
    test = test[:args.limit] if args.limit else test
    cfg = reader_settings(reader_dir, examples, test)
    n_has = sum(not e["is_impossible"] for e in test)
    print(f"questions scored: {len(test)} of {len(examples)} ({n_has} answerable, {len(test) - n_has} not), from "
          f"{len({e['context'] for e in test})} passages the reader never saw")
    results = {"load_start": load_avg(), "n": len(test)}

    emb = minilm()
    with tempfile.TemporaryDirectory() as tmp:
        chunker = Chunker.for_embedder(emb, max_tokens=min(256, emb.max_tokens), overlap_tokens=32)
        store = EmbeddedStore.create(Path(tmp) / "squad", IndexManifest.new(emb, chunker))
        Indexer(store, emb, chunker).index(Loader().load([SQUAD]).documents)
        retriever = HybridRetriever.default(DenseRetriever(store, emb), BM25Retriever(store))
        print(f"index: {store.count()} chunks of {store.manifest.chunker.max_tokens} tokens; retriever: hybrid "
              f"(k_rrf {retriever.k_rrf:g}, weights {retriever.weights}, fetch_k {retriever.fetch_k})")
        has = [e for e in test if not e["is_impossible"]]
        hit = {k: sum(any(h.chunk.text in e["context"] or e["context"] in h.chunk.text
                          for h in retriever.retrieve(e["question"], k)) for e in has) / len(has) for k in (1, args.k)}
        print(f"gold passage retrieved for answerable test questions: top-1 {hit[1]:.3f}, top-{args.k} "
              f"{hit[args.k]:.3f}\n")

        reader = QAReader(str(reader_dir), max_seq_len=int(cfg.get("max_seq_len", 384)),
                          doc_stride=int(cfg.get("doc_stride", 128)), max_answer_len=int(cfg.get("max_answer_len", 30)))
        t = time.perf_counter()
        gold = question_answering(reader.lm, [e["question"] for e in test], [e["context"] for e in test],
                                  model=reader.model, **reader.options)
        results["reader_gold"] = row("reader, gold passage", test, {e["id"]: g["answer"].strip()
                                                                    for e, g in zip(test, gold)},
                                     time.perf_counter() - t)
        for k in sorted({1, args.k}):
            t = time.perf_counter()
            answerer = Answerer(retriever, reader=reader, k=k)
            preds = {}
            for e in test:
                a = answerer.ask(e["question"])
                preds[e["id"]] = "" if a.refused else _CITE.sub("", a.text).strip()
            results[f"reader_rag_top{k}"] = row(f"reader, RAG top-{k}", test, preds, time.perf_counter() - t)
        # The same reader made to always answer (its best span, the null score ignored): HasAns F1 then measures
        # span quality alone, which a reader that says "no answer" too often hides.
        spans = QAReader(reader.lm, **dict(reader.options, handle_impossible_answer=False))
        t = time.perf_counter()
        best = question_answering(spans.lm, [e["question"] for e in test], [e["context"] for e in test],
                                  model=spans.model, **spans.options)
        results["reader_gold_span"] = row("best span, gold passage", test, {e["id"]: g["answer"].strip()
                                                                        for e, g in zip(test, best)},
                                          time.perf_counter() - t)
        t = time.perf_counter()
        answerer = Answerer(retriever, reader=spans, k=args.k)
        preds = {e["id"]: _CITE.sub("", answerer.ask(e["question"]).text).strip() for e in test}
        results[f"reader_span_rag_top{args.k}"] = row(f"best span, RAG top-{args.k}", test, preds,
                                                      time.perf_counter() - t)

        if args.generator_url:
            url, _, model = args.generator_url.partition("#")
            generator, gname = OpenAIGenerator(url, model or "default", max_tokens=args.max_new_tokens), url
        else:
            generator = LmforgeGenerator(args.generator, max_new_tokens=args.max_new_tokens, truncate=True)
            gname = Path(args.generator).name
        t = time.perf_counter()
        answerer = Answerer(retriever, generator=generator, k=args.generator_k)
        preds, cited, dropped, samples = {}, 0, 0, []
        for e in test:
            a = answerer.ask(e["question"])
            preds[e["id"]] = "" if a.refused else _CITE.sub("", a.text).strip()
            cited += bool(a.citations)
            dropped += len(a.dropped)
            if len(samples) < 3:
                samples.append((e["question"], a.text[:100]))
        results["generator"] = row(f"generator {gname}, RAG top-{args.generator_k}", test, preds,
                                   time.perf_counter() - t,
                                   f" | cites a source {100 * cited / len(test):.1f}%, dropped citations {dropped}")
        for q, a in samples:
            print(f"  e.g. {q!r} -> {a!r}")
    results["load_end"] = load_avg()
    print(f"end: {load_avg()}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
