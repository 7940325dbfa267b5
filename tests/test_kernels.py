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
    assert kernels.verdicts() and not any(kernels.verdicts().values())  # ours and PyTorch's: both refused


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


# ----------------------------------------------------------------------------------------------------------------
# lmforge's own int8/int4 matrix-vector kernels (csrc/decode_kernels.c)
# ----------------------------------------------------------------------------------------------------------------
needs_gemv = pytest.mark.skipif(kernels.gemv_library() is None, reason="no C compiler to build lmforge's kernels")


def reference_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernels' arithmetic written out in torch: x rounded to int8 per block of 32, exact products. w: the
    dequantized (N, K) weight (integer codes times per-row or per-group scales), multiplied in float64 so only the
    activation rounding separates it from the float result."""
    return (kernels.gemv_rounded(x) @ w.double().t()).float()


@needs_gemv
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("K,N,M,G", [(64, 48, 1, 32), (128, 45, 3, 32), (768, 50, 1, 64), (256, 7, 17, 128)])
def test_gemv_matches_its_arithmetic_and_the_float_layer(scheme, K, N, M, G):
    torch.manual_seed(K + N + M)
    lin = torch.nn.Linear(K, N)
    q = QuantLinear.from_float(lin, scheme, G)
    x = torch.randn(M, K) * torch.linspace(0.1, 10, K)  # blocks of very different magnitudes
    with torch.no_grad():
        y = q(x)
    assert q._kernel() == f"{scheme}_gemv"
    w = q.dequantize()
    exact = reference_gemv(x, w) + q.bias.detach()
    assert torch.allclose(y, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    ref = torch.nn.functional.linear(x, w, q.bias)  # what the rounding of x costs: well under 1% of the output
    assert (y - ref).abs().max() <= 0.01 * ref.abs().max()


@needs_gemv
def test_gemv_handles_zero_and_extreme_blocks():
    q = QuantLinear.from_float(torch.nn.Linear(96, 20), "int8")
    x = torch.zeros(2, 96)
    x[1, 32:64] = 1e30  # a block whose scale is huge next to an all-zero one
    x[1, 64] = -3.0
    with torch.no_grad():
        y = q(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y[0], q.bias.detach())
    exact = reference_gemv(x, q.dequantize()) + q.bias.detach()
    assert torch.allclose(y, exact, rtol=1e-4)


@needs_gemv
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_gemv_simd_levels_agree(tmp_path, scheme):
    """The AVX2 and plain-C loops (built here with other flags) compute what the native build does; CPUs without
    AVX-512 VNNI take those loops, so each is tested on every machine that can run it."""
    import ctypes.util  # noqa: F401  (ctypes itself is what loads the builds)
    builds = {"native": kernels.load_gemv(kernels.gemv_library())}
    flags = {"plain C": ["-O2", "-fopenmp", "-shared", "-fPIC"]}
    if "avx2" in kernels._cpu_id() and "fma" in kernels._cpu_id():
        flags["AVX2"] = ["-O2", "-march=haswell", "-fopenmp", "-shared", "-fPIC"]
    for name, f in flags.items():
        out = tmp_path / f"gemv-{name.replace(' ', '')}.so"
        why = kernels.compile_gemv("cc", f, out)
        assert why is None, why
        builds[name] = kernels.load_gemv(out)
    torch.manual_seed(1)
    K, N, M = 256, 37, 3
    q = QuantLinear.from_float(torch.nn.Linear(K, N), scheme, 32)
    x = torch.randn(M, K)
    outs = {}
    for name, lib in builds.items():
        if scheme == "int8":
            outs[name] = kernels.int8_gemv(x, *q._int8_gemv_args(), None, lib=lib)
        else:
            outs[name] = kernels.int4_gemv(x, *q._int4_gemv_args(), q.group_size, None, lib=lib)
    levels = {name: lib.lmf_simd_level() for name, lib in builds.items()}
    assert levels["plain C"] == 0 and levels.get("AVX2", 1) == 1
    for name, y in outs.items():
        assert torch.allclose(y, outs["native"], rtol=1e-5, atol=1e-5), name


@needs_gemv
def test_gemv_can_be_switched_off_and_a_missing_compiler_falls_back(monkeypatch, call_log):
    q = QuantLinear.from_float(torch.nn.Linear(64, 48), "int8")
    x = torch.randn(1, 64)
    with torch.no_grad():
        want = q(x)
    assert {op for op, _ in call_log} == {"int8_gemv"}
    monkeypatch.setenv("LMFORGE_GEMV", "0")
    assert kernels.gemv_library() is None
    q._kernel_cache.clear()
    call_log.clear()
    with torch.no_grad():
        off = q(x)
    assert "int8_gemv" not in {op for op, _ in call_log}
    assert (off - want).abs().max() <= 0.02 * want.abs().max()  # PyTorch's bf16 kernel: another rounding
    monkeypatch.delenv("LMFORGE_GEMV")
    monkeypatch.setattr(kernels, "_gemv_path", False)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert kernels.gemv_library() is None
    assert kernels.check("int8_gemv", torch.float32, 64, 48) in (True, False)  # answered from the cache, or no


@needs_gemv
def test_the_library_is_cached_per_cpu_and_written_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_gemv_path", False)
    path = kernels.gemv_library()
    assert path.parent == tmp_path / "lmforge" / "kernels" and path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    monkeypatch.setattr(kernels, "_gemv_path", False)
    monkeypatch.setattr(kernels, "_cpu_id", lambda: "flags : avx2 (another machine)")
    other = kernels.gemv_library()
    assert other != path  # a home directory shared with another CPU type gets its own build


@needs_gemv
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_group_forward_is_one_call_equal_to_the_layers_one_by_one(scheme, call_log):
    """q, k and v (and gate, up) read the same input: the decode step runs them as one kernel call, with the same
    numbers as three calls, and a layer whose codes change is seen by the next grouped call."""
    torch.manual_seed(4)
    layers = [QuantLinear.from_float(torch.nn.Linear(128, n), scheme, 32) for n in (64, 32, 32)]
    x = torch.randn(2, 128)
    with torch.no_grad():
        apart = torch.cat([m(x) for m in layers], dim=-1)
        call_log.clear()
        together = QuantLinear.group_forward(x, layers)
    assert [op for op, _ in call_log] == [f"{scheme}_gemv"]
    assert torch.equal(together, apart)
    new = QuantLinear.from_float(torch.nn.Linear(128, 32), scheme, 32)
    layers[1].load_state_dict(new.state_dict())
    with torch.no_grad():
        again = QuantLinear.group_forward(x, layers)
        assert torch.equal(again[:, 64:96], new(x))
        assert torch.equal(again[:, :64], apart[:, :64])
    mixed = [layers[0], QuantLinear.from_float(torch.nn.Linear(128, 8), "nf4", 32)]
    assert QuantLinear.group_forward(x, mixed) is None  # the decode step then calls them one by one


@needs_gemv
def test_quantized_decode_step_matches_the_forward(tmp_path):
    """The decode step of a quantized Llama (q, k, v and gate, up grouped) gives the logits a full forward gives
    for the same positions, through the same kernels."""
    from lmforge.generation.loop import generate_ids
    from lmforge.generation.sampling import SamplingParams

    q = quantize_model(copy.deepcopy(tiny_llama()), "int8", 32, embeddings="same", progress=False)
    prompt = [5, 17, 33, 2, 90]
    out = generate_ids(q, [prompt], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))[0].token_ids
    ids = torch.tensor([prompt + out])
    with torch.no_grad():
        logits = q(ids)[0]
    greedy = logits[len(prompt) - 1:-1].argmax(-1).tolist()
    assert greedy == out


@needs_gemv
@pytest.mark.parametrize("B,nh,nkv,L", [(1, 4, 4, 0), (2, 6, 2, 9), (3, 8, 1, 40)])
def test_attend_one_writes_the_cache_and_equals_sdpa(B, nh, nkv, L):
    torch.manual_seed(B + L)
    hd, T = 32, 48
    rows = torch.randn(B, (nh + 2 * nkv) * hd)  # q | k | v side by side, as a fused projection returns them
    q = rows[:, :nh * hd].view(B, nh, hd)  # row views: each sequence's heads contiguous, rows strided
    k_new = rows[:, nh * hd:(nh + nkv) * hd].view(B, nkv, hd)
    v_new = rows[:, (nh + nkv) * hd:].view(B, nkv, hd)
    kc, vc = torch.randn(B, nkv, T, hd), torch.randn(B, nkv, T, hd)
    want_k, want_v = kc.clone(), vc.clone()
    want_k[:, :, L], want_v[:, :, L] = k_new, v_new
    rep = nh // nkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], want_k[:, :, :L + 1].repeat_interleave(rep, 1), want_v[:, :, :L + 1].repeat_interleave(rep, 1))
    y = kernels.attend_one(q, k_new, v_new, kc, vc, L)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # slot L written, nothing else touched
    torch.testing.assert_close(y, ref.reshape(B, nh * hd), rtol=1e-5, atol=1e-5)


@needs_gemv
def test_greedy_decoding_uses_the_one_call_attention(call_log, monkeypatch):
    from lmforge.generation import decode
    from lmforge.generation.loop import generate_ids
    from lmforge.generation.sampling import SamplingParams

    monkeypatch.setattr(decode, "NATIVE_STEP", False)  # the Python step (the native one attends inside its call)
    model = tiny_llama()
    out = generate_ids(model, [[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    assert "attend_one" in {op for op, _ in call_log}
    ids = torch.tensor([[1, 2, 3] + out[0].token_ids])
    with torch.no_grad():
        assert model(ids)[0, 2:-1].argmax(-1).tolist() == out[0].token_ids


def test_large_owned_copies_start_on_a_huge_page_and_keep_their_values(monkeypatch):
    t = torch.randn(768, 1024)  # 3 MiB
    big = kernels.owned(t)
    assert torch.equal(big, t) and kernels.is_owned(big)
    if sys.platform.startswith("linux"):
        assert big.data_ptr() % kernels.HUGE_PAGE == 0  # madvise(MADV_HUGEPAGE) covers its whole 2 MB pages
    monkeypatch.setenv("LMFORGE_HUGEPAGES", "0")
    plain = kernels.owned(t)
    assert torch.equal(plain, t) and plain.data_ptr() % kernels.ALIGN == 0
    small = kernels.owned(torch.arange(10.0))
    assert torch.equal(small, torch.arange(10.0)) and small.data_ptr() % kernels.ALIGN == 0


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_model_saves_after_decoding_from_shared_chunks(tmp_path, scheme):
    """After a decode, the int8 codes live in shared huge-page chunks (views of one storage): saving still writes
    each tensor on its own and the reloaded model decodes the same tokens."""
    from lmforge.generation.loop import generate_ids
    from lmforge.generation.sampling import SamplingParams

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("llama-tiny", vocab_size=256, n_layer=2, n_embd=256, n_head=4, n_kv_head=2,
                                intermediate_size=512, block_size=64)  # 64-512 KB matrices: arena-sized
    q = quantize_model(Transformer(cfg).eval(), scheme, 32, embeddings="same", progress=False)
    params = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)
    first = generate_ids(q, [[1, 2, 3]], params)[0].token_ids
    LM(q, None, q.config).save(tmp_path / "q")
    back = lmforge.load(tmp_path / "q")
    assert generate_ids(back.model, [[1, 2, 3]], params)[0].token_ids == first


@needs_gemv
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_decoding_never_dequantizes_a_weight(monkeypatch, scheme):
    """Every product of a quantized decode runs in the kernels: a step that dequantized a weight (the tied output
    layer's, say, through its `.weight`) would run 20x slower and still give the right tokens."""
    from lmforge.generation.loop import generate_ids
    from lmforge.generation.sampling import SamplingParams

    q = quantize_model(copy.deepcopy(tiny_llama()), scheme, 32, embeddings="same", progress=False)
    calls = []
    real = QuantLinear.dequantize
    monkeypatch.setattr(QuantLinear, "dequantize", lambda self, *a, **k: calls.append(self) or real(self, *a, **k))
    generate_ids(q, [[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
    assert calls == []
