"""Pretraining recipe and CLI: shipped configs, config typos, an end-to-end run that `lmforge.load` reads, resume,
resume of a different model, `lmforge eval perplexity` next to the n-gram baseline, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge import argconf
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.recipes.pretrain import PretrainConfig, expand_path
from lmforge.training.loop import read_metrics, read_train_state
from tests.conftest import data_file

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "pretrain").glob("*.yaml"))


def test_every_shipped_config_loads():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "verdict", "shakespeare", "gpt2-124m"} <= names
    from lmforge.recipes.mlm import MLMConfig

    for p in CONFIGS:
        cls = MLMConfig if p.stem.startswith("mlm") else PretrainConfig  # masked-LM configs: `lmforge pretrain-mlm`
        cfg = argconf.build(cls, argconf.load_yaml(p))
        assert cfg.max_steps >= 1 and cfg.data, p
    v = argconf.build(PretrainConfig, argconf.load_yaml(CONFIGS[[p.stem for p in CONFIGS].index("verdict")]))
    assert (v.block_size, v.batch_size, v.epochs, v.lr, v.model) == (256, 2, 10, 4e-4, "gpt2")


def test_unknown_field_names_the_closest(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [builtin]\nweight_decy: 0.1\n")
    assert main(["pretrain", "--config", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown config field 'weight_decy'; did you mean 'weight_decay'?"
    assert len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="'warmup_step'.*'warmup_steps'"):
        argconf.build(PretrainConfig, {"warmup_step": 3})


def test_unset_environment_variable_is_named(monkeypatch):
    monkeypatch.delenv("LMFORGE_NOPE", raising=False)
    with pytest.raises(ConfigError, match="LMFORGE_NOPE is not set"):
        expand_path("${LMFORGE_NOPE}/x.txt")


def _tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--tokenizer", "train", "--vocab-size", "300",
            "--model", "llama-tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1",
            "--intermediate-size", "64", "--block-size", "32", "--batch-size", "4", "--lr", "3e-3",
            "--eval-every", "3", "--eval-batches", "2", "--save-every", "3", "--sample-every", "3",
            "--sample-prompt", "I had", "--sample-tokens", "5", "--progress", "false", "--threads", "1", *extra]


def test_pretrain_end_to_end_resume_and_eval(tmp_path, capsys):
    import lmforge

    text = data_file("the-verdict.txt")
    out = tmp_path / "run"
    assert main(_tiny_args(text, out, "--max-steps", "6")) == 0
    printed = capsys.readouterr().out
    assert "model directory" in printed and "step 3 sample: 'I had" in printed
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "metrics.jsonl",
              "loss.png", "pretrain_config.json", "train_state/state.json"):
        assert (out / f).exists(), f
    assert (tmp_path / "run.shards" / "manifest.json").exists()
    lm = lmforge.load(out)
    assert lm.config.n_embd == 32 and lm.config.vocab_size == 300
    assert isinstance(lm.generate("I had", max_new_tokens=4, temperature=0.0), str)
    first = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(first) == 6

    # resume to 9 steps: the steps already done are kept, three more run
    assert main(_tiny_args(text, out, "--max-steps", "9", "--resume")) == 0
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 10)) and [r["loss"] for r in recs[:6]] == first
    assert read_train_state(out)["step"] == 9

    # resuming with a different model shape is refused in one line, and the run is untouched
    capsys.readouterr()
    assert main(_tiny_args(text, out, "--max-steps", "12", "--resume", "--n-embd", "48")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "different model" in err and len(err.splitlines()) == 1
    assert read_train_state(out)["step"] == 9

    # eval perplexity: the model next to the n-gram baseline on the same validation tokens
    assert main(["eval", "perplexity", str(out), "--data", str(text), "--ngram", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    model_row, ngram_row = res["model"], next(v for k, v in res.items() if k.startswith("3-gram"))
    assert model_row["tokens"] == ngram_row["tokens"] > 100
    assert 0 < model_row["loss"] < 7 and 0 < ngram_row["loss"] < 7 and model_row["bits_per_char"] > 0
    assert main(["eval", "perplexity", str(out), "--data", str(text), "--ngram", "0", "--stride", "8",
                 "--json"]) == 0
    strided = json.loads(capsys.readouterr().out)["model"]
    assert strided["tokens"] == model_row["tokens"] and strided["stride"] == 8 and strided["loss"] != model_row["loss"]


def test_bad_data_is_one_line_error(tmp_path, capsys):
    assert main(_tiny_args(tmp_path / "missing.txt", tmp_path / "o", "--max-steps", "2")) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'missing.txt'}: file not found"
    (tmp_path / "empty.txt").write_text("")
    assert main(_tiny_args(tmp_path / "empty.txt", tmp_path / "o", "--max-steps", "2")) == 1
    assert "empty" in capsys.readouterr().err
    assert main(["pretrain", "--data", "builtin", "--max-steps", "2"]) == 1
    assert "--out" in capsys.readouterr().err
