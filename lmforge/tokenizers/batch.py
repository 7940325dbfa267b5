"""The batch call every lmforge tokenizer shares: `tok(texts, padding=True, truncation=True, max_length=...)`."""

from __future__ import annotations

from typing import Sequence

from lmforge.errors import TokenizerError


class BatchEncoding(dict):
    """What `tok(texts, padding=True, ...)` returns: {"input_ids", "attention_mask"} as lists, or (B, T) tensors
    with return_tensors="pt". `num_truncated[i]` is how many tokens text i lost to `max_length` (never silent)."""

    num_truncated: list[int]


class BatchCallMixin:
    """`tok(texts, padding=True, truncation=True, max_length=...)`: the batch call every lmforge tokenizer shares.

    Decoder tokenizers pad on the right with `pad_token_id` (else EOS, else 0); the attention mask marks the real
    tokens. Generation pads on the left by itself (lmforge.generation.loop), so this call is for training and
    scoring batches.
    """

    def __call__(self, texts: str | Sequence[str], *, padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None) -> BatchEncoding:
        single = isinstance(texts, str)
        rows = self.encode_batch([texts] if single else list(texts))
        cut = [0] * len(rows)
        if truncation:
            if not isinstance(max_length, int) or max_length < 1:
                raise TokenizerError(f"truncation needs max_length >= 1, got {max_length!r}")
            cut = [max(0, len(r) - max_length) for r in rows]
            rows = [r[:max_length] for r in rows]
        if padding == "max_length" and max_length is None:
            raise TokenizerError("padding='max_length' needs max_length")
        width = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
        pad = next((i for i in (getattr(self, "pad_token_id", None), getattr(self, "eos_token_id", None))
                    if i is not None), 0)
        masks = [[1] * len(r) for r in rows]
        if padding:
            masks = [m + [0] * (width - len(m)) for m in masks]
            rows = [r + [pad] * (width - len(r)) for r in rows]
        elif return_tensors == "pt" and len({len(r) for r in rows}) > 1:
            raise TokenizerError("texts of different lengths need padding=True to become one tensor")
        out = BatchEncoding(input_ids=rows, attention_mask=masks)
        if return_tensors == "pt":
            import torch  # tokenizing must not import torch (seconds of start-up); only tensors need it

            out = BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long),
                                attention_mask=torch.tensor(masks, dtype=torch.long))
        elif return_tensors is not None:
            raise TokenizerError(f"return_tensors={return_tensors!r}; use None or 'pt'")
        if single and return_tensors is None:
            out = BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        out.num_truncated = cut
        return out
