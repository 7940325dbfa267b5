"""The native decode step (`kernels.DecodeProgram`, csrc/decode_kernels.c's `lmf_decode_step`): one C call per token
that must compute what the Python `decode_step` computes, for every family it accepts (GPT-2: learned positions,
LayerNorm, GELU, biases; Llama/Qwen2: rope, RMSNorm, SwiGLU, GQA/MQA, q/k/v biases), for fp32, int8 and int4
weights, one row or several of equal length; and that it steps aside (hooks, no library) instead of skipping
anything. Also the fp32 product it uses, against torch, in every SIMD build."""

from __future__ import annotations

import copy

import pytest
import torch

import lmforge.generation.decode as decode_mod
from lmforge import kernels
from lmforge.compress.quantize import quantize_model
from lmforge.generation.decode import DecodeWeights, decoder_for, fused_weights
from lmforge.models.config import ModelConfig
from lmforge.models.decoder import Transformer

needs_lib = pytest.mark.skipif(kernels.gemv_library() is None, reason="no C compiler: lmforge's kernels not built")

FAMILIES = {
    "gpt2": dict(name="gpt-tiny", vocab_size=97, block_size=64, n_layer=2, n_embd=64, n_head=4),
    "llama-gqa": dict(name="llama-tiny", vocab_size=97, block_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                      intermediate_size=128),
    "llama-mqa": dict(name="llama-tiny", vocab_size=97, block_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=1,
                      intermediate_size=128),
    "qwen2-bias": dict(name="llama-tiny", vocab_size=97, block_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                       intermediate_size=128, qkv_bias=True, tie_word_embeddings=False),
}


def make(kind: str, seed: int = 0) -> Transformer:
    kw = dict(FAMILIES[kind])
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name(kw.pop("name"), init_std=0.2, **kw)).eval()
    with torch.no_grad():  # non-zero biases and norm weights, so one left out or misplaced shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the C loops share rows among threads: test the split
    yield
    torch.set_num_threads(threads)


def steps(model, prompt: torch.Tensor, n: int, native: bool, monkeypatch) -> tuple[torch.Tensor, object]:
    """n greedy dense steps after the prompt through a Decoder: (n, B, V) logits and the cache."""
    monkeypatch.setattr(decode_mod, "NATIVE_STEP", native)
    model._decode_weights = None
    B, T = prompt.shape
    cache = model.new_cache(B, T + n)
    dec = decoder_for(model).begin()
    assert (dec.weights is not None and dec.weights.program is not None) == native
    out, fed = [], []
    with torch.inference_mode():
        logits = model(prompt, kv_cache=cache)[:, -1]
        for i in range(1, n + 1):
            fed.append(logits.argmax(-1, keepdim=True))
            logits = dec.step(fed[-1], torch.ones(B, dtype=torch.bool), cache, span=T + i, dense=True)
            out.append(logits)
    cache.fed = torch.cat([prompt] + fed, dim=1)  # the prompt and every token fed to a step
    return torch.stack(out), cache


def forward_argmax(model, fed: torch.Tensor, T: int) -> list:
    """The full forward's greedy choice after each fed token (positions T.. of `fed`)."""
    with torch.no_grad():
        return model(fed)[0, T:].argmax(-1).tolist()


@needs_lib
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_native_step_equals_the_python_step(kind, rows, monkeypatch):
    model = make(kind)
    assert DecodeWeights.form(model) == "native"
    prompt = torch.randint(0, 97, (rows, 6))
    got, a = steps(model, prompt, 10, True, monkeypatch)
    want, b = steps(model, prompt, 10, False, monkeypatch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    n = int(b.lengths[0])
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.positions, b.positions)
    assert torch.equal(a.key_mask, b.key_mask)
    torch.testing.assert_close(a.k[..., :n, :], b.k[..., :n, :], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.v[..., :n, :], b.v[..., :n, :], atol=1e-4, rtol=1e-4)


