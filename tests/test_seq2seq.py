"""Seq2seq recipes: span corruption's contract, the date task, a tiny pretrain -> fine-tune (full and LoRA) run that
writes a directory transformers loads with the same logits, the CLI, and one-line errors for bad input."""

import json
import random

import pytest
import torch

import lmforge
from lmforge.errors import ConfigError, DataError
from lmforge.recipes.seq2seq import (DATE_FORMATS, Seq2SeqFinetuneConfig, Seq2SeqPretrainConfig, date_examples,
                                     read_pairs, run_eval, run_finetune, run_pretrain, span_corrupt)

transformers = pytest.importorskip("transformers")


def test_span_corruption_contract():
    rng = random.Random(0)
    sentinels = list(range(1000, 1010))
    for n in (5, 20, 64, 200):
        ids = list(range(n))
        inp, tgt = span_corrupt(ids, sentinels, rng)
        k = sum(t >= 1000 for t in inp)
        assert tgt[-1] == sentinels[k] and sum(t >= 1000 for t in tgt) == k + 1
        # putting the spans back where their sentinels are gives the original text
        spans, cur = {}, None
        for t in tgt[:-1]:
            if t >= 1000:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [x for t in inp for x in (spans[t] if t >= 1000 else [t])]
        assert rebuilt == ids
        noise = n - (len(inp) - k)
        assert noise == min(max(1, round(n * 0.15)), n - 1)


def test_date_task_is_checkable():
    rows = date_examples(50, seed=1)
    assert rows == date_examples(50, seed=1) and rows != date_examples(50, seed=2)
    for r in rows:
        fmt = r["input"].split(":")[0].removeprefix("to ")
        assert fmt in DATE_FORMATS and r["target"] not in r["input"]


def test_read_pairs_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_pairs(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: each row needs"):
        read_pairs(str(bad))
    with pytest.raises(ConfigError, match="noise_density"):
        Seq2SeqPretrainConfig(noise_density=0.9)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("t5pre") / "m"
    cfg = Seq2SeqPretrainConfig(out=str(out), max_steps=6, batch_size=8, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                num_heads=2, vocab_size=300, num_sentinels=8, window=32, eval_every=0,
                                eval_batches=1, progress=False, device="cpu", split_digits=True)
    summary = run_pretrain(cfg, log=lambda *_: None)
    return out, summary


def test_pretrain_writes_a_transformers_t5(pretrained):
    out, summary = pretrained
    assert summary["steps"] == 6 and summary["val_loss"] > 0
    lm = lmforge.load(out)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(out)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "to iso: March 14, 2021"
    ids = lm.tokenizer.encode(text)
    assert ids == tok(text)["input_ids"] and ids[-1] == lm.tokenizer.eos_token_id
    digits = [p for p in lm.tokenizer.tokenize("12/31/1999 and 2021-03-14") if any(c.isdigit() for c in p)]
    assert digits and all(len(p) == 1 for p in digits)  # split_digits: one token per digit
    dec = torch.tensor([[0, 5, 9]])
    with torch.no_grad():
        a = hf(input_ids=torch.tensor([ids]), decoder_input_ids=dec).logits
        b = lm.model(torch.tensor([ids]), decoder_input_ids=dec)
    assert (a - b).abs().max().item() < 1e-5
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, num_beams=3, do_sample=False)[0, 1:].tolist()
    got = lm.generate(text, max_new_tokens=6, num_beams=3)
    assert got.token_ids == [t for t in ref if t not in (0, 1)][:len(got.token_ids)]
    assert isinstance(lm.generate(text, max_new_tokens=4, num_beams=3, num_return_sequences=2), list)


@pytest.mark.parametrize("use_lora", [False, True])
def test_finetune_runs_and_reports_exact_match(pretrained, tmp_path, use_lora):
    out, _ = pretrained
    cfg = Seq2SeqFinetuneConfig(model=str(out), out=str(tmp_path / "ft"), train_examples=64, eval_examples=16,
                                max_steps=4, batch_size=8, eval_every=0, eval_batches=1, progress=False,
                                device="cpu", lora=use_lora, max_new_tokens=8)
    before = {k: v.clone() for k, v in lmforge.load(out).model.state_dict().items()}
    summary = run_finetune(cfg, log=lambda *_: None)
    assert 0.0 <= summary["exact_match"] <= 1.0 and summary["steps"] == 4
    saved = json.loads((tmp_path / "ft" / "seq2seq_metrics.json").read_text())
    assert saved["exact_match"] == summary["exact_match"]
    after = lmforge.load(tmp_path / "ft").model.state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and (not use_lora or all(".self_attn." in k or ".cross_attn." in k for k in changed))
    res = run_eval(str(tmp_path / "ft"), n=8, max_new_tokens=8)
    assert res["examples"] == 8


def test_finetune_refuses_a_decoder(tmp_path):
    from lmforge.generation.config import GenerationConfig
    from lmforge.lm import LM
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer

    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    LM(Transformer(cfg), None, cfg, GenerationConfig()).save(tmp_path / "dec")
    with pytest.raises(ConfigError, match="not an encoder-decoder"):
        run_finetune(Seq2SeqFinetuneConfig(model=str(tmp_path / "dec"), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_cli_generate(pretrained, capsys):
    from lmforge.cli import main

    out, _ = pretrained
    assert main(["seq2seq", "generate", str(out), "to us: 1999-01-02", "--num-beams", "2",
                 "--max-new-tokens", "4"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out.strip()), str)
