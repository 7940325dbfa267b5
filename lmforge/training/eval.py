"""Evaluation of language models by perplexity, with an n-gram baseline on the very same tokens.

Cross-entropy is the average of ``-log P(token | preceding tokens)`` over held-out text, in nats per token;
perplexity is ``exp(cross-entropy)``: the number of equally likely choices the model is, on average, as unsure as.
A uniform guess over a vocabulary of V tokens has perplexity V; a perfect model has 1.

Two models are comparable only on the same tokens with the same tokenizer. Across tokenizers compare per
*character* (or per byte): nats/char = nats/token * tokens / characters, and bits = nats / ln 2.

How a transformer scores a long text here: cut the tokens into consecutive windows of ``block_size`` inputs; the
targets of each window are its inputs shifted by one, so every token after the first is predicted exactly once
(tokens at the start of a window see a shorter context). The n-gram baseline (`lmforge.models.ngram`) predicts the same
positions from up to ``n - 1`` previous tokens.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import DataError
from lmforge.models.ngram import NGramLM


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens, block_size: int | None = None, batch_size: int = 8,
               progress: bool = False, stride: int | None = None) -> dict[str, float]:
    """Cross-entropy (nats/token) and perplexity of `model` on a 1-D token sequence (array, list or TokenView).

    A model with a context of T tokens cannot see the whole sequence, so it is scored in windows of T tokens.
    stride: windows start every `stride` tokens, and each scores only the tokens no earlier window scored. The
    default (stride = T) is non-overlapping windows: cheap, but the first tokens of every window are predicted
    from almost no context, which overstates the loss. With stride < T every token after the first window is
    predicted from at least T - stride tokens of context, at T / stride times the compute (the sliding-window
    evaluation of Hugging Face's "perplexity of fixed-length models"). Every token is scored exactly once.
    """
    from tqdm.auto import tqdm

    toks = np.asarray(tokens[0:len(tokens)], dtype=np.int64)
    if len(toks) < 2:
        raise DataError(f"need at least 2 tokens to compute perplexity, got {len(toks)}")
    T = block_size or model.config.block_size
    stride = stride or T
    if not 1 <= stride <= T:
        raise DataError(f"stride must be between 1 and the window of {T} tokens, got {stride}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # window w covers inputs toks[s:s+T] and targets toks[s+1:s+T+1]; it scores the targets from index `first` on
    windows, scored_to = [], 0  # scored_to: targets 1..scored_to are already scored
    for s in range(0, len(toks) - 1, stride):
        end = min(s + T, len(toks) - 1)  # last target index of this window
        if end > scored_to:
            windows.append((s, scored_to + 1))
            scored_to = end
        if scored_to == len(toks) - 1:
            break
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, unit="batch"):
        group = windows[i:i + batch_size]
        rows = [toks[s:s + T + 1] for s, _ in group]
        width = max(len(r) for r in rows)
        x = torch.zeros(len(rows), width - 1, dtype=torch.long)  # (B, T)
        y = torch.full((len(rows), width - 1), -100, dtype=torch.long)  # (B, T), -100 = not scored here
        for j, (r, (s, first)) in enumerate(zip(rows, group)):
            x[j, :len(r) - 1] = torch.from_numpy(r[:-1])
            skip = first - (s + 1)  # targets before `first` were scored by an earlier window
            y[j, skip:len(r) - 1] = torch.from_numpy(r[1 + skip:])
        logits = model(x.to(device))  # (B, T, V); right padding never affects earlier positions (causal)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), ignore_index=-100,
                               reduction="sum")
        nll += float(loss)
        count += int((y != -100).sum())
    model.train(was_training)
    ce = nll / count
    return {"loss": ce, "perplexity": math.exp(min(ce, 700.0)), "tokens": count}


def ngram_baseline(train_tokens, val_tokens, n: int = 5, vocab_size: int | None = None,
                   smoothing: str = "kneser_ney") -> dict[str, float]:
    """Fit an n-gram model on `train_tokens` and score `val_tokens` (same positions as `perplexity`)."""
    train = np.asarray(train_tokens[0:len(train_tokens)], dtype=np.int64)
    val = np.asarray(val_tokens[0:len(val_tokens)], dtype=np.int64)
    if vocab_size is None:
        vocab_size = int(max(train.max(), val.max())) + 1
    lm = NGramLM(n=n, smoothing=smoothing, vocab_size=vocab_size).fit(train)
    ce = lm.cross_entropy(val)
    return {"loss": ce, "perplexity": math.exp(min(ce, 700.0)), "tokens": len(val) - 1, "n": n}


def per_char(result: dict[str, Any], n_chars: int) -> dict[str, Any]:
    """Add nats/char and bits/char to a result that scored `result['tokens']` tokens spanning `n_chars` characters."""
    nats = result["loss"] * result["tokens"] / max(1, n_chars)
    return {**result, "loss_per_char": nats, "bits_per_char": nats / math.log(2)}
