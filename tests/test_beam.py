"""Beam search: on the same weights, the ids (and scores) equal transformers.generate's, for decoder-only models
(HF random tiny GPT-2 / Llama imported with lmforge.load, and an lmforge model exported with export_hf) and for T5,
across length_penalty, early_stopping, no_repeat_ngram_size, num_return_sequences and repetition_penalty."""

import pytest
import torch

import lmforge
from lmforge.errors import GenerationError
from lmforge.generation.beam import BeamParams, banned_ngram_tokens, decoder_beam_search, seq2seq_beam_search
from lmforge.generation.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

EOS, PAD, V = 3, 0, 40
SETTINGS = [
    dict(num_beams=4),
    dict(num_beams=3, length_penalty=2.0, num_return_sequences=3),
    dict(num_beams=4, length_penalty=-1.0, early_stopping=True, num_return_sequences=2),
    dict(num_beams=2, early_stopping="never", length_penalty=0.5),
    dict(num_beams=4, no_repeat_ngram_size=2, num_return_sequences=4),
    dict(num_beams=3, repetition_penalty=1.8),
]


def _eos_heavy(model, head_name="lm_head"):
    """Random tiny models are near-uniform; make EOS likely enough that beams finish at different lengths."""
    with torch.no_grad():
        getattr(model, head_name).weight[EOS] *= 3.0
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder_pair(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      eos_token_id=EOS, bos_token_id=EOS, tie_word_embeddings=False)
        hf = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       eos_token_id=EOS, bos_token_id=EOS, tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(cfg)
    _eos_heavy(hf.eval())
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(str(d))
    return hf, lmforge.load(d)


def _hf_beam(hf, inputs, settings, max_new_tokens, **extra):
    s = dict(settings)
    rep = s.pop("repetition_penalty", None)
    with torch.no_grad():
        out = hf.generate(inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS,
                          pad_token_id=PAD, output_scores=True, return_dict_in_generate=True,
                          repetition_penalty=rep, **s, **extra)
    return out.sequences, out.sequences_scores


def _check(ours, hf_rows, hf_scores, start):
    assert len(ours) == hf_rows.shape[0]
    for h, row, score in zip(ours, hf_rows.tolist(), hf_scores.tolist()):
        gen = row[start:]
        assert gen[:len(h.token_ids)] == h.token_ids
        # HF pads shorter hypotheses with `pad_token_id or eos_token_id` (a pad id of 0 counts as none)
        assert all(t == (PAD or EOS) for t in gen[len(h.token_ids):])
        assert abs(h.score - score) < 1e-4


def _split(settings):
    s = dict(settings)
    rep = s.pop("repetition_penalty", None)
    return BeamParams(**s), SamplingParams(repetition_penalty=rep)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("seed", [1, 2])
def test_decoder_beam_equals_transformers(decoder_pair, settings, seed):
    hf, lm = decoder_pair
    prompt = torch.randint(4, V, (1, 5), generator=torch.Generator().manual_seed(seed))
    rows, scores = _hf_beam(hf, prompt, settings, max_new_tokens=9)
    beam, params = _split(settings)
    ours = decoder_beam_search(lm.model, prompt[0].tolist(), beam, 9, [EOS], params)
    _check(ours, rows, scores, prompt.shape[1])


def test_lmforge_model_exported_to_hf(tmp_path):
    from lmforge.generation.config import GenerationConfig
    from lmforge.lm import LM
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer

    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32, qkv_bias=True, o_bias=True,
                      mlp_bias=True, tie_word_embeddings=False)  # GPT-2's shape
    model = _eos_heavy(Transformer(cfg).eval())
    lmforge.export_hf(LM(model, None, cfg, GenerationConfig(eos_token_id=EOS)), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    prompt = torch.randint(4, V, (1, 6), generator=torch.Generator().manual_seed(4))
    for settings in SETTINGS[:3]:
        rows, scores = _hf_beam(hf, prompt, settings, max_new_tokens=8)
        beam, params = _split(settings)
        _check(decoder_beam_search(model, prompt[0].tolist(), beam, 8, [EOS], params), rows, scores, 6)


@pytest.mark.parametrize("settings", SETTINGS)
def test_t5_beam_equals_transformers(settings):
    from lmforge.formats.t5 import build_t5, config_from_hf, state_dict_from_hf

    torch.manual_seed(5)
    kw = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD,
              decoder_start_token_id=PAD)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw)).eval()
    with torch.no_grad():  # HF's random head (std 1) puts nearly all mass on one token: a flatter one has choices
        hf.lm_head.weight.normal_(0.0, 0.1)
    _eos_heavy(hf)
    config = config_from_hf(kw)
    model = build_t5(config, state_dict_from_hf(hf.state_dict(), config))
    for seed in (6, 7):
        ids = torch.randint(4, V, (1, 7), generator=torch.Generator().manual_seed(seed))
        rows, scores = _hf_beam(hf, ids, settings, max_new_tokens=8)
        beam, params = _split(settings)
        _check(seq2seq_beam_search(model, ids[0].tolist(), beam, 8, [EOS], params), rows, scores, 1)


def test_lm_generate_dispatches_num_beams(decoder_pair):
    hf, lm = decoder_pair
    prompt = [5, 9, 11, 7]
    rows, _ = _hf_beam(hf, torch.tensor([prompt]), dict(num_beams=3), max_new_tokens=6)
    out = lm.generate(prompt, num_beams=3, max_new_tokens=6, stop_token_ids=[EOS])
    want = [t for t in rows[0, 4:].tolist() if t not in (EOS, PAD)]
    assert out.token_ids == want
    greedy = lm.generate(prompt, num_beams=1, max_new_tokens=6, temperature=0)  # one beam: the ordinary loop
    assert greedy.token_ids == lm.generate(prompt, max_new_tokens=6, temperature=0).token_ids
    two = lm.generate([prompt, prompt[:2]], num_beams=3, num_return_sequences=2, max_new_tokens=6)
    assert len(two) == 2 and all(len(x) == 2 for x in two) and two[0][0].token_ids == out.token_ids


def test_helpers_and_errors():
    assert sorted(banned_ngram_tokens([1, 2, 3, 1, 2], 3)) == [3]
    assert banned_ngram_tokens([1, 2], 3) == set()
    assert sorted(banned_ngram_tokens([4, 4, 5], 1)) == [4, 5]
    with pytest.raises(GenerationError, match="num_return_sequences"):
        BeamParams(num_beams=2, num_return_sequences=3)
    with pytest.raises(GenerationError, match="early_stopping"):
        BeamParams(num_beams=2, early_stopping="sometimes")
    with pytest.raises(GenerationError, match="num_beams"):
        BeamParams(num_beams=0)
