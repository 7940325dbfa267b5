"""Recipes: make a model smaller (quantize, distill, prune) and report what it cost.

    lmforge quantize runs/demo --scheme int8 --out runs/demo-int8
    lmforge distill --teacher runs/demo --student llama-tiny --n-layer 2 --max-steps 200 --out runs/student
    lmforge prune runs/demo --n-layer 3 --intermediate-size 256 --heal-steps 100 --out runs/demo-pruned

The library parts live in `lmforge.compress` (quantize.py, distill.py, prune.py); these functions compose them
with loading, data and saving, and return the report the CLI prints as one JSON line. Each refuses to write into a
directory that already holds a model unless `overwrite` is set, before any work is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge import argconf
from lmforge.compress.distill import DistillConfig, distill
from lmforge.compress.prune import prune_model
from lmforge.compress.quantize import calibration_batches, model_nbytes, quantize_model
from lmforge.errors import ConfigError
from lmforge.lm import LM
from lmforge.loader import load
from lmforge.models.config import PRESETS, ModelConfig
from lmforge.models.decoder import Transformer
from lmforge.tokenizers.bpe import read_text_file
from lmforge.training.data import PackedBatches, builtin_corpus
from lmforge.training.eval import perplexity
from lmforge.utils import check_output, human_bytes


def corpus_text(sources: list[str]) -> str:
    """The text of `sources`: files, or "builtin" for the embedded corpus."""
    return "\n\n".join(builtin_corpus() if s == "builtin" else read_text_file(s) for s in sources)


def token_data(lm: LM, sources: list[str], block_size: int, batch_size: int, seed: int = 0):
    """Encode the text with the model's tokenizer: (training batches, validation tokens, block size); the last 10%
    of the tokens are held out for validation."""
    if lm.tokenizer is None:
        raise ConfigError("the model has no tokenizer to encode the training text")
    ids = np.asarray(lm.tokenizer.encode(corpus_text(sources)), dtype=np.int64)
    cut = int(len(ids) * 0.9)
    block_size = min(block_size, lm.config.block_size)
    return PackedBatches(ids[:cut], batch_size, block_size, seed=seed), ids[cut:], block_size


def prune_and_heal(lm, calibration, data, heal_config=None, val_tokens=None, **targets) -> tuple[Any, dict]:
    """Prune `lm` (an `LM`) to `targets` (n_kv_head / intermediate_size / n_layer), then heal the pruned model by
    distilling from the original on `data`. Returns (pruned LM, report with sizes and perplexities)."""
    teacher = lm.model
    small = prune_model(teacher, calibration, **targets)
    report: dict[str, Any] = {"params_before": teacher.num_params(), "params_after": small.num_params()}
    if val_tokens is not None:
        report["ppl_before"] = perplexity(teacher, val_tokens)["perplexity"]
        report["ppl_pruned"] = perplexity(small, val_tokens)["perplexity"]
    result = distill(teacher, small, data, heal_config or DistillConfig(max_steps=100, lr=1e-3, warmup_steps=10))
    if val_tokens is not None:
        report["ppl_healed"] = perplexity(small, val_tokens)["perplexity"]
    report["heal_steps"] = result.train.step
    out = LM(small, lm.tokenizer, small.config, lm.generation_config, lm.chat_template)
    return out, report


def run_quantize(model: str, out: Path, *, scheme: str = "int8", group_size: int = 32, method: str = "rtn",
                 calib_data: Path | None = None, calib_samples: int = 32, calib_len: int = 256,
                 embeddings: str = "int8", fallback: str | None = None, overwrite: bool = False) -> dict:
    """Quantize `model`'s linear layers (RTN, or GPTQ calibrated on `calib_data` or the embedded corpus) and save
    the quantized model directory at `out`. Returns sizes before and after."""
    check_output(out, overwrite=overwrite)
    lm = load(model, dtype="float32")
    calib = None
    if method == "gptq":
        if lm.tokenizer is None:
            raise ConfigError(f"{model} has no tokenizer; GPTQ needs one to encode calibration text")
        text = read_text_file(calib_data) if calib_data is not None else builtin_corpus()
        seq_len = min(calib_len, lm.config.block_size)
        calib = list(calibration_batches(lm.tokenizer, text, calib_samples, seq_len).split(8))  # batches of 8
    before = model_nbytes(lm.model)
    quantize_model(lm.model, scheme, group_size, calibration=calib, method=method, embeddings=embeddings,
                   fallback=fallback)
    after = model_nbytes(lm.model)
    lm.save(out)
    disk = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    return {"out": str(out), "scheme": scheme, "method": method,
            "group_size": None if scheme == "int8" else group_size,
            "weights_before": human_bytes(before), "weights_after": human_bytes(after),
            "ratio": round(after / before, 4), "safetensors_on_disk": human_bytes(disk)}


def run_distill(teacher: str, student: str, out: Path, config: DistillConfig, *, data: list[str] = ("builtin",),
                block_size: int = 128, n_layer: int | None = None, n_embd: int | None = None,
                overwrite: bool = False) -> dict:
    """Train `student` (a model directory, or a ModelConfig preset made fresh with the teacher's vocabulary,
    optionally with n_layer / n_embd) to imitate `teacher` on `data`, and save it at `out`."""
    check_output(out, overwrite=overwrite)
    t = load(teacher, dtype="float32")
    if student in PRESETS:
        over = {k: v for k, v in (("n_layer", n_layer), ("n_embd", n_embd)) if v is not None}
        cfg = ModelConfig.from_name(student, vocab_size=t.config.vocab_size, block_size=t.config.block_size, **over)
        s = LM(Transformer(cfg), t.tokenizer, cfg, t.generation_config, t.chat_template)
    else:
        s = load(student, dtype="float32")
    batches, val, block = token_data(t, list(data), block_size, config.batch_size, config.seed)
    result = distill(t, s, batches, config, val_tokens=val[: 64 * block])
    s.save(out)
    return {"out": str(out), "steps": result.train.step, **result.report}


def run_prune(model: str, out: Path, *, n_kv_head: int | None = None, intermediate_size: int | None = None,
              n_layer: int | None = None, data: list[str] = ("builtin",), block_size: int = 128,
              heal_steps: int = 100, lr: float = 1e-3, batch_size: int = 8, progress: str | None = None,
              overwrite: bool = False) -> dict:
    """Prune heads / MLP channels / layers of `model` by activation importance, heal by distillation from the
    unpruned model for `heal_steps` (0: none, perplexities reported instead), and save at `out`."""
    targets = {k: v for k, v in (("n_kv_head", n_kv_head), ("intermediate_size", intermediate_size),
                                 ("n_layer", n_layer)) if v is not None}
    if not targets:
        raise ConfigError("say what to prune: --n-kv-head, --intermediate-size and/or --n-layer")
    check_output(out, overwrite=overwrite)
    lm = load(model, dtype="float32")
    batches, val, block = token_data(lm, list(data), block_size, batch_size)
    calib = torch.cat([batches(i)["input_ids"] for i in range(4)])  # (4 * batch_size, T)
    val = val[: 64 * block]
    if heal_steps == 0:
        small = prune_model(lm.model, calib, **targets)
        pruned = LM(small, lm.tokenizer, small.config, lm.generation_config, lm.chat_template)
        report = {"params_before": lm.model.num_params(), "params_after": small.num_params(),
                  "ppl_before": perplexity(lm.model, val, block)["perplexity"],
                  "ppl_pruned": perplexity(small, val, block)["perplexity"]}
    else:
        heal = argconf.build(DistillConfig, {"max_steps": heal_steps, "lr": lr, "batch_size": batch_size,
                                             "warmup_steps": min(10, heal_steps), "eval_every": 0,
                                             **({"progress": progress} if progress else {})})
        pruned, report = prune_and_heal(lm, calib, batches, heal, val_tokens=val, **targets)
    pruned.save(out)
    return {"out": str(out), **report}
