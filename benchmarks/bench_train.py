"""Training throughput on CPU: lmforge's loop vs a plain `transformers` LlamaForCausalLM, same run.

Both train the same ~20M-parameter Llama-shaped model (same config, same initial weights via tests/helpers.py's to_hf_model),
on the same batches (B x T random windows of a fixed token stream), with AdamW (same hyper-parameters), gradient
clipping at 1.0, fp32. The Hugging Face side is the loop a user writes by hand: `model(input_ids, labels=...)`,
`loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW(...)` with its default implementation.

The steps interleave one for one: lmforge's `train()` runs with an `on_step` hook that has the transformers side
take one step after each of its own (lmforge's tokens/s excludes the hook). Each pair of neighbouring steps sees the
same machine load, so the median of the per-pair ratios is steady on a shared machine where the speed of the whole
box drifts by +-20% within a minute; the medians of tokens/s are printed too. The first steps of each run (warm-up,
and the one-time compile with --compile) are dropped.

The transformers side runs in its own process (started with `spawn`, waiting on a pipe while lmforge steps), so
each side has the process a user would give it: lmforge's `train()` keeps freed memory for the next step
(`lmforge.training.heap`), and that process-wide malloc setting must not reach the peer, whose loop has no such thing.
`--peer-retain` gives the peer the same setting, to show how much of the ratio it accounts for.

    .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--steps 8] [--compile] [--peer-retain]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.models.config import ModelConfig  # noqa: E402
from lmforge.training.data import PackedBatches  # noqa: E402
from lmforge.training.heap import page_faults, retain_freed_memory  # noqa: E402
from tests.helpers import to_hf_model  # noqa: E402
from lmforge.models.decoder import Transformer  # noqa: E402
from lmforge.training.loop import TrainConfig, train  # noqa: E402


def bench_model(block_size: int) -> Transformer:
    cfg = ModelConfig.from_name("llama-small", vocab_size=8192, block_size=block_size, n_layer=6, n_embd=512,
                                n_head=8, n_kv_head=4, intermediate_size=1376)
    torch.manual_seed(0)
    return Transformer(cfg)


def bench_batches(args: argparse.Namespace) -> PackedBatches:
    toks = np.random.default_rng(0).integers(0, 8192, size=200_000)
    return PackedBatches(toks, args.batch_size, args.block_size, seed=0)


HP = dict(lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)


def peer(args: argparse.Namespace, conn) -> None:
    """The transformers side, in its own process: one training step per batch index received, its tokens/s
    and page faults sent back; None ends it."""
    torch.set_num_threads(args.threads)
    theirs = to_hf_model(bench_model(args.block_size)).train()  # the same initial weights as lmforge's side
    batches = bench_batches(args)
    tok_per_step = args.batch_size * args.block_size
    opt = torch.optim.AdamW(theirs.parameters(), **HP)
    with retain_freed_memory() if args.peer_retain else contextlib.nullcontext():
        conn.send("ready")
        while (index := conn.recv()) is not None:
            b = batches(index)
            f0 = page_faults()
            t0 = time.perf_counter()
            # HF shifts labels inside the loss: pass the window (T+1 tokens would change T), so we give the
            # inputs as labels and the same T positions are scored (T-1 of them; the cost is identical)
            loss = theirs(input_ids=b["input_ids"], labels=b["input_ids"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss.detach())
            conn.send((tok_per_step / (time.perf_counter() - t0), page_faults() - f0))


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
    ap.add_argument("--peer-retain", action="store_true",
                    help="run the transformers side inside lmforge.training.heap.retain_freed_memory() as well")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ours = bench_model(args.block_size)
    n_params = ours.num_params()
    batches = bench_batches(args)
    spawn = mp.get_context("spawn")
    conn, child_conn = spawn.Pipe()
    child = spawn.Process(target=peer, args=(args, child_conn), daemon=True)
    child.start()
    conn.recv()  # the peer has built its model
    hf_step_index = [0]
    faults: dict[str, list[int]] = {"lmforge": [], "transformers": []}  # page faults per step, warm-up dropped

    def run_pair(compile_: bool) -> tuple[list[float], list[float]]:
        """lmforge's steps and the transformers step taken right after each (tokens/s), warm-up dropped."""
        hf_tps: list[float] = []
        last = [page_faults()]

        def hf_step(rec: dict) -> None:
            ours_faults = page_faults() - last[0]  # since the end of the previous hook: lmforge's own step
            conn.send(hf_step_index[0])
            hf_step_index[0] += 1
            tps, hf_faults = conn.recv()
            hf_tps.append(tps)
            if len(hf_tps) > args.warmup:
                faults["lmforge"].append(ours_faults)
                faults["transformers"].append(hf_faults)
            last[0] = page_faults()

        res = train(ours, batches, TrainConfig(max_steps=args.steps + args.warmup, lr=HP["lr"],
                                               weight_decay=HP["weight_decay"], batch_size=args.batch_size,
                                               schedule="constant", eval_every=0, grad_clip=1.0, progress=False,
                                               compile=compile_, cores=args.cores, retain_memory=True,
                                               cpu_matmul=args.cpu_matmul),
                    on_step=hf_step)
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
          f"torch {torch.__version__}, transformers in its own process"
          f"{' (keeping freed memory too)' if args.peer_retain else ''}, load average {os.getloadavg()[0]:.1f}")
    for k, v in tps.items():
        name = "lmforge" if k == "eager" else "lmforge+compile"
        pair = [a / b for a, b in zip(v["lmforge"], v["transformers"])]
        q = statistics.quantiles(pair, n=4) if len(pair) > 1 else [pair[0]] * 3
        print(f"{name:16s} {statistics.median(v['lmforge']):8,.0f} tok/s | transformers steps next to it "
              f"{statistics.median(v['transformers']):8,.0f} tok/s | per-pair ratio "
              f"median {statistics.median(pair):.2f}x "
              f"(quartiles {q[0]:.2f}-{q[2]:.2f}, {len(pair)} pairs; target >= 1.2x)")
    print(f"page faults per step (median): lmforge {statistics.median(faults['lmforge']):,.0f}, transformers "
          f"{statistics.median(faults['transformers']):,.0f} (each is a 4 KiB page the kernel zeroes on first touch)")
    conn.send(None)
    child.join()


if __name__ == "__main__":
    main()
