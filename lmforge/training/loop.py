"""The one training loop: pretraining and every fine-tuning recipe run through `train()`.

What a training step does (Loshchilov & Hutter 2019 for AdamW; nanoGPT's train.py is the shape we follow):

    for step in range(max_steps):
        lr = schedule(step)                         # linear warmup, then cosine decay (or constant / WSD)
        for micro in range(grad_accum_steps):       # gradient accumulation: a big batch in small pieces
            loss = loss_fn(model, next_batch())     # default: next-token cross-entropy
            (loss / grad_accum_steps).backward()    # the gradients of the pieces add up to the big batch's
        clip_grad_norm_(params, grad_clip)          # one bad batch cannot blow the weights up
        optimizer.step(); optimizer.zero_grad()

Why each piece is there:
- **AdamW with weight-decay groups.** Decay pulls weights toward zero (a regularizer). It is applied to matrices
  (linear and embedding weights) but not to biases and norm gains, whose job is to shift and scale, not to store
  patterns. Only parameters with ``requires_grad`` are handed to the optimizer, so a frozen base model with LoRA
  adapters trains the adapters alone. PyTorch's *fused* AdamW updates all tensors in one kernel.
- **Warmup + cosine.** Adam's second-moment estimates are noisy in the first steps; a small, rising learning rate
  avoids early divergence. Cosine decay then anneals to ``min_lr`` so the final weights settle in a minimum. WSD
  (warmup-stable-decay) holds the peak rate and decays only in the last ``decay_frac`` of the run, which lets one
  continue a run without restarting the schedule. ``constant`` is for short fine-tunes.
- **Mixed precision.** On CUDA the forward pass runs under bf16 autocast (same exponent range as fp32, so no loss
  scaling); weights and optimizer state stay fp32. On CPU we train in fp32.
- **Every CPU core.** On a CPU each micro-batch is cut into one shard per core, and each core runs its shard's
  forward and backward single-threaded; the gradients are added in a fixed order (`lmforge.training.cores`, ``cores``).
  No op waits for the other cores, and the products can use whichever BLAS is faster here.
- **Exact resume.** A checkpoint is the run directory plus ``train_state/``: trainable weights (fp32, safetensors),
  optimizer moments, RNG states, the step and the *data position*. Batches are addressed by a global index
  (``train_data(index)``), so the resumed run draws exactly the batches the killed run would have drawn, and on
  CPU the losses after a SIGKILL + resume are bit-identical to an uninterrupted run. Checkpoints are written into
  a temporary sibling directory and swapped in by rename (`lmforge.utils.atomic_dir`): a crash or a full disk
  during a save leaves the previous checkpoint as it was.
- **Scale-out.** Under ``torchrun`` the same function joins the process group (gloo on CPU, NCCL on GPU) and wraps
  the model in DDP (or FSDP2's ``fully_shard`` for models that do not fit one device). Rank ``r`` of ``W`` draws
  batch ``(step * grad_accum_steps + micro) * W + r``, so two processes with accumulation 1 see exactly the
  batches one process with accumulation 2 sees, and the averaged gradient is the same.

Data a loop can consume: a callable ``index -> batch`` (the datasets in `lmforge.training.data` are such callables), a
sequence of batches (cycled), or any re-iterable such as a ``torch.utils.data.DataLoader`` (epochs restart it;
on resume it is fast-forwarded). A batch is a dict with ``input_ids`` and ``labels`` (labels already shifted, -100
ignored), or a tuple ``(inputs, targets)``; custom ``loss_fn(model, batch) -> scalar loss`` may take anything.

    from lmforge.training.loop import TrainConfig, train
    result = train(model, train_batches, TrainConfig(max_steps=200, lr=3e-4), val_data=val_batches,
                   out_dir="runs/x", save_model=lambda d: lm.save(d))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.generation.loop import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.training.batch import count_tokens, next_token_loss, to_device, unique_trainable
from lmforge.training.cores import CoreParallel, dropout_active, linear_shapes, pick_matmul
from lmforge.training.heap import retain_freed_memory
from lmforge.training.moe import plot_router_load, router_aux_loss_for
from lmforge.utils import atomic_dir, atomic_write, atomic_write_json, parse_device

TRAIN_STATE_DIR = "train_state"
STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Settings of the loop. Recipes embed these field names in their own config dataclasses."""

    max_steps: int = field(default=1000, metadata={"help": "optimizer steps to run"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch (per process)"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of lr"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warmup"})
    schedule: Literal["cosine", "constant", "wsd"] = field(
        default="cosine", metadata={"help": "learning-rate schedule after warmup: cosine, constant or wsd"})
    decay_frac: float = field(default=0.2, metadata={"help": "wsd: fraction of the run spent decaying"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0: off)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the forward pass and the loss (a one-time "
                                                           "compile, then faster steps; needs a C++ compiler on CPU)"})
    parallel: Literal["ddp", "fsdp"] = field(default="ddp", metadata={"help": "under torchrun: ddp or fsdp"})
    cores: int = field(default=0, metadata={
        "help": "CPU: run each micro-batch as this many shards at once, one per core, each single-threaded "
                "(lmforge.training.cores). 0 = auto: torch's thread count for fp32 CPU training in one process without "
                "dropout, else off; 1 = off"})
    cpu_matmul: Literal["auto", "torch", "numpy"] = field(default="auto", metadata={
        "help": "with cores > 1: who runs the matrix products: torch (MKL), numpy (its BLAS: OpenBLAS in numpy's "
                "wheels), or auto (time both once, take the faster)"})
    retain_memory: bool = field(default=False, metadata={
        "help": "CPU: keep freed memory in the process between steps (glibc mallopt, process-wide while the run "
                "lasts; lmforge.training.heap). Faster steps on machines where fresh pages are slow"})
    tf32: bool = field(default=False, metadata={
        "help": "CUDA: let fp32 matmuls use TF32 tensor cores (process-wide while the run lasts, then restored)"})
    peak_tflops: float = field(default=0.0, metadata={
        "help": "the accelerator's peak dense TFLOP/s (per device) for the MFU column; 0: looked up from the CUDA "
                "device name for bf16 training (H100/H200/A100/L40S/L4/A10); unknown devices and CPUs print none"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every N steps (0: only at the end)"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation (0: all)"})
    eval_at_start: bool = field(default=False, metadata={"help": "also evaluate before the first step"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    sample_every: int = field(default=0, metadata={"help": "print a sample generation every N steps (0: off)"})
    sample_prompt: str = field(default="", metadata={"help": "prompt for the sample generations"})
    sample_tokens: int = field(default=40, metadata={"help": "tokens per sample generation"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop after this much wall time (0: no limit); "
                                                              "the schedule still spans max_steps"})
    time_schedule: bool = field(default=False, metadata={
        "help": "with max_minutes: the lr schedule follows wall time (a step's place in the schedule is the larger "
                "of step/max_steps and elapsed/max_minutes), so the decay ends when the time budget does on any "
                "machine; max_steps becomes an upper bound. Runs are then not reproducible step for step"})
    seed: int = field(default=1337, metadata={"help": "seed of dropout and other randomness in the loop"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "sample_every", "sample_tokens",
                     "max_minutes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "constant", "wsd"):
            raise ConfigError(f"schedule must be cosine, constant or wsd, got {self.schedule!r}")
        if self.cores < 0:
            raise ConfigError(f"cores must be >= 0 (0: auto), got {self.cores}")
        if self.cpu_matmul not in ("auto", "torch", "numpy"):
            raise ConfigError(f"cpu_matmul must be auto, torch or numpy, got {self.cpu_matmul!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_frac <= 1.0:
            raise ConfigError(f"decay_frac must be in (0, 1], got {self.decay_frac}")
        if self.time_schedule and not self.max_minutes:
            raise ConfigError("time_schedule needs a time budget: set max_minutes too")


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    tokens: int  # training tokens seen (all processes)
    train_loss: float | None  # loss of the last step
    val_loss: float | None  # last validation loss
    history: list[dict[str, Any]]  # every metrics record written by this call


# ----------------------------------------------------------------------------------------------------------------
# Pieces: schedule, optimizer, loss
# ----------------------------------------------------------------------------------------------------------------
def _set_tf32(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): warmup, then cosine / constant / WSD down to min_lr.

    >>> cfg = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.0)
    >>> lr_at(0, cfg), lr_at(9, cfg), lr_at(10, cfg), round(lr_at(55, cfg), 3), lr_at(100, cfg)
    (0.1, 1.0, 1.0, 0.5, 0.0)
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, int(cfg.max_steps * (1 - cfg.decay_frac)))
        if step < decay_start:
            return cfg.lr
        frac = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
        return cfg.lr + frac * (min_lr - cfg.lr)
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - min_lr)


def configure_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices (dim >= 2), none on biases and norm gains."""
    params = unique_trainable(model)
    if not params:
        raise ConfigError("the model has no parameters with requires_grad=True: nothing to train")
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device_type in ("cpu", "cuda") and all(not _is_dtensor(p) for _, p in params):
        kwargs["fused"] = True  # one kernel for all tensors (CPU support since torch 2.4)
    return torch.optim.AdamW(groups, **kwargs)


def _is_dtensor(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor"


# ----------------------------------------------------------------------------------------------------------------
# Data sources: every batch has a global index, which is what makes resume and sharding exact
# ----------------------------------------------------------------------------------------------------------------
class _IterableSource:
    """Adapts a re-iterable (e.g. a DataLoader) to index -> batch. Indices must not decrease; epochs restart it."""

    def __init__(self, iterable: Iterable):
        self.iterable = iterable
        self._reset()

    def _reset(self):
        self.it, self.pos, self.epoch = None, 0, 0

    def _next(self):
        for _ in range(2):
            if self.it is None:
                if hasattr(self.iterable, "set_epoch"):
                    self.iterable.set_epoch(self.epoch)
                self.it = iter(self.iterable)
            try:
                return next(self.it)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1
        raise DataError("the training data yielded no batches")

    def __call__(self, index: int):
        if index < self.pos:
            self._reset()
        batch = None
        while self.pos <= index:
            batch = self._next()
            self.pos += 1
        return batch


def as_batch_source(data: Any) -> Callable[[int], Any]:
    """A callable index -> batch from a callable, a sequence of batches (cycled) or a re-iterable."""
    if callable(data):
        return data
    if isinstance(data, Sequence) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if len(data) == 0:
            raise DataError("the training data has no batches")
        return lambda i: data[i % len(data)]
    if isinstance(data, Iterable):
        return _IterableSource(data)
    raise ConfigError(f"training data must be a callable index -> batch, a sequence or an iterable, "
                      f"got {type(data).__name__}")


def _val_batches(val_data: Any, limit: int) -> Iterable:
    if val_data is None:
        return []
    n = len(val_data) if hasattr(val_data, "__len__") else None
    if hasattr(val_data, "__getitem__") and n is not None:
        n = n if not limit else min(n, limit)
        return (val_data[i] for i in range(n))
    if isinstance(val_data, Iterable):
        it = iter(val_data)
        return it if not limit else (b for _, b in zip(range(limit), it))
    raise ConfigError(f"validation data must be a sequence or an iterable of batches, got {type(val_data).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); a single process otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def _all_reduce_mean(x: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist_info.world_size
    return x


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and samples
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, val_data: Any, loss_fn: Callable | None = None, max_batches: int = 0,
             device: torch.device | str = "cpu", autocast=None, dist_info: DistInfo | None = None) -> float:
    """Mean loss over validation batches (each process takes every W-th batch; the results are averaged)."""
    loss_fn = loss_fn or next_token_loss
    dist_info = dist_info or DistInfo()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, batches)
    for i, batch in enumerate(_val_batches(val_data, max_batches)):
        if i % dist_info.world_size != dist_info.rank:
            continue
        with autocast or contextlib.nullcontext():
            loss = loss_fn(model, to_device(batch, device))
        total[0] += loss.double()
        total[1] += 1
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    model.train(was_training)
    if total[1] == 0:
        raise DataError("the validation data has no batches")
    return float(total[0] / total[1])


@torch.no_grad()
def sample_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40,
                device: torch.device | str = "cpu") -> str:
    """Greedy continuation of `prompt` (the token-id decode loop of `lmforge.generation.loop`), used to watch a
    model learn. BOS first when the tokenizer says the model expects it; a long prompt keeps its end.

    Runs inside `torch.random.fork_rng`, so sampling during training never shifts the RNG stream that dropout
    draws from: a run with samples and one without (or a resumed one) see the same random numbers.
    """
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if not prompt:  # start from the document separator
        ids = [bos if bos is not None else eos]
    else:
        ids = list(tokenizer.encode(prompt))
        if getattr(tokenizer, "add_bos_token", False) and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
    block = model.config.block_size
    ids = ids[-(block - 1):]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop_token_ids=[eos] if eos is not None else [])
    was_training = model.training
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        text = generate_ids(model, [ids], params, tokenizer, max_len=block)[0]
    model.train(was_training)
    return prompt + str(text)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: <out_dir>/train_state/{trainable.safetensors, optimizer.pt, rng.pt, state.json}
# ----------------------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_signature(model: nn.Module) -> dict[str, list[int]]:
    """Names and shapes of the trainable parameters: what a checkpoint must match to be resumed."""
    return {name: list(p.shape) for name, p in unique_trainable(model)}


def _full_trainable_state(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names = {n for n, _ in unique_trainable(model)}
        return {k: v.float().contiguous() for k, v in full.items() if k in names}
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in unique_trainable(model)}


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def save_checkpoint(out_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], save_model: Callable[[Path], None] | None = None,
                    dist_info: DistInfo | None = None, fsdp: bool = False) -> None:
    """Write the model artifact (via `save_model(dir)`) and `train_state/` into `out_dir`, atomically.

    All processes must call this (FSDP gathers full tensors collectively); only rank 0 writes. Any failure to
    write (disk full, permission) raises `CheckpointError` and leaves the previous checkpoint untouched.
    """
    from safetensors.torch import save_file

    dist_info = dist_info or DistInfo()
    weights = _full_trainable_state(model, fsdp)
    optim = _optimizer_state(model, optimizer, fsdp)
    rng = _rng_state()
    if dist_info.world_size > 1:
        import torch.distributed as dist

        rngs = [None] * dist_info.world_size
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if dist_info.is_main:
        out_dir = Path(out_dir)
        try:
            with atomic_dir(out_dir) as tmp:
                if save_model is not None:
                    save_model(tmp)
                ts = tmp / TRAIN_STATE_DIR
                ts.mkdir(exist_ok=True)
                save_file(weights, str(ts / "trainable.safetensors"))
                torch.save(optim, ts / "optimizer.pt")
                torch.save(rngs, ts / "rng.pt")
                atomic_write_json(ts / "state.json", {**state, "version": STATE_VERSION, "world_size":
                                                      dist_info.world_size, "model_signature": model_signature(model)})
        except OSError as e:
            raise CheckpointError(f"could not write checkpoint to {out_dir}: {e.strerror or e}; "
                                  f"the previous checkpoint is intact") from e
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def recover_run_dir(out_dir: str | os.PathLike) -> bool:
    """Put back the previous checkpoint if a kill landed inside a directory swap.

    `atomic_dir` swaps a new checkpoint in with two renames: ``out -> .out.old-PID``, then ``tmp -> out``. A
    SIGKILL between them leaves no ``out`` but a complete previous checkpoint in ``.out.old-PID``; we rename it back.
    Returns True when something was recovered.
    """
    out = Path(out_dir)
    if out.exists():
        return False
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in olds:
        if (old / TRAIN_STATE_DIR / "state.json").exists():
            os.replace(old, out)
            return True
    return False


def read_train_state(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The `state.json` of a run directory's checkpoint (step, tokens, data position, config...)."""
    recover_run_dir(out_dir)
    path = Path(out_dir) / TRAIN_STATE_DIR / "state.json"
    if not path.exists():
        raise CheckpointError(f"{out_dir}: no {TRAIN_STATE_DIR}/ to resume from (was the run checkpointed?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable train state ({e})") from None


def load_checkpoint(out_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    dist_info: DistInfo | None = None, fsdp: bool = False) -> dict[str, Any]:
    """Restore trainable weights, optimizer and RNG from `out_dir/train_state`; returns its state.json."""
    from safetensors.torch import load_file

    dist_info = dist_info or DistInfo()
    state = read_train_state(out_dir)
    ts = Path(out_dir) / TRAIN_STATE_DIR
    want, have = model_signature(model), state.get("model_signature", {})
    if want != have:
        bad = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have.get(k))
        shape = lambda s: "no such parameter" if s is None else f"shape {tuple(s)}"  # noqa: E731
        raise CheckpointError(f"{out_dir}: checkpoint was written for a different model (parameter {bad[0]!r}: "
                              f"the model has {shape(want.get(bad[0]))}, the checkpoint {shape(have.get(bad[0]))})")
    weights = load_file(str(ts / "trainable.safetensors"))
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=opts)
        if optimizer is not None:
            optim = torch.load(ts / "optimizer.pt", map_location="cpu", weights_only=True)
            set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    else:
        params = dict(unique_trainable(model))
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        if optimizer is not None:
            optim = torch.load(ts / "optimizer.pt", map_location="cpu", weights_only=True)
            optimizer.load_state_dict(optim)
    rngs = torch.load(ts / "rng.pt", weights_only=False)  # our own file: numpy/python RNG states are tuples
    if len(rngs) == dist_info.world_size:
        _set_rng_state(rngs[dist_info.rank])
    return state


# ----------------------------------------------------------------------------------------------------------------
# Metrics and plots
# ----------------------------------------------------------------------------------------------------------------
def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:  # reopened each time: the run dir is swapped on checkpoints
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: everything before it is kept
                break
    return out


def plot_losses(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """PNG of training (and validation) loss against tokens seen."""
    from matplotlib.figure import Figure  # the object API: no global pyplot state, no backend selection

    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
def _core_parallel(cfg: TrainConfig, model: nn.Module, loss_fn: Callable, device: torch.device,
                   dist_info: DistInfo, log: Callable[[str], None], resumed: dict[str, Any]):
    """The `lmforge.training.cores.CoreParallel` runner this run uses, or None (see TrainConfig.cores).

    A resumed run keeps the shard count and matrix-product library its checkpoint recorded (when the config
    leaves them on auto): a different cut of the batch, or another BLAS, would change the float rounding and the
    resumed losses would no longer match an uninterrupted run bit for bit."""
    recorded = resumed.get("cores", 1) if resumed else 0  # checkpoints from before lmforge.training.cores: one thread pool
    n = cfg.cores or int(recorded or 0) or torch.get_num_threads()
    if n == 1:
        return None
    why_not = None
    if device.type != "cpu":
        why_not = f"the run is on {device.type}"
    elif dist_info.world_size > 1:
        why_not = "the run has several processes"
    elif cfg.dtype not in ("auto", "float32", "fp32"):
        why_not = f"it needs float32 training, not {cfg.dtype}"
    elif getattr(loss_fn, "batch_mean", None) not in ("rows", "tokens"):
        why_not = ("the loss function does not declare how its batch may be cut into shards (mark it with "
                   "lmforge.training.batch.row_mean or token_mean)")
    elif dropout_active(model):
        why_not = "the model uses dropout (random numbers drawn from two threads would make runs unrepeatable)"
    if why_not is not None:
        if cfg.cores > 1:
            log(f"note: cores={cfg.cores} is ignored: {why_not}")
        return None
    matmul = cfg.cpu_matmul
    if matmul == "auto":
        matmul = resumed.get("cpu_matmul") or pick_matmul(n, linear_shapes(model))
    log(f"training on {n} cores: one shard of each batch per core, matrix products by {matmul}")
    return CoreParallel(model, n, matmul, loss_fn.batch_mean)


# Model FLOPs utilisation (MFU): the share of the accelerator's peak arithmetic the training step turns into model
# FLOPs. A training step costs ~6 FLOPs per weight per token (2 forward, 4 backward: Kaplan et al. 2020) plus
# attention's own products, 12 * n_layer * n_embd * T per token (PaLM, appendix B; nanoGPT's estimate_mfu). Only
# the FLOPs the model needs count: recomputation, padding and optimizer work are overhead, which is the point.
PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity)
    "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
}


def train_flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """Model FLOPs of one training token: 6 * (weights a token uses) + 12 * n_layer * n_embd * seq_len.

    Weights a token uses: every parameter except the learned position table (a lookup), and, in a mixture of
    experts, only the experts it is routed to (num_experts_per_tok of num_experts). None for models without a
    decoder config."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "n_layer") or not hasattr(model, "num_params"):
        return None
    n = model.num_params()
    wpe = getattr(model, "wpe", None)
    if wpe is not None:
        n -= wpe.weight.numel()
    if getattr(cfg, "num_experts", 0):
        experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        n -= experts * (1 - cfg.num_experts_per_tok / cfg.num_experts)
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def peak_flops(device: torch.device, dtype: str, peak_tflops: float = 0.0) -> float | None:
    """The device's peak FLOP/s for MFU: `peak_tflops` when given, else the bf16 table for a known CUDA GPU."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device.type != "cuda" or dtype not in ("auto", "bfloat16", "bf16"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" before "H100": the first match wins
        if key in name:
            return tflops * 1e12
    return None


def _autocast(device: torch.device, dtype: str):
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype in ("float32", "fp32"):
        return contextlib.nullcontext()
    if dtype in ("bfloat16", "bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype in ("float16", "fp16"):
        raise ConfigError("float16 training needs loss scaling, which lmforge does not do; use bfloat16")
    raise ConfigError(f"unknown training dtype {dtype!r}; use auto, float32 or bfloat16")


def train(
    model: nn.Module,
    train_data: Any,
    config: TrainConfig,
    *,
    val_data: Any = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    out_dir: str | os.PathLike | None = None,
    save_model: Callable[[Path], None] | None = None,
    tokenizer: Any = None,
    resume: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train `model` for `config.max_steps` optimizer steps and return the final losses and the metrics history.

    model:      an nn.Module (its frozen parameters stay frozen); moved to `config.device`
    train_data: callable index -> batch, a sequence of batches, or a re-iterable of batches
    val_data:   a sequence or iterable of batches for evaluation (optional)
    loss_fn:    loss_fn(model, batch) -> scalar tensor; default next-token cross-entropy
    out_dir:    run directory: metrics.jsonl, loss.png and checkpoints (model artifact + train_state/)
    save_model: writes the model artifact into a directory (e.g. ``lambda d: lm.save(d)``) at each checkpoint
    tokenizer:  needed for sample generations (config.sample_every)
    resume:     continue from `out_dir/train_state` (same model shape) instead of starting fresh
    on_step:    called with each step's metrics record (logging hooks, early stopping via exceptions)
    log:        where text lines (samples, evaluations) go; default tqdm.write on rank 0
    """
    from tqdm.auto import tqdm

    cfg = config
    device = parse_device(cfg.device)
    dist_info = setup_distributed(device)
    if dist_info.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    loss_fn = loss_fn or next_token_loss
    source = as_batch_source(train_data)
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ConfigError("resume needs out_dir (the run directory to continue)")
    if log is None:
        def log(msg: str) -> None:
            if dist_info.is_main:
                tqdm.write(msg)

    raw_model = model.to(device)
    raw_model.train()
    fsdp = dist_info.world_size > 1 and cfg.parallel == "fsdp"
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(raw_model, "blocks", []):
            fully_shard(block)
        fully_shard(raw_model)
    optimizer = configure_optimizer(raw_model, cfg, device.type)

    # --- resume or start fresh ------------------------------------------------------------------------------
    start_step, tokens, history, state = 0, 0, [], {}
    if resume:
        state = load_checkpoint(out, raw_model, optimizer, dist_info, fsdp)
        start_step, tokens = int(state["step"]), int(state["tokens"])
        if state.get("world_size", 1) * state.get("grad_accum_steps", cfg.grad_accum_steps) != \
                dist_info.world_size * cfg.grad_accum_steps:
            log(f"note: resuming with {dist_info.world_size} process(es) x {cfg.grad_accum_steps} accumulation; the "
                f"checkpoint used {state.get('world_size')} x {state.get('grad_accum_steps')}: data order differs")
        if dist_info.is_main:  # forget metrics logged after the checkpoint: those steps run again
            kept = [r for r in read_metrics(out / "metrics.jsonl") if r.get("step", 0) <= start_step]
            with atomic_write(out / "metrics.jsonl") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        log(f"resumed from {out} at step {start_step} ({tokens:,} tokens)")
    else:
        torch.manual_seed(cfg.seed + dist_info.rank)  # dropout and any other randomness in the loop
        if out is not None and dist_info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)

    fwd_model = raw_model
    if dist_info.world_size > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        # buffers (RoPE frequencies) are identical on every rank: no need to broadcast them at each forward
        no_sync_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                           inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
        fwd_model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync_buffers)
    step_loss = loss_fn
    if cfg.compile:
        if dist_info.world_size == 1:  # one graph for forward + loss: the cross-entropy fuses with the logits
            step_loss = torch.compile(loss_fn)
        else:  # DDP/FSDP: compile the (wrapped) model, as before
            fwd_model = torch.compile(fwd_model)
    router = router_aux_loss_for(raw_model, step_loss)  # experts: + load-balancing loss (lmforge.training.moe)
    if router is not None:
        step_loss = router
    autocast = _autocast(device, cfg.dtype)
    params = [p for _, p in unique_trainable(raw_model)]
    cores = _core_parallel(cfg, raw_model, loss_fn, device, dist_info, log, state)
    eval_loss = loss_fn if cores is None else (lambda m, b: cores.loss(loss_fn, m, b))

    def record(rec: dict[str, Any]) -> None:
        history.append(rec)
        if out is not None and dist_info.is_main:
            _append_jsonl(out / "metrics.jsonl", rec)

    def run_eval(step: int) -> float | None:
        if val_data is None:
            return None
        # DDP: evaluate the plain module (its forward has no collectives), each rank a share of the batches.
        # FSDP: the sharded module must run the same forwards on every rank, so every rank evaluates every batch.
        eval_model = raw_model
        val = evaluate(eval_model, val_data, eval_loss, cfg.eval_batches, device, autocast,
                       DistInfo() if fsdp else dist_info)
        rec = {"step": step, "tokens": tokens, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        record(rec)
        log(f"step {step}: val loss {val:.4f}, perplexity {rec['val_ppl']:.2f}")
        return val

    def checkpoint(step: int) -> None:
        if out is None:
            return
        state = {"step": step, "tokens": tokens, "data_position": step * cfg.grad_accum_steps * dist_info.world_size,
                 "grad_accum_steps": cfg.grad_accum_steps, "lr": lr_at(max(step - 1, 0), cfg),
                 "cores": cores.n if cores else 1, "cpu_matmul": cores.matmul if cores else None,
                 "config": dataclasses.asdict(cfg)}
        save_checkpoint(out, raw_model, optimizer, state, save_model if dist_info.is_main else None,
                        dist_info, fsdp)
        if dist_info.is_main:
            plot_losses(read_metrics(out / "metrics.jsonl"), out / "loss.png")
            if router is not None:
                plot_router_load(read_metrics(out / "metrics.jsonl"), out / "router_load.png")

    # --- the loop -------------------------------------------------------------------------------------------
    held = contextlib.ExitStack()  # what the run holds until it ends, released in the `finally` below
    bar = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and dist_info.is_main))
    train_loss = val_loss = None
    end_step = cfg.max_steps
    try:
        if device.type == "cpu" and cfg.retain_memory:  # freed tensors stay for the next step (lmforge.training.heap)
            held.enter_context(retain_freed_memory())
        if device.type == "cuda" and cfg.tf32:  # asked for by the caller; the previous setting comes back at the end
            old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            held.callback(_set_tf32, *old)
            _set_tf32(True, True)
        if cores is not None:  # numpy's BLAS held at one thread, Linears routed to the faster product
            held.enter_context(cores)
        if cfg.eval_at_start and start_step == 0:
            val_loss = run_eval(start_step)
        peak = peak_flops(device, cfg.dtype, cfg.peak_tflops)
        mfu_flops = None  # model FLOPs per token, set from the first batch's length when a peak is known
        t_last, tok_last = time.perf_counter(), tokens
        t_start = t_last
        for step in range(start_step, cfg.max_steps):
            sched_step = step
            if cfg.time_schedule:  # the schedule's clock is the time budget: ahead of the step count on slow machines
                elapsed = (time.perf_counter() - t_start) / (cfg.max_minutes * 60)
                sched_step = max(step, int(elapsed * cfg.max_steps))
            lr = lr_at(sched_step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum_steps):
                index = (step * cfg.grad_accum_steps + micro) * dist_info.world_size + dist_info.rank
                batch = to_device(source(index), device)
                last = micro == cfg.grad_accum_steps - 1
                sync = contextlib.nullcontext() if (last or fwd_model is raw_model or fsdp) else fwd_model.no_sync()
                if cores is not None:  # one shard of the batch per core (fp32 CPU, one process)
                    loss = cores.backward(step_loss, fwd_model, batch, 1.0 / cfg.grad_accum_steps)
                else:
                    with sync:
                        with autocast:
                            loss = step_loss(fwd_model, batch)
                        (loss / cfg.grad_accum_steps).backward()
                loss_sum += loss.detach().float()
                tokens += count_tokens(batch) * dist_info.world_size
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            train_loss = float(_all_reduce_mean(loss_sum / cfg.grad_accum_steps, dist_info))
            if not math.isfinite(train_loss):
                raise ConfigError(f"loss became {train_loss} at step {step + 1}; lower lr (now {lr:.3g}) "
                                  f"or enable grad_clip")
            now = time.perf_counter()
            tok_s = (tokens - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, tokens
            rec = {"step": step + 1, "tokens": tokens, "loss": train_loss, "lr": lr, "tok_per_s": round(tok_s, 1)}
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            if peak is not None:
                if mfu_flops is None:
                    ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
                    mfu_flops = train_flops_per_token(raw_model, ids.shape[-1]) or 0.0
                if mfu_flops:  # tokens/s here count every rank's tokens: divide by every rank's peak
                    rec["mfu"] = round(tok_s * mfu_flops / (peak * dist_info.world_size), 4)
            moe = router.pop_stats() if router is not None else {}  # aux_loss, router_load, router_entropy
            rec.update(moe)
            record(rec)
            shown = {"aux": f"{moe['aux_loss']:.3f}", "max_load": f"{max(map(max, moe['router_load'])):.2f}"} \
                if moe else {}  # the load-balancing loss, and the busiest expert's share of its layer's tokens
            if "mfu" in rec:
                shown["mfu"] = f"{100 * rec['mfu']:.1f}%"
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", **shown, refresh=False)
            bar.update(1)
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
                val_loss = run_eval(done)
            if cfg.sample_every and tokenizer is not None and done % cfg.sample_every == 0 and \
                    (dist_info.is_main or fsdp):  # FSDP: every rank takes part in the sharded forwards
                text = sample_text(raw_model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, device)
                log(f"step {done} sample: {text!r}")
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
                checkpoint(done)
            if on_step is not None:
                on_step(rec)
            t_last = time.perf_counter()  # tokens/s measures training, not evaluation or checkpoint writes
            if cfg.max_minutes and t_last - t_start > cfg.max_minutes * 60:
                end_step = done
                log(f"time budget of {cfg.max_minutes:g} min reached at step {done}")
                break
        bar.close()
        final_step = max(start_step, end_step)
        if val_data is not None and (start_step < end_step or val_loss is None):
            val_loss = run_eval(final_step)
        checkpoint(final_step)
    finally:
        bar.close()
        held.close()  # the cores' threads first, then malloc's defaults
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return TrainResult(step=max(start_step, end_step), tokens=tokens, train_loss=train_loss,
                       val_loss=val_loss, history=history)
