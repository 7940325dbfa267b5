"""The skeleton: config schema (Python / YAML / flags), atomic writes, the CLI's error contract, the corpus."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from lmforge import argconf
from lmforge.models.config import PRESETS, ModelConfig
from lmforge.training.data import builtin_corpus, builtin_documents
from lmforge.errors import ConfigError, LmforgeError
from lmforge.utils import atomic_dir, atomic_write, atomic_write_json, parse_dtype


@dataclass
class _Cfg:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    max_steps: int = field(default=10, metadata={"help": "optimizer steps"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    targets: list[str] = field(default_factory=lambda: ["q_proj"], metadata={"help": "modules"})
    name: str | None = None


def test_argconf_precedence_defaults_yaml_flags(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("lr: 0.01\nmax_steps: 50\n")
    parser = argparse.ArgumentParser()
    argconf.add_arguments(parser, _Cfg)
    args = parser.parse_args(["--max-steps", "7", "--compile", "--targets", "q_proj,v_proj"])
    cfg = argconf.from_cli(_Cfg, args, config_path=str(yml))
    assert cfg.lr == 0.01 and cfg.max_steps == 7 and cfg.compile is True
    assert cfg.targets == ["q_proj", "v_proj"] and cfg.name is None


def test_argconf_unknown_field_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match="max_step.*did you mean 'max_steps'"):
        argconf.build(_Cfg, {"max_step": 3})
    yml = tmp_path / "c.yaml"
    yml.write_text("lrr: 0.1\n")
    with pytest.raises(ConfigError, match="'lrr'.*'lr'"):
        argconf.from_cli(_Cfg, argparse.Namespace(), config_path=str(yml))
    with pytest.raises(ConfigError, match="max_steps.*int"):
        argconf.build(_Cfg, {"max_steps": "ten"})


def test_model_config_validation_and_presets():
    assert ModelConfig.from_name("gpt2").num_params() == 124_439_808  # the GPT-2 124M count
    for name in PRESETS:
        cfg = ModelConfig.from_name(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="n_kv_head=3 must divide n_head=4"):
        ModelConfig(n_head=4, n_embd=64, n_kv_head=3)
    with pytest.raises(ConfigError, match="did you mean 'gpt2'"):
        ModelConfig.from_name("gtp2")
    with pytest.raises(ConfigError, match="unknown ModelConfig field 'n_layers'"):
        ModelConfig.from_dict({"n_layers": 2})


def test_num_params_matches_built_model():
    from lmforge.models.decoder import Transformer

    for cfg in (ModelConfig.from_name("gpt-tiny"), ModelConfig.from_name("llama-tiny"),
                ModelConfig.from_name("llama-tiny", tie_word_embeddings=False, qkv_bias=True)):
        assert Transformer(cfg).num_params() == cfg.num_params()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "state.json"
    atomic_write_json(p, {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(p) as f:
            f.write('{"step": 2, "half')
            raise RuntimeError("disk full")
    assert p.read_text().strip().startswith('{\n  "step": 1')
    assert [x.name for x in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


def test_atomic_dir_keeps_existing_files_and_rolls_back(tmp_path):
    d = tmp_path / "model"
    with atomic_dir(d) as t:
        (t / "a.txt").write_text("1")
    with atomic_dir(d) as t:
        (t / "b.txt").write_text("2")
    assert sorted(x.name for x in d.iterdir()) == ["a.txt", "b.txt"]
    with pytest.raises(KeyError):
        with atomic_dir(d) as t:
            (t / "a.txt").write_text("corrupt")
            raise KeyError
    assert (d / "a.txt").read_text() == "1"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model"]


def test_parse_dtype():
    import torch

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("auto") is None
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        parse_dtype("int3")


def test_builtin_corpus_is_deterministic_and_sizeable():
    docs = builtin_documents()
    assert len(docs) > 500 and len(set(docs)) == len(docs)
    text = builtin_corpus()
    assert len(text) > 400_000 and "for_stmt" not in text[:10] and text == builtin_corpus()


def test_error_hierarchy():
    for cls in (ConfigError,):
        assert issubclass(cls, LmforgeError)


def test_cli_help_lists_commands_and_errors_are_one_line():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "usage: lmforge" in out.stdout
