"""What every encoder task shares: an encoder with its head as one module, labels, checks, batched forwards.

A task model is the encoder (lmforge.models.encoder.Encoder) with one small head on top
(lmforge.models.heads): the head turns the hidden states (B, T, C) into what the task needs.

    kind                     head output                     pipeline (lmforge.tasks.*)
    mlm                      logits (B, T, V)                fill_mask
    sequence_classification  logits (B, L)                   text_classification
    token_classification     logits (B, T, L)                token_classification
    question_answering       start, end logits (B, T) each   question_answering

`task_model(lm, kind)` builds that module from a loaded `EncoderLM`: when the checkpoint carried this head
(a BertForTokenClassification directory, say), its trained weights are loaded; when it did not, fine-tuning
recipes ask for a fresh, randomly initialised head (`require_head=False`), exactly as transformers'
`AutoModelForTokenClassification.from_pretrained(bare_bert)` does. Label names live where Hugging Face keeps them,
in config.json's `id2label`, so a saved model loads with its labels in both libraries.

This file exists beside lmforge/models/heads.py because the heads there are single layers; the task model joins
encoder, pooler and head, which the task functions and recipes all need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from lmforge.encoder_lm import load_encoder_dir
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.formats.bert import export_encoder_hf, is_encoder_dir
from lmforge.models.encoder import Pooler
from lmforge.models.heads import MLMHead, QuestionAnsweringHead, SequenceClassificationHead, TokenClassificationHead

HEAD_KINDS = ("mlm", "sequence_classification", "token_classification", "question_answering")
_HEAD_CLASS = {"sequence_classification": SequenceClassificationHead, "token_classification": TokenClassificationHead}


class TaskModel(nn.Module):
    """An encoder and one task head: forward(input_ids, attention_mask, token_type_ids) -> the head's output."""

    def __init__(self, encoder: nn.Module, head: nn.Module, kind: str):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ConfigError(f"unknown head kind {kind!r}; use one of {', '.join(HEAD_KINDS)}")
        self.encoder = encoder
        self.head = head
        self.kind = kind
        self.config = encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None):
        h = self.encoder(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        if self.kind == "sequence_classification":
            pooled = self.encoder.pool(h) if self.encoder.pooler is not None else None  # (B, C) for BERT
            return self.head(h, pooled)  # (B, L)
        return self.head(h)  # (B, T, V) | (B, T, L) | ((B, T), (B, T))


def is_encoder(lm: Any) -> bool:
    return bool(getattr(lm, "is_encoder", False))


def check_encoder(lm: Any, task: str) -> None:
    """A decoder handed to an encoder task is a one-line error (not an AttributeError three calls down)."""
    if not is_encoder(lm):
        name = getattr(getattr(lm, "config", None), "name", "") or "this model"
        raise ConfigError(f"{name} is a decoder (GPT/Llama-style); {task} needs a BERT-family encoder "
                          "(e.g. the all-MiniLM-L6-v2 weights or a model from `lmforge pretrain-mlm`)")
    if lm.tokenizer is None:
        raise CheckpointError(f"{lm.path or 'this encoder'} has no tokenizer (tokenizer.json or vocab.txt)")


def labels_of(lm: Any) -> list[str] | None:
    """Label names in id order from config.json's id2label, or None when the checkpoint declares none."""
    id2label = lm.config.extra.get("id2label")
    if not id2label:
        return None
    try:
        return [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in range(len(id2label))]
    except KeyError:
        raise CheckpointError(f"{lm.path or 'model'}: config.json id2label is not numbered 0..{len(id2label) - 1}")


def set_labels(lm: Any, labels: Sequence[str]) -> None:
    """Record label names the Hugging Face way (config.json id2label / label2id) for the next save."""
    lm.config.extra["id2label"] = {str(i): str(lab) for i, lab in enumerate(labels)}
    lm.config.extra["label2id"] = {str(lab): i for i, lab in enumerate(labels)}


def _new_head(lm: Any, kind: str, num_labels: int | None) -> nn.Module:
    config = lm.model.config
    if kind == "mlm":
        return MLMHead(config, lm.model.wte)
    if kind == "question_answering":
        return QuestionAnsweringHead(config)
    if not num_labels:
        raise ConfigError(f"a new {kind} head needs num_labels (the number of label names)")
    return _HEAD_CLASS[kind](config, num_labels)


def task_model(lm: Any, kind: str, num_labels: int | None = None, require_head: bool = True) -> TaskModel:
    """The encoder of `lm` with a `kind` head: the checkpoint's own head if it has one, else a new random one
    (only with require_head=False, for fine-tuning). The encoder is shared with `lm.model`, not copied."""
    check_encoder(lm, kind.replace("_", " "))
    if kind not in HEAD_KINDS:
        raise ConfigError(f"unknown head kind {kind!r}; use one of {', '.join(HEAD_KINDS)}")
    trained = lm.head_kind == kind and bool(lm.head_state)
    if require_head and not trained:
        have = f"a {lm.head_kind} head" if lm.head_kind else "no task head (a bare encoder)"
        raise CheckpointError(f"{lm.path or 'this encoder'} has {have}; {kind.replace('_', ' ')} needs a model "
                              f"trained for it (fine-tune one with `lmforge finetune`)")
    if trained and kind in _HEAD_CLASS:
        saved = int(lm.head_state["classifier.weight" if "classifier.weight" in lm.head_state
                                  else "out_proj.weight"].shape[0])
        if num_labels is not None and num_labels != saved:
            raise CheckpointError(f"{lm.path or 'model'}: its {kind} head has {saved} labels, not {num_labels}")
        num_labels = saved
    head = _new_head(lm, kind, num_labels)
    if trained:
        head = head.to(lm.dtype)
        missing, unexpected = head.load_state_dict(lm.head_state, strict=False)
        missing = [m for m in missing if m != "decoder.weight"]  # the MLM output layer is tied to wte
        if missing or unexpected:
            raise CheckpointError(f"{lm.path or 'model'}: {kind} head tensors do not match "
                                  f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    encoder = lm.model
    if kind == "sequence_classification" and encoder.config.pooler and encoder.pooler is None:
        # a masked-LM checkpoint carries no pooler; BERT's classifier reads it, so it starts fresh (as in HF)
        encoder.pooler = Pooler(encoder.config)
        encoder.pooler.dense.weight.data.normal_(0.0, encoder.config.init_std)
        encoder.pooler.dense.bias.data.zero_()
    return TaskModel(encoder, head.to(lm.device), kind)


def save_task_model(lm: Any, model: TaskModel, path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """A Hugging Face directory (Bert/DistilBert/Roberta For<Task>) that loads here and in transformers."""
    if labels is not None:
        set_labels(lm, labels)
        if model.encoder.config is not lm.config:  # a merged copy carries its own config; the export reads it
            model.encoder.config.extra.update({k: lm.config.extra[k] for k in ("id2label", "label2id")})
    return export_encoder_hf(lm, path, head_kind=model.kind, head=model.head)


def load_encoder(path: str | Path, dtype: str = "auto", task: str = "this task"):
    """`EncoderLM` from a directory; a decoder directory is a one-line error naming the task."""
    p = Path(path)
    if is_encoder_dir(p):
        return load_encoder_dir(p, dtype=dtype)
    if (p / "config.json").exists() or p.is_file():
        raise ConfigError(f"{path} is not a BERT-family encoder (config.json model_type bert, roberta or "
                          f"distilbert); {task} needs one, e.g. the all-MiniLM-L6-v2 weights")
    raise CheckpointError(f"{path}: no such model directory")


def check_texts(texts: Any, what: str = "text") -> tuple[list[str], bool]:
    """(list of texts, was a single string). Empty or non-string input is a DataError naming which."""
    single = isinstance(texts, str)
    items = [texts] if single else texts
    if not isinstance(items, (list, tuple)) or not items:
        raise DataError(f"no {what} given: pass a string or a non-empty list of strings")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise DataError(f"{what} {i} is {type(t).__name__}, not a string")
        if not t.strip():
            raise DataError(f"{what} {i} is empty" if not single else f"the {what} is empty")
    return list(items), single


@torch.inference_mode()
def forward_batches(model: nn.Module, tokenizer, encodings: list, batch_size: int = 16) -> list:
    """Run `model` over tokenizer Encodings in padded batches (input order kept); returns one output per batch,
    each the model's output sliced to that batch: logits tensors (b, T, ...) or tuples of them."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = []
    try:
        for s in range(0, len(encodings), batch_size):
            b = tokenizer.pad(encodings[s:s + batch_size], padding=True, return_tensors="pt")
            out = model(b["input_ids"].to(device), b["attention_mask"].to(device), b["token_type_ids"].to(device))
            outs.append(tuple(o.float().cpu() for o in out) if isinstance(out, tuple) else out.float().cpu())
    finally:
        model.train(was_training)
    return outs
