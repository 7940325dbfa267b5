"""Core-parallel CPU training (lmforge.training.cores): numpy-BLAS linears against F.linear, batch shards, gradients equal to
the whole batch's, repeatable runs and exact resume with TrainConfig(cores=2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.training.cores import (CoreParallel, dropout_active, linear_shapes, np_linear, np_mm, numpy_linears,
                           pick_matmul, shard_batch)
from lmforge.training.data import PackedBatches
from lmforge.errors import ConfigError
from lmforge.training.batch import next_token_loss
from lmforge.training.loop import TrainConfig, read_train_state, train
from test_train import tiny_model  # the same 2-layer Llama the loop's own tests train


def tokens(n: int = 4000) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 64, size=n)


# ---- the numpy-BLAS products --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_np_mm_matches_torch_for_every_transpose(ta, tb):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g)
    b = torch.randn(5, 3, generator=g)
    a_ = a.t().contiguous().t() if ta else a  # same values, column-major storage
    b_ = b.t().contiguous().t() if tb else b
    torch.testing.assert_close(np_mm(a_, b_), a @ b)
    torch.testing.assert_close(np_mm(a[:, 1:4], b[1:4]), a[:, 1:4] @ b[1:4])  # a strided slice is copied first


def test_np_linear_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(np_linear, (x, w, b), atol=1e-9, rtol=1e-7)
    assert torch.autograd.gradcheck(lambda x, w: np_linear(x, w, None), (x, w), atol=1e-9, rtol=1e-7)


def test_np_linear_equals_f_linear_and_keeps_a_column_major_weights_layout():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 16, generator=g, requires_grad=True)
    w = torch.randn(24, 16, generator=g).t().contiguous().t().requires_grad_()  # (out, in) with strides (1, out)
    b = torch.randn(24, generator=g, requires_grad=True)
    dy = torch.randn(4, 6, 24, generator=g)
    ours = torch.autograd.grad(np_linear(x, w, b), (x, w, b), dy)
    ref = torch.autograd.grad(F.linear(x, w, b), (x, w, b), dy)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    assert ours[1].stride() == w.stride()  # the weight gradient is laid out like the weight
    frozen = w.detach()  # a frozen base layer (LoRA): only the input gradient is computed
    (gx,) = torch.autograd.grad(np_linear(x, frozen, None), (x,), dy)
    torch.testing.assert_close(gx, torch.autograd.grad(F.linear(x, frozen), (x,), dy)[0], rtol=1e-5, atol=1e-5)


def test_np_linear_inside_torch_compile_matches_eager():
    lin = nn.Linear(8, 12)
    x = torch.randn(3, 5, 8, requires_grad=True)
    fn = torch.compile(lambda x, w, b: np_linear(x, w, b).relu().sum(), fullgraph=True, backend="aot_eager")
    out = fn(x, lin.weight, lin.bias)
    out.backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad = lin.weight.grad = None
    F.linear(x, lin.weight, lin.bias).relu().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, lin.weight.grad, rtol=1e-5, atol=1e-5)


def test_numpy_linears_routes_plain_fp32_linears_and_restores_them():
    model = tiny_model()
    x = torch.randint(0, 64, (2, 8))
    before = model(x)
    with numpy_linears(model) as n:
        assert n == sum(type(m) is nn.Linear for m in model.modules())
        assert all("forward" in vars(m) for m in model.modules() if type(m) is nn.Linear)
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert linear_shapes(model) == [(32, 16), (32, 32), (32, 64), (64, 32)]  # q; k,v; gate,up,lm_head... ; down
    with numpy_linears(model.to(torch.bfloat16)) as n:
        assert n == 0  # only fp32 layers are routed


def test_pick_matmul_chooses_one_and_remembers_it():
    choice = pick_matmul(2, [(32, 64)], rows=64)
    assert choice in ("torch", "numpy")
    assert pick_matmul(2, [(32, 64)], rows=64) == choice
    assert pick_matmul(2, []) == "torch"


# ---- shards -------------------------------------------------------------------------------------------------------
def test_shard_batch_cuts_rows_of_every_kind_of_batch():
    ids = torch.arange(35).view(5, 7)
    shards = shard_batch({"input_ids": ids, "labels": ids + 1}, 2)
    assert [w for _, w in shards] == [0.4, 0.6]
    torch.testing.assert_close(torch.cat([s["input_ids"] for s, _ in shards]), ids)
    torch.testing.assert_close(shards[1][0]["labels"], ids[2:] + 1)
    assert [s[1].shape[0] for s, _ in shard_batch((ids, ids[:, 0]), 3)] == [1, 2, 2]
    assert len(shard_batch(ids[:1], 4)) == 1  # never more shards than rows
    assert shard_batch({"input_ids": ids, "labels": ids[:3]}, 2) == []  # rows disagree: the batch runs whole
    assert shard_batch({"input_ids": ids, "note": "text"}, 2) == []


# ---- gradients ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("matmul", ["torch", "numpy"])
def test_core_parallel_gradients_equal_the_whole_batch(matmul):
    model = tiny_model()
    batch = PackedBatches(tokens(), 5, 32, seed=1)(0)  # 5 rows: shards of 2 and 3
    next_token_loss(model, batch).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_loss = next_token_loss(model, batch)
    model.zero_grad(set_to_none=True)
    with CoreParallel(model, 2, matmul) as cores:
        loss = cores.backward(next_token_loss, model, batch)
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)
        # accumulation: a second call adds onto p.grad (here the same batch at half weight: 1.5x the gradient)
        cores.backward(next_token_loss, model, batch, scale=0.5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, 1.5 * ref[n], rtol=1e-4, atol=1e-6, msg=n)
        with torch.no_grad():
            torch.testing.assert_close(cores.loss(next_token_loss, model, batch), ref_loss.detach(), rtol=1e-5,
                                       atol=1e-6)
    assert not any("forward" in vars(m) for m in model.modules())  # leaving the block restored the layers


def test_token_mean_losses_weigh_shards_by_scored_targets():
    """SFT batches mask prompts with -100: rows score different numbers of tokens, a shard may score none."""
    model = tiny_model()
    batch = PackedBatches(tokens(), 4, 32, seed=2)(0)
    labels = batch["labels"].clone()
    labels[:2] = -100  # shard 0 (rows 0-1) scores nothing
    labels[2, :20] = -100  # row 2 scores 12 targets, row 3 all 32
    batch = {"input_ids": batch["input_ids"], "labels": labels}
    assert [w for _, w in shard_batch(batch, 2, mean="tokens")] == [1.0]  # the empty shard is left out
    assert [w for _, w in shard_batch(batch, 4, mean="tokens")] == [12 / 44, 32 / 44]
    ref_loss = next_token_loss(model, batch)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with CoreParallel(model, 4, "torch", mean="tokens") as cores:
        loss = cores.backward(next_token_loss, model, batch)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)
    assert next_token_loss.batch_mean == "tokens"


def test_core_parallel_needs_two_cores_and_a_known_matmul():
    with pytest.raises(ConfigError, match="at least 2"):
        CoreParallel(tiny_model(), 1)
    with pytest.raises(ConfigError, match="cpu_matmul"):
        CoreParallel(tiny_model(), 2, "mkl")
    with pytest.raises(ConfigError, match="cores must be >= 0"):
        TrainConfig(cores=-1)
    with pytest.raises(ConfigError, match="cpu_matmul must be"):
        TrainConfig(cpu_matmul="blas")


# ---- the training loop -------------------------------------------------------------------------------------------
def _losses(res):
    return [r["loss"] for r in res.history if "loss" in r]


def test_train_on_two_cores_matches_one_and_repeats_bit_for_bit():
    data = PackedBatches(tokens(), 4, 32, seed=3)
    val = [PackedBatches(tokens(), 4, 32, seed=9)(i) for i in range(2)]
    cfg = dict(max_steps=4, lr=1e-2, batch_size=4, grad_accum_steps=2, eval_every=0, progress=False)
    one = train(tiny_model(), data, TrainConfig(**cfg, cores=1), val_data=val)
    two = train(tiny_model(), data, TrainConfig(**cfg, cores=2, cpu_matmul="numpy"), val_data=val)
    again = train(tiny_model(), data, TrainConfig(**cfg, cores=2, cpu_matmul="numpy"), val_data=val)
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
    np.testing.assert_allclose(two.val_loss, one.val_loss, rtol=1e-5)
    assert _losses(again) == _losses(two) and again.val_loss == two.val_loss


def test_resume_keeps_the_recorded_cores_and_matmul_and_is_exact(tmp_path, monkeypatch):
    import lmforge.training.cores

    data = PackedBatches(tokens(), 4, 32, seed=3)
    cfg = dict(lr=1e-2, batch_size=4, eval_every=0, save_every=3, progress=False, cores=2)
    ref = train(tiny_model(), data, TrainConfig(max_steps=6, cpu_matmul="numpy", **cfg))

    class Crash(Exception):
        pass

    def crash_after_3(rec):
        if rec["step"] == 3:  # the checkpoint of step 3 is written before this hook runs
            raise Crash

    with pytest.raises(Crash):
        train(tiny_model(), data, TrainConfig(max_steps=6, cpu_matmul="numpy", **cfg), out_dir=tmp_path,
              on_step=crash_after_3)
    state = read_train_state(tmp_path)
    assert state["cores"] == 2 and state["cpu_matmul"] == "numpy"

    def no_timing(*a, **k):
        raise AssertionError("a resumed run reuses the recorded choice")

    monkeypatch.setattr(lmforge.training.cores, "pick_matmul", no_timing)
    cfg["cores"] = 0  # auto: the recorded 2 shards are used even though this test process runs one torch thread
    res = train(tiny_model(), data, TrainConfig(max_steps=6, cpu_matmul="auto", **cfg), out_dir=tmp_path, resume=True)
    assert _losses(res) == _losses(ref)[3:]
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs if "loss" in r] == _losses(ref)


def test_resuming_a_checkpoint_from_before_cores_keeps_one_thread_pool(tmp_path):
    data = PackedBatches(tokens(), 4, 32, seed=3)
    cfg = dict(lr=1e-2, batch_size=4, eval_every=0, progress=False)
    train(tiny_model(), data, TrainConfig(max_steps=2, cores=1, **cfg), out_dir=tmp_path)
    state_file = tmp_path / "train_state" / "state.json"
    state = json.loads(state_file.read_text())
    del state["cores"], state["cpu_matmul"]  # what an older lmforge wrote
    state_file.write_text(json.dumps(state))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # auto would otherwise cut batches in two
    try:
        notes: list[str] = []
        train(tiny_model(), data, TrainConfig(max_steps=3, **cfg), out_dir=tmp_path, resume=True, log=notes.append)
    finally:
        torch.set_num_threads(threads)
    assert not any("training on" in n for n in notes)
    assert read_train_state(tmp_path)["cores"] == 1


def test_auto_keeps_the_usual_path_for_one_thread_and_for_dropout(monkeypatch):
    import lmforge.training.cores

    def refuse(*a, **k):
        raise AssertionError("core-parallel training should be off here")

    monkeypatch.setattr(lmforge.training.cores, "CoreParallel", refuse)
    data = PackedBatches(tokens(), 2, 32)
    train(tiny_model(), data, TrainConfig(max_steps=1, eval_every=0, progress=False))  # conftest: one torch thread
    notes: list[str] = []
    train(tiny_model(dropout=0.1), data, TrainConfig(max_steps=1, eval_every=0, progress=False, cores=2),
          log=notes.append)
    assert any("cores=2 is ignored" in n and "dropout" in n for n in notes)

    def pair_loss(model, batch):  # rows that depend on each other (as DPO's chosen/rejected halves): not declared
        return next_token_loss(model, batch)

    notes.clear()
    train(tiny_model(), data, TrainConfig(max_steps=1, eval_every=0, progress=False, cores=2), loss_fn=pair_loss,
          log=notes.append)
    assert any("cores=2 is ignored" in n and "does not declare" in n for n in notes)
    assert dropout_active(tiny_model(dropout=0.1)) and not dropout_active(tiny_model())
