"""Tokenizer benchmarks: BPE training speed (vs HF tokenizers and a naive trainer) and encode throughput (vs tiktoken).

    .venv/bin/python benchmarks/bench_tokenizer.py            # full run (~1-2 min on 2 cores)
    .venv/bin/python benchmarks/bench_tokenizer.py --quick    # smaller naive sample, 1 repeat

Training: War and Peace (3.26 MB), vocab 8192 incl. `<|endoftext|>`, GPT-2 pre-tokenization. Every trainer sees the
same pre-tokenization: lmforge trains on the whole text; HF `tokenizers` gets the text cut into ~64 KB pieces at
places where GPT-2's regex cannot change (`lmforge.tokenizers.bpe._chunks`), so its Rust threads can work in parallel
on identical pre-tokens. Each trainer runs in a fresh child process so its peak RSS (ru_maxrss) is its own; the
baseline row is a child that only reads the text.

The naive trainer (`train_bpe_naive`: recount every pair after every merge) would take minutes for 7,935 merges,
so it runs only the first `--naive-merges` merges and its time is EXTRAPOLATED linearly to the full run (an
overestimate of its per-merge cost late in training, when words are shorter, and an underestimate of nothing).
The same first merges are timed for lmforge too, so a like-for-like ratio is printed as well.

Encoding: tinyshakespeare (1.1 MB) with GPT-2's tokenizer: lmforge's fast path (a tiktoken Encoding built from
the same ranks), tiktoken itself (built offline from the same files), lmforge's pure-Python path (cold per-word
cache, then warm), and HF tokenizers for reference. Best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import shared_data_dir  # noqa: E402

VOCAB = 8192
SPECIAL = "<|endoftext|>"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(which: str, naive_merges: int) -> dict:
    """Run one trainer in this (fresh) process; return its wall time and peak RSS."""
    from lmforge.tokenizers.bpe import GPT2_PATTERN, Tokenizer, _chunks, count_pretokens, train_bpe
    from tests.helpers import train_bpe_naive

    text = (shared_data_dir() / "war_and_peace" / "warpeace_input.txt").read_text(encoding="utf-8")
    out: dict = {"which": which}
    t0 = time.perf_counter()
    if which == "baseline":
        pass
    elif which in ("lmforge", "lmforge-serial"):
        tok = Tokenizer.train([text], VOCAB, special_tokens=[SPECIAL], num_workers=1 if which.endswith("serial")
                              else 2, progress=False)
        out["merges"] = [[a.hex(), b.hex()] for a, b in tok.merges]
        out["vocab_size"] = tok.vocab_size
    elif which == "hf":
        from tokenizers import Tokenizer as HF
        from tokenizers import models, pre_tokenizers, trainers

        hf = HF(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[SPECIAL], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(_chunks(text, GPT2_PATTERN, 1 << 16), trainer)
        out["vocab_size"] = hf.get_vocab_size()
        out["merges_hf"] = len(json.loads(hf.to_str())["model"]["merges"])
    elif which == "naive":
        counts = count_pretokens([text], GPT2_PATTERN, [SPECIAL], num_workers=1)
        t1 = time.perf_counter()
        naive = train_bpe_naive(counts, naive_merges)
        out["naive_merge_s"] = time.perf_counter() - t1
        out["pretok_s"] = t1 - t0
        t2 = time.perf_counter()
        fast = train_bpe(counts, naive_merges, progress=False)
        out["lmforge_same_merges_s"] = time.perf_counter() - t2
        out["agree"] = naive == fast
    out["seconds"] = time.perf_counter() - t0
    out["peak_mb"] = _peak_mb()
    return out


def run_child(which: str, naive_merges: int) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--naive-merges", str(naive_merges)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_training(naive_merges: int) -> None:
    print(f"== BPE training: War and Peace, vocab {VOCAB} (incl. {SPECIAL}), GPT-2 pattern")
    base = run_child("baseline", naive_merges)
    ser = run_child("lmforge-serial", naive_merges)
    par = run_child("lmforge", naive_merges)
    hf = run_child("hf", naive_merges)
    nv = run_child("naive", naive_merges)
    n_merges = len(par["merges"])
    assert par["merges"] == ser["merges"], "parallel and serial pre-tokenization gave different merges"
    naive_full = nv["pretok_s"] + nv["naive_merge_s"] / naive_merges * n_merges
    best = min(ser["seconds"], par["seconds"])
    print(f"  baseline (read text only)      peak RSS {base['peak_mb']:7.1f} MB")
    print(f"  lmforge, 1 process             {ser['seconds']:7.2f} s   peak RSS {ser['peak_mb']:7.1f} MB  "
          f"({n_merges} merges, vocab {ser['vocab_size']})")
    print(f"  lmforge, 2 pre-token workers   {par['seconds']:7.2f} s   peak RSS {par['peak_mb']:7.1f} MB")
    print(f"  HF tokenizers BpeTrainer       {hf['seconds']:7.2f} s   peak RSS {hf['peak_mb']:7.1f} MB  "
          f"(vocab {hf['vocab_size']})")
    print(f"  naive recount, first {naive_merges} merges {nv['naive_merge_s']:7.2f} s  (+ {nv['pretok_s']:.2f} s "
          f"pre-tokenization)   peak RSS {nv['peak_mb']:7.1f} MB")
    print(f"  naive, EXTRAPOLATED to {n_merges} merges: {naive_full:8.1f} s")
    print(f"  lmforge, same first {naive_merges} merges: {nv['lmforge_same_merges_s']:.3f} s "
          f"(merges identical to naive: {nv['agree']})")
    print(f"  ratio lmforge(best)/HF tokenizers: {best / hf['seconds']:.2f}x  (target: within 10x)")
    print(f"  ratio naive(extrapolated)/lmforge(best): {naive_full / best:.1f}x faster  (target: > 20x)")
    print(f"  ratio naive/lmforge on the same first {naive_merges} merges: "
          f"{nv['naive_merge_s'] / nv['lmforge_same_merges_s']:.1f}x")


def bench_encode(repeats: int) -> None:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    from lmforge.tokenizers.bpe import Tokenizer

    d = shared_data_dir()
    enc_json, vocab_bpe = d / "gpt2" / "encoder.json", d / "gpt2" / "vocab.bpe"
    text = (d / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    print(f"== Encode throughput: tinyshakespeare ({mb:.2f} MB), GPT-2 tokenizer, best of {repeats}")
    tok = Tokenizer.from_gpt2_files(enc_json, vocab_bpe)
    t0 = time.perf_counter()
    assert tok.has_fast_path
    print(f"  (lmforge fast path built in {time.perf_counter() - t0:.2f} s, incl. the rank-consistency check)")
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(enc_json))
    tt = tiktoken.Encoding("gpt2-offline", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                           special_tokens={SPECIAL: 50256}, explicit_n_vocab=50257)
    hf = HF(models.BPE.from_file(str(enc_json), str(vocab_bpe)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()

    def best_of(fn, n=repeats):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            ids = fn()
            times.append(time.perf_counter() - t)
        return min(times), ids

    t_tt, ids_tt = best_of(lambda: tt.encode(text))
    t_fast, ids_fast = best_of(lambda: tok.encode(text))

    def cold():
        tok._cache.clear()
        return tok.encode(text, fast=False)

    t_cold, ids_py = best_of(cold, 1)
    t_warm, _ = best_of(lambda: tok.encode(text, fast=False))
    t_hf, ids_hf = best_of(lambda: hf.encode(text, add_special_tokens=False).ids)
    assert ids_fast == ids_tt == ids_py == ids_hf, "encoders disagree"
    print(f"  tiktoken                     {mb / t_tt:7.2f} MB/s")
    print(f"  lmforge fast path            {mb / t_fast:7.2f} MB/s   tiktoken/lmforge-fast time ratio "
          f"{t_fast / t_tt:.2f}x (target: within 1.2x)")
    print(f"  lmforge pure Python (cold)   {mb / t_cold:7.2f} MB/s   {t_cold / t_tt:.1f}x slower than tiktoken")
    print(f"  lmforge pure Python (warm)   {mb / t_warm:7.2f} MB/s   {t_warm / t_tt:.1f}x slower than tiktoken")
    print(f"  HF tokenizers (reference)    {mb / t_hf:7.2f} MB/s")
    print(f"  all four produce the same {len(ids_tt)} ids")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--naive-merges", type=int, default=40, help="merges the naive trainer actually runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["train", "encode"], help="run one of the two benchmarks")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.naive_merges)))
        return 0
    if not (shared_data_dir() / "war_and_peace" / "warpeace_input.txt").exists():
        print(f"shared data not found under {shared_data_dir()}; set LMFORGE_DATA", file=sys.stderr)
        return 1
    if args.quick:
        args.naive_merges, args.repeats = 10, 1
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.only != "encode":
        bench_training(args.naive_merges)
    if args.only != "train":
        bench_encode(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
