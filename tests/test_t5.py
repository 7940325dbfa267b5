"""T5: logits equal transformers' T5ForConditionalGeneration (v1.0 ReLU tied, v1.1 gated-GELU untied), cached
decoding equals the full forward, the HF export loads back in transformers, `lmforge.load` gives a generating
`Seq2SeqLM` whose greedy/sampled ids equal transformers.generate."""

import json

import pytest
import torch

import lmforge
from lmforge.errors import CheckpointError, ConfigError
from lmforge.formats.t5 import build_t5, config_from_hf, export_t5, rename, state_dict_from_hf
from lmforge.models.t5 import T5, T5Config, relative_position_bucket

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "v1.0-relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1-gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def hf_t5(variant: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    kw = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
              decoder_start_token_id=0, **VARIANTS[variant])
    kw.update(over)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw)).eval()
    if not kw["tie_word_embeddings"]:
        # transformers 5 ties the head to `shared` unless the checkpoint has its own: give it one
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model, kw


def ours_from_hf(hf_model, kw) -> T5:
    config = config_from_hf(kw)
    return build_t5(config, state_dict_from_hf(hf_model.state_dict(), config))


def _inputs(seed=1, V=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as T5 tokenizers pad
    mask[2, 3:] = 0
    dec = torch.randint(2, V, (3, 6), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec


def test_bucket_worked_example_and_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None]
    for bidir in (True, False):
        for nb, md in ((32, 128), (8, 20)):
            ref = T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=nb, max_distance=md)
            assert torch.equal(relative_position_bucket(rel, bidir, nb, md), ref)
    got = relative_position_bucket(torch.tensor([-200, -9, -1, 0, 1, 9, 200]), True, 32, 128)
    assert got.tolist() == [15, 8, 1, 0, 17, 24, 31]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant):
    hf, kw = hf_t5(variant)
    ours = ours_from_hf(hf, kw)
    ids, mask, dec = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(ids, mask, decoder_input_ids=dec)
    assert (got - ref).abs().max().item() < 1e-5
    labels = dec.clone()
    labels[0, 4:] = -100
    with torch.no_grad():
        ref_loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        from lmforge.models.t5 import seq2seq_loss
        got_loss = seq2seq_loss(ours, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert abs(ref_loss.item() - got_loss.item()) < 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_equals_full_forward(variant):
    hf, kw = hf_t5(variant)
    ours = ours_from_hf(hf, kw)
    ids, mask, dec = _inputs(2)
    with torch.no_grad():
        memory = ours.encode(ids, mask)
        full = ours.decode(dec, memory, mask)
        cache = ours.new_cache(memory, mask, max_len=8)
        steps = [ours.decode(dec[:, :2], cache=cache)]  # a 2-token prefill, then one token at a time
        steps += [ours.decode(dec[:, t:t + 1], cache=cache) for t in range(2, dec.shape[1])]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    assert cache.cross_k.shape == (3, 3, 4, 11, 8)  # (n, B, nh, S, hd): computed once, at new_cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_in_transformers_with_same_logits(variant, tmp_path):
    hf, kw = hf_t5(variant)
    ours = ours_from_hf(hf, kw)
    export_t5(ours, None, tmp_path / "out")
    back = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask, dec = _inputs(3)
    with torch.no_grad():
        a = back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        b = ours(ids, mask, decoder_input_ids=dec)
    assert (a - b).abs().max().item() < 1e-5
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is kw["tie_word_embeddings"]
    # and lmforge reads its own export back
    again = lmforge.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again.model(ids, mask, decoder_input_ids=dec), b)


def test_name_table_both_ways():
    hf, kw = hf_t5("v1.1-gated-gelu-untied")
    for name in hf.state_dict():
        if name.endswith("embed_tokens.weight"):
            continue
        assert rename(rename(name, "from_hf"), "to_hf") == name


def _save_hf_dir(hf, d):
    hf.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_and_generate_match_transformers(variant, tmp_path):
    hf, kw = hf_t5(variant, seed=3, num_decoder_layers=2)  # transformers.generate sizes its cache by num_layers
    _save_hf_dir(hf, tmp_path)
    lm = lmforge.load(tmp_path)
    ids = torch.randint(2, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, num_beams=1)[0, 1:].tolist()
    got = lm.generate_ids([ids[0].tolist()], max_new_tokens=12, temperature=0)[0]
    assert got == ref[:len(got)] and (len(got) == len(ref) or ref[len(got)] == 1)  # HF keeps the EOS
    # sampling with a seed is reproducible and uses every control
    a = lm.generate_ids([ids[0].tolist()], max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, min_p=0.01,
                        repetition_penalty=1.2, seed=7)
    b = lm.generate_ids([ids[0].tolist()], max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, min_p=0.01,
                        repetition_penalty=1.2, seed=7)
    assert a == b


def test_repetition_penalty_matches_transformers(tmp_path):
    hf, kw = hf_t5("v1.0-relu-tied", seed=4, num_decoder_layers=2)
    _save_hf_dir(hf, tmp_path)
    lm = lmforge.load(tmp_path)
    ids = torch.randint(2, 97, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=10, do_sample=False, repetition_penalty=1.5)[0, 1:].tolist()
    got = lm.generate_ids([ids[0].tolist()], max_new_tokens=10, temperature=0, repetition_penalty=1.5)[0]
    assert got == ref[:len(got)]


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="activation .bogus"):
        T5Config(feed_forward_proj="gated-bogus")
    with pytest.raises(ConfigError, match="d_model"):
        T5Config(d_model=0)
    hf, kw = hf_t5("v1.0-relu-tied")
    sd = dict(hf.state_dict())
    sd.pop("decoder.final_layer_norm.weight")
    with pytest.raises(CheckpointError, match="final_layer_norm"):
        build_t5(config_from_hf(kw), state_dict_from_hf(sd, config_from_hf(kw)))
