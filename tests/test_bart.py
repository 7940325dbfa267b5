"""BART (and mBART): logits equal transformers' BartForConditionalGeneration / MBartForConditionalGeneration on
random configs, cached decoding equals the full forward, the HF export loads back in transformers, `lmforge.load`
gives a Seq2SeqLM whose greedy and beam ids equal transformers.generate (forced <s> and </s>, min_length), and
`lmforge.pipeline("summarization")` equals transformers 4's summarization pipeline on the same directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import CheckpointError, ConfigError
from lmforge.formats.bart import build_bart, config_from_hf, export_bart, rename, state_dict_from_hf
from lmforge.models.bart import Bart, BartConfig
from lmforge.models.t5 import seq2seq_loss

transformers = pytest.importorskip("transformers")

V, PAD, BOS, EOS = 61, 1, 0, 2
VARIANTS = {
    "bart": (transformers.BartConfig, transformers.BartForConditionalGeneration, {}),
    "bart-scaled-untied-relu": (transformers.BartConfig, transformers.BartForConditionalGeneration,
                                dict(scale_embedding=True, tie_word_embeddings=False, activation_function="relu")),
    "mbart-pre-ln": (transformers.MBartConfig, transformers.MBartForConditionalGeneration, dict(scale_embedding=True)),
}


def hf_bart(variant: str = "bart", seed: int = 0, **over):
    """A random tiny HF model with non-trivial LayerNorms and logits bias (random init leaves them 1, 0, 0)."""
    cfg_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=48, max_position_embeddings=48,
              dropout=0.0, init_std=0.2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
              decoder_start_token_id=EOS, forced_eos_token_id=EOS, **extra)
    kw.update(over)
    config = cfg_cls(**kw)
    model = model_cls(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.3)
        model.final_logits_bias[0, EOS] += 1.5  # beams finish at different lengths
        for n, p in model.named_parameters():
            if "layer_norm" in n or "layernorm" in n:
                p.normal_(1.0 if n.endswith("weight") else 0.0, 0.2)
        if not config.tie_word_embeddings:  # its own head; the input embeddings stay one shared table
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.2)
            model.model.encoder.embed_tokens.weight.copy_(model.model.shared.weight)
            model.model.decoder.embed_tokens.weight.copy_(model.model.shared.weight)
    return model, config.to_dict()


def ours_from_hf(hf_model, raw) -> Bart:
    config = config_from_hf(raw)
    return build_bart(config, state_dict_from_hf(hf_model.state_dict(), config))


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    dec = torch.randint(3, V, (3, 6), generator=g)
    dec[:, 0] = EOS  # BART's decoder starts from </s>
    return ids, mask, dec


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_loss_match_transformers(variant):
    hf, raw = hf_bart(variant)
    ours = ours_from_hf(hf, raw)
    ids, mask, dec = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(ids, mask, decoder_input_ids=dec)
    assert (got - ref).abs().max().item() < 1e-5
    labels = dec.clone()
    labels[0, 4:] = -100
    with torch.no_grad():
        ref_loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        got_loss = seq2seq_loss(ours, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert abs(ref_loss.item() - got_loss.item()) < 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_equals_full_forward(variant):
    hf, raw = hf_bart(variant)
    ours = ours_from_hf(hf, raw)
    ids, mask, dec = _inputs(2)
    with torch.no_grad():
        memory = ours.encode(ids, mask)
        full = ours.decode(dec, memory, mask)
        cache = ours.new_cache(memory, mask, max_len=8)
        steps = [ours.decode(dec[:, :2], cache=cache)]  # a 2-token prefill, then one token at a time
        steps += [ours.decode(dec[:, t:t + 1], cache=cache) for t in range(2, dec.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.cross_k.shape == (2, 3, 2, 11, 16)  # (n, B, nh, S, hd): computed once, at new_cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_in_transformers_with_same_logits(variant, tmp_path):
    hf, raw = hf_bart(variant)
    ours = ours_from_hf(hf, raw)
    export_bart(ours, None, tmp_path / "out")
    cls = VARIANTS[variant][1]
    back = cls.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask, dec = _inputs(3)
    with torch.no_grad():
        a = back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        b = ours(ids, mask, decoder_input_ids=dec)
    assert (a - b).abs().max().item() < 1e-5
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == raw["model_type"] and cfg["tie_word_embeddings"] is raw["tie_word_embeddings"]
    again = lmforge.load(tmp_path / "out")  # and lmforge reads its own export back
    with torch.no_grad():
        assert torch.equal(again.model(ids, mask, decoder_input_ids=dec), b)


def test_name_table_both_ways():
    hf, raw = hf_bart("mbart-pre-ln")
    for name in hf.state_dict():
        if name.endswith("embed_tokens.weight"):
            continue
        assert rename(rename(name, "from_hf"), "to_hf") == name
    assert rename("decoder.blocks.1.cross_attn.o.bias", "to_hf") == "model.decoder.layers.1.encoder_attn.out_proj.bias"


def _save(hf, d: Path, **generation) -> Path:
    """save_pretrained with generation defaults (transformers 5 keeps forced_bos_token_id only there)."""
    hf.generation_config.update(**generation)
    hf.save_pretrained(str(d))
    return d


def _hf_generate(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kw)


@pytest.mark.parametrize("forced_bos", [None, BOS])
def test_greedy_equals_transformers_generate(tmp_path, forced_bos):
    hf, raw = hf_bart("bart", seed=3)
    lm = lmforge.load(_save(hf, tmp_path, forced_bos_token_id=forced_bos))
    assert type(lm.model).__name__ == "Bart"
    for seed in range(4):
        ids = torch.randint(3, V, (1, 9), generator=torch.Generator().manual_seed(seed))
        for kw in (dict(max_new_tokens=12), dict(max_new_tokens=7, min_length=6),
                   dict(max_new_tokens=9, repetition_penalty=1.5)):
            ref = _hf_generate(hf, ids, num_beams=1, **kw)[0, 1:].tolist()
            got = lm.generate_ids([ids[0].tolist()], temperature=0, **kw)[0]
            assert got == ref[:len(got)] and ref[len(got):] in ([], [EOS]), (kw, got, ref)  # HF keeps the EOS
            if forced_bos is not None:
                assert got[0] == BOS
    # sampling with a seed is reproducible, and the forced tokens hold
    a = lm.generate_ids([[5, 6, 7, 8]], max_new_tokens=6, temperature=0.9, top_k=20, seed=7)
    assert a == lm.generate_ids([[5, 6, 7, 8]], max_new_tokens=6, temperature=0.9, top_k=20, seed=7)
    for n in (1, 2):  # at n = 1 both rules apply: the forced EOS comes last and wins, as in transformers
        ref = _hf_generate(hf, torch.tensor([[5, 6, 7]]), max_new_tokens=n)[0, 1:].tolist()
        assert lm.generate_ids([[5, 6, 7]], max_new_tokens=n, temperature=0)[0] + [EOS] == ref


BEAM_SETTINGS = [
    dict(num_beams=4),
    dict(num_beams=3, length_penalty=2.0, num_return_sequences=3),
    dict(num_beams=4, length_penalty=-1.0, early_stopping=True, num_return_sequences=2),
    dict(num_beams=2, early_stopping="never", length_penalty=0.5),
    dict(num_beams=4, no_repeat_ngram_size=2, num_return_sequences=4),
    dict(num_beams=3, repetition_penalty=1.8),
    dict(num_beams=3, min_length=7, num_return_sequences=2),
    dict(num_beams=4, min_new_tokens=5, length_penalty=0.0),
]


@pytest.mark.parametrize("settings", BEAM_SETTINGS)
def test_beam_equals_transformers_generate(tmp_path, settings):
    hf, raw = hf_bart("bart", seed=5)
    lm = lmforge.load(_save(hf, tmp_path, forced_bos_token_id=BOS))
    n_ret = settings.get("num_return_sequences", 1)
    for seed in (6, 7):
        ids = torch.randint(3, V, (1, 7), generator=torch.Generator().manual_seed(seed))
        rows = _hf_generate(hf, ids, max_new_tokens=8, **settings)[:, 1:].tolist()
        got = lm.generate_ids([ids[0].tolist()], max_new_tokens=8, **settings)[0]
        got = got if n_ret > 1 else [got]
        assert len(got) == len(rows)
        for g, row in zip(got, rows):
            assert row[:len(g)] == g, (settings, got, rows)
            assert all(t in (PAD, EOS) for t in row[len(g):])  # HF pads shorter hypotheses after their EOS


def test_generation_config_defaults_are_used(tmp_path):
    """num_beams, no_repeat_ngram_size, min_length and max_length from generation_config.json, as HF uses them."""
    hf, raw = hf_bart("bart", seed=8)
    lm = lmforge.load(_save(hf, tmp_path / "hf", forced_bos_token_id=BOS, num_beams=3, no_repeat_ngram_size=2,
                            min_length=5, max_length=9, length_penalty=1.5))
    ids = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(9))
    ref = _hf_generate(hf, ids)[0, 1:].tolist()
    got = lm.generate_ids([ids[0].tolist()])[0]
    assert got == ref[:len(got)] and ref[len(got):] in ([], [EOS])
    # Seq2SeqLM.save writes a BART directory that keeps those defaults, for lmforge and transformers alike
    lm.save(tmp_path / "again")
    assert lmforge.load(tmp_path / "again").generate_ids([ids[0].tolist()])[0] == got
    back = transformers.BartForConditionalGeneration.from_pretrained(str(tmp_path / "again")).eval()
    assert _hf_generate(back, ids)[0, 1:].tolist() == ref


# ----------------------------------------------------------------------------------------------------------------
# summarization: lmforge.pipeline vs transformers 4's pipeline, on a directory with RoBERTa's tokenizer files
# ----------------------------------------------------------------------------------------------------------------
_ORACLE = """
import json, sys, transformers
args = json.loads(sys.argv[1])
pipe = transformers.pipeline("summarization", model=args["model"], tokenizer=args["model"])
print(json.dumps([pipe(args["texts"], **kw) for kw in args["settings"]]))
"""

TEXTS = ["The quick brown fox jumps over the lazy dog. It was a sunny day in the park.",
         "Encoder-decoder models read the whole input, then write the output one token at a time."]
# the model below ends right after the forced <s> unless min_length holds the end back: the settings tell both apart
SETTINGS = [dict(max_new_tokens=10), dict(max_new_tokens=10, min_length=9), dict(max_new_tokens=12, num_beams=3),
            dict(max_new_tokens=12, num_beams=3, no_repeat_ngram_size=2, min_length=8),
            dict(max_new_tokens=8, num_beams=2, min_length=6, length_penalty=2.0)]


@pytest.fixture(scope="module")
def bart_summarizer_dir(tmp_path_factory):
    from tests.test_roberta_tokenizer import make_tokenizer_dir

    d = tmp_path_factory.mktemp("bart_sum")
    make_tokenizer_dir(d, n_merges=400, cls=transformers.BartTokenizer)
    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    hf, _ = hf_bart("bart", seed=11, vocab_size=len(vocab), max_position_embeddings=64, init_std=0.1)
    with torch.no_grad():
        hf.final_logits_bias[0, EOS] += 0.5
    return _save(hf, d, forced_bos_token_id=BOS)


def test_summarization_pipeline_equals_transformers4(bart_summarizer_dir):
    path = os.environ.get("LMFORGE_TRANSFORMERS4")
    try:
        from transformers.pipelines.text2text_generation import SummarizationPipeline  # noqa: F401
        env = dict(os.environ)
    except ImportError:
        if not path:
            pytest.skip("transformers 5 has no summarization pipeline; set LMFORGE_TRANSFORMERS4 to a directory "
                        "holding transformers 4 to compare with it")
        env = dict(os.environ, PYTHONPATH=path + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = json.dumps({"model": str(bart_summarizer_dir), "texts": TEXTS, "settings": SETTINGS})
    res = subprocess.run([sys.executable, "-c", _ORACLE, args], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    summarize = lmforge.pipeline("summarization", str(bart_summarizer_dir))
    for kw, want in zip(SETTINGS, theirs):
        assert summarize(TEXTS, **kw) == want, kw
    assert theirs[0] != theirs[1] and theirs[2] != theirs[3]  # min_length changed the summaries


def test_bad_configs_and_checkpoints_are_one_line_errors():
    with pytest.raises(ConfigError, match="activation_function"):
        BartConfig(activation_function="bogus")
    with pytest.raises(ConfigError, match="divisible"):
        BartConfig(d_model=30, encoder_attention_heads=4)
    with pytest.raises(ConfigError, match="static"):
        config_from_hf({"model_type": "bart", "static_position_embeddings": True})
    hf, raw = hf_bart("bart")
    sd = dict(hf.state_dict())
    sd.pop("model.decoder.layernorm_embedding.weight")
    config = config_from_hf(raw)
    with pytest.raises(CheckpointError, match="layernorm_embedding"):
        build_bart(config, state_dict_from_hf(sd, config))
    sd = dict(hf.state_dict())
    sd["model.encoder.embed_tokens.weight"] = sd["model.encoder.embed_tokens.weight"] + 1.0
    with pytest.raises(CheckpointError, match="differs from model.shared.weight"):
        state_dict_from_hf(sd, config)
