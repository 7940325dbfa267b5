"""Peak resident memory and load time of `lmforge.load` + a short greedy decode, one fresh process per run.

    .venv/bin/python benchmarks/bench_load_rss.py DIR [DIR ...] [--tree /path/to/other/checkout ...] [--rounds 3]

Each DIR is an lmforge model directory (bench_llamacpp.py builds GPT-2 124M fp32/int8/int4 ones). Each run is a
fresh Python process that imports lmforge (from `--tree`, default this checkout: compare two versions of the code
on the same weights, e.g. `git worktree add /tmp/old HEAD~1`), loads the model, decodes `--new-tokens` greedy
tokens as bench_llamacpp.py's lmforge worker does, and reports:

* import:  peak RSS after `import lmforge` (VmHWM, MiB; torch alone is most of it)
* load:    peak RSS right after `lmforge.load` returned, and the wall time of the load
* total:   peak RSS after a 4-token warm-up and the decode (what bench_llamacpp.py reports: the decode path's own
           copies included), and the decode's tokens/s (its 16-token prompt included)

Figures are medians over `--rounds` (runs alternate between trees, so both see the same machine load). The greedy
ids of every tree must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
from bench_llamacpp import peak_rss_kib, prompts
sys.path.insert(0, {tree!r})
import torch
import lmforge
from lmforge.generation.loop import generate_ids
from lmforge.generation.sampling import SamplingParams
assert lmforge.__file__.startswith({tree!r}), lmforge.__file__
torch.set_num_threads({threads})
rss_import = peak_rss_kib()
t = time.perf_counter()
lm = lmforge.load({path!r})
load_s = time.perf_counter() - t
rss_load = peak_rss_kib()
short, _ = prompts(lm.config.vocab_size, 1)
run = lambda k: generate_ids(lm.model, [short], SamplingParams(temperature=0.0, max_new_tokens=k,
                                                               ignore_eos=True))[0].token_ids
run(4)  # warm-up, as bench_llamacpp.py does: first-call kernel checks and allocations
t = time.perf_counter()
ids = run({n})
decode_s = time.perf_counter() - t
print(json.dumps({{"import": rss_import / 1024, "load": rss_load / 1024, "total": peak_rss_kib() / 1024,
                  "load_s": load_s, "tok_s": len(ids) / decode_s, "ids": list(ids)}}))
"""


def run(tree: str, path: str, args) -> dict:
    code = CHILD.format(bench=str(ROOT / "benchmarks"), tree=str(Path(tree).resolve()), path=path, n=args.new_tokens,
                        threads=args.threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode != 0:
        raise SystemExit(f"{tree} on {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--tree", action="append", help="a checkout of lmforge to run (repeatable; default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    trees = args.tree or [str(ROOT)]
    for tree in trees:  # warm-up: build/cache the C kernels of each tree, and the page cache of each file
        for d in args.dirs:
            run(tree, d, argparse.Namespace(**{**vars(args), "new_tokens": 2}))
    print("| model | tree | import MiB | peak after load MiB | peak after decode MiB | load s | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for d in args.dirs:
        res = {t: [] for t in trees}
        for _ in range(args.rounds):
            for t in trees:
                res[t].append(run(t, d, args))
        ids = {t: res[t][0]["ids"] for t in trees}
        for t in trees:
            med = {k: statistics.median(r[k] for r in res[t]) for k in ("import", "load", "total", "load_s", "tok_s")}
            print(f"| {Path(d).name} | {t} | {med['import']:.0f} | {med['load']:.0f} | {med['total']:.0f} | "
                  f"{med['load_s']:.3f} [{min(r['load_s'] for r in res[t]):.3f}-"
                  f"{max(r['load_s'] for r in res[t]):.3f}] | {med['tok_s']:.1f} |")
        if len({json.dumps(v) for v in ids.values()}) > 1:
            print(f"  greedy ids differ between trees on {d}!")


if __name__ == "__main__":
    main()
