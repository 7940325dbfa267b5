"""Pretraining with `tokenizer: char` (nanoGPT's shakespeare_char vocabulary): the run saves a model directory whose
character tokenizer `lmforge.load` reads back, and the loaded model generates; the shipped shakespeare-char config
builds."""

from __future__ import annotations

from pathlib import Path

from lmforge import argconf
from lmforge.cli import main
from lmforge.recipes.pretrain import PretrainConfig
from lmforge.tokenizers.basic import CharTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 40
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "shakespeare-char.yaml"


def test_char_tokenized_pretrain_saves_reloads_and_generates(tmp_path, capsys):
    import lmforge

    data = tmp_path / "tiny.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(data), "--out", str(out), "--tokenizer", "char", "--model", "llama-tiny",
            "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--intermediate-size", "64",
            "--block-size", "16", "--batch-size", "4", "--max-steps", "4", "--lr", "3e-3", "--eval-every", "2",
            "--eval-batches", "0", "--progress", "false", "--threads", "1"]
    assert main(args) == 0
    assert "val loss" in capsys.readouterr().out

    lm = lmforge.load(out)
    tok = lm.tokenizer
    assert isinstance(tok, CharTokenizer)
    # the vocabulary is the text's sorted characters, then <|endoftext|> (the document separator) and <|unk|>
    chars = sorted(set(TEXT))
    assert [tok.decode([i]) for i in range(len(chars))] == chars
    assert tok.vocab_size == len(chars) + 2 == lm.config.vocab_size
    assert tok.decode(tok.encode("Speak, hear me.")) == "Speak, hear me."

    text = lm.generate("All:", max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert isinstance(text, str) and 0 < len(text) <= 12 * len("<|endoftext|>")
    assert set(text) <= set(TEXT) | set("<|endoftext|><|unk|>")


def test_shipped_shakespeare_char_config_builds():
    cfg = argconf.build(PretrainConfig, argconf.load_yaml(CONFIG))
    assert cfg.tokenizer == "char" and cfg.val_fraction == 0.1
    assert cfg.eval_batches == 0  # the whole validation split, as the benchmark against nanoGPT reports it
