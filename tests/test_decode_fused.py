"""The one-token decode step (`lmforge.generation.decode.fused_step`, `DecodeWeights`) against the module-by-module forward:
same logits and same cache contents for every architecture variant it covers, in both forms (a small model's fused
copies; a large model's weights re-laid out in place, with products split across threads), rebuilt after the
weights change, and never used where it does not apply (LoRA, quantized layers, past a sliding window)."""

from __future__ import annotations

import pytest
import torch

import lmforge.generation.decode as model_mod
from lmforge.generation.decode import DecodeWeights, decode_product, fused_step, fused_step_ok, fused_weights
from lmforge.models.config import ModelConfig
from lmforge.models.decoder import Transformer

CONFIGS = {
    "gpt2": dict(name="gpt-tiny", vocab_size=97, block_size=48, n_layer=2, n_embd=32, n_head=4),  # biases, LayerNorm
    "llama-gqa": dict(name="llama-tiny", vocab_size=97, block_size=48, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                      intermediate_size=48),
    "llama-mqa": dict(name="llama-tiny", vocab_size=97, block_size=48, n_layer=2, n_embd=32, n_head=4, n_kv_head=1,
                      intermediate_size=48),
    "qwen2-bias": dict(name="llama-tiny", vocab_size=97, block_size=48, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                       intermediate_size=48, qkv_bias=True, tie_word_embeddings=False),
    "mistral-window": dict(name="llama-tiny", vocab_size=97, block_size=48, n_layer=2, n_embd=32, n_head=4,
                           n_kv_head=2, intermediate_size=48, sliding_window=6),
}


def make(kind: str, seed: int = 0) -> Transformer:
    kw = dict(CONFIGS[kind])
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name(kw.pop("name"), init_std=0.2, **kw)).eval()
    with torch.no_grad():  # non-zero biases, so a bias left out or misplaced shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    return model


