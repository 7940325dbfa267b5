"""Training on every CPU core at once: one shard of each batch per core, each shard single-threaded.

PyTorch's usual way to use several CPU cores is *intra-op* parallelism: every op (a matrix product, a softmax, an
add) is cut across the cores and joined again before the next op starts. A training step of a small transformer
is a few thousand ops, and each join makes the fast cores wait for the slow one. The other way is the one
data-parallel training uses across machines, brought inside one process: cut the batch into one shard per core,
let each core run the whole forward and backward of its shard with single-threaded ops, and add the shards'
gradients. Nothing waits until the end of the step.

    batch (B rows) -> shard 0 (rows 0..B/2)  -> core 0: loss_0, grads_0 ┐
                   -> shard 1 (rows B/2..B)  -> core 1: loss_1, grads_1 ┴> grad = w_0 grads_0 + w_1 grads_1

Each shard's loss is weighted by its share of what the loss averages over (w_i = rows_i / B for a mean over
rows; its share of the scored tokens for a token mean), so the summed gradient is the whole batch's gradient to
float rounding, as when gradient accumulation adds micro-batches. The sum is taken in a fixed order, so a run is
as repeatable as a single-threaded one: resuming after a crash gives bit-identical losses.

Two more things make a shard fast:

- **The matrix products.** With one thread per shard, each product is single-threaded, and the BLAS that does it
  matters. PyTorch's CPU wheels use Intel's MKL; numpy's wheels ship OpenBLAS, which on some CPUs (AMD's among
  them) can run these products faster. `cpu_matmul="auto"` times both once on the model's own layer shapes, n
  threads at once as the shards run them, and takes the faster. The numpy route is a `torch.library` custom op
  with its own backward (dX = dY W, dW = dYᵀ X), so `torch.compile` keeps it as one opaque call in its graph.
- **No thread pool fighting another.** OpenBLAS's worker threads and PyTorch's OpenMP threads each spin while
  they wait for work; two pools on the same cores slow each other down. Here every pool is held at one thread
  for the step (`torch.set_num_threads(1)`, and numpy's BLAS through threadpoolctl), and the only threads that
  run are the shards' own.

Only a loss whose rows are scored independently can be cut this way, so `train()` shards a batch only when its
loss function says what it averages over: rows (`lmforge.training.batch.row_mean`, classification) or scored target tokens
(`token_mean`, the next-token cross-entropy; a shard then weighs its share of the scored tokens, so SFT batches
whose prompts are masked add up to the whole batch's mean). DPO, whose rows pair a chosen answer with a rejected
one, sees its batches whole.

The cost: the shards run in Python threads, so a model's Python code takes turns holding the interpreter lock
(the ops themselves release it), and dropout draws from PyTorch's one global random generator, whose order two
threads would make unrepeatable, so models with dropout train the usual way. `TrainConfig(cores=...)` picks the
mode; `auto` uses it for fp32 training on a CPU in one process when torch has more than one thread.

    from lmforge.training.cores import CoreParallel
    with CoreParallel(model, n=2, matmul="numpy", mean="tokens") as cores:  # what train() builds on 2 cores
        loss = cores.backward(next_token_loss, model, batch)  # fills p.grad as loss.backward() would
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import kernels
from lmforge.errors import ConfigError
from lmforge.training.batch import split_batch, unique_trainable
from lmforge.utils import atomic_write_json


# ----------------------------------------------------------------------------------------------------------------
# Matrix products through numpy's BLAS, as custom ops that autograd and torch.compile understand
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lmforge::np_mm", mutates_args=())
def np_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D fp32 CPU tensors, computed by numpy's BLAS. Transposed views are passed as BLAS flags."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    np.matmul(_blas_view(a), _blas_view(b), out=out.numpy())
    return out


@np_mm.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


def _blas_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view BLAS can read without a copy: row-major, or a transposed (column-major) matrix."""
    if not (t.is_contiguous() or t.t().is_contiguous()):
        t = t.contiguous()
    return t.numpy()


