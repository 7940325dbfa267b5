"""Fill-mask: ask a masked-language model which words fit where the [MASK] is.

A masked-LM (BERT's pretraining task, lmforge.tasks.mlm) learned to recover hidden tokens from the words on
*both* sides. At inference we hide a token ourselves and read the model's distribution at that position:

    "Paris is the [MASK] of France."  ->  logits (V,) at the [MASK]  ->  softmax  ->  top-k
    [{"score": 0.93, "token": 3007, "token_str": "capital", "sequence": "paris is the capital of france."}, ...]

The output is transformers' `pipeline("fill-mask")`'s, field for field (tests/test_mlm.py checks tokens and
scores against it on the same weights): `sequence` is the text decoded with the mask filled (special tokens
dropped when there is one mask, kept when there are several, so the other [MASK]s stay visible), `token_str` the
decoded token. With several masks each is predicted on its own (the others stay masked), so the result is a
list per mask. `targets` limits the choice to given words (a word not in the vocabulary counts as its first
word piece, as in transformers).

One deviation: transformers returns a one-element list input unwrapped; here a list in gives a list out.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from lmforge.errors import ConfigError, DataError
from lmforge.tasks.common import check_texts, forward_batches, task_model


def target_ids(tokenizer, targets: str | Sequence[str]) -> list[int]:
    """Vocabulary ids of the target words (transformers' `get_target_ids`): the word itself when the vocabulary
    has it, else its first word piece (with a warning)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    ids = []
    for t in targets:
        i = tokenizer.token_to_id(t)
        if i is None:
            pieces = tokenizer.encode(t, add_special_tokens=False)
            if not pieces:
                warnings.warn(f"target {t!r} has no token in the vocabulary; ignored", stacklevel=3)
                continue
            i = pieces[0]
            warnings.warn(f"target {t!r} is not in the vocabulary; using {tokenizer.id_to_token(i)!r}",
                          stacklevel=3)
        ids.append(int(i))
    ids = sorted(set(ids))
    if not ids:
        raise ConfigError("no usable target: give at least one word from the vocabulary")
    return ids


def fill_mask(lm: Any, texts: str | Sequence[str], top_k: int = 5, targets: str | Sequence[str] | None = None,
              batch_size: int = 8) -> list:
    """Top-k fillers for each [MASK] in each text.

    One text with one mask -> [{"score", "token", "token_str", "sequence"}, ...] (top_k dicts, best first);
    one text with m masks -> m such lists; a list of texts -> one of the above per text.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r} must be a positive integer")
    items, single = check_texts(texts)
    model = task_model(lm, "mlm")
    tok = lm.tokenizer
    mask_id = tok.mask_token_id
    if mask_id is None:
        raise ConfigError(f"{lm.path or 'this tokenizer'} has no mask token; fill-mask needs one")
    mask_str = tok.id_to_token(mask_id)
    encs = tok.encode_batch(items)
    for i, e in enumerate(encs):
        if mask_id not in e.ids:
            raise DataError(f"text {i} has no {mask_str}: write {mask_str} where the word to predict goes")
        if len(e) > lm.max_seq_length:
            raise DataError(f"text {i} is {len(e)} tokens, longer than the model's {lm.max_seq_length}")
    allowed = target_ids(tok, targets) if targets is not None else None
    k = min(top_k, len(allowed)) if allowed is not None else top_k
    logits = [row for out in forward_batches(model, tok, encs, batch_size) for row in out]  # each (T, V)
    results = []
    for e, lg in zip(encs, logits):
        ids = torch.tensor(e.ids)
        where = torch.nonzero(ids == mask_id).squeeze(-1)  # (m,)
        probs = lg[:len(e)][where].softmax(dim=-1)  # (m, V)
        if allowed is not None:
            probs = probs[:, allowed]  # (m, len(targets))
        values, preds = probs.topk(k)  # (m, k)
        one_mask = len(where) == 1
        per_mask = []
        for m in range(len(where)):
            row = []
            for v, p in zip(values[m].tolist(), preds[m].tolist()):
                token = allowed[p] if allowed is not None else p
                filled = ids.clone()
                filled[where[m]] = token
                row.append({"score": v, "token": token, "token_str": tok.decode([token]),
                            "sequence": tok.decode(filled.tolist(), skip_special_tokens=one_mask)})
            per_mask.append(row)
        results.append(per_mask[0] if one_mask else per_mask)
    return results[0] if single else results
