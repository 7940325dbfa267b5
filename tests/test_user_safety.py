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
    assert main(_pretrain_args(_text(tmp), out, "--max-steps", "2")) == 0
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
    from lmforge.gguf import export_gguf
    import lmforge

    with pytest.raises(ConfigError, match="is a directory"):
        export_gguf(lmforge.load(model_dir), d)


def test_tokenizer_out_under_a_file_is_one_line(tmp_path, capsys):
    text = _text(tmp_path)
    before = text.read_bytes()
    assert main(["tokenizer", "train", str(text), "--vocab-size", "260", "--out", str(text / "x")]) == 1
    assert "is a file, not a directory" in _one_line_error(capsys)
    assert text.read_bytes() == before
