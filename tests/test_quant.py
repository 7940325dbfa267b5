"""Weight-only quantization: number formats, error bounds, kernels vs reference, GPTQ vs RTN, save/load, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import lmforge
from lmforge import kernels
from lmforge.cli import main as cli_main
from lmforge.models.config import ModelConfig
from lmforge.errors import ConfigError, LmforgeError
from lmforge.lm import LM
from lmforge.models.decoder import Transformer
from lmforge.compress.quantize import (QuantEmbedding, QuantLinear, TiedQuantHead, bits_per_weight, gptq_quantize_weight,
                              model_nbytes, nf4_levels, pack_int4, prepare_for_load, quantize_model, unpack_int4)

# bitsandbytes' published NF4 table (QLoRA, Dettmers et al. 2023, appendix E)
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def tiny_llama(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("llama-tiny", **{**dict(vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                                        intermediate_size=128, block_size=64), **kw})
    return Transformer(cfg).eval()


def tiny_gpt2(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt-tiny", **{**dict(vocab_size=256, n_layer=2, n_embd=64, n_head=4, block_size=64),
                                              **kw})
    return Transformer(cfg).eval()


def test_nf4_levels_match_qlora_table():
    assert torch.allclose(nf4_levels(), torch.tensor(NF4_PUBLISHED), atol=1e-6)


def test_pack_unpack_roundtrip():
    q = torch.randint(0, 16, (7, 10))
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (7, 5)
    assert torch.equal(unpack_int4(p).long(), q)


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_dequantize_error_bounds(scheme):
    torch.manual_seed(1)
    lin = nn.Linear(128, 48)
    w = lin.weight.detach()
    q = QuantLinear.from_float(lin, scheme, 32)
    err = (q.dequantize() - w).abs()  # (N, K)
    if scheme == "int8":  # half a step of the row's scale, plus fp16 rounding of the scale itself
        bound = q.scale.float()[:, None] / 2 * 1.001 + 1e-6
        assert (err <= bound).all()
        assert err.max() < w.abs().max() / 127
    else:
        s = q.scale.float().repeat_interleave(32, dim=1)  # (N, K)
        if scheme == "int4":  # uniform grid: at most half a step
            bound = s / 2 * 1.001 + 1e-6
        else:  # NF4: at most half the widest gap between neighbouring levels, times the group absmax
            bound = s * (nf4_levels().diff().max() / 2) * 1.001 + 1e-6
        assert (err <= bound).all()
    # the group maxima are exact for the symmetric/absmax formats (that is how the scale is chosen)
    if scheme == "nf4":
        g = w.view(48, 4, 32)
        idx = g.abs().argmax(-1, keepdim=True)
        deq = q.dequantize().view(48, 4, 32)
        assert torch.allclose(deq.gather(-1, idx), g.gather(-1, idx), rtol=1e-3)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cpu_kernels_match_reference_path(scheme):
    torch.manual_seed(2)
    lin = nn.Linear(128, 64, bias=True)
    q = QuantLinear.from_float(lin, scheme, 32)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        fast = q(x)
        QuantLinear.use_kernels = False
        try:
            ref = q(x)
        finally:
            QuantLinear.use_kernels = True
    assert fast.shape == (2, 5, 64)
    torch.testing.assert_close(fast, ref, rtol=2e-2, atol=2e-2)
    if q._kernel().endswith("_gemv"):  # lmforge's kernels: x rounded to int8 per block of 32, exact products
        seen = kernels.gemv_rounded(x.reshape(-1, 128)).float().view(2, 5, 128)
        torch.testing.assert_close(fast, nn.functional.linear(seen, q.dequantize(), q.bias), rtol=1e-4, atol=1e-4)
    else:  # PyTorch's kernels take bf16 activations: equal up to bf16 rounding of x
        ref_bf16 = nn.functional.linear(x.bfloat16().float(), q.dequantize(), q.bias)
        torch.testing.assert_close(fast, ref_bf16, rtol=1e-2, atol=5e-3)


def test_gradients_flow_through_quantized_linear():
    """QLoRA needs d(loss)/d(input) through a frozen quantized layer."""
    q = QuantLinear.from_float(nn.Linear(64, 32), "nf4", 32)
    x = torch.randn(3, 64, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(3, 64))


def test_gptq_beats_rtn_on_layer_output():
    torch.manual_seed(3)
    K, N, n = 128, 64, 2048
    # correlated inputs (as real activations are): GPTQ can push one column's error onto its correlated neighbours
    mix = torch.randn(K, K) / K**0.5 + torch.eye(K)
    X = torch.randn(n, K) @ mix * torch.linspace(0.2, 3, K)
    W = torch.randn(N, K) * 0.05
    H = 2 * X.T @ X / n
    for scheme in ("int4", "nf4", "int8"):
        lin = nn.Linear(K, N, bias=False)
        lin.weight.data.copy_(W)
        rtn = QuantLinear.from_float(lin, scheme, 32).dequantize()
        codes, s, z = gptq_quantize_weight(W, H, scheme, 32)
        gptq = QuantLinear.from_float(lin, scheme, 32, codes=codes, scale=s, zero=z).dequantize()
        err_rtn = ((X @ (W - rtn).T) ** 2).mean()
        err_gptq = ((X @ (W - gptq).T) ** 2).mean()
        assert err_gptq < 0.8 * err_rtn, (scheme, err_gptq, err_rtn)


@pytest.mark.parametrize("embeddings", ["keep", "int8", "same"])
@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quantized_model_save_load_same_logits(tmp_path, scheme, embeddings):
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(ids)
    q = quantize_model(copy.deepcopy(model), scheme, 32, embeddings=embeddings, progress=False)
    if embeddings != "keep":
        assert isinstance(q.wte, QuantEmbedding) and isinstance(q.lm_head, TiedQuantHead)
    with torch.no_grad():
        out = q(ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < {"int8": 0.02, "int4": 0.15, "nf4": 0.15}[scheme]
    LM(q, None, q.config).save(tmp_path / "q")
    qjson = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert qjson["scheme"] == scheme and "blocks.0.attn.q_proj" in qjson["modules"]
    lm = lmforge.load(tmp_path / "q")
    assert isinstance(lm.model.blocks[0].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(lm.model(ids), out)


def test_memory_shrinks_and_bits_per_weight():
    model = tiny_gpt2(vocab_size=1024)  # biases, LayerNorm, learned positions, tied head
    fp32 = model_nbytes(model)
    int8 = quantize_model(copy.deepcopy(model), "int8", progress=False)
    int4 = quantize_model(copy.deepcopy(model), "int4", 32, embeddings="same", progress=False)
    assert model_nbytes(int8) < 0.3 * fp32
    assert model_nbytes(int4) < 0.2 * fp32
    assert 8.0 < bits_per_weight(int8) < 8.5
    assert bits_per_weight(int4) == pytest.approx(4 + (16 + 8) / 32)  # codes + fp16 scale + uint8 zero per 32
    assert not any(isinstance(m, nn.Linear) for m in int4.modules())


def test_untied_head_and_gpt2_biases_roundtrip(tmp_path):
    model = tiny_gpt2(tie_word_embeddings=False)
    q = quantize_model(model, "int4", 32, progress=False)
    assert isinstance(q.lm_head, QuantLinear) and q.blocks[0].attn.q_proj.bias is not None
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        out = q(ids)
    LM(q, None, q.config).save(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(lmforge.load(tmp_path / "q").model(ids), out, rtol=0, atol=0)


def test_gptq_model_calibrated_beats_rtn():
    """Whole-model GPTQ (sequential, block by block) is closer to the fp32 logits than RTN on held-out text."""
    model = tiny_llama()
    torch.manual_seed(4)
    calib, held = torch.randint(0, 256, (8, 32)), torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        ref = model(held)
    errs = {}
    for method in ("rtn", "gptq"):
        q = quantize_model(copy.deepcopy(model), "int4", 32, calibration=calib if method == "gptq" else None,
                           method=method, embeddings="keep", progress=False)
        assert q.quantization_config["method"] == method
        with torch.no_grad():
            errs[method] = ((q(held) - ref) ** 2).mean().item()
    assert errs["gptq"] < errs["rtn"]


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"group_size 48 does not divide the input width 64"):
        quantize_model(tiny_llama(), "int4", 48)
    with pytest.raises(ConfigError, match="unknown quantization scheme 'int3'"):
        quantize_model(tiny_llama(), "int3")
    with pytest.raises(ConfigError, match="needs calibration"):
        quantize_model(tiny_llama(), "int4", 32, method="gptq")
    with pytest.raises(ConfigError, match="positive even"):
        quantize_model(tiny_llama(), "nf4", 0)
    with pytest.raises(ConfigError, match="unknown format"):
        prepare_for_load(tiny_llama(), {"format": "awq"})
    m = quantize_model(tiny_llama(), "int8", progress=False)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(m, "int8")
    # fallback: a width the group does not divide goes int8 instead of failing
    q = quantize_model(tiny_llama(intermediate_size=96), "int4", 64, fallback="int8", progress=False)
    assert q.blocks[0].mlp.down_proj.scheme == "int8" and q.blocks[0].mlp.up_proj.scheme == "int4"


def test_quantized_stories260k_generates_like_fp32(shared_data):
    binf = shared_data("stories260K/stories260K.bin")
    lm = lmforge.load(binf)
    ref = lm.generate("Once upon a time", max_new_tokens=20, temperature=0)
    quantize_model(lm.model, "int8", progress=False)
    out = lm.generate("Once upon a time", max_new_tokens=20, temperature=0)
    assert isinstance(out, str) and len(out) > 20
    assert out[:20] == ref[:20]  # int8 keeps the first greedy words


def test_cli_quantize(tmp_path, capsys):
    model = tiny_llama()
    from lmforge.tokenizers.bpe import Tokenizer

    tok = Tokenizer.train(["hello world, the quick brown fox jumps over the lazy dog. " * 50], vocab_size=256 + 20)
    model = Transformer(ModelConfig.from_dict({**model.config.to_dict(), "vocab_size": tok.vocab_size}))
    LM(model, tok, model.config).save(tmp_path / "m")
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    rc = cli_main(["quantize", str(tmp_path / "m"), "--scheme", "int4", "--group-size", "32", "--method", "gptq",
                   "--calib-data", str(tmp_path / "calib.txt"), "--calib-samples", "4", "--calib-len", "32",
                   "--out", str(tmp_path / "q")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ratio"] < 0.35
    lm = lmforge.load(tmp_path / "q")
    assert lm.model.quantization_config["method"] == "gptq"
    assert isinstance(lm.generate("the quick", max_new_tokens=5, temperature=0), str)
    rc = cli_main(["quantize", str(tmp_path / "m"), "--scheme", "int4", "--group-size", "24",
                   "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: group_size 24") and err.count("\n") == 1
