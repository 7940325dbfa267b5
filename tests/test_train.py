"""The training loop: schedule, optimizer groups, accumulation, exact resume after SIGKILL, DDP under torchrun,
failed checkpoint writes, and resume refusing a different model."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.models.config import ModelConfig
from lmforge.training.data import Batches, PackedBatches, SlidingWindowDataset
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models.decoder import Transformer
from lmforge.training.loop import (TrainConfig, configure_optimizer, lr_at, read_metrics, read_train_state, train)

REPO = Path(__file__).resolve().parent.parent


def tiny_model(seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("llama-tiny", **{**dict(vocab_size=64, block_size=32, n_layer=2, n_embd=32,
                                                      n_head=2, n_kv_head=1, intermediate_size=64), **over})
    return Transformer(cfg)


def pattern_tokens(n: int = 4000, seed: int = 0) -> np.ndarray:
    """A learnable stream: a fixed random 'sentence' of 37 tokens repeated, so the loss can fall far."""
    rng = np.random.default_rng(seed)
    sentence = rng.integers(0, 64, size=37)
    return np.tile(sentence, n // 37 + 1)[:n]


# ---- schedule and optimizer -----------------------------------------------------------------------------------
def test_schedules():
    c = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    cos = [lr_at(s, c) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(cos, cos[1:])) and cos[-1] == pytest.approx(0.1)
    assert lr_at(55, c) == pytest.approx(0.55)  # halfway through the cosine: midpoint of lr and min_lr
    w = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, schedule="wsd", decay_frac=0.2, min_lr_ratio=0.0)
    assert lr_at(50, w) == 1.0 and lr_at(79, w) == 1.0 and lr_at(90, w) == pytest.approx(0.5)
    assert lr_at(100, w) == pytest.approx(0.0)
    k = TrainConfig(max_steps=10, lr=0.5, schedule="constant")
    assert {lr_at(s, k) for s in range(10)} == {0.5}
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="linear")


def test_time_schedule_decays_by_the_time_budget():
    """With time_schedule the cosine runs on the clock: a budget far shorter than max_steps still ends decayed."""
    toks = pattern_tokens()
    cfg = TrainConfig(max_steps=100_000, lr=1e-2, min_lr_ratio=0.0, batch_size=2, eval_every=0, progress=False,
                      max_minutes=0.05, time_schedule=True)
    res = train(tiny_model(), PackedBatches(toks, 2, 32, seed=1), cfg)
    lrs = [r["lr"] for r in res.history if "lr" in r]
    assert 2 < len(lrs) < 100_000  # stopped by the 3 s budget, not by max_steps
    assert lrs[0] == pytest.approx(1e-2, rel=0.05) and lrs[-1] < 2e-3  # decayed on the clock's schedule
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ConfigError, match="max_minutes"):
        TrainConfig(time_schedule=True)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile needs C++")
def test_compiled_training_matches_eager():
    """compile=True traces forward + loss into one graph; the losses follow the eager run's (different kernel
    summation order: close, not bit-equal). One layer keeps the cold compile short."""
    toks = pattern_tokens()
    losses = {}
    for compile_ in (False, True):
        cfg = TrainConfig(max_steps=4, lr=1e-2, batch_size=2, eval_every=0, progress=False, compile=compile_)
        res = train(tiny_model(n_layer=1), PackedBatches(toks, 2, 32, seed=1), cfg)
        losses[compile_] = [r["loss"] for r in res.history if "loss" in r]
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


def test_optimizer_groups_skip_frozen_and_decay_only_matrices():
    m = tiny_model(**{"qkv_bias": True})
    m.blocks[0].requires_grad_(False)
    opt = configure_optimizer(m, TrainConfig(weight_decay=0.1))
    by_decay = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    frozen = {id(p) for p in m.blocks[0].parameters()}
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert not frozen & set(all_ids) and len(all_ids) == len(set(all_ids))  # tied weight counted once
    assert all(p.dim() >= 2 for p in by_decay[0.1]) and all(p.dim() < 2 for p in by_decay[0.0])
    assert id(m.wte.weight) in {id(p) for p in by_decay[0.1]}
    assert opt.defaults.get("fused") is True


# ---- the loop learns; accumulation is equivalent to a bigger batch -------------------------------------------
def test_loss_falls_metrics_and_plot(tmp_path):
    toks = pattern_tokens()
    m = tiny_model()
    cfg = TrainConfig(max_steps=60, lr=1e-2, warmup_steps=5, batch_size=4, eval_every=30, progress=False)
    val = Batches(SlidingWindowDataset(toks[:600], 32, 32), 4)
    res = train(m, PackedBatches(toks, 4, 32, seed=1), cfg, val_data=val, out_dir=tmp_path / "run")
    losses = [r["loss"] for r in res.history if "loss" in r]
    assert len(losses) == 60 and losses[0] > 3.5 and losses[-1] < 1.0, losses[::10]
    assert res.val_loss < 1.0 and res.tokens == 60 * 4 * 32
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs if "val_loss" in r] == [30, 60]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_train_state(tmp_path / "run")["step"] == 60


def test_grad_accumulation_matches_big_batch():
    toks = pattern_tokens()
    big = PackedBatches(toks, 4, 32, seed=3)

    def halves(i):  # micro-batch i is half of big batch i // 2
        b = big(i // 2)
        sl = slice(0, 2) if i % 2 == 0 else slice(2, 4)
        return {k: v[sl] for k, v in b.items()}

    base = dict(max_steps=6, lr=3e-3, progress=False, eval_every=0)
    r1 = train(tiny_model(), big, TrainConfig(batch_size=4, **base))
    r2 = train(tiny_model(), halves, TrainConfig(batch_size=2, grad_accum_steps=2, **base))
    l1 = [r["loss"] for r in r1.history]
    l2 = [r["loss"] for r in r2.history]
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-6)


def test_custom_loss_and_frozen_params_stay_frozen():
    m = tiny_model()
    for p in m.parameters():
        p.requires_grad_(False)
    m.norm_f.weight.requires_grad_(True)
    before = m.blocks[1].mlp.up_proj.weight.clone()
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        logits = model(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    toks = pattern_tokens()
    norm_before = m.norm_f.weight.clone()
    train(m, [PackedBatches(toks, 2, 32)(i) for i in range(3)], TrainConfig(max_steps=3, lr=1e-2, progress=False),
          loss_fn=loss_fn)
    assert len(calls) == 3
    assert torch.equal(before, m.blocks[1].mlp.up_proj.weight)
    assert not torch.equal(norm_before, m.norm_f.weight)


# ---- checkpoints: failed write, different model -----------------------------------------------------------------
def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    toks = pattern_tokens()
    out = tmp_path / "run"
    cfg = TrainConfig(max_steps=4, lr=1e-3, progress=False, eval_every=0)
    train(tiny_model(), PackedBatches(toks, 2, 32), cfg, out_dir=out)
    good = (out / "train_state" / "trainable.safetensors").read_bytes()

    import safetensors.torch

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        train(tiny_model(), PackedBatches(toks, 2, 32), TrainConfig(max_steps=8, lr=1e-3, progress=False,
                                                                    eval_every=0), out_dir=out, resume=True)
    assert read_train_state(out)["step"] == 4
    assert (out / "train_state" / "trainable.safetensors").read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no temp dir left behind


def test_resume_refuses_other_model_and_missing_state(tmp_path):
    toks = pattern_tokens()
    out = tmp_path / "run"
    train(tiny_model(), PackedBatches(toks, 2, 32), TrainConfig(max_steps=2, progress=False), out_dir=out)
    with pytest.raises(CheckpointError, match="different model.*n_embd|different model"):
        train(tiny_model(n_embd=48, n_head=2), PackedBatches(toks, 2, 32), TrainConfig(max_steps=4, progress=False),
              out_dir=out, resume=True)
    with pytest.raises(CheckpointError, match="no train_state"):
        train(tiny_model(), PackedBatches(toks, 2, 32), TrainConfig(max_steps=4, progress=False),
              out_dir=tmp_path / "empty", resume=True)


# ---- exact resume after SIGKILL; DDP under torchrun (real subprocesses) ---------------------------------------
CHILD = textwrap.dedent('''
    import json, sys, time
    import numpy as np, torch
    torch.set_num_threads(1)
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer
    from lmforge.training.data import PackedBatches
    from lmforge.training.loop import TrainConfig, train

    out, resume, accum, batch, steps, delay, dropout = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), \\
        int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])
    modes = sys.argv[8].split(",") if len(sys.argv) > 8 else ["ddp"]
    cores = int(sys.argv[9]) if len(sys.argv) > 9 else 0  # 2: one shard per core (lmforge.training.cores), numpy's BLAS
    import os
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one group for both modes; train() uses a group it finds
        dist.init_process_group("gloo")
    for mode in modes:
        torch.manual_seed(0)
        cfg = ModelConfig.from_name("llama-tiny", vocab_size=64, block_size=32, n_layer=2, n_embd=32, n_head=2,
                                    n_kv_head=1, intermediate_size=64, dropout=dropout)
        model = Transformer(cfg)
        toks = np.random.default_rng(0).integers(0, 64, size=3000)
        run_out = out if mode == "ddp" else out + "-" + mode
        val = [PackedBatches(toks, 2, 32, seed=99)(i) for i in range(3)]  # 3 batches: uneven over 2 ranks
        res = train(model, PackedBatches(toks, batch, 32, seed=5), val_data=val,
                    config=TrainConfig(max_steps=steps, lr=1e-2, warmup_steps=2, batch_size=batch, grad_accum_steps=accum,
                                save_every=3, eval_every=0, progress=False, parallel=mode, cores=cores,
                                cpu_matmul="numpy" if cores > 1 else "auto"),
                    out_dir=run_out, resume=resume, on_step=lambda rec: time.sleep(delay))
        json.dump([r["loss"] for r in res.history if "loss" in r] + [res.val_loss], open(run_out + ".losses.json", "w"))
    if dist.is_initialized():
        dist.destroy_process_group()
''')


def _child(tmp_path: Path) -> Path:
    p = tmp_path / "child.py"
    p.write_text(CHILD)
    return p


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("dropout,cores", [("0.1", "0"), ("0", "2")], ids=["dropout", "two-cores"])
def test_sigkill_then_resume_is_bit_exact(tmp_path, dropout, cores):
    script = _child(tmp_path)
    steps = 12
    ref_out, run_out = str(tmp_path / "ref"), str(tmp_path / "run")
    # dropout > 0, so the restored RNG state matters too; or no dropout and core-parallel steps (lmforge.training.cores)
    extra = [dropout, "ddp", cores]
    ref = subprocess.Popen([sys.executable, str(script), ref_out, "0", "1", "2", str(steps), "0", *extra], env=_env())
    run = subprocess.Popen([sys.executable, str(script), run_out, "0", "1", "2", str(steps), "0.25", *extra],
                           env=_env())
    metrics, state = Path(run_out) / "metrics.jsonl", Path(run_out) / "train_state" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once a checkpoint exists and the run went past it
        if state.exists() and metrics.exists():
            recs = read_metrics(metrics)
            if recs and recs[-1]["step"] >= 5:
                break
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert ref.wait(timeout=240) == 0
    killed_at = read_metrics(metrics)[-1]["step"]
    ckpt = read_train_state(run_out)["step"]
    assert 3 <= ckpt < steps and killed_at < steps
    resumed = subprocess.run([sys.executable, str(script), run_out, "1", "1", "2", str(steps), "0", *extra],
                             env=_env(), timeout=240)
    assert read_train_state(run_out)["cores"] == (int(cores) or 1)
    assert resumed.returncode == 0
    ref_losses = json.loads(Path(ref_out + ".losses.json").read_text())[:-1]  # the last entry is the val loss
    run_losses = [r["loss"] for r in read_metrics(metrics) if "loss" in r]
    assert [r["step"] for r in read_metrics(metrics) if "loss" in r] == list(range(1, steps + 1))  # no duplicates
    assert run_losses == ref_losses  # bit-exact


def test_ddp_and_fsdp_two_processes_equal_single_process_with_accumulation(tmp_path):
    from safetensors.torch import load_file

    script = _child(tmp_path)
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           out, "0", "1", "2", "5", "0", "0", "ddp,fsdp"]
    single = subprocess.Popen([sys.executable, str(script), str(tmp_path / "single"), "0", "2", "2", "5", "0", "0"],
                              env=_env())
    p = subprocess.run(cmd, env=_env(), timeout=300, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert single.wait(timeout=240) == 0
    ddp = json.loads(Path(out + ".losses.json").read_text())
    one = json.loads(Path(str(tmp_path / "single") + ".losses.json").read_text())
    assert read_train_state(out)["world_size"] == 2 and read_train_state(tmp_path / "single")["world_size"] == 1
    fsdp = json.loads(Path(out + "-fsdp.losses.json").read_text())
    assert len(ddp) == len(one) == len(fsdp) == 6  # 5 losses + the final validation loss
    np.testing.assert_allclose(ddp, one, rtol=2e-5)
    np.testing.assert_allclose(fsdp, one, rtol=2e-5)
    assert ddp[-1] < ddp[0]
    # FSDP's sharded weights were gathered into one full checkpoint that equals the single process's
    w_fsdp = load_file(str(Path(out + "-fsdp") / "train_state" / "trainable.safetensors"))
    w_one = load_file(str(tmp_path / "single" / "train_state" / "trainable.safetensors"))
    assert w_fsdp.keys() == w_one.keys()
    for k in w_one:
        torch.testing.assert_close(w_fsdp[k], w_one[k], rtol=1e-4, atol=1e-5)


def test_kill_between_the_two_renames_of_a_swap_is_recovered(tmp_path):
    toks = pattern_tokens()
    out = tmp_path / "run"
    train(tiny_model(), PackedBatches(toks, 2, 32), TrainConfig(max_steps=2, progress=False), out_dir=out)
    os.replace(out, tmp_path / ".run.old-12345")  # what a SIGKILL right after atomic_dir's first rename leaves
    assert read_train_state(out)["step"] == 2 and out.is_dir()
    res = train(tiny_model(), PackedBatches(toks, 2, 32), TrainConfig(max_steps=3, progress=False), out_dir=out,
                resume=True)
    assert res.step == 3


def test_reiterable_data_cycles_epochs_and_fast_forwards():
    from lmforge.training.loop import as_batch_source

    class Loader:  # a DataLoader-like re-iterable with set_epoch (as DistributedSampler users call it)
        def __init__(self):
            self.epochs = []

        def set_epoch(self, e):
            self.epochs.append(e)

        def __iter__(self):
            return iter([f"e{self.epochs[-1]}b{i}" for i in range(3)])

    loader = Loader()
    src = as_batch_source(loader)
    assert [src(i) for i in range(7)] == ["e0b0", "e0b1", "e0b2", "e1b0", "e1b1", "e1b2", "e2b0"]
    fresh = as_batch_source(Loader())
    assert fresh(4) == "e1b1"  # a resumed run fast-forwards to its data position
    assert as_batch_source([1, 2])(5) == 2  # sequences cycle


def test_mfu_flops_per_token_and_the_logged_mfu():
    """MFU = tokens/s x model FLOPs per token / peak FLOP/s, with nanoGPT's / PaLM's count: 6 per weight a token
    uses (learned position table excluded, only routed experts) + 12 * n_layer * n_embd * T for attention."""
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer
    from lmforge.training.loop import peak_flops, train_flops_per_token

    gpt = Transformer(ModelConfig.from_name("gpt-tiny", vocab_size=97, block_size=48, n_layer=2, n_embd=32, n_head=4))
    n = sum(p.numel() for p in gpt.parameters()) - 48 * 32  # tied head counted once; positions are a lookup
    assert train_flops_per_token(gpt, 40) == 6 * n + 12 * 2 * 32 * 40
    moe = Transformer(ModelConfig.from_name("llama-tiny", vocab_size=97, block_size=48, n_layer=2, n_embd=32,
                                            n_head=4, n_kv_head=2, intermediate_size=48, num_experts=4,
                                            num_experts_per_tok=1))
    total = sum(p.numel() for p in moe.parameters())
    experts = sum(p.numel() for name, p in moe.named_parameters() if ".experts." in name)
    assert experts > 0 and train_flops_per_token(moe, 8) == 6 * (total - experts * 3 / 4) + 12 * 2 * 32 * 8
    assert peak_flops(torch.device("cpu"), "auto") is None  # no MFU on a CPU unless the peak is given
    assert peak_flops(torch.device("cpu"), "auto", 2.0) == 2e12

    m = tiny_model()
    res = train(m, PackedBatches(pattern_tokens(), 2, 32, seed=1),
                TrainConfig(max_steps=3, lr=1e-3, progress=False, eval_every=0, peak_tflops=1e-3))
    for rec in res.history:
        assert rec["mfu"] == pytest.approx(rec["tok_per_s"] * train_flops_per_token(m, 32) / 1e9, rel=1e-2, abs=1e-4)
