"""A new user's first hour (issue 25): no command destroys work it was not asked to replace, every flag does
what it says, and mistakes end in one line, not a traceback.

Data-loss checks look at the bytes and permissions of what was there before, not only at the exit code.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from lmforge.cli import main

WORDS = ("the for statement iterates over the items of any sequence in the order that they appear and the while "
         "statement repeats as long as an expression is true; a function is defined with def and returns a value ")


def _text(tmp: Path) -> Path:
    p = tmp / "notes.txt"
    p.write_text(WORDS * 60, encoding="utf-8")
    return p


def _pretrain_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--vocab-size", "300", "--model", "llama-tiny",
            "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--intermediate-size", "64",
            "--block-size", "32", "--batch-size", "4", "--eval-every", "0", "--save-every", "0",
            "--sample-every", "0", "--progress", "false", "--threads", "1", "--cores", "1", *extra]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A trained model directory (2 steps of a tiny model on a few KB of text)."""
    tmp = tmp_path_factory.mktemp("safety")
    out = tmp / "model"
    args = _pretrain_args(_text(tmp), out, "--max-steps", "2")
    args[args.index("--block-size") + 1] = "256"  # room for an Alpaca prompt and a chat request
    assert main(args) == 0
    return out


def _snapshot(d: Path) -> dict[str, tuple[str, int]]:
    """name -> (sha256, mode) of every file under `d` (the directory itself included as '.')."""
    snap = {".": ("", stat.S_IMODE(d.stat().st_mode))}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            snap[str(p.relative_to(d))] = (hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(p.stat().st_mode))
    return snap


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


# ---- 1. a run into a directory that holds a model is refused, byte for byte -------------------------------------
def test_pretrain_into_a_trained_model_is_refused(model_dir, tmp_path, capsys):
    before = _snapshot(model_dir)
    assert main(_pretrain_args(_text(tmp_path), model_dir, "--max-steps", "1")) == 1
    err = _one_line_error(capsys)
    assert "--resume" in err and "--overwrite" in err and str(model_dir) in err
    assert _snapshot(model_dir) == before


def test_pretrain_overwrite_replaces_the_model(tmp_path, capsys):
    data, out = _text(tmp_path), tmp_path / "m"
    assert main(_pretrain_args(data, out, "--max-steps", "1")) == 0
    old = (out / "model.safetensors").read_bytes()
    assert main(_pretrain_args(data, out, "--max-steps", "1", "--overwrite", "--seed", "7")) == 0
    assert (out / "model.safetensors").read_bytes() != old
    capsys.readouterr()
    assert main(_pretrain_args(data, out, "--max-steps", "1", "--overwrite", "--resume")) == 1
    assert "pass one of them" in _one_line_error(capsys)


@pytest.mark.parametrize("argv", [
    ["finetune", "sft", "{model}", "--data", "{data}", "--out", "{out}"],
    ["finetune", "classify", "{model}", "--data", "{data}", "--out", "{out}"],
    ["finetune", "dpo", "{model}", "--data", "{data}", "--out", "{out}"],
    ["finetune", "prompt-tune", "{model}", "--data", "{data}", "--out", "{out}"],
    ["quantize", "{model}", "--out", "{out}"],
    ["distill", "--teacher", "{model}", "--student", "llama-tiny", "--out", "{out}"],
    ["prune", "{model}", "--n-layer", "1", "--out", "{out}"],
    ["import", "{model}", "--out", "{out}"],
    ["export", "{model}", "--format", "hf", "--out", "{out}"],
], ids=lambda a: " ".join(a[:2]) if a[0] == "finetune" else a[0])
def test_every_command_refuses_a_directory_holding_a_model(argv, model_dir, tmp_path, capsys):
    import shutil

    target = tmp_path / "precious"
    shutil.copytree(model_dir, target)
    before = _snapshot(target)
    data = tmp_path / "d.json"
    data.write_text("[]", encoding="utf-8")
    args = [a.format(model=model_dir, data=data, out=target) for a in argv]
    assert main(args) == 1
    err = _one_line_error(capsys)
    assert "--overwrite" in err and str(target) in err
    assert _snapshot(target) == before


