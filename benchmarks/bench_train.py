"""Training throughput on CPU: lmforge's loop vs a plain `transformers` LlamaForCausalLM, same run.

Both train the same ~20M-parameter Llama-shaped model (same config, same initial weights via lmforge.hf.to_hf_model),
on the same batches (B x T random windows of a fixed token stream), with AdamW (same hyper-parameters), gradient
clipping at 1.0, fp32. The Hugging Face side is the loop a user writes by hand: `model(input_ids, labels=...)`,
`loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW(...)` with its default implementation. Rounds alternate
between the two so that load from other processes on a shared machine hits both alike; we report the median
tokens/s per step (the first step of each round is a warm-up and is dropped).

    .venv/bin/python benchmarks/bench_train.py [--rounds 4] [--steps 6] [--compile]
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also measure lmforge with torch.compile")
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

    def run_lmforge(compile_: bool) -> list[float]:
        res = train(ours, batches, TrainConfig(max_steps=args.steps, lr=hp["lr"], weight_decay=hp["weight_decay"],
                                               batch_size=args.batch_size, schedule="constant", eval_every=0,
                                               grad_clip=1.0, progress=False, compile=compile_))
        return [r["tok_per_s"] for r in res.history[1:]]

    hf_opt = torch.optim.AdamW(theirs.parameters(), **hp)

    def run_hf() -> list[float]:
        out = []
        for i in range(args.steps):
            b = batches(i)
            t0 = time.perf_counter()
            # HF shifts labels inside the loss: pass the window (T+1 tokens would change T), so we give the
            # inputs as labels and the same T positions are scored (T-1 of them; the cost is identical)
            loss = theirs(input_ids=b["input_ids"], labels=b["input_ids"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
            float(loss.detach())
            out.append(tok_per_step / (time.perf_counter() - t0))
        return out[1:]

    results: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    if args.compile:
        results["lmforge+compile"] = []
    for r in range(args.rounds):
        results["lmforge"] += run_lmforge(False)
        results["transformers"] += run_hf()
        if args.compile:
            results["lmforge+compile"] += run_lmforge(True)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {statistics.median(v):,.0f} tok/s"
                                                           for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nmodel: Llama-shaped, {n_params / 1e6:.1f}M params (n_layer=6, n_embd=512, n_head=8, n_kv_head=4, "
          f"vocab 8192), batch {args.batch_size} x {args.block_size}, fp32, {args.threads} threads, "
          f"torch {torch.__version__}")
    for k, v in med.items():
        print(f"{k:18s} {v:10,.0f} tokens/s (median of {len(results[k])} steps)")
    print(f"ratio lmforge / transformers: {med['lmforge'] / med['transformers']:.2f}x (target >= 1.2x)")
    if args.compile:
        print(f"ratio lmforge+compile / transformers: {med['lmforge+compile'] / med['transformers']:.2f}x")


if __name__ == "__main__":
    main()
