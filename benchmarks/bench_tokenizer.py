"""Tokenizer benchmarks: BPE training speed (vs HF tokenizers and a naive trainer) and encode throughput (vs tiktoken).

    .venv/bin/python benchmarks/bench_tokenizer.py            # full run (~1-2 min on 2 cores)
    .venv/bin/python benchmarks/bench_tokenizer.py --quick    # smaller naive sample, 1 repeat

Training: War and Peace (3.26 MB), vocab 8192 incl. `<|endoftext|>`, GPT-2 pre-tokenization. Every trainer sees the
same pre-tokenization: lmforge trains on the whole text; HF `tokenizers` gets the text cut into ~64 KB pieces at
places where GPT-2's regex cannot change (`lmforge.tokenizers.bpe._chunks`), so its Rust threads can work in parallel
on identical pre-tokens. Each trainer runs in a fresh child process so its peak RSS (ru_maxrss) is its own; the
baseline row is a child that only reads the text.

Training times start after the imports and stop when the trainer returns (HF's JSON serialisation, used to read
its merges back, is outside the timer). Each trainer runs `--rounds` times in turn (lmforge, HF, ...), and the
medians with min-max spread are printed. lmforge's merges are compared with HF's: both pick the most frequent pair,
so they agree merge for merge until two pairs tie in count (the tie-break rule differs); the length of the
identical prefix and the overlap of the two merge sets are printed.

The naive trainer (`train_bpe_naive`: recount every pair after every merge) would take minutes for 7,935 merges,
so it runs only the first `--naive-merges` merges and its time is EXTRAPOLATED linearly to the full run (an
overestimate of its per-merge cost late in training, when words are shorter, and an underestimate of nothing).
The same first merges are timed for lmforge too, so a like-for-like ratio is printed as well.

Encoding: tinyshakespeare (1.1 MB) with GPT-2's tokenizer: tiktoken (built offline from the same files), lmforge's
own encoder (the readable pure-Python path, cold per-word cache, then warm: lmforge's figure), lmforge's fast path
and HF tokenizers. lmforge's fast path IS a `tiktoken.Encoding` built from the same ranks (lmforge hands the
work to tiktoken when the ranks allow it), so "fast path vs tiktoken" times tiktoken against itself: it shows the
wrapper costs nothing, not that lmforge's code is as fast as tiktoken. Median of `--repeats` runs, with spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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

    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, trainers

    text = (shared_data_dir() / "war_and_peace" / "warpeace_input.txt").read_text(encoding="utf-8")
    out: dict = {"which": which}
    t0 = time.perf_counter()
    if which == "baseline":
        pass
    elif which in ("lmforge", "lmforge-serial"):
        tok = Tokenizer.train([text], VOCAB, special_tokens=[SPECIAL], num_workers=1 if which.endswith("serial")
                              else 2, progress=False)
        out["seconds"] = time.perf_counter() - t0
        out["merges"] = [[a.hex(), b.hex()] for a, b in tok.merges]
        out["vocab_size"] = tok.vocab_size
    elif which == "hf":
        hf = HF(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[SPECIAL], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(_chunks(text, GPT2_PATTERN, 1 << 16), trainer)
        out["seconds"] = time.perf_counter() - t0  # the JSON below only reads the merges back
        out["vocab_size"] = hf.get_vocab_size()
        out["merges"] = [[_hf_bytes(m).hex() for m in (pair.split(" ") if isinstance(pair, str) else pair)]
                         for pair in json.loads(hf.to_str())["model"]["merges"]]
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
    out.setdefault("seconds", time.perf_counter() - t0)
    out["peak_mb"] = _peak_mb()
    return out


def _hf_bytes(piece: str) -> bytes:
    """HF's byte-level piece (GPT-2's printable stand-in characters) -> the bytes it stands for."""
    from lmforge.tokenizers.bpe import bytes_to_unicode

    inverse = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(inverse[c] for c in piece)


def run_child(which: str, naive_merges: int) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--naive-merges", str(naive_merges)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f} s [{min(xs):.2f}-{max(xs):.2f}]"


def bench_training(naive_merges: int, rounds: int) -> None:
    print(f"== BPE training: War and Peace, vocab {VOCAB} (incl. {SPECIAL}), GPT-2 pattern, {rounds} rounds in turn "
          f"(median [min-max]), load average {os.getloadavg()[0]:.1f}")
    base = run_child("baseline", naive_merges)
    runs: dict[str, list[dict]] = {"lmforge-serial": [], "lmforge": [], "hf": []}
    for _ in range(rounds):
        for k in runs:
            runs[k].append(run_child(k, naive_merges))
    nv = run_child("naive", naive_merges)
    ser, par, hf = runs["lmforge-serial"][0], runs["lmforge"][0], runs["hf"][0]
    t = {k: [r["seconds"] for r in v] for k, v in runs.items()}
    n_merges = len(par["merges"])
    assert par["merges"] == ser["merges"], "parallel and serial pre-tokenization gave different merges"
    prefix = next((i for i, (a, b) in enumerate(zip(par["merges"], hf["merges"])) if a != b),
                  min(len(par["merges"]), len(hf["merges"])))
    common = len({tuple(m) for m in par["merges"]} & {tuple(m) for m in hf["merges"]})
    naive_full = nv["pretok_s"] + nv["naive_merge_s"] / naive_merges * n_merges
    best = min(statistics.median(t["lmforge-serial"]), statistics.median(t["lmforge"]))
    print(f"  baseline (read text only)      peak RSS {base['peak_mb']:7.1f} MB")
    print(f"  lmforge, 1 process             {_med(t['lmforge-serial'])}   peak RSS {ser['peak_mb']:7.1f} MB  "
          f"({n_merges} merges, vocab {ser['vocab_size']})")
    print(f"  lmforge, 2 pre-token workers   {_med(t['lmforge'])}   peak RSS {par['peak_mb']:7.1f} MB")
    print(f"  HF tokenizers BpeTrainer       {_med(t['hf'])}   peak RSS {hf['peak_mb']:7.1f} MB  "
          f"(vocab {hf['vocab_size']}, {len(hf['merges'])} merges)")
    print(f"  merges: the first {prefix} are identical to HF's, in order; {common} of {n_merges} "
          f"({common / n_merges:.1%}) are in both sets (they part at a tie in pair counts)")
    print(f"  naive recount, first {naive_merges} merges {nv['naive_merge_s']:7.2f} s  (+ {nv['pretok_s']:.2f} s "
          f"pre-tokenization)   peak RSS {nv['peak_mb']:7.1f} MB")
    print(f"  naive, EXTRAPOLATED to {n_merges} merges: {naive_full:8.1f} s")
    print(f"  lmforge, same first {naive_merges} merges: {nv['lmforge_same_merges_s']:.3f} s "
          f"(merges identical to naive: {nv['agree']})")
    print(f"  ratio lmforge(faster median)/HF tokenizers median: {best / statistics.median(t['hf']):.2f}x time "
          f"(target: within 10x)")
    print(f"  ratio naive(extrapolated)/lmforge: {naive_full / best:.1f}x faster  (target: > 20x)")
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
    print(f"== Encode throughput: tinyshakespeare ({mb:.2f} MB), GPT-2 tokenizer, median [min-max] of {repeats}")
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
        """(median seconds, ids, 'median [min-max] MB/s')"""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            ids = fn()
            times.append(time.perf_counter() - t)
        rates = sorted(mb / x for x in times)
        return statistics.median(times), ids, f"{statistics.median(rates):5.2f} [{rates[0]:.2f}-{rates[-1]:.2f}]"

    t_tt, ids_tt, r_tt = best_of(lambda: tt.encode(text))
    t_fast, ids_fast, r_fast = best_of(lambda: tok.encode(text))

    def cold():
        tok._cache.clear()
        return tok.encode(text, fast=False)

    t_cold, ids_py, r_cold = best_of(cold, 1)
    t_warm, _, r_warm = best_of(lambda: tok.encode(text, fast=False))
    t_hf, ids_hf, r_hf = best_of(lambda: hf.encode(text, add_special_tokens=False).ids)
    assert ids_fast == ids_tt == ids_py == ids_hf, "encoders disagree"
    print(f"  tiktoken                             {r_tt} MB/s")
    print(f"  lmforge's own encoder (cold cache)   {r_cold} MB/s   {t_cold / t_tt:.1f}x tiktoken's time")
    print(f"  lmforge's own encoder (warm cache)   {r_warm} MB/s   {t_warm / t_tt:.1f}x tiktoken's time")
    print(f"  lmforge fast path = a tiktoken.Encoding: {r_fast} MB/s   {t_fast / t_tt:.2f}x tiktoken's time "
          f"(tiktoken timed against itself through lmforge's wrapper)")
    print(f"  HF tokenizers (reference)            {r_hf} MB/s")
    print(f"  all four produce the same {len(ids_tt)} ids")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--naive-merges", type=int, default=40, help="merges the naive trainer actually runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="training runs of each trainer, in turn")
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
        args.naive_merges, args.repeats, args.rounds = 10, 1, 1
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.only != "encode":
        bench_training(args.naive_merges, args.rounds)
    if args.only != "train":
        bench_encode(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
