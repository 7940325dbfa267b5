"""The one-token decode step (`lmforge.generation.decode.decode_step` through a `Decoder`) against the module-by-module
forward: same logits and same cache contents for every architecture variant, through every form of weights (a small
model's fused copies; a large model's weights re-laid out in place, with products split across threads; the model's
own modules for LoRA and quantized layers), dense or masked (padding, finished rows, past a sliding window), and
weights remade after they change."""

from __future__ import annotations

import pytest
import torch

import lmforge.generation.decode as model_mod
from lmforge import kernels
from lmforge.generation.decode import DecodeWeights, decode_product, decoder_for, fused_weights
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
    """Greedy decode, through the decode step as `generate` drives it (fused=True: span and dense from what the
    caller knows) or the forward only; returns the (steps, B, V) logits and the cache."""
    B, T = prompt.shape
    cache = model.new_cache(B, T + steps)
    dec = decoder_for(model).begin() if fused else None
    window = model.config.sliding_window
    out = []
    with torch.inference_mode():
        logits = model(prompt, kv_cache=cache)[:, -1]
        for step in range(1, steps + 1):
            nxt = logits.argmax(-1, keepdim=True)
            if dec is not None:
                span = T + step
                dense = not (window and span > window)
                logits = dec.step(nxt, torch.ones(B, dtype=torch.bool), cache, span=span, dense=dense)
                if calls is not None:
                    calls.append(dense)
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


@pytest.fixture
def python_forms(monkeypatch):
    """The Python forms of the step ("copies", "in_place"), not the native one-call step."""
    monkeypatch.setattr(model_mod, "NATIVE_STEP", False)


@pytest.mark.parametrize("form", ["copies", "in_place", "native"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_dense_steps_equal_the_module_forward(kind, form, request):
    if form == "in_place":
        request.getfixturevalue("in_place")
    if form == "native":
        if kernels.gemv_library() is None:
            pytest.skip("no C compiler here: lmforge's kernels are not built")
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # (the C loops share rows among threads)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    else:
        request.getfixturevalue("python_forms")
    model = make(kind)
    assert DecodeWeights.form(model) == form
    prompt = torch.randint(0, 97, (2, 5))  # two rows of equal length: the dense cache
    calls = []
    got, cache_f = decode(model, prompt, 12, fused=True, calls=calls)
    want, cache_m = decode(model, prompt, 12, fused=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    n = int(cache_m.lengths[0])
    assert n == 17 and torch.equal(cache_f.lengths, cache_m.lengths)
    if kind == "mistral-window":  # dense (no mask) while the window covers every cached token, masked after
        assert cache_f.dense_len is None and 0 < sum(calls) < 12
    else:
        assert cache_f.dense_len == cache_m.dense_len == n and all(calls)
    torch.testing.assert_close(cache_f.k[:, :, :, :n], cache_m.k[:, :, :, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache_f.v[:, :, :, :n], cache_m.v[:, :, :, :n], atol=1e-5, rtol=0)
    assert torch.equal(cache_f.key_mask, cache_m.key_mask) and torch.equal(cache_f.lengths, cache_m.lengths)
    assert torch.equal(cache_f.positions, cache_m.positions)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_masked_step_with_padding_and_finished_rows_equals_the_forward(kind):
    """A left-padded batch with a row that finishes: the step through the masked path (per-row slots, positions and
    validity) gives the forward's logits for the live rows and the same cache bookkeeping, with each form of weights
    (fused copies, or the model's own modules: weights=None)."""
    model = make(kind)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for own_modules in (False, True):
        dec = decoder_for(model).begin()
        if own_modules:
            dec.weights = None
        a, b = model.new_cache(2, 16), model.new_cache(2, 16)
        with torch.inference_mode():
            model(ids, attention_mask=mask, kv_cache=a)
            model(ids, attention_mask=mask, kv_cache=b)
            for step, feed in enumerate(([[9], [10]], [[11], [12]], [[0], [13]], [[0], [14]]), start=1):
                feed = torch.tensor(feed)
                alive = torch.tensor([step < 3, True])
                want = model(feed, attention_mask=alive.long()[:, None], kv_cache=a)[:, -1]
                got = dec.step(feed, alive, b, span=5 + step)
                torch.testing.assert_close(got[alive], want[alive], rtol=1e-5, atol=1e-5)
                assert torch.equal(a.lengths, b.lengths) and torch.equal(a.positions, b.positions)
                assert torch.equal(a.key_mask, b.key_mask)
                real = a.key_mask[None, :, None, :, None].expand_as(a.k)
                torch.testing.assert_close(a.k[real], b.k[real])
                torch.testing.assert_close(a.v[real], b.v[real])


OPTIMIZERS = {  # the fused kernels update weights without bumping version counters (decode.py's step hook does)
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True),
}


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_fused_copies_are_remade_after_the_weights_change(optim):
    model = make("llama-gqa")
    prompt = torch.randint(0, 97, (1, 4))
    first = fused_weights(model)
    assert fused_weights(model) is first  # unchanged weights: the same copies
    opt = OPTIMIZERS[optim](model.parameters())
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


def test_lora_and_quantized_models_step_through_their_own_modules(monkeypatch, python_forms):
    from lmforge.finetune.lora import add_lora
    from lmforge.compress.quantize import quantize_model

    model = make("llama-gqa")
    add_lora(model, ("q_proj", "v_proj"), r=2)
    with torch.no_grad():  # a non-zero adapter, so leaving it out would show
        for name, p in model.named_parameters():
            if "lora_b" in name.lower():
                p.normal_(0, 0.5)
    assert fused_weights(model) is None  # a LoRA-wrapped projection is not a plain nn.Linear: no laid-out copies
    q = quantize_model(make("gpt2"), "int8", progress=False)
    assert fused_weights(q) is None
    prompt = torch.randint(0, 97, (2, 5))
    for m in (model, q):
        got, _ = decode(m, prompt, 6, fused=True)  # the step with weights=None: the model's own modules
        want, _ = decode(m, prompt, 6, fused=False)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

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


def test_in_place_relayout_keeps_the_model_whole(in_place, python_forms, tmp_path):
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


def test_generate_lays_weights_out_once_per_call_and_decodes_padded_batches(monkeypatch):
    """generate asks for the decode weights once per call (remade only when the weights changed), and a left-padded
    batch also decodes through the step: same tokens as each prompt alone."""
    from lmforge.generation.api import generate
    from lmforge.generation import decode
    from lmforge.lm import LM

    model = make("llama-gqa")
    calls = []
    monkeypatch.setattr(decode, "fused_weights", lambda m: calls.append(1) or fused_weights(m))
    lm = LM(model, None)
    both = generate(lm, [[5, 6, 7], [8, 9]], temperature=0, max_new_tokens=6, ignore_eos=True)
    assert calls == [1]
    alone = [generate(lm, [p], temperature=0, max_new_tokens=6, ignore_eos=True)[0] for p in ([5, 6, 7], [8, 9])]
    assert [o.token_ids for o in both] == [o.token_ids for o in alone]
