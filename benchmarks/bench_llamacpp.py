"""CPU inference against llama.cpp, the strongest CPU peer: decode, prefill and memory on the same weights.

    .venv/bin/python benchmarks/bench_llamacpp.py [--threads 2] [--rounds 3] [--new-tokens 128] [--prompt 512]

The model is GPT-2 124M with random weights (transformers' own initialisation, seed 0) and GPT-2's real tokenizer
(../shared/data/gpt2). lmforge saves it, quantizes it (int8 per channel; int4 group 32, round to nearest) and
exports the GGUF files llama.cpp reads (f32, q8_0, q4_0) from the same weights. Pairs compared:

    lmforge fp32 vs llama.cpp f32     lmforge int8 vs llama.cpp q8_0     lmforge int4 (g32) vs llama.cpp q4_0

Every (engine, weights) run is a fresh process (`--worker`), so each side's peak resident memory (VmHWM from
/proc/self/status: the library's import, the weights and the run) is its own. (Not ru_maxrss: Linux carries the
parent's peak into a child across fork and exec, so every worker would report the parent's 1 GiB bandwidth array.) Rounds: each round runs every pair, lmforge then llama.cpp,
so both see the same machine load; the figures are medians over rounds with the min-max spread. Each run measures:

* prefill: time to the first generated token after a `--prompt`-token prompt, in prompt tokens/s;
* decode: `--new-tokens` greedy tokens after a 16-token prompt, EOS ignored, tokens/s over the whole call (the
  16-token prefill included on both sides);
* the greedy ids, compared across the pair (number of leading tokens equal).

Same threads on both sides (torch.set_num_threads / llama.cpp n_threads and n_threads_batch).

Also measured: the machine's memory read bandwidth (a STREAM-style read: the sum of a 1 GiB fp32 array, 1 and 2
threads, median of 5), and from it each weight format's floor: bytes read per token / bandwidth. A decoder at batch
1 reads every weight once per token, so no engine decodes faster than that floor allows.

Needs llama-cpp-python (`make test-llamacpp` builds it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAIRS = [("fp32", "f32"), ("int8", "q8_0"), ("int4", "q4_0")]


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: summing a `gib` GiB fp32 array (far larger than any cache) reads it once."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(int(gib * 2**30) // 4)
    a.sum()  # touch every page first
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / statistics.median(times) / 1e9


def prompts(vocab: int, n_long: int) -> tuple[list[int], list[int]]:
    import random

    rng = random.Random(0)
    return ([rng.randrange(vocab) for _ in range(16)], [rng.randrange(vocab) for _ in range(n_long)])


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM), in KiB; per address space, so a fresh exec starts from zero."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the best there is


def worker(args: argparse.Namespace) -> None:
    """One engine on one weight file, in this fresh process: prints one JSON line."""
    rss0 = peak_rss_kib()
    short, long = prompts(50257, args.prompt)
    n = args.new_tokens
    if args.engine == "lmforge":
        import torch

        import lmforge
        from lmforge.generation.loop import generate_ids
        from lmforge.generation.sampling import SamplingParams

        torch.set_num_threads(args.threads)
        rss_import = peak_rss_kib()
        t = time.perf_counter()
        lm = lmforge.load(args.path)
        load_s = time.perf_counter() - t

        def run(p, k):
            return generate_ids(lm.model, [p], SamplingParams(temperature=0.0, max_new_tokens=k,
                                                               ignore_eos=True))[0].token_ids

    else:
        import llama_cpp

        rss_import = peak_rss_kib()
        t = time.perf_counter()
        llm = llama_cpp.Llama(model_path=args.path, n_ctx=1024, n_batch=512, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
        load_s = time.perf_counter() - t

        def run(p, k):
            llm.reset()
            out = []
            for tok in llm.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                out.append(int(tok))
                if len(out) == k:
                    break
            return out

    run(short, 4)  # warm-up: first-call allocations on both sides
    t = time.perf_counter()
    run(long, 1)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    ids = run(short, n)
    decode_s = time.perf_counter() - t
    print(json.dumps({"decode_tps": len(ids) / decode_s, "prefill_tps": len(long) / prefill_s, "ids": ids,
                      "load_s": load_s, "rss_mib": peak_rss_kib() / 1024,
                      "rss_import_mib": rss_import / 1024, "rss_start_mib": rss0 / 1024}))
    if args.engine == "llama.cpp":
        llm.close()


def build(tmp: Path) -> dict[str, Path]:
    """The weight files: lmforge dirs (fp32, int8, int4 g32) and GGUF exports (f32, q8_0, q4_0), same weights."""
    import copy

    import torch
    import transformers

    from lmforge.compress.quantize import quantize_model
    from lmforge.formats.gguf import export_gguf
    from lmforge.formats.hf import from_hf_model
    from lmforge.lm import LM
    from lmforge.tokenizers.bpe import Tokenizer
    from tests.helpers import shared_data_dir

    gpt2 = shared_data_dir() / "gpt2"
    tok = Tokenizer.from_gpt2_files(gpt2 / "encoder.json", gpt2 / "vocab.bpe")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # 124M, random weights
    model = from_hf_model(hf).eval()
    lm = LM(model, tok)
    paths = {}
    lm.save(tmp / "fp32")
    paths["fp32"] = tmp / "fp32"
    for scheme in ("int8", "int4"):
        q = quantize_model(copy.deepcopy(model), scheme, group_size=32, progress=False)
        LM(q, tok, lm.config).save(tmp / scheme)
        paths[scheme] = tmp / scheme
    for dtype in ("f32", "q8_0", "q4_0"):
        paths[dtype] = export_gguf(lm, tmp / f"gpt2-{dtype}.gguf", dtype)
    return paths


def weight_bytes(gguf_path: Path) -> int:
    """Bytes of weights one decode step reads, from the GGUF's tensor table: every tensor except the embedding
    tables (token and position), which a step reads one row of. The LM head is counted (llama.cpp stores it as its
    own `output.weight`, a copy of the tied embedding)."""
    from gguf import GGUFReader

    tensors = GGUFReader(str(gguf_path)).tensors
    return sum(int(t.n_bytes) for t in tensors if t.name not in ("token_embd.weight", "position_embd.weight"))


def run_worker(engine: str, path: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--path", str(path),
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--prompt", str(args.prompt)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode != 0:
        raise SystemExit(f"{engine} on {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(xs: list[float], fmt: str = ".1f") -> str:
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens for the prefill figure")
    ap.add_argument("--only", default="", help="comma-separated lmforge schemes to run (fp32,int8,int4)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed (`make test-llamacpp` builds it)")
    import platform

    import torch

    bw = {t: read_bandwidth(t) for t in sorted({1, args.threads})}
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, load "
          f"average {os.getloadavg()[0]:.1f}; memory read bandwidth (sum of a 1 GiB fp32 array, median of 5): "
          + ", ".join(f"{v:.1f} GB/s with {t} thread{'s' if t > 1 else ''}" for t, v in bw.items()), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    paths = build(tmp)
    pairs = [p for p in PAIRS if not args.only or p[0] in args.only.split(",")]
    res: dict[str, list[dict]] = {k: [] for pair in pairs for k in pair}
    for r in range(args.rounds):
        for ours, theirs in pairs:
            res[ours].append(run_worker("lmforge", paths[ours], args))
            res[theirs].append(run_worker("llama.cpp", paths[theirs], args))
            print(f"round {r + 1}: lmforge {ours} {res[ours][-1]['decode_tps']:.1f} tok/s, llama.cpp {theirs} "
                  f"{res[theirs][-1]['decode_tps']:.1f} tok/s (load {os.getloadavg()[0]:.1f})", flush=True)
    rows = ["| weights (lmforge / llama.cpp) | bytes/token | floor tok/s at "
            f"{bw[args.threads]:.1f} GB/s | decode tok/s lmforge | llama.cpp | ratio | prefill tok/s ({args.prompt} "
            "tokens) lmforge | llama.cpp | ratio | peak RSS MiB lmforge | llama.cpp | greedy ids equal |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ours, theirs in pairs:
        a, b = res[ours], res[theirs]
        da, db = [x["decode_tps"] for x in a], [x["decode_tps"] for x in b]
        pa, pb = [x["prefill_tps"] for x in a], [x["prefill_tps"] for x in b]
        ratio = [x / y for x, y in zip(da, db)]
        pratio = [x / y for x, y in zip(pa, pb)]
        ia, ib = a[-1]["ids"], b[-1]["ids"]
        same = next((i for i, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
        nbytes = weight_bytes(paths[theirs])
        rows.append(f"| {ours} / {theirs} | {nbytes / 2**20:.0f} MiB | {bw[args.threads] * 1e9 / nbytes:.1f} | "
                    f"{spread(da)} | {spread(db)} | {statistics.median(ratio):.2f}x | {spread(pa, '.0f')} | "
                    f"{spread(pb, '.0f')} | {statistics.median(pratio):.2f}x | "
                    f"{statistics.median(x['rss_mib'] for x in a):.0f} | {statistics.median(x['rss_mib'] for x in b):.0f}"
                    f" | {same}/{len(ia)} |")
    def imp(engine: str) -> float:
        keys = [p[0] if engine == "lmforge" else p[1] for p in pairs]
        return statistics.median(x["rss_import_mib"] for k in keys for x in res[k])

    print(f"\nGPT-2 124M (random weights, GPT-2 tokenizer), batch 1, {args.threads} threads, {args.rounds} rounds "
          f"(median [min-max]); decode: {args.new_tokens} greedy tokens after 16; peak RSS includes each library's "
          f"import (after import, before loading weights: lmforge/torch {imp('lmforge'):.0f} MiB, llama_cpp "
          f"{imp('llama.cpp'):.0f} MiB); load average at the end {os.getloadavg()[0]:.1f}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