@needs_lib
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["gpt2", "qwen2-bias"])
def test_native_step_of_a_quantized_model_equals_its_python_step(kind, scheme, monkeypatch):
    """Same kernels, called from C instead of Python: the same logits up to summation order, the same greedy ids
    as the model's full forward."""
    q = quantize_model(make(kind), scheme, 32, progress=False)
    assert DecodeWeights.form(q) == "native"
    prompt = torch.randint(0, 97, (1, 5))
    got, cache = steps(q, prompt, 8, True, monkeypatch)
    want, _ = steps(q, prompt, 8, False, monkeypatch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert forward_argmax(q, cache.fed, 5) == got[:, 0].argmax(-1).tolist()


@needs_lib
def test_generate_goes_through_the_native_step_and_equals_the_python_one(monkeypatch):
    from lmforge.generation.loop import generate_ids
    from lmforge.generation.sampling import SamplingParams

    model = make("llama-gqa")
    calls = []
    real = kernels.DecodeProgram.__call__
    monkeypatch.setattr(kernels.DecodeProgram, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]  # equal lengths: dense, several rows in one call
    native = [o.token_ids for o in generate_ids(model, prompts, params)]
    assert len(calls) == 11  # every step after the prefill's first token
    monkeypatch.setattr(decode_mod, "NATIVE_STEP", False)
    model._decode_weights = None
    assert [o.token_ids for o in generate_ids(model, prompts, params)] == native
    monkeypatch.setattr(decode_mod, "NATIVE_STEP", True)
    model._decode_weights = None
    padded = [o.token_ids for o in generate_ids(model, [[5, 6, 7, 8], [9, 10]], params)]  # masked: Python step
    alone = [generate_ids(model, [p], params)[0].token_ids for p in ([5, 6, 7, 8], [9, 10])]
    assert padded == alone


@needs_lib
def test_a_hook_or_a_trained_weight_is_never_skipped(monkeypatch):
    """A forward hook on any module sends the step back to Python (which runs it); a weight changed in place is
    seen by the next native step (the program reads the live tensors, and is remade when they are replaced)."""
    model = make("gpt2")
    assert DecodeWeights.form(model) == "native"
    handle = model.blocks[1].mlp.up_proj.register_forward_hook(lambda m, i, o: None)
    assert DecodeWeights.form(model) != "native"
    handle.remove()
    prompt = torch.randint(0, 97, (1, 4))
    before, _ = steps(model, prompt, 3, True, monkeypatch)
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight.mul_(1.5)
        model.blocks[0].mlp.down_proj.bias.add_(0.3)
    after, _ = steps(model, prompt, 3, True, monkeypatch)
    want, _ = steps(model, prompt, 3, False, monkeypatch)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, atol=1e-4, rtol=1e-4)


@needs_lib
def test_program_refuses_inputs_that_do_not_fit():
    model = make("gpt2")
    prog = fused_weights(model).program
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="do not match"):
        prog(torch.randn(1, 63), cache.k, cache.v, 0)
    with pytest.raises(ValueError, match="do not match"):
        prog(torch.randn(1, 64), cache.k, cache.v, 8)  # slot 8 of an 8-slot cache


@needs_lib
@pytest.mark.parametrize("K,N,M", [(64, 40, 1), (100, 9, 3), (768, 130, 2), (3072, 17, 1)])
def test_f32_gemv_equals_torch_in_every_simd_build(K, N, M, tmp_path):
    builds = {"native": None}
    flags = {"plain C": ["-O2", "-fopenmp", "-shared", "-fPIC"]}
    if "avx2" in kernels._cpu_id() and "fma" in kernels._cpu_id():
        flags["AVX2"] = ["-O2", "-march=haswell", "-fopenmp", "-shared", "-fPIC"]
    for name, f in flags.items():
        out = tmp_path / f"k-{name.replace(' ', '')}.so"
        assert kernels.compile_gemv("cc", f, out) is None
        builds[name] = kernels.load_gemv(out)
    torch.manual_seed(K + N)
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    want = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
    for name, lib in builds.items():
        got = kernels.f32_gemv(x, w, b, lib=lib)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)
        pair = kernels.Gemv("f32", [(w[:N // 2 + 1],), (w[N // 2 + 1:],)], lib=lib)  # two matrices, one call
        torch.testing.assert_close(pair(x, [b[:N // 2 + 1], None]),
                                   torch.cat([want[:, :N // 2 + 1], want[:, N // 2 + 1:] - b[N // 2 + 1:]], 1),
                                   atol=1e-4, rtol=1e-4, msg=name)


def test_without_the_library_the_python_step_serves(monkeypatch):
    monkeypatch.setattr(kernels, "gemv_library", lambda: None)
    model = make("llama-gqa")
    assert DecodeWeights.form(model) in ("copies", "in_place")
    q = copy.deepcopy(model)
    prompt = torch.randint(0, 97, (1, 4))
    got, cache = steps(q, prompt, 3, False, monkeypatch)
    assert forward_argmax(q, cache.fed, 4) == got[:, 0].argmax(-1).tolist()


@needs_lib
def test_a_loaded_model_decodes_from_the_weights_it_loaded(tmp_path):
    """The loader reads weights into owned, aligned memory; the native step uses them where they are (no second
    copy of the weights for decoding), and a deep copy of a model that has decoded is a plain model again."""
    import lmforge
    from lmforge.generation.loop import generate_ids
    from lmforge.generation.sampling import SamplingParams
    from lmforge.lm import LM

    model = make("gpt2")
    LM(model, None, model.config).save(tmp_path / "m")
    lm = lmforge.load(tmp_path / "m")
    before = {n: p.data_ptr() for n, p in lm.model.named_parameters()}
    params = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)
    out = generate_ids(lm.model, [[1, 2, 3]], params)[0].token_ids
    assert lm.model._decode_weights.program is not None
    assert {n: p.data_ptr() for n, p in lm.model.named_parameters()} == before
    twin = copy.deepcopy(lm.model)
    assert twin._decode_weights is None
    assert generate_ids(twin, [[1, 2, 3]], params)[0].token_ids == out
