"""Training throughput on CPU: lmforge's loop vs a plain `transformers` LlamaForCausalLM, same run.

Both train the same ~20M-parameter Llama-shaped model (same config, same initial weights via lmforge.hf.to_hf_model),
on the same batches (B x T random windows of a fixed token stream), with AdamW (same hyper-parameters), gradient
clipping at 1.0, fp32. The Hugging Face side is the loop a user writes by hand: `model(input_ids, labels=...)`,
`loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW(...)` with its default implementation.

The steps interleave one for one: lmforge's `train()` runs with an `on_step` hook that takes one transformers step
after each of its own (lmforge's tokens/s excludes the hook). Each pair of neighbouring steps sees the same machine
load, so the median of the per-pair ratios is steady on a shared machine where the speed of the whole box drifts by
+-20% within a minute; the medians of tokens/s are printed too. The first steps of each run (warm-up, and the
one-time compile with --compile) are dropped.

    .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--steps 8] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.data import PackedBatches  # noqa: E402
from lmforge.hf import to_hf_model  # noqa: E402
from lmforge.model import Transformer  # noqa: E402
from lmforge.train import TrainConfig, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also measure lmforge with torch.compile")
    ap.add_argument("--cores", type=int, default=0, help="TrainConfig.cores for lmforge (0: auto, 1: off)")
    ap.add_argument("--cpu-matmul", default="auto", choices=["auto", "torch", "numpy"],
                    help="TrainConfig.cpu_matmul for lmforge")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = ModelConfig.from_name("llama-small", vocab_size=8192, block_size=args.block_size, n_layer=6, n_embd=512,
                                n_head=8, n_kv_head=4, intermediate_size=1376)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    theirs = to_hf_model(ours).train()
    n_params = ours.num_params()
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, size=200_000)
    batches = PackedBatches(toks, args.batch_size, args.block_size, seed=0)
    tok_per_step = args.batch_size * args.block_size
    hp = dict(lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)

    hf_opt = torch.optim.AdamW(theirs.parameters(), **hp)
    hf_step_index = [0]

    def hf_step() -> float:
        b = batches(hf_step_index[0])
        hf_step_index[0] += 1
        t0 = time.perf_counter()
        # HF shifts labels inside the loss: pass the window (T+1 tokens would change T), so we give the
        # inputs as labels and the same T positions are scored (T-1 of them; the cost is identical)
        loss = theirs(input_ids=b["input_ids"], labels=b["input_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        float(loss.detach())
        return tok_per_step / (time.perf_counter() - t0)

    def run_pair(compile_: bool) -> tuple[list[float], list[float]]:
        """lmforge's steps and the transformers step taken right after each (tokens/s), warm-up dropped."""
        hf_tps: list[float] = []
        res = train(ours, batches, TrainConfig(max_steps=args.steps + args.warmup, lr=hp["lr"],
                                               weight_decay=hp["weight_decay"], batch_size=args.batch_size,
                                               schedule="constant", eval_every=0, grad_clip=1.0, progress=False,
                                               compile=compile_, cores=args.cores,
                                               cpu_matmul=args.cpu_matmul),
                    on_step=lambda rec: hf_tps.append(hf_step()))
        ours_tps = [r["tok_per_s"] for r in res.history]
        return ours_tps[args.warmup:], hf_tps[args.warmup:]

    kinds = ["eager"] + (["compile"] if args.compile else [])
    tps: dict[str, dict[str, list[float]]] = {k: {"lmforge": [], "transformers": []} for k in kinds}
    for r in range(args.rounds):
        for k in kinds:
            o, h = run_pair(k == "compile")
            tps[k]["lmforge"] += o
            tps[k]["transformers"] += h
        print(f"round {r + 1}/{args.rounds}: " + "; ".join(
            f"{k}: lmforge {statistics.median(v['lmforge']):,.0f} / transformers "
            f"{statistics.median(v['transformers']):,.0f} tok/s" for k, v in tps.items()), flush=True)
    print(f"\nmodel: Llama-shaped, {n_params / 1e6:.1f}M params (n_layer=6, n_embd=512, n_head=8, n_kv_head=4, "
          f"vocab 8192), batch {args.batch_size} x {args.block_size}, fp32, {args.threads} threads, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    for k, v in tps.items():
        name = "lmforge" if k == "eager" else "lmforge+compile"
        pair = [a / b for a, b in zip(v["lmforge"], v["transformers"])]
        q = statistics.quantiles(pair, n=4) if len(pair) > 1 else [pair[0]] * 3
        print(f"{name:16s} {statistics.median(v['lmforge']):8,.0f} tok/s | transformers steps next to it "
              f"{statistics.median(v['transformers']):8,.0f} tok/s | per-pair ratio "
              f"median {statistics.median(pair):.2f}x "
              f"(quartiles {q[0]:.2f}-{q[2]:.2f}, {len(pair)} pairs; target >= 1.2x)")


if __name__ == "__main__":
    main()
