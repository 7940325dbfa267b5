"""Training throughput on CPU: lmforge's loop vs a plain `transformers` LlamaForCausalLM, same run.

Both train the same ~20M-parameter Llama-shaped model (same config, same initial weights via tests/helpers.py's to_hf_model),
on the same batches (step i of each side reads batch i: B x T random windows of a fixed token stream), scoring the
same B x T next-token targets, with AdamW (same hyper-parameters and parameter groups: decay on matrices only),
gradient clipping at 1.0, fp32. The Hugging Face side is the loop a competent user writes by hand: logits from
`model(input_ids)`, cross-entropy on the targets, `loss.backward()`, `clip_grad_norm_`, and
`torch.optim.AdamW(..., fused=True)` (the fastest CPU AdamW; lmforge uses it too). Each step's two losses are
printed side by side: they start equal and drift only by float rounding, which shows both did the same work.

The steps interleave one for one: lmforge's `train()` runs with an `on_step` hook that has the transformers side
take one step after each of its own (lmforge's tokens/s excludes the hook). Each pair of neighbouring steps sees the
same machine load, so the median of the per-pair ratios is steady on a shared machine where the speed of the whole
box drifts by +-20% within a minute; the medians of tokens/s are printed too. The first steps of each run (warm-up,
and the one-time compile with --compile) are dropped.

The transformers side runs in its own process (started with `spawn`, waiting on a pipe while lmforge steps), so
each side has the process a user would give it: lmforge's `train()` keeps freed memory for the next step
(`lmforge.training.heap`), and that process-wide malloc setting must not reach the peer, whose loop has no such thing.
`--peer-retain` gives the peer the same setting, to show how much of the ratio it accounts for: report both.

`--peer ddp` replaces the one-process peer by the natural peer of lmforge's core-parallel steps (`cores`: one
shard of the batch per core): transformers under PyTorch DDP with 2 processes (gloo, 1 thread each, half the batch
each, gradients all-reduced), stepping in turn with lmforge as the one-process peer does.

    .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--steps 8] [--compile] [--peer-retain] [--peer ddp]
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


def hf_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW as lmforge's configure_optimizer builds it: decay on matrices only, fused kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": HP["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], fused=True)


def hf_step(model, opt, batch: dict, params) -> float:
    """One training step of the hand-written transformers loop; returns the loss."""
    logits = model(input_ids=batch["input_ids"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def peer(args: argparse.Namespace, conn) -> None:
    """The transformers side, in its own process: one training step per batch index received, its tokens/s,
    page faults and loss sent back; None ends it."""
    torch.set_num_threads(args.threads)
    batches = bench_batches(args)
    tok_per_step = args.batch_size * args.block_size
    with retain_freed_memory() if args.peer_retain else contextlib.nullcontext():
        conn.send("ready")
        while (index := conn.recv()) is not None:
            if index == "reset":  # a new round: the same initial weights as lmforge's side, a fresh optimizer
                theirs = to_hf_model(bench_model(args.block_size)).train()
                opt = hf_optimizer(theirs)
                params = list(theirs.parameters())
                continue
            b = batches(index)
            f0 = page_faults()
            t0 = time.perf_counter()
            loss = hf_step(theirs, opt, b, params)
            conn.send((tok_per_step / (time.perf_counter() - t0), page_faults() - f0, loss))


def ddp_peer(args: argparse.Namespace, conn, rank: int = 0, init_file: str = "") -> None:
    """The DDP peer: rank 0 talks to the benchmark over `conn` and starts rank 1; both take each step on their
    half of the batch (1 thread each), DDP all-reduces the gradients over gloo. Rank 0 reports the step's wall time
    for the whole batch and the mean loss of the two halves."""
    import tempfile

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    if rank == 0:
        init_file = os.path.join(tempfile.mkdtemp(prefix="bench-ddp-"), "init")
        other = mp.get_context("spawn").Process(target=ddp_peer, args=(args, None, 1, init_file), daemon=True)
        other.start()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    batches = bench_batches(args)
    half = args.batch_size // 2
    tok_per_step = args.batch_size * args.block_size
    if rank == 0:
        conn.send("ready")
    index = torch.zeros((), dtype=torch.long)
    while True:
        if rank == 0:
            msg = conn.recv()
            index.fill_(-1 if msg is None else -2 if msg == "reset" else msg)
        dist.broadcast(index, 0)
        if int(index) == -2:  # a new round: the same initial weights as lmforge's side, a fresh optimizer
            model = to_hf_model(bench_model(args.block_size)).train()
            ddp = DDP(model)
            opt = hf_optimizer(model)
            params = list(model.parameters())
            continue
        if int(index) < 0:
            break
        b = {k: v[rank * half:(rank + 1) * half] for k, v in batches(int(index)).items()}
        f0 = page_faults()
        t0 = time.perf_counter()
        loss = torch.tensor(hf_step(ddp, opt, b, params))
        dist.all_reduce(loss)  # for the report only: the mean loss of the whole batch
        if rank == 0:
            conn.send((tok_per_step / (time.perf_counter() - t0), page_faults() - f0, float(loss) / 2))
    dist.destroy_process_group()


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
    ap.add_argument("--peer", default="process", choices=["process", "ddp"],
                    help="process: transformers in one process with --threads; ddp: 2 gloo DDP processes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    n_params = bench_model(args.block_size).num_params()
    batches = bench_batches(args)
    spawn = mp.get_context("spawn")
    conn, child_conn = spawn.Pipe()
    if args.peer == "ddp" and args.batch_size % 2:
        raise SystemExit("--peer ddp splits the batch over 2 processes: --batch-size must be even")
    child = spawn.Process(target=ddp_peer if args.peer == "ddp" else peer, args=(args, child_conn),
                          daemon=args.peer != "ddp")  # a daemon cannot start rank 1
    child.start()
    conn.recv()  # the peer has built its model
    losses: list[tuple[int, float, float]] = []  # (step, lmforge loss, transformers loss)
    faults: dict[str, list[int]] = {"lmforge": [], "transformers": []}  # page faults per step, warm-up dropped

    def run_pair(compile_: bool) -> tuple[list[float], list[float]]:
        """lmforge's steps and the transformers step taken right after each (tokens/s), warm-up dropped. Both
        sides start the run from the same initial weights with a fresh optimizer, so their losses can be compared."""
        ours = bench_model(args.block_size)
        conn.send("reset")
        hf_tps: list[float] = []
        last = [page_faults()]

        def peer_step(rec: dict) -> None:
            ours_faults = page_faults() - last[0]  # since the end of the previous hook: lmforge's own step
            conn.send(rec["step"] - 1)  # lmforge's step i read batch i: the peer reads the same batch
            tps, hf_faults, hf_loss = conn.recv()
            hf_tps.append(tps)
            losses.append((rec["step"], rec["loss"], hf_loss))
            if len(hf_tps) > args.warmup:
                faults["lmforge"].append(ours_faults)
                faults["transformers"].append(hf_faults)
            last[0] = page_faults()

        res = train(ours, batches, TrainConfig(max_steps=args.steps + args.warmup, lr=HP["lr"],
                                               weight_decay=HP["weight_decay"], batch_size=args.batch_size,
                                               schedule="constant", eval_every=0, grad_clip=1.0, progress=False,
                                               compile=compile_, cores=args.cores, retain_memory=True,
                                               cpu_matmul=args.cpu_matmul),
                    on_step=peer_step)
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
          f"torch {torch.__version__}, transformers "
          + ("under DDP: 2 gloo processes x 1 thread, half the batch each" if args.peer == "ddp"
             else f"in its own process, fused AdamW{' (keeping freed memory too)' if args.peer_retain else ''}")
          + f", load average {os.getloadavg()[0]:.1f}")
    diffs = [abs(a - b) / abs(b) for _, a, b in losses]
    first = losses[0]
    print(f"losses (same batches, same initial weights): step 1 lmforge {first[1]:.6f} vs transformers "
          f"{first[2]:.6f}; relative difference median {statistics.median(diffs):.1e}, max {max(diffs):.1e} over "
          f"{len(losses)} steps (rounding drift only if small); last step {losses[-1][1]:.4f} vs {losses[-1][2]:.4f}")
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
    child.join(timeout=60)


if __name__ == "__main__":
    main()
