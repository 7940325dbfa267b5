"""Helpers for the tests and benchmarks, not part of the library: the shared data folder, a transformers twin of an
lmforge model, and the naive BPE trainer the fast one is checked against."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmforge.errors import CheckpointError
from lmforge.formats.hf import IGNORED, config_to_hf, state_dict_to_hf


def shared_data_dir() -> Path:
    """Where the project's shared public data lives (``../shared/data`` beside the checkout), or $LMFORGE_DATA."""
    env = os.environ.get("LMFORGE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def to_hf_model(model: torch.nn.Module):
    """A `transformers` AutoModelForCausalLM holding this lmforge model's weights (needs transformers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    hf_dict = config_to_hf(model.config, dtype)
    mt = hf_dict.pop("model_type")
    hf_config = AutoConfig.for_model(mt, **{k: v for k, v in hf_dict.items() if k != "torch_dtype"})
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    missing, unexpected = hf_model.load_state_dict(state_dict_to_hf(model.state_dict(), model.config), strict=False)
    missing = [m for m in missing if not (model.config.tie_word_embeddings and m == "lm_head.weight")
               and not IGNORED.search(m)]
    if missing or unexpected:
        raise CheckpointError(f"HF model mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.config.tie_word_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


def train_bpe_naive(counts: dict[bytes, int], num_tokens: int) -> list[tuple[bytes, bytes]]:
    """The textbook loop, for teaching and as a test oracle: recount every pair after every merge.

    Same result as `train_bpe` (same tie rule, same handling of a merge that re-creates an existing token), but
    each merge costs a pass over all pre-tokens — O(merges x corpus) instead of O(merges x affected words).
    """
    words = [[bytes([x]) for x in w] for w in counts]
    freqs = list(counts.values())
    known = {bytes([i]) for i in range(256)}
    merges: list[tuple[bytes, bytes]] = []
    n_new = 0
    while n_new < num_tokens:
        pairs: dict[tuple[bytes, bytes], int] = {}
        for w, f in zip(words, freqs):
            for p in zip(w, w[1:]):
                pairs[p] = pairs.get(p, 0) + f
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # highest count, then the greater byte pair
        merges.append(best)
        if best[0] + best[1] not in known:
            known.add(best[0] + best[1])
            n_new += 1
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and (w[i], w[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return merges


TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128)


def tiny_bert_dir(d: str | os.PathLike, model_class, tokenizer, *, seed: int = 0,
                  scale: tuple[str, float] | None = None, **config) -> Path:
    """A tiny random BERT-family model (`model_class`, a transformers class such as BertForMaskedLM) with
    `tokenizer`, saved in `d` the way transformers saves it. `config` overrides TINY_BERT's sizes and adds head
    settings (num_labels, id2label, ...). scale=(parameter name, factor) multiplies one weight, so that outputs are
    confident rather than near-ties (top-k orders, entity grouping, span choice)."""
    import transformers

    torch.manual_seed(seed)
    model = model_class(transformers.BertConfig(vocab_size=tokenizer.vocab_size, **{**TINY_BERT, **config})).eval()
    if scale is not None:
        with torch.no_grad():
            model.get_parameter(scale[0]).mul_(scale[1])
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return Path(d)
