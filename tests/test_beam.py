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


# ---- a batch of inputs searched together ------------------------------------------------------------------------
def _left_padded(prompts):
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, P


@pytest.mark.parametrize("settings", [SETTINGS[0], SETTINGS[1], SETTINGS[2], SETTINGS[4]])
def test_decoder_batch_equals_transformers(decoder_pair, settings):
    """Prompts of different lengths, left-padded as transformers pads a batch, searched in one pass."""
    from lmforge.generation.beam import decoder_beam_search_batch

    hf, lm = decoder_pair
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(4, V, (n,), generator=g).tolist() for n in (5, 2, 7)]
    ids, mask, P = _left_padded(prompts)
    rows, scores = _hf_beam(hf, ids, settings, max_new_tokens=8, attention_mask=mask)
    beam, params = _split(settings)
    ours = decoder_beam_search_batch(lm.model, prompts, beam, 8, [EOS], params, pad_id=PAD)
    n = beam.num_return_sequences
    for b, hyps in enumerate(ours):
        _check(hyps, rows[b * n:(b + 1) * n], scores[b * n:(b + 1) * n], P)


def _t5_pair(seed=5):
    from lmforge.formats.t5 import build_t5, config_from_hf, state_dict_from_hf

    torch.manual_seed(seed)
    kw = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD,
              decoder_start_token_id=PAD)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw)).eval()
    with torch.no_grad():
        hf.lm_head.weight.normal_(0.0, 0.1)
    _eos_heavy(hf)
    config = config_from_hf(kw)
    return hf, build_t5(config, state_dict_from_hf(hf.state_dict(), config))


@pytest.mark.parametrize("settings", SETTINGS)
def test_t5_batch_equals_transformers(settings):
    from lmforge.generation.beam import seq2seq_beam_search_batch

    hf, model = _t5_pair()
    g = torch.Generator().manual_seed(12)
    inputs = [torch.randint(4, V, (n,), generator=g).tolist() for n in (7, 3, 5, 9)]
    S = max(len(i) for i in inputs)
    ids = torch.tensor([i + [PAD] * (S - len(i)) for i in inputs])
    mask = torch.tensor([[1] * len(i) + [0] * (S - len(i)) for i in inputs])
    rows, scores = _hf_beam(hf, ids, settings, max_new_tokens=8, attention_mask=mask)
    beam, params = _split(settings)
    ours = seq2seq_beam_search_batch(model, inputs, beam, 8, [EOS], params)
    n = beam.num_return_sequences
    for b, hyps in enumerate(ours):
        _check(hyps, rows[b * n:(b + 1) * n], scores[b * n:(b + 1) * n], 1)
        alone = seq2seq_beam_search(model, inputs[b], beam, 8, [EOS], params)  # a batch changes nothing
        assert [h.token_ids for h in alone] == [h.token_ids for h in hyps]


# ---- beam sampling (do_sample=True, num_beams > 1) ---------------------------------------------------------------
def test_beam_sample_equals_transformers_with_the_same_seed():
    """transformers 5 draws 2K candidates with torch.multinomial over softmax(beam score + warped log-probs), then
    sorts them by score; lmforge does the same with a generator seeded like torch.manual_seed(seed)."""
    hf, model = _t5_pair(seed=8)
    for seed, settings in ((1, dict(num_beams=3)), (2, dict(num_beams=4, num_return_sequences=2, top_p=0.9)),
                           (3, dict(num_beams=2, top_k=5, length_penalty=0.5)), (4, dict(num_beams=3, min_p=0.05))):
        s = dict(settings)
        sampling = {k: s.pop(k) for k in ("top_k", "top_p", "min_p") if k in s}
        ids = torch.randint(4, V, (1, 6), generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=sampling.get("top_k", 0),
                              top_p=sampling.get("top_p", 1.0), min_p=sampling.get("min_p"), eos_token_id=EOS,
                              pad_token_id=PAD, output_scores=True, return_dict_in_generate=True, **s)
        ours = seq2seq_beam_search(model, ids[0].tolist(), BeamParams(do_sample=True, **s), 8, [EOS],
                                   SamplingParams(temperature=0.7, seed=seed, **sampling))
        _check(ours, out.sequences, out.sequences_scores, 1)


def test_beam_sample_invariants(decoder_pair):
    """Seeded: the same seed gives the same beams, alone or in a batch; seeds differ in what they find; each
    hypothesis' score is the sum of its tempered log-probs / length ** length_penalty, best first."""
    from lmforge.generation.beam import decoder_beam_search_batch

    _, lm = decoder_pair
    prompt = [5, 9, 11, 7, 4]
    beam = BeamParams(num_beams=3, num_return_sequences=3, do_sample=True, length_penalty=0.8)
    runs = {seed: decoder_beam_search(lm.model, prompt, beam, 7, [EOS], SamplingParams(temperature=1.3, seed=seed))
            for seed in range(6)}
    again = decoder_beam_search(lm.model, prompt, beam, 7, [EOS], SamplingParams(temperature=1.3, seed=2))
    assert [h.token_ids for h in again] == [h.token_ids for h in runs[2]]
    batch = decoder_beam_search_batch(lm.model, [prompt, prompt[:3]], beam, 7, [EOS],
                                      SamplingParams(temperature=1.3, seed=2))
    assert [h.token_ids for h in batch[0]] == [h.token_ids for h in runs[2]]
    assert len({tuple(tuple(h.token_ids) for h in r) for r in runs.values()}) > 1
    greedy = decoder_beam_search(lm.model, prompt, BeamParams(num_beams=3, num_return_sequences=3, length_penalty=0.8),
                                 7, [EOS])
    for hyps in runs.values():
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            seq = torch.tensor([prompt + h.token_ids])
            with torch.no_grad():
                lp = torch.log_softmax(lm.model(seq)[0, len(prompt) - 1:-1].float(), -1) / 1.3
            total = lp.gather(1, torch.tensor(h.token_ids)[:, None]).sum().item()
            assert h.score == pytest.approx(total / len(h.token_ids) ** 0.8, abs=1e-4)
    with pytest.raises(GenerationError, match="temperature"):
        decoder_beam_search(lm.model, prompt, beam, 7, [EOS], SamplingParams(temperature=0.0))
    assert greedy  # plain beam search still runs next to the sampled one