def decode(model: Transformer, prompt: torch.Tensor, steps: int, fused: bool, calls: list | None = None):
    """Greedy decode, through the fused step where it applies (fused=True) or the forward only; returns the
    (steps, B, V) logits and the cache."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps)
    weights = fused_weights(model) if fused else None
    assert (weights is not None) == fused
    out = []
    with torch.inference_mode():
        logits = model(prompt, kv_cache=cache)[:, -1]
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            if weights is not None and fused_step_ok(model, cache):
                logits = fused_step(model, nxt, cache, weights)[:, -1]
                if calls is not None:
                    calls.append(1)
            else:
                logits = model(nxt, kv_cache=cache)[:, -1]
            out.append(logits)
    return torch.stack(out), cache


@pytest.fixture
def in_place(monkeypatch):
    """Every model counts as large (weights re-laid out in place), and every product is split over 2 threads."""
    monkeypatch.setattr(model_mod, "FUSED_DECODE_MAX_PARAMS", 0)
    monkeypatch.setattr(model_mod, "SPLIT_PRODUCT_MIN_WEIGHTS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("form", ["copies", "in_place"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fused_steps_equal_the_module_forward(kind, form, request):
    if form == "in_place":
        request.getfixturevalue("in_place")
    model = make(kind)
    assert DecodeWeights.form(model) == form
    prompt = torch.randint(0, 97, (2, 5))  # two rows of equal length: the dense cache
    calls = []
    got, cache_f = decode(model, prompt, 12, fused=True, calls=calls)
    want, cache_m = decode(model, prompt, 12, fused=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    n = cache_m.dense_len
    assert cache_f.dense_len == n == 17
    torch.testing.assert_close(cache_f.k[:, :, :, :n], cache_m.k[:, :, :, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache_f.v[:, :, :, :n], cache_m.v[:, :, :, :n], atol=1e-5, rtol=0)
    assert torch.equal(cache_f.key_mask, cache_m.key_mask) and torch.equal(cache_f.lengths, cache_m.lengths)
    assert torch.equal(cache_f.positions, cache_m.positions)
    if kind == "mistral-window":  # fused only while the window still covers every cached token (5 + 1 < 6 ... )
        assert 0 < len(calls) < 12
    else:
        assert len(calls) == 12


def test_fused_copies_are_remade_after_the_weights_change():
    model = make("llama-gqa")
    prompt = torch.randint(0, 97, (1, 4))
    first = fused_weights(model)
    assert fused_weights(model) is first  # unchanged weights: the same copies
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    loss = model(prompt).float().pow(2).mean()
    loss.backward()
    opt.step()  # in-place update of every weight
    model.eval()
    assert fused_weights(model) is not first
    got, _ = decode(model, prompt, 6, fused=True)
    want, _ = decode(model, prompt, 6, fused=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():  # a weight replaced outright (load_state_dict-style .data swap) is noticed too
        model.blocks[0].attn.q_proj.weight.data = torch.randn_like(model.blocks[0].attn.q_proj.weight)
    got, _ = decode(model, prompt, 6, fused=True)
    want, _ = decode(model, prompt, 6, fused=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_not_used_for_lora_quantized_or_large_models(monkeypatch):
    from lmforge.finetune.lora import add_lora

    model = make("llama-gqa")
    add_lora(model, ("q_proj", "v_proj"), r=2)
    assert fused_weights(model) is None  # a LoRA-wrapped projection is not a plain nn.Linear

    from lmforge.compress.quantize import quantize_model

    q = quantize_model(make("gpt2"), "int8", progress=False)
    assert fused_weights(q) is None

    monkeypatch.setattr(model_mod, "FUSED_DECODE_MAX_PARAMS", 100)  # large: in place on a CPU, nothing elsewhere
    assert DecodeWeights.form(make("gpt2")) == "in_place"
    with torch.device("meta"):
        meta = Transformer(ModelConfig.from_name("gpt-tiny", vocab_size=97, block_size=48, n_layer=2, n_embd=32,
                                                 n_head=4))
    assert DecodeWeights.form(meta) is None


@pytest.mark.parametrize("rows", [1, 3])
def test_split_product_equals_the_plain_product(monkeypatch, rows):
    monkeypatch.setattr(model_mod, "SPLIT_PRODUCT_MIN_WEIGHTS", 0)
    threads = torch.get_num_threads()
    try:
        for t in (2, 3):
            torch.set_num_threads(t)
            h, w, b = torch.randn(rows, 96), torch.randn(96, 40), torch.randn(40)
            calls = []
            orig_bmm = torch.bmm
            monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or orig_bmm(*a))
            torch.testing.assert_close(decode_product(h, w, b), torch.addmm(b, h, w), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(decode_product(h, w, None), h @ w, atol=1e-5, rtol=1e-5)
            assert len(calls) == 2  # the split path ran
            monkeypatch.setattr(torch, "bmm", orig_bmm)
            torch.testing.assert_close(decode_product(h[:, :95], w[:95], None), h[:, :95] @ w[:95])  # K % T != 0: plain
    finally:
        torch.set_num_threads(threads)


def test_in_place_relayout_keeps_the_model_whole(in_place, tmp_path):
    """Re-laid out weights are the same parameters with the same values, no copy is kept, and every other stage
    (the module forward, training, saving and loading, LoRA, quantization) still works on them."""
    from lmforge.formats.native import save
    from lmforge.loader import load
    from lmforge.lm import LM
    from lmforge.finetune.lora import add_lora
    from lmforge.compress.quantize import quantize_model

    model = make("qwen2-bias")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: p for k, p in model.named_parameters()}
    prompt = torch.randint(0, 97, (1, 6))
    with torch.inference_mode():
        want = model(prompt)
    dw = fused_weights(model)  # relayout happens here (inference mode or not, the weights stay trainable)
    assert dw.in_place and fused_weights(model) is dw
    assert {k: p for k, p in model.named_parameters()} == params  # the same Parameter objects
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    q = model.blocks[0].attn.q_proj.weight
    assert q.stride() == (1, q.shape[0]) and model.lm_head.weight.stride() == (1, 97)
    assert dw.blocks[0][0][0][0].data_ptr() == q.data_ptr()  # a view of the parameter, not a copy
    with torch.inference_mode():
        torch.testing.assert_close(model(prompt), want, atol=1e-5, rtol=0)

    save(LM(model, None), tmp_path / "m")  # contiguous on disk
    again = load(tmp_path / "m").model
    for k, v in again.state_dict().items():
        assert torch.equal(v, before[k]), k

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(prompt).float().pow(2).mean().backward()
    opt.step()
    model.eval()
    assert fused_weights(model) is not dw  # the optimizer step is seen; the step agrees with the forward again
    got, _ = decode(model, prompt, 5, fused=True)
    want_steps, _ = decode(model, prompt, 5, fused=False)
    torch.testing.assert_close(got, want_steps, atol=1e-5, rtol=0)

    from lmforge.formats.gguf import gguf_tensors  # GGUF export reads row-major arrays back

    plain, relaid = make("llama-gqa"), make("llama-gqa")
    fused_weights(relaid)
    a, b = gguf_tensors(plain, plain.config, "llama"), gguf_tensors(relaid, relaid.config, "llama")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() and b[k].flags.c_contiguous for k in a)

    relaid_gpt2 = make("gpt2")
    fused_weights(relaid_gpt2)
    quantize_model(relaid_gpt2, "int8", progress=False)  # a re-laid out model quantizes
    lora_model = make("gpt2")
    fused_weights(lora_model)
    add_lora(lora_model, ("q_proj", "v_proj"), r=2)
    with torch.inference_mode():
        lora_model(prompt)


def test_padded_batches_make_no_decode_weights(monkeypatch):
    """A left-padded batch never takes the dense one-token step, so generate does not ask for decode weights."""
    from lmforge.generation.api import generate
    from lmforge.generation import loop
    from lmforge.lm import LM

    model = make("llama-gqa")
    calls = []
    monkeypatch.setattr(loop.decode, "fused_weights", lambda m: calls.append(1) or fused_weights(m))
    lm = LM(model, None)
    generate(lm, [[5, 6, 7], [8, 9]], temperature=0, max_new_tokens=3, ignore_eos=True)
    assert calls == []
    generate(lm, [[5, 6, 7], [8, 9, 10]], temperature=0, max_new_tokens=3, ignore_eos=True)
    assert calls == [1]