@torch.library.custom_op("lmforge::np_linear", mutates_args=())
def np_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear (x W^T + b) with the product done by numpy's BLAS. x: (..., in), weight: (out, in)."""
    y = np_mm(x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])


@np_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _np_linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _np_linear_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = np_mm(g, weight).view(x.shape)  # dX = dY W: (N, out) @ (out, in)
    if ctx.needs_input_grad[1]:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        if weight.t().is_contiguous() and not weight.is_contiguous():
            gw = np_mm(x2.t(), g).t()  # a column-major weight gets a column-major gradient: (X^T dY)^T
        else:
            gw = np_mm(g.t(), x2)  # dW = dY^T X: (out, N) @ (N, in)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = g.sum(0)
    return gx, gw, gb


np_linear.register_autograd(_np_linear_backward, setup_context=_np_linear_setup)


def _np_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return np_linear(x, self.weight, self.bias)


@contextlib.contextmanager
def numpy_linears(model: nn.Module) -> Iterator[int]:
    """Route every plain fp32 CPU `nn.Linear` of `model` through numpy's BLAS while the block runs.

    Yields how many modules were routed. Each module's own forward is restored on exit (the patch is an
    instance attribute, so other models of the same class are never touched)."""
    routed = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
              and m.weight.device.type == "cpu" and "forward" not in vars(m)]
    for m in routed:
        kernels.own_(m, "weight")  # BLAS reads the weight's memory directly: owned and aligned, never a file view
        m.forward = types.MethodType(_np_linear_forward, m)
    try:
        yield len(routed)
    finally:
        for m in routed:
            vars(m).pop("forward", None)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch's intra-op pool held at one thread inside the block (the setting is process-wide)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _in_order_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """t0 + t1 + ... added left to right, always in this order (a run stays repeatable bit for bit)."""
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


