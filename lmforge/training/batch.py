"""Batches and the losses computed on them: what every training path (the loop, core-parallel steps, recipes) shares.

A batch is `(inputs, targets)` or a dict with `input_ids` and `labels`; targets of -100 are not scored. A loss
function takes `(model, batch)` and returns a scalar; `row_mean` / `token_mean` declare what it averages over, which
is what lets `lmforge.training.cores` cut a batch into per-core shards and weigh them correctly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import DataError


def unique_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, param) of every parameter that trains, each tensor once (a tied lm_head shares wte's weight)."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a batch given as a dict (`input_ids`, `labels`/`targets`) or a pair."""
    if isinstance(batch, dict):
        inputs = batch["input_ids"]
        targets = batch.get("labels", batch.get("targets"))
        if targets is None:
            raise DataError("a batch dict needs 'labels' (or 'targets') next to 'input_ids'")
        return inputs, targets
    inputs, targets = batch
    return inputs, targets


def row_mean(loss_fn: Callable) -> Callable:
    """Declare that a loss is the mean over the batch's rows, each row scored on its own (classification).

    `lmforge.training.cores` cuts a batch into shards only for a loss declared this way or with `token_mean`: a loss whose
    rows depend on each other (DPO pairs a chosen row with a rejected one) must see its batch whole."""
    loss_fn.batch_mean = "rows"
    return loss_fn


def token_mean(loss_fn: Callable) -> Callable:
    """Declare that a loss is the mean over the batch's targets other than -100, each row scored on its own.

    `lmforge.training.cores` then weighs each shard of a batch by its share of scored targets, so the shards add up to the
    whole batch's token mean even when the rows score different numbers of tokens (prompts masked in SFT)."""
    loss_fn.batch_mean = "tokens"
    return loss_fn


@token_mean
def next_token_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of predicting each target token; targets of -100 are ignored (padding, prompts).

    The batch's targets are the inputs shifted left by one (done by the dataset), so logits[:, t] is scored
    against targets[:, t] = inputs[:, t + 1].
    """
    inputs, targets = split_batch(batch)
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def count_tokens(batch: Any) -> int:
    """Tokens a batch feeds the model (for tokens/s): its input ids."""
    if isinstance(batch, dict):
        return int(batch["input_ids"].numel())
    if isinstance(batch, (tuple, list)) and isinstance(batch[0], torch.Tensor):
        return int(batch[0].numel())
    return 0


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
