"""The decode step with static shapes (lmforge.generation.decode.Decoder, what compile=True runs): eager it is
token-for-token the default path (batched, padded, finished rows, sampling, GQA + RoPE and learned positions), and compiled with
torch.compile it still is. The compile test uses one tiny model and one shape so it stays within seconds once
Inductor's kernels are built (skipped when no C++ compiler is present)."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmforge.generation.api import generate, stream
from lmforge.generation.decode import decoder_for
from lmforge.generation.loop import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.models.config import ModelConfig
from lmforge.lm import LM
from lmforge.models.decoder import Transformer
from test_generate import byte_tokenizer, tiny_lm


def _ids(outs):
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_static_step_equals_default_cache_path(kind):
    lm = tiny_lm(kind)
    prompts = [list(range(5, 17)), [7, 8, 9], [200, 3, 40, 41, 42]]
    for controls in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 3},
                     {"temperature": 0, "repetition_penalty": 1.3}):
        ref = generate(lm, prompts, max_new_tokens=20, ignore_eos=True, **controls)
        got = generate(lm, prompts, max_new_tokens=20, ignore_eos=True, static=True, **controls)
        assert _ids(got) == _ids(ref), controls
        assert [g.finish_reason for g in got] == [r.finish_reason for r in ref]


def test_static_step_logits_and_cache_state_equal_model_forward():
    lm = tiny_lm("llama")
    model = lm.model
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    dec = decoder_for(model)  # no span: the whole cache, masked (the compiled step's static shapes), eager
    a, b = model.new_cache(2, 16), model.new_cache(2, 16)
    with torch.inference_mode():
        model(ids, attention_mask=mask, kv_cache=a)
        model(ids, attention_mask=mask, kv_cache=b)
        for step, feed in enumerate(([[9], [10]], [[11], [12]], [[0], [13]])):
            feed = torch.tensor(feed)
            alive = torch.tensor([step < 2, True])
            want = model(feed, attention_mask=alive.long()[:, None], kv_cache=a)[:, -1]
            got = dec.step(feed, alive, b)
            torch.testing.assert_close(got[alive], want[alive], rtol=1e-5, atol=1e-5)  # a padding row's are unused
            assert torch.equal(a.lengths, b.lengths) and torch.equal(a.positions, b.positions)
            assert torch.equal(a.key_mask, b.key_mask)
            real = a.key_mask[None, :, None, :, None].expand_as(a.k)  # slots of real tokens (padding is never read)
            torch.testing.assert_close(a.k[real], b.k[real])
            torch.testing.assert_close(a.v[real], b.v[real])


def test_static_step_stops_rows_and_streams_like_default():
    lm = tiny_lm("gpt")
    p = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[ord("e")])
    prompts = [list(b"hello"), list(b"a much longer prompt")]
    ref = generate_ids(lm.model, prompts, p, lm.tokenizer, max_len=64)
    got = generate_ids(lm.model, prompts, p, lm.tokenizer, max_len=64, static=True)
    assert _ids(got) == _ids(ref) and [g.finish_reason for g in got] == [r.finish_reason for r in ref]
    assert "".join(stream(lm, "hi", max_new_tokens=8, temperature=0, static=True)) == \
        generate(lm, "hi", max_new_tokens=8, temperature=0)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile needs C++")
def test_compiled_step_equals_eager_tokens():
    """fullgraph=True: compiling fails loudly if the step reads a Python value back from a tensor. One layer and
    one shape keep the cold compile short (Inductor caches its kernels on disk, so later runs take ~1 s)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("llama-tiny", vocab_size=257, block_size=64, n_layer=1, n_embd=32, n_head=4,
                                n_kv_head=2, intermediate_size=48, init_std=0.2)
    lm = LM(Transformer(cfg).eval(), byte_tokenizer(), cfg)
    prompt = list(range(5, 17))
    ref = generate(lm, prompt, max_new_tokens=24, temperature=0, ignore_eos=True)
    got = generate(lm, prompt, max_new_tokens=24, temperature=0, ignore_eos=True, compile=True)
    assert got.token_ids == ref.token_ids
    again = generate(lm, prompt[:5], max_new_tokens=24, temperature=0, ignore_eos=True, compile=True)  # same graph
    assert again.token_ids == generate(lm, prompt[:5], max_new_tokens=24, temperature=0, ignore_eos=True).token_ids


def test_decoder_cache_does_not_keep_models_alive():
    import gc
    import weakref

    lm = tiny_lm("gpt")
    generate(lm, [5, 6], max_new_tokens=2, temperature=0, static=True)
    ref = weakref.ref(lm.model)
    del lm
    gc.collect()
    assert ref() is None
