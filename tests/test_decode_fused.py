"""The fused one-token decode step (`Transformer.decode_fused`, `DecodeWeights`) against the module-by-module
forward: same logits and same cache contents for every architecture variant it covers, rebuilt after the weights
change, and never used where it does not apply (LoRA, quantized layers, large models, past a sliding window)."""

from __future__ import annotations

import pytest
import torch

import lmforge.model as model_mod
from lmforge.config import ModelConfig
from lmforge.model import DecodeWeights, Transformer

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


def decode(model: Transformer, prompt: torch.Tensor, steps: int, fused: bool):
    """Greedy decode; returns the (steps, B, V) logits and the cache."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps, fused=fused)
    assert (cache.fused is not None) == fused
    out = []
    with torch.inference_mode():
        logits = model(prompt, kv_cache=cache)[:, -1]
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(nxt, kv_cache=cache)[:, -1]
            out.append(logits)
    return torch.stack(out), cache


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fused_steps_equal_the_module_forward(kind):
    model = make(kind)
    prompt = torch.randint(0, 97, (2, 5))  # two rows of equal length: the dense cache
    calls = []
    orig = Transformer.decode_fused
    Transformer.decode_fused = lambda self, ids, cache: calls.append(1) or orig(self, ids, cache)
    try:
        got, cache_f = decode(model, prompt, 12, fused=True)
    finally:
        Transformer.decode_fused = orig
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
    first = model.decode_weights()
    assert model.decode_weights() is first  # unchanged weights: the same copies
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    loss = model(prompt).float().pow(2).mean()
    loss.backward()
    opt.step()  # in-place update of every weight
    model.eval()
    assert model.decode_weights() is not first
    got, _ = decode(model, prompt, 6, fused=True)
    want, _ = decode(model, prompt, 6, fused=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():  # a weight replaced outright (load_state_dict-style .data swap) is noticed too
        model.blocks[0].attn.q_proj.weight.data = torch.randn_like(model.blocks[0].attn.q_proj.weight)
    got, _ = decode(model, prompt, 6, fused=True)
    want, _ = decode(model, prompt, 6, fused=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_not_used_for_lora_quantized_or_large_models(monkeypatch):
    from lmforge.lora import add_lora

    model = make("llama-gqa")
    add_lora(model, ("q_proj", "v_proj"), r=2)
    assert model.new_cache(1, 8).fused is None  # a LoRA-wrapped projection is not a plain nn.Linear

    from lmforge.quantize import quantize_model

    q = quantize_model(make("gpt2"), "int8", progress=False)
    assert q.new_cache(1, 8).fused is None

    monkeypatch.setattr(model_mod, "FUSED_DECODE_MAX_PARAMS", 100)
    assert not DecodeWeights.eligible(make("gpt2"))
    assert make("gpt2").new_cache(1, 8).fused is None
