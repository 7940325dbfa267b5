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

Peak resident memory of a training step (`--rss-steps`, on by default) is measured apart from the timed run, because
the timed run's lmforge process also drives the peer and builds a model per round: after the timed rounds, each side
runs once more in a fresh `spawn` child of its own (lmforge's `train()` with the timed run's TrainConfig; the peer
through the same `peer` / `ddp_peer` code the timed run uses, driven by the same messages), with the same model,
batches and optimizer settings: `--warmup` steps, then the peak is reset (`/proc/self/clear_refs` 5) and
`--rss-steps` more steps run; VmHWM from /proc/self/status then is the peak of a steady training step (model,
gradients, AdamW state, activations, and whatever freed memory the side's malloc setting keeps). The peak since the
child started (imports, model build, lmforge's one-time BLAS timing, the first steps) is printed too. Under
`--peer ddp` the peer's figure is the sum over its two processes.

    .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--steps 8] [--compile] [--peer-retain] [--peer ddp]
                                               [--rss-steps 8]
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


def train_config(args: argparse.Namespace, steps: int, compile_: bool = False) -> TrainConfig:
    """lmforge's side, as the timed run and the peak-RSS child both run it."""
    return TrainConfig(max_steps=steps, lr=HP["lr"], weight_decay=HP["weight_decay"], batch_size=args.batch_size,
                       schedule="constant", eval_every=0, grad_clip=1.0, progress=False, compile=compile_,
                       cores=args.cores, retain_memory=True, cpu_matmul=args.cpu_matmul)


def status_kb(field: str) -> int:
    """A kB field of /proc/self/status (VmHWM: peak resident set; VmRSS: resident set now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """The peak resident set of this process: `mark()` after the warm-up steps notes the peak so far and resets it
    (Linux: writing 5 to /proc/self/clear_refs sets VmHWM to the current RSS); `report()` after the measured
    steps."""

    def __init__(self):  # made first thing in the child: its RSS then is the interpreter with the imports
        self.imports_kb = status_kb("VmRSS")
        self.startup_kb = self.before_kb = 0
        self.reset = False

    def mark(self) -> None:
        self.startup_kb, self.before_kb = status_kb("VmHWM"), status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False

    def report(self) -> dict:
        peak = status_kb("VmHWM")
        return {"step_peak_kb": peak, "process_peak_kb": max(peak, self.startup_kb), "before_kb": self.before_kb,
                "imports_kb": self.imports_kb, "reset": self.reset}


def lmforge_rss(args: argparse.Namespace, conn) -> None:
    """lmforge's side in a fresh process: the timed run's TrainConfig, `--warmup` steps, peak reset,
    `--rss-steps` steps; sends PeakRSS.report()."""
    rss = PeakRSS()
    torch.set_num_threads(args.threads)
    batches = bench_batches(args)
    ours = bench_model(args.block_size)
    if args.warmup == 0:
        rss.mark()

    def hook(rec: dict) -> None:
        if rec["step"] == args.warmup:
            rss.mark()

    train(ours, batches, train_config(args, args.warmup + args.rss_steps), on_step=hook)
    conn.send(rss.report())


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
    page faults and loss sent back; None ends it. "mark" and "rss" serve the peak-RSS run (PeakRSS)."""
    rss = PeakRSS()
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
            if index == "mark":  # the peak-RSS run: the warm-up steps are done
                rss.mark()
                continue
            if index == "rss":
                conn.send([rss.report()])
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

    rss = PeakRSS()
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
    codes = {None: -1, "reset": -2, "mark": -3, "rss": -4}
    while True:
        if rank == 0:
            msg = conn.recv()
            index.fill_(codes[msg] if msg in codes else msg)
        dist.broadcast(index, 0)
        if int(index) == -3:  # the peak-RSS run: the warm-up steps are done
            rss.mark()
            continue
        if int(index) == -4:  # each rank's report, gathered on rank 0
            reports: list = [None, None]
            dist.all_gather_object(reports, rss.report())
            if rank == 0:
                conn.send(reports)
            continue
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
    ap.add_argument("--rss-steps", type=int, default=None,
                    help="steps after the warm-up in each side's fresh peak-RSS process (default: --steps; "
                         "0: do not measure)")
    args = ap.parse_args()
    if args.rss_steps is None:
        args.rss_steps = args.steps
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

        res = train(ours, batches, train_config(args, args.steps + args.warmup, compile_), on_step=peer_step)
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
    if args.rss_steps > 0:
        measure_rss(args)


def measure_rss(args: argparse.Namespace) -> dict:
    """Each side's peak RSS of a training step, each in a fresh process (see the module docstring); printed."""
    spawn = mp.get_context("spawn")
    conn, child_conn = spawn.Pipe()
    ours = spawn.Process(target=lmforge_rss, args=(args, child_conn))
    ours.start()
    mine = conn.recv()
    ours.join(timeout=60)

    conn, child_conn = spawn.Pipe()
    child = spawn.Process(target=ddp_peer if args.peer == "ddp" else peer, args=(args, child_conn),
                          daemon=args.peer != "ddp")
    child.start()
    conn.recv()  # ready
    conn.send("reset")
    for i in range(args.warmup + args.rss_steps):
        if i == args.warmup:
            conn.send("mark")
        conn.send(i)
        conn.recv()
    conn.send("rss")
    theirs = conn.recv()
    conn.send(None)
    child.join(timeout=60)

    def mib(kb: int) -> float:
        return kb / 1024

    peer_step = sum(r["step_peak_kb"] for r in theirs)
    peer_proc = sum(r["process_peak_kb"] for r in theirs)
    peer_before = sum(r["before_kb"] for r in theirs)
    peer_imports = sum(r["imports_kb"] for r in theirs)
    reset = mine["reset"] and all(r["reset"] for r in theirs)
    what = "2 DDP processes, summed" if args.peer == "ddp" else "its own process" + (
        ", keeping freed memory too" if args.peer_retain else "")
    print(f"\npeak RSS of a training step (VmHWM; each side in a fresh process, batch {args.batch_size} x "
          f"{args.block_size}, fused AdamW, {args.warmup} warm-up + {args.rss_steps} measured steps"
          + ("" if reset else "; /proc/self/clear_refs refused: peaks since start") + "):")
    print(f"  {'':13s} {'steady step peak':>17s} {'process peak':>13s} {'RSS after warm-up':>18s} "
          f"{'RSS of imports':>15s}")
    print(f"  {'lmforge':13s} {mib(mine['step_peak_kb']):13,.0f} MiB {mib(mine['process_peak_kb']):9,.0f} MiB "
          f"{mib(mine['before_kb']):14,.0f} MiB {mib(mine['imports_kb']):11,.0f} MiB")
    print(f"  {'transformers':13s} {mib(peer_step):13,.0f} MiB {mib(peer_proc):9,.0f} MiB "
          f"{mib(peer_before):14,.0f} MiB {mib(peer_imports):11,.0f} MiB   ({what})")
    print(f"  ratio lmforge / transformers: steady step peak {mine['step_peak_kb'] / peer_step:.2f}x, process peak "
          f"{mine['process_peak_kb'] / peer_proc:.2f}x")
    return {"lmforge": mine, "transformers": theirs}


if __name__ == "__main__":
    main()
