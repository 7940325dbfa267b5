"""Decode speed: the ONNX export run by ONNX Runtime vs lmforge's own PyTorch generate, same weights, 1 thread.

    .venv/bin/python benchmarks/bench_onnx.py               # GPT-2 124M shape, 128 new tokens, 3 repeats
    .venv/bin/python benchmarks/bench_onnx.py --quick       # 24 new tokens, 1 repeat (a smoke run)

The model: GPT-2 124M's shape (`ModelConfig.from_name("gpt2")`) with lmforge's random init (seed 0), float32.
It is exported once with `lmforge.formats.onnx.export_onnx` (the export time is printed), then both runtimes
decode the same prompt greedily, EOS ignored, so both produce exactly N tokens; their ids are compared and the
check is printed. ONNX Runtime runs with intra_op_num_threads=1 and lmforge with torch.set_num_threads(1).

Decode tokens/s = (N - 1) / (time of an N-token generation - time of a 1-token generation): the prefill and the
first token cancel out. Wall time and process CPU time (`time.process_time`) are both reported, median of
--repeats alternating runs: on a machine shared with other jobs the CPU-time rate is the steadier comparison.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime  # noqa: E402

from lmforge.formats.onnx import OnnxDecoder, export_onnx  # noqa: E402
from lmforge.lm import LM  # noqa: E402
from lmforge.models.config import ModelConfig  # noqa: E402
from lmforge.models.decoder import Transformer  # noqa: E402


def timed(fn) -> tuple[float, float, object]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="24 new tokens, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 24, 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt2")
    lm = LM(Transformer(cfg).eval(), None)
    n_params = lm.model.num_params()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export_onnx(lm, Path(tmp) / "gpt2-onnx")
        export_s = time.perf_counter() - t0
        size = (Path(tmp) / "gpt2-onnx" / "model.onnx").stat().st_size
        dec = OnnxDecoder(Path(tmp) / "gpt2-onnx", threads=1)
        print(f"model: GPT-2 124M shape, random weights, {n_params / 1e6:.1f}M parameters, float32; "
              f"export {export_s:.1f}s, model.onnx {size / 1e6:.0f} MB", flush=True)
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=g).tolist()
        N = args.new_tokens

        def run_lmforge(n):
            return lm.generate(prompt, max_new_tokens=n, temperature=0.0, ignore_eos=True).token_ids

        def run_ort(n):
            return dec.generate_ids(prompt, max_new_tokens=n, stop_token_ids=())

        rates = {"lmforge": ([], []), "onnxruntime": ([], [])}
        ids = {}
        run_lmforge(2), run_ort(2)  # warm-up: first-call allocations
        for r in range(args.repeats):
            for name, fn in (("lmforge", run_lmforge), ("onnxruntime", run_ort)):
                w1, c1, _ = timed(lambda: fn(1))
                wn, cn, out = timed(lambda: fn(N))
                ids[name] = out
                rates[name][0].append((N - 1) / max(wn - w1, 1e-9))
                rates[name][1].append((N - 1) / max(cn - c1, 1e-9))
                print(f"  repeat {r + 1} {name:<12} {rates[name][0][-1]:6.1f} tok/s wall, "
                      f"{rates[name][1][-1]:6.1f} tok/CPU-s  (load average {os.getloadavg()[0]:.1f})", flush=True)
    same = ids["lmforge"] == ids["onnxruntime"]
    med = {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in rates.items()}
    spread = {k: (min(w), max(w)) for k, (w, c) in rates.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, 1 thread each")
    print(f"decode batch 1, prompt {args.prompt_tokens}, {N} new tokens, median of {args.repeats}:")
    for k, (w, c) in med.items():
        print(f"  {k:<12} {w:6.1f} tok/s wall (min-max {spread[k][0]:.1f}-{spread[k][1]:.1f}), {c:6.1f} tok/CPU-s")
    print(f"  onnxruntime / lmforge: {med['onnxruntime'][0] / med['lmforge'][0]:.2f}x wall, "
          f"{med['onnxruntime'][1] / med['lmforge'][1]:.2f}x per CPU second; identical ids: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