def test_export_never_replaces_a_file(model_dir, tmp_path, capsys):
    f = tmp_path / "some" / "existing" / "file.txt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"my notes\n")
    os.chmod(f, 0o640)
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(model_dir), "--format", "hf", "--out", str(f), *extra]) == 1
        _one_line_error(capsys)
        assert f.read_bytes() == b"my notes\n" and stat.S_IMODE(f.stat().st_mode) == 0o640
        assert sorted(p.name for p in f.parent.iterdir()) == ["file.txt"]  # nothing moved aside either
    assert main(["export", str(model_dir), "--format", "gguf", "--out", str(f)]) == 1
    assert "--overwrite" in _one_line_error(capsys) and f.read_bytes() == b"my notes\n"


def test_library_atomic_dir_refuses_a_file(tmp_path):
    from lmforge.errors import ConfigError
    from lmforge.utils import atomic_dir

    f = tmp_path / "file.txt"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="file of that name exists"):
        with atomic_dir(f):
            pass
    assert f.read_bytes() == b"x"


# ---- 3. written files keep the permissions the umask gives -------------------------------------------------------
@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_saved_and_exported_models_are_readable_by_others(model_dir, tmp_path, umask022, capsys):
    import lmforge

    lm = lmforge.load(model_dir)
    saved = tmp_path / "saved"
    lm.save(saved)
    assert main(["export", str(model_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(model_dir), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    for d in (saved, tmp_path / "hf"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
        for p in d.rglob("*"):
            want = 0o755 if p.is_dir() else 0o644
            assert stat.S_IMODE(p.stat().st_mode) == want, p
    assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == 0o644
    for p in model_dir.rglob("*"):  # the pretrain run's own files too
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, p


def test_atomic_write_keeps_an_existing_files_mode(tmp_path, umask022):
    from lmforge.utils import atomic_write_json

    p = tmp_path / "m.json"
    atomic_write_json(p, {"a": 1})
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    os.chmod(p, 0o600)  # the user made it private: a rewrite keeps it private
    atomic_write_json(p, {"a": 2})
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and json.loads(p.read_text()) == {"a": 2}


# ---- 10, 11. paths of the wrong kind are one-line errors -----------------------------------------------------------
def test_gguf_export_into_a_directory_is_one_line(model_dir, tmp_path, capsys):
    d = tmp_path / "exports"
    d.mkdir()
    assert main(["export", str(model_dir), "--format", "gguf", "--out", str(d)]) == 1
    assert "is a directory" in _one_line_error(capsys)
    assert list(d.iterdir()) == []
    from lmforge.errors import ConfigError
    from lmforge.formats.gguf import export_gguf
    import lmforge

    with pytest.raises(ConfigError, match="is a directory"):
        export_gguf(lmforge.load(model_dir), d)


def test_tokenizer_out_under_a_file_is_one_line(tmp_path, capsys):
    text = _text(tmp_path)
    before = text.read_bytes()
    assert main(["tokenizer", "train", str(text), "--vocab-size", "260", "--out", str(text / "x")]) == 1
    assert "is a file, not a directory" in _one_line_error(capsys)
    assert text.read_bytes() == before


# ---- 4. a command-line flag beats the config file, and the note says so ----------------------------------------------
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "finetune"


@pytest.mark.parametrize("recipe,yaml", [("classify", "sms-spam.yaml"), ("prompt-tune", "prompt-tune.yaml")])
def test_max_steps_flag_beats_epochs_in_the_config(recipe, yaml, capsys):
    from lmforge import argconf
    from lmforge.cli import build_parser
    from lmforge.cli.finetune import _recipe

    args = build_parser().parse_args(["finetune", recipe, "m", "--config", str(CONFIGS / yaml), "--max-steps", "1"])
    cls, _ = _recipe(recipe)
    cfg = argconf.from_cli(cls, args, args.config, model="m")
    assert cfg.epochs is None and cfg.train_config(steps_per_epoch=500).max_steps == 1
    err = capsys.readouterr().err
    assert "--max-steps 1 wins over epochs:" in err and "flag beats the config file" in err
    # both on the command line: epochs decides, and says so
    args = build_parser().parse_args(["finetune", recipe, "m", "--epochs", "2", "--max-steps", "1"])
    cfg = argconf.from_cli(cls, args, None, model="m")
    assert cfg.train_config(steps_per_epoch=10).max_steps == 20 // cfg.grad_accum_steps
    assert "--epochs 2 wins over --max-steps 1" in capsys.readouterr().err


# ---- 5. the shipped configs fit the demo model; clipping is reported ------------------------------------------------
@pytest.mark.parametrize("yaml,recipe", [("sft-alpaca.yaml", "sft"), ("dpo-lora.yaml", "dpo"),
                                         ("prompt-tune.yaml", "prompt-tune"), ("sms-spam.yaml", "classify")])
def test_shipped_finetune_configs_fit_the_demo_model(yaml, recipe):
    from lmforge import argconf
    from lmforge.cli.finetune import _recipe
    from lmforge.models.config import ModelConfig
    from lmforge.finetune.common import max_length

    cls, _ = _recipe(recipe)
    cfg = argconf.build(cls, {**argconf.load_yaml(CONFIGS / yaml), "model": "m"})
    demo = ModelConfig.from_name("llama-tiny", block_size=128, n_embd=128, vocab_size=2048)  # configs/pretrain/demo

    class M:
        config = demo

    assert max_length(cfg, M()) <= 128


def test_sft_reports_clipped_examples(model_dir):
    import lmforge
    from lmforge.recipes.sft import SFTConfig, sft_batches

    lm = lmforge.load(model_dir)
    long = {"instruction": "Repeat: " + WORDS * 6, "input": "", "output": "ok"}
    short = {"instruction": "Say hi", "input": "", "output": "hi"}
    lines: list[str] = []
    cfg = SFTConfig(model=str(model_dir), data="x.json", out="o", batch_size=2)
    sft_batches(cfg, lm, {"train": [long, short, short], "val": []}, None, lines.append)
    assert any("1 of 3 train examples are longer than 256 tokens (the model's context) and were cut" in ln
               for ln in lines), lines


# ---- 6. the prompt as a positional argument -------------------------------------------------------------------------
def test_generate_takes_the_prompt_as_an_argument(model_dir, capsys):
    assert main(["generate", str(model_dir), "The for statement", "-n", "5", "--seed", "0"]) == 0
    positional = capsys.readouterr().out
    assert main(["generate", str(model_dir), "--prompt", "The for statement", "-n", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out == positional
    assert main(["generate", str(model_dir), "a", "--prompt", "b"]) == 1
    assert "not both" in _one_line_error(capsys)


# ---- 7. the same seed on the same machine gives the same run ---------------------------------------------------------
def test_matmul_pick_is_recorded_once_per_machine(tmp_path, monkeypatch):
    import lmforge.training.cores as cores

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    picks = iter(["numpy", "torch", "numpy", "torch"])  # timing noise: each measurement says something else
    monkeypatch.setattr(cores, "_time_matmuls", lambda n, shapes, rows: next(picks))
    seen = []
    for _ in range(3):  # three runs (three processes: the in-memory memo is gone each time)
        monkeypatch.setattr(cores, "_MATMUL_CHOICE", {})
        seen.append(cores.pick_matmul(2, [(32, 64), (64, 32)], rows=64))
    assert seen == ["numpy"] * 3
    assert json.loads((tmp_path / "cpu_matmul.json").read_text())  # the record a later run reads


# ---- 8. a misspelled flag: the subcommand's usage and the closest flag -----------------------------------------------
@pytest.mark.parametrize("argv,usage,hint", [
    (["generate", "m", "-p", "hi", "--temprature", "0.5"], "usage: lmforge generate", "did you mean --temperature?"),
    (["pretrain", "--max-stepz", "3"], "usage: lmforge pretrain", "did you mean --max-steps?"),
    (["finetune", "sft", "m", "--lora-rr", "4"], "usage: lmforge finetune sft", "did you mean --lora-r?"),
])
def test_misspelled_flag_suggests_the_closest(argv, usage, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and hint in err and "usage: lmforge [-h]" not in err


# ---- 9. seeds are checked everywhere -------------------------------------------------------------------------------
def test_huge_seed_is_one_line(model_dir, capsys):
    assert main(["generate", str(model_dir), "-p", "hi", "--seed", "99999999999999999999999"]) == 1
    assert "seed" in _one_line_error(capsys)
    assert main(_pretrain_args(Path("x.txt"), Path("never"), "--seed", str(2**64))) == 1
    assert "seed" in _one_line_error(capsys) and not Path("never").exists()


def test_server_answers_400_to_a_huge_seed_and_rejects_boolean_max_tokens(model_dir):
    import httpx

    from tests.test_serve_helpers import start_server

    srv, _ = start_server(model_dir)
    try:
        url = srv.url + "/v1/chat/completions"
        msgs = [{"role": "user", "content": "hi"}]
        r = httpx.post(url, json={"model": model_dir.name, "messages": msgs, "seed": 2**64, "max_tokens": 3})
        assert r.status_code == 400 and "seed" in r.json()["error"]["message"], r.text
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
        r = httpx.post(srv.url + "/v1/completions", json={"model": model_dir.name, "prompt": "hi", "seed": 2**64})
        assert r.status_code == 400
        r = httpx.post(url, json={"model": model_dir.name, "messages": msgs, "max_tokens": True})
        assert r.status_code in (400, 422) and "max_tokens" in r.json()["error"]["message"], r.text
        r = httpx.post(url, json={"model": model_dir.name, "messages": msgs, "max_tokens": 2, "seed": 5})
        assert r.status_code == 200
    finally:
        srv.stop()


# ---- 12, 13. the right message for the wrong input -------------------------------------------------------------------
def test_sft_names_the_formats_it_reads(model_dir, tmp_path, capsys):
    text = _text(tmp_path)
    assert main(["finetune", "sft", str(model_dir), "--data", str(text), "--out", str(tmp_path / "o")]) == 1
    err = _one_line_error(capsys)
    assert "Alpaca records" in err and "columns" not in err


def test_non_utf8_prompt_on_stdin_is_refused(model_dir, monkeypatch, capsys):
    import io

    class Stdin(io.TextIOWrapper):
        def isatty(self):
            return False

    monkeypatch.setattr("sys.stdin", Stdin(io.BytesIO("caf\xe9".encode("latin-1")), encoding="utf-8"))
    assert main(["generate", str(model_dir), "-n", "2"]) == 1
    assert "not UTF-8" in _one_line_error(capsys)


def test_prune_has_progress_like_distill():
    from lmforge.cli import build_parser

    args = build_parser().parse_args(["prune", "m", "--n-layer", "1", "--out", "o", "--progress", "false"])
    assert args.progress == "false"


def test_resume_mismatch_names_the_missing_parameter(model_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model_dir, run)
    data = _text(tmp_path)
    args = _pretrain_args(data, run, "--max-steps", "3", "--resume", "--block-size", "256")
    args[args.index("--n-layer") + 1] = "2"
    assert main(args) == 1
    err = _one_line_error(capsys)
    assert "None" not in err and "no such parameter" in err