_MATMUL_CHOICE: dict[tuple, str] = {}


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every distinct plain fp32 CPU nn.Linear in the model: what `numpy_linears` would route."""
    return sorted({(m.in_features, m.out_features) for m in model.modules() if type(m) is nn.Linear
                   and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"})


def pick_matmul(n: int, shapes: list[tuple[int, int]], rows: int = 512) -> str:
    """"numpy" if numpy's BLAS runs these linear layers' products faster than torch's, else "torch".

    Measured once per machine and remembered (`matmul_choices_file`): the two libraries round differently, so a
    pick that flipped between runs would make two runs with the same seed give different weights. The first run
    on a machine times them; every later run, in any process, reuses that pick (delete the file to time again).
    Timed as the shards use them: n threads at once, each single-threaded, each running the forward and backward
    (three products) of a `rows`-row batch through a linear layer of every (in, out) shape. The two libraries
    take turns, 7 timed rounds each after a warm-up, and the median of the 7 ratios of neighbouring rounds decides
    (neighbours see the same load from anything else on the machine): about 4 s for a 20M-parameter model, a
    fraction of a second for a small one (the custom op's first use also imports torch._dynamo, ~2 s)."""
    key = (n, tuple(shapes), rows)
    if key in _MATMUL_CHOICE:
        return _MATMUL_CHOICE[key]
    if not shapes:
        return "torch"
    name = _machine_key(n, shapes, rows)
    choice = _recorded_matmul(name)
    if choice is None:
        choice = _record_matmul(name, _time_matmuls(n, shapes, rows))
    _MATMUL_CHOICE[key] = choice
    return choice


def _time_matmuls(n: int, shapes: list[tuple[int, int]], rows: int) -> str:
    """The faster library for these shapes, measured now (see `pick_matmul`)."""
    from threadpoolctl import threadpool_limits

    tensors = [(torch.randn(rows, i, requires_grad=True), torch.randn(o, i, requires_grad=True),
                torch.randn(rows, o)) for i, o in shapes]

    def run(linear):
        for x, w, g in tensors:
            torch.autograd.grad(linear(x, w, None), (x, w), g)

    times: dict[str, list[float]] = {"torch": [], "numpy": []}
    with _one_torch_thread(), threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(n) as pool:
        for i in range(8):
            for name, linear in (("torch", F.linear), ("numpy", np_linear)):
                t0 = time.perf_counter()
                for f in [pool.submit(run, linear) for _ in range(n)]:
                    f.result()
                if i:  # the first round warms both up
                    times[name].append(time.perf_counter() - t0)
    ratios = sorted(t / n for t, n in zip(times["torch"], times["numpy"]))  # neighbours in time: same load
    return "numpy" if ratios[len(ratios) // 2] > 1.0 else "torch"


def matmul_choices_file() -> Path:
    """Where the per-machine picks live: $LMFORGE_CACHE/cpu_matmul.json (default ~/.cache/lmforge)."""
    import os

    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("LMFORGE_CACHE") or Path(cache) / "lmforge") / "cpu_matmul.json"


def _machine_key(n: int, shapes: list[tuple[int, int]], rows: int) -> str:
    """What the pick depends on: the CPU, the two libraries' versions, the thread count and the layer shapes."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} | torch {torch.__version__} | numpy {np.__version__} | {n} threads | {rows} rows | {sorted(shapes)}"


def _recorded_matmul(name: str) -> str | None:
    import json

    try:
        choice = json.loads(matmul_choices_file().read_text(encoding="utf-8")).get(name)
    except (OSError, ValueError, AttributeError):
        return None
    return choice if choice in ("torch", "numpy") else None


def _record_matmul(name: str, choice: str) -> str:
    """Store `choice` unless another process stored one first (then that one is used: every run agrees)."""
    import fcntl
    import json

    path = matmul_choices_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                table = json.loads(path.read_text(encoding="utf-8"))
                table = table if isinstance(table, dict) else {}
            except (OSError, ValueError):
                table = {}
            if table.get(name) in ("torch", "numpy"):
                return table[name]
            table[name] = choice
            atomic_write_json(path, table)
    except OSError:  # a read-only home: this process still uses one pick throughout
        pass
    return choice


# ----------------------------------------------------------------------------------------------------------------
# Shards of a batch
# ----------------------------------------------------------------------------------------------------------------
def _rows(batch: Any) -> int | None:
    """The number of rows every tensor of the batch shares (dim 0), or None if the batch cannot be cut by rows."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    leaves = list(batch.values()) if isinstance(batch, dict) else list(batch) if isinstance(batch, (tuple, list)) \
        else None
    if not leaves:
        return None
    sizes = {_rows(x) for x in leaves}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def _take(batch: Any, lo: int, hi: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    if isinstance(batch, dict):
        return {k: _take(v, lo, hi) for k, v in batch.items()}
    return type(batch)(_take(v, lo, hi) for v in batch)


def shard_batch(batch: Any, n: int, mean: str = "rows") -> list[tuple[Any, float]]:
    """Cut a batch (tensor, dict or tuple of tensors sharing dim 0) into at most n shards of consecutive rows.

    Returns (shard, weight) pairs; the weights add up to 1 and make the weighted sum of the shards' mean losses
    the whole batch's mean loss. `mean="rows"`: the loss averages over rows, and a shard weighs its share of the
    rows. `mean="tokens"`: the loss averages over the targets that are not -100 (`next_token_loss`), and a shard
    weighs its share of the scored targets; a shard with none is left out (its mean would be 0/0).
    [] if the batch has no common row dimension or nothing to score (then it runs whole)."""
    rows = _rows(batch)
    if not rows:
        return []
    n = min(n, rows)
    bounds = [rows * i // n for i in range(n + 1)]
    shards = [_take(batch, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    if mean == "rows":
        return [(s, (hi - lo) / rows) for s, lo, hi in zip(shards, bounds, bounds[1:])]
    counts = [int((split_batch(s)[1] != -100).sum()) for s in shards]  # the targets a token mean scores
    total = sum(counts)
    return [(s, c / total) for s, c in zip(shards, counts) if c] if total else []


# ----------------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------------
def dropout_active(model: nn.Module) -> bool:
    """Whether a training forward of `model` would draw random numbers for dropout."""
    cfg = getattr(model, "config", None)
    if float(getattr(cfg, "dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


class CoreParallel:
    """Runs each batch as `n` shards on `n` threads, each single-threaded, and sums the gradients in order.

    Use `backward` in place of ``loss_fn(model, batch).backward()`` and `loss` in place of a no-grad
    ``loss_fn(model, batch)``, for a loss whose rows are scored independently and averaged over rows or over
    tokens (`mean`, see `shard_batch`). Enter the object (``with cores:``) around the whole run: numpy's BLAS is
    then held at one thread, and with `matmul="numpy"` the model's Linears take numpy's product. Leaving the block
    (or `close`) restores both and stops the threads.
    """

    def __init__(self, model: nn.Module, n: int, matmul: str = "torch", mean: str = "rows"):
        if n < 2:
            raise ConfigError(f"cores={n}: core-parallel training needs at least 2 cores")
        if matmul not in ("torch", "numpy"):
            raise ConfigError(f"cpu_matmul={matmul!r} is not one of: auto, torch, numpy")
        if mean not in ("rows", "tokens"):
            raise ConfigError(f"mean={mean!r}: a loss averages over 'rows' or 'tokens'")
        self.model, self.n, self.matmul, self.mean = model, n, matmul, mean
        self.params = [p for _, p in unique_trainable(model)]  # a tied weight once
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="lmforge-core")
        self._stack = contextlib.ExitStack()
        self._warm: set[tuple] = set()  # step functions already run once (a first compile runs alone)

    def __enter__(self) -> CoreParallel:
        from threadpoolctl import threadpool_limits

        self._stack.enter_context(threadpool_limits(1, user_api="blas"))
        if self.matmul == "numpy":
            self._stack.enter_context(numpy_linears(self.model))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, fn: Callable, shards: list, key: tuple) -> list:
        """fn(shard) on the pool, one thread per shard, torch held at one thread; results in shard order."""
        with _one_torch_thread():
            if key not in self._warm:  # the first call of a step function runs its shards one at a time, so
                self._warm.add(key)     # that a torch.compile happens once, without a second thread waiting
                return [self._pool.submit(fn, s).result() for s in shards]
            futures = [self._pool.submit(fn, s) for s in shards]
            return [f.result() for f in futures]

    def backward(self, loss_fn: Callable, model: nn.Module, batch: Any, scale: float = 1.0) -> torch.Tensor:
        """Like ``(loss_fn(model, batch) * scale).backward()``; returns the batch's loss (detached).

        Gradients add onto any already in ``p.grad`` (gradient accumulation), shard 0 first; shards are weighted
        by what the loss averages over (`mean`, given at construction; see `shard_batch`)."""
        shards = shard_batch(batch, self.n, self.mean)
        if len(shards) < 2:  # nothing to cut: the usual way, with torch's own threads
            loss = loss_fn(model, batch)
            (loss * scale).backward()
            return loss.detach()
        params = self.params

        def one(item):
            shard, weight = item
            loss = loss_fn(model, shard)
            grads = torch.autograd.grad(loss * (weight * scale), params, allow_unused=True)
            return loss.detach() * weight, grads

        results = self._run(one, shards, ("backward", id(loss_fn)))
        for i, p in enumerate(params):
            grads = [r[1][i] for r in results if r[1][i] is not None]
            if not grads:
                continue
            g = _in_order_sum(grads)
            if p.grad is None:
                p.grad = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
            else:
                p.grad += g
        return _in_order_sum([r[0] for r in results])

    @torch.no_grad()
    def loss(self, loss_fn: Callable, model: nn.Module, batch: Any) -> torch.Tensor:
        """loss_fn(model, batch) computed shard by shard on the cores (no gradients), shards weighted as in
        `backward`."""
        shards = shard_batch(batch, self.n, self.mean)
        if len(shards) < 2:
            return loss_fn(model, batch)

        def one(item):
            shard, weight = item
            with torch.no_grad():  # grad mode is per thread
                return loss_fn(model, shard).detach() * weight

        return _in_order_sum(self._run(one, shards, ("loss", id(loss_fn))))
