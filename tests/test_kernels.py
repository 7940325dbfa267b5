"""Private kernels get owned, 64-byte-aligned inputs on every load path, and a kernel that crashes cannot take the
process down (issue 17: SIGSEGV in torch._weight_int8pack_mm on AVX-512 after save + load)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import lmforge
from lmforge import kernels
from lmforge.models.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.lm import LM
from lmforge.models.decoder import Transformer
from lmforge.compress.quantize import QuantLinear, quantize_model


def tiny_llama() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("llama-tiny", vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                intermediate_size=128, block_size=64)
    return Transformer(cfg).eval()


@pytest.fixture
def call_log(monkeypatch):
    log: list = []
    monkeypatch.setattr(kernels, "_call_log", log)
    return log


def _saved_quantized(tmp_path, scheme):
    q = quantize_model(copy.deepcopy(tiny_llama()), scheme, 32, embeddings="same", progress=False)
    LM(q, None, q.config).save(tmp_path / "q")
    return q


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_loaded_quantized_model_feeds_kernels_owned_aligned_memory(tmp_path, call_log, scheme):
    q = _saved_quantized(tmp_path, scheme)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        want = q(ids)
    lm = lmforge.load(tmp_path / "q")
    call_log.clear()
    with torch.no_grad():
        got = lm.model(ids)
    assert torch.equal(got, want)
    ops = {op for op, _ in call_log}
    if not kernels.verdicts() or any(kernels.verdicts().values()):
        assert ops, "no kernel call was made: the test would prove nothing"
    for op, args in call_log:
        for ptr, shape, dtype in args:
            assert ptr % 64 == 0, f"{op}: an input {shape} {dtype} at data_ptr % 64 == {ptr % 64}"
    if scheme == "int8":
        for m in lm.model.modules():
            if isinstance(m, QuantLinear) and m._kernel_cache:
                assert kernels.is_owned(m.qweight)  # the mapped view was replaced by the owned copy


def test_misaligned_input_is_refused_before_the_kernel():
    w = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    raw = torch.empty(16 * 64 + 40, dtype=torch.int8)
    view = raw[40:].view(16, 64)  # what a memory-mapped safetensors view can look like
    view.copy_(w)
    assert view.data_ptr() % 64 != 0
    x = torch.randn(1, 64).to(torch.bfloat16)
    s = torch.ones(16, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="64-byte aligned"):
        kernels.int8_mm(x, view, s)
    fixed = kernels.owned(view)
    assert fixed.data_ptr() % 64 == 0 and kernels.is_owned(fixed) and torch.equal(fixed, w)
    assert kernels.owned(fixed) is fixed  # at most one copy


def test_owned_parameter_keeps_identity():
    lin = torch.nn.Linear(8, 4)
    p = lin.weight
    before = p.detach().clone()
    kernels.own_(lin, "weight")
    assert lin.weight is p and torch.equal(p, before) and kernels.is_owned(p)


def test_check_runs_kernels_in_a_child_and_caches(monkeypatch):
    monkeypatch.setattr(kernels, "_verdicts", {})
    monkeypatch.setenv("LMFORGE_KERNEL_CHECK", "1")
    assert kernels.check("int8_mm", torch.bfloat16, 64, 48) in (True, False)
    assert len(kernels.verdicts()) == 1
    kernels.check("int8_mm", torch.bfloat16, 128, 32)  # same class (K % 64, N % 16): no second child
    assert len(kernels.verdicts()) == 1


def test_a_crashing_kernel_falls_back_instead_of_killing_the_process(monkeypatch, tmp_path):
    """The child dies by SIGSEGV, as the real kernel did: the verdict is no, a warning says why, and the quantized
    model runs through dequantize + F.linear with the reference result."""
    monkeypatch.setattr(kernels, "_verdicts", {})
    monkeypatch.setenv("LMFORGE_KERNEL_CHECK", "1")
    monkeypatch.setattr(kernels, "_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    lin = torch.nn.Linear(64, 48)
    q = QuantLinear.from_float(lin, "int8")
    x = torch.randn(3, 64)
    with pytest.warns(RuntimeWarning, match="signal 11"):
        with torch.no_grad():
            y = q(x)
    ref = torch.nn.functional.linear(x, q.dequantize(), q.bias)
    assert torch.equal(y, ref)
    assert list(kernels.verdicts().values()) == [False]


def test_fallback_mode_never_calls_a_kernel(monkeypatch, call_log):
    monkeypatch.setenv("LMFORGE_KERNEL_CHECK", "fallback")
    q = QuantLinear.from_float(torch.nn.Linear(64, 48), "int8")
    with torch.no_grad():
        q(torch.randn(2, 64))
    assert call_log == []


def test_loaded_model_generates_in_a_fresh_process(tmp_path):
    """What the issue's user did: quantize, save, then load and generate in a new process."""
    _saved_quantized(tmp_path, "int8")
    code = ("import torch, lmforge; lm = lmforge.load(r'%s'); "
            "print(lm.model(torch.randint(0, 256, (1, 5))).shape)") % (tmp_path / "q")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# ---- corrupt quantized checkpoints: one line naming the file and the tensor ----------------------------------------
def test_bit_flip_in_codes_is_named(tmp_path):
    _saved_quantized(tmp_path, "int4")
    f = tmp_path / "q" / "model.safetensors"
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:header])
    start, _ = meta["blocks.1.mlp.down_proj.qweight"]["data_offsets"]
    data[header + start + 3] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'blocks\.1\.mlp\.down_proj\.qweight' is "
                                              r"corrupt") as e:
        lmforge.load(tmp_path / "q")
    assert "\n" not in str(e.value)


def test_truncated_file_is_one_line(tmp_path):
    _saved_quantized(tmp_path, "int8")
    f = tmp_path / "q" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file") as e:
        lmforge.load(tmp_path / "q")
    assert "\n" not in str(e.value)


def test_quantization_json_that_disagrees_with_tensors(tmp_path):
    _saved_quantized(tmp_path, "int8")
    qj = tmp_path / "q" / "quantization.json"
    cfg = json.loads(qj.read_text())
    cfg.pop("checksums")
    cfg["modules"]["blocks.0.attn.q_proj"]["scheme"] = "int4"  # the file holds int8 codes
    cfg["modules"]["blocks.0.attn.q_proj"]["group_size"] = 32
    qj.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.q_proj\.(qweight|scales)") as e:
        lmforge.load(tmp_path / "q")
    assert "\n" not in str(e.value)
    # and a scheme the codes' dtype contradicts, with shapes that happen to agree
    cfg["modules"]["blocks.0.attn.q_proj"] = {"scheme": "int8"}
    qj.write_text(json.dumps(cfg))
    f = tmp_path / "q" / "model.safetensors"
    from safetensors.torch import load_file, save_file
    sd = load_file(str(f))
    sd["blocks.0.attn.q_proj.qweight"] = sd["blocks.0.attn.q_proj.qweight"].to(torch.int16)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"q_proj\.qweight' is int16 but"):
        lmforge.load(tmp_path / "q")
