"""A text classifier from a pretrained language model: a class head on the last real token.

A decoder-only LM reads left to right, so the hidden state of the *last* token is the only one that has seen the
whole text (causal attention hides later tokens from earlier ones). The course's spam classifier therefore
feeds the final hidden state of the last real token (after the final norm) to a small linear head with one
output per class, and trains with cross-entropy on the label:

    ids (B, T) -> transformer -> h (B, T, C) -> h[b, last_b] (B, C) -> head -> class logits (B, K)

With right padding, last_b = (number of real tokens in row b) - 1; padding after it never influences it.

What to train: the head alone is cheap but weak; the course trains the last transformer block, the final norm
and the head (`train_layers=1`), which is nearly as good as training everything (`train_layers=-1`) and much
faster. LoRA on the blocks plus a trained head is a third option.

On disk a classifier is a normal lmforge model directory (so `lmforge.load` still reads it as a language model)
plus `classifier.json` (labels, max length) and `classifier_head.safetensors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.finetune.data import classification_collate, encode_texts
import lmforge  # lmforge.load at call time: the loader imports finetune (adapters), so not `from lmforge.loader`
from lmforge.training.batch import row_mean
from lmforge.utils import atomic_dir, atomic_write_json, read_json

CLASSIFIER_CONFIG = "classifier.json"
CLASSIFIER_HEAD = "classifier_head.safetensors"


class SequenceClassifier(nn.Module):
    """`base` (a Transformer) + `head` (C -> K). forward(input_ids, attention_mask) -> logits (B, K)."""

    def __init__(self, base: nn.Module, labels: Sequence[str]):
        super().__init__()
        if len(labels) < 2:
            raise ConfigError(f"a classifier needs at least 2 labels, got {list(labels)}")
        self.base = base
        self.labels = list(labels)
        w = base.wte.weight
        self.head = nn.Linear(base.config.n_embd, len(labels), device=w.device, dtype=w.dtype)

    @property
    def config(self):
        return self.base.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(last_token_hidden(self.base, input_ids, attention_mask))  # (B, K)


def last_token_hidden(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """The final hidden state (after the final norm) of each row's last real token: (B, T) ids -> (B, C).
    Also the pooling of a reward model (`finetune.rlhf.RewardModel`)."""
    # right padding: causal attention already keeps padding out of the real tokens, so no mask is passed
    out = base(input_ids, output_hidden_states=True, logits_to_keep=1)
    h = out.hidden_states[-1]  # (B, T, C), after the final norm
    B, T = input_ids.shape
    last = attention_mask.sum(1) - 1 if attention_mask is not None else torch.full((B,), T - 1)  # (B,)
    return h[torch.arange(B, device=h.device), last.to(h.device)]  # (B, C)


def set_trainable(clf: SequenceClassifier, train_layers: int = 1) -> None:
    """Freeze everything, then unfreeze the head, the final norm and the last `train_layers` blocks
    (-1: the whole model). Parameters LoRA marked trainable stay trainable."""
    for name, p in clf.named_parameters():
        p.requires_grad = ".lora_A." in name or ".lora_B." in name
    base = clf.base
    if train_layers < 0:
        for name, p in base.named_parameters():
            p.requires_grad = True
    else:
        for block in list(base.blocks)[len(base.blocks) - train_layers:] if train_layers else []:
            for p in block.parameters():
                p.requires_grad = True
        for p in base.norm_f.parameters():
            p.requires_grad = True
    for p in clf.head.parameters():
        p.requires_grad = True


@row_mean
def classification_loss(clf: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = clf(batch["input_ids"], batch["attention_mask"])  # (B, K)
    return nn.functional.cross_entropy(logits.float(), batch["labels"])


@torch.no_grad()
def predict(clf: SequenceClassifier, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 32,
            pad_id: int = 0) -> torch.Tensor:
    """Class probabilities (N, K) for a list of texts."""
    was = clf.training
    clf.eval()
    device = next(clf.parameters()).device
    ids = encode_texts(tokenizer, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    probs = torch.zeros(len(ids), len(clf.labels))
    for s in range(0, len(ids), batch_size):
        idx = order[s:s + batch_size]
        batch = classification_collate([(ids[i], 0) for i in idx], pad_id)
        logits = clf(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (b, K)
        probs[idx] = logits.float().softmax(-1).cpu()
    clf.train(was)
    return probs


def save_classifier(clf: SequenceClassifier, lm, path: str | Path, max_length: int, extra: dict | None = None) -> Path:
    """Write `lm` (whose model is clf.base) as a model directory plus the classifier head and labels."""
    from safetensors.torch import save_file

    if lm.model is not clf.base:
        raise ConfigError("save_classifier: lm.model must be the classifier's base model")
    lm.save(path)
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in clf.head.state_dict().items()},
                  str(tmp / CLASSIFIER_HEAD), metadata={"format": "pt"})
        atomic_write_json(tmp / CLASSIFIER_CONFIG, {"labels": clf.labels, "pooling": "last_token",
                                                    "max_length": max_length, **(extra or {})})
    return Path(path)


def load_classifier(path: str | Path, device=None):
    """(lm, classifier, config dict) from a directory written by `save_classifier`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CLASSIFIER_CONFIG).is_file():
        raise CheckpointError(f"{path}: not a classifier directory (no {CLASSIFIER_CONFIG}); train one with "
                              f"`lmforge finetune classify`")
    cfg = read_json(path / CLASSIFIER_CONFIG)
    lm = lmforge.load(path, device=device)
    clf = SequenceClassifier(lm.model, cfg["labels"])
    state = load_file(str(path / CLASSIFIER_HEAD))
    try:
        clf.head.load_state_dict({k: v.to(clf.head.weight.dtype) for k, v in state.items()})
    except RuntimeError as e:
        raise CheckpointError(f"{path / CLASSIFIER_HEAD}: does not match {len(cfg['labels'])} labels "
                              f"({str(e).splitlines()[0]})") from None
    return lm, clf.eval(), cfg
