"""Sentence embeddings: one vector per text, and what to do with them (cosine similarity, semantic search).

An encoder gives one vector per *token* (B, T, C). A sentence embedding squeezes them into one vector per text
(B, C) so that texts with similar meaning land close together. How to squeeze is called *pooling*:

    cls            h[:, 0], the vector at the [CLS] position. BERT's pre-training put a sentence-level task
                   (next-sentence prediction) on it, but raw [CLS] vectors are poor at similarity until a model is
                   fine-tuned to make them good (as some embedders are: they declare "cls").
    mean           the average of the real tokens' vectors (padding excluded through the attention mask). Every
                   token contributes, so it is robust; sentence-transformers' all-MiniLM-L6-v2 was trained with it.
    max            the per-dimension maximum over real tokens.
    mean_sqrt_len  the sum divided by sqrt(number of tokens), a length-damped mean.

The model directory says which one its embedder was trained with (sentence-transformers' 1_Pooling/config.json),
and `EncoderLM` uses that; using another pooling than the one trained gives worse vectors without any error, which
is why it is read from the checkpoint rather than chosen by the caller.

Normalizing to unit length (L2) makes the dot product equal the cosine similarity: cos(a, b) = a.b / (|a||b|),
1 for the same direction, 0 for unrelated, -1 for opposite. Semantic search is then a matrix product and a top-k.

The formulas below are sentence-transformers' (`models/Pooling.py`, `util.py`) to the operation, so the results
agree to float rounding (tests/test_embed.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, DataError

POOLINGS = ("mean", "cls", "max", "mean_sqrt_len")


def pool(h: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Token vectors (B, T, C) + mask (B, T) -> one vector per text (B, C).

    pool([[[1, 2], [3, 4], [9, 9]]], [[1, 1, 0]], "mean") -> [[2., 3.]]   (the padded [9, 9] does not count)
    """
    if pooling == "cls":
        return h[:, 0]  # (B, C)
    mask = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
    if pooling == "max":
        masked = h.masked_fill(mask == 0, -1e9)  # padding can never be the maximum
        return masked.max(dim=1).values  # (B, C)
    summed = (h * mask).sum(dim=1)  # (B, C)
    count = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    if pooling == "mean":
        return summed / count
    if pooling == "mean_sqrt_len":
        return summed / count.sqrt()
    raise ConfigError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Scale each row to unit L2 length: normalize([[3., 4.]]) -> [[0.6, 0.8]]."""
    return F.normalize(x, p=2, dim=-1)


def cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` (N, C) with every row of `b` (M, C): an (N, M) matrix.

    cos_sim([[1., 0.]], [[1., 0.], [0., 1.], [-1., 0.]]) -> [[1., 0., -1.]]
    """
    a = a.unsqueeze(0) if a.dim() == 1 else a
    b = b.unsqueeze(0) if b.dim() == 1 else b
    if a.shape[-1] != b.shape[-1]:
        raise ConfigError(f"cannot compare embeddings of size {a.shape[-1]} with size {b.shape[-1]} "
                          "(made by different models?)")
    return normalize(a) @ normalize(b).T


def semantic_search(query: torch.Tensor, corpus: torch.Tensor, top_k: int = 10) -> list[list[dict]]:
    """For each query row, the `top_k` most similar corpus rows: [[{"corpus_id": j, "score": cos}, ...], ...],
    best first (the shape sentence-transformers' util.semantic_search returns)."""
    if top_k < 1:
        raise ConfigError(f"top_k={top_k} must be >= 1")
    scores = cos_sim(query, corpus)  # (N, M)
    k = min(top_k, scores.shape[1])
    values, idx = scores.topk(k, dim=1)  # (N, k)
    return [[{"corpus_id": int(j), "score": float(s)} for s, j in zip(vs, ix)] for vs, ix in zip(values, idx)]


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """A list of non-empty strings, or a one-line error naming the first bad one."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise DataError("no texts to embed (got an empty list)")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"text {i} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise DataError(f"text {i} is empty; an embedding needs at least one word")
    return texts
