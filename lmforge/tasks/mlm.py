"""Masked-language modelling (BERT's pretraining task): hide some tokens, learn to recover them from both sides.

A decoder learns p(token t | tokens before t): it only ever sees the left context, because at generation time the
right context does not exist yet. An encoder is never asked to generate, so it may look both ways: the
representation of "bank" can use "river" three words later. But a model that sees every token cannot be trained
to predict those same tokens (it would copy them). Devlin et al. 2018 (BERT, arXiv:1810.04805, section 3.1)
therefore *hide* a random 15% of the tokens and train the model to predict only those:

    input   [CLS] the  cat  [MASK] on  the  mat  [SEP]
    labels  -100  -100 -100 sat    -100 -100 -100 -100      loss = cross-entropy at the hidden position only

The 80/10/10 rule. Of the 15% chosen positions, 80% become [MASK], 10% a random token, 10% stay as they were.
Why not always [MASK]? [MASK] never appears when the model is used later (fine-tuning, embeddings), so a model
trained only on [MASK] positions would learn "the interesting tokens are the [MASK]s" and could keep poor
representations of ordinary tokens. With random and unchanged tokens in the mix, any input position may be a
prediction target, so the model must build a good contextual vector for every token; the random 10% (1.5% of all
tokens) is little enough not to damage its grasp of the language.

Whole-word masking (the later "BERT-wwm" checkpoints): masking "##ing" alone is easy (the rest of "play##ing" is
still visible), so whole-word masking chooses *words* with probability p and hides all of their pieces. Word
boundaries come from the tokenizer's `word_ids` (the pre-tokenizer's words: whitespace and each punctuation mark
split). The 80/10/10 choice is still drawn per piece.

`mask_tokens` draws its random numbers in exactly the order transformers' `DataCollatorForLanguageModeling`
does, so with the same `torch.Generator` seed the two mask the same positions (tests/test_mlm.py checks this),
and `mlm_loss` equals `BertForMaskedLM`'s loss on the same batch.

    inputs, labels = mask_tokens(ids, special_ids=tok.all_special_ids, mask_token_id=tok.mask_token_id,
                                 vocab_size=tok.vocab_size, generator=torch.Generator().manual_seed(0))
    data = MLMBatches(sequences, tok, batch_size=16, seed=0)    # index -> masked batch, for training.loop.train
    train(task_model(lm, "mlm"), data, TrainConfig(...), loss_fn=mlm_loss)
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, DataError
from lmforge.training.batch import token_mean


def mask_tokens(input_ids: torch.Tensor, *, special_ids: Sequence[int], mask_token_id: int, vocab_size: int,
                mlm_probability: float = 0.15, mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
                generator: torch.Generator | None = None, word_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked inputs, labels) for a batch of ids (B, T); labels are -100 except at the chosen positions.

    special_ids: never chosen ([CLS], [SEP], [PAD], ...). word_ids (B, T), -1 for special tokens: whole-word
    masking (a word is chosen with `mlm_probability` and all its pieces are hidden).
    """
    if not 0.0 <= mlm_probability <= 1.0:
        raise ConfigError(f"mlm_probability={mlm_probability} must be in [0, 1]")
    if mask_replace_prob < 0 or random_replace_prob < 0 or mask_replace_prob + random_replace_prob > 1:
        raise ConfigError(f"mask_replace_prob={mask_replace_prob} + random_replace_prob={random_replace_prob} "
                          "must be within [0, 1]")
    inputs, labels = input_ids.clone(), input_ids.clone()  # (B, T)
    special = torch.isin(input_ids, torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype))  # (B, T)
    prob = torch.full(labels.shape, mlm_probability)  # (B, T)
    if word_ids is not None:
        # choose a word at its first piece, then spread the choice over every piece of the word
        first = torch.ones_like(special)
        first[:, 1:] = word_ids[:, 1:] != word_ids[:, :-1]
        prob.masked_fill_(special | ~first | (word_ids < 0), 0.0)
        chosen = torch.bernoulli(prob, generator=generator).bool()  # (B, T) at first pieces
        row = torch.arange(word_ids.shape[0])[:, None].expand_as(word_ids)
        key = row * (int(word_ids.max()) + 2) + word_ids  # a batch-wide id per (row, word)
        masked = torch.isin(key, key[chosen]) & (word_ids >= 0) & ~special
    else:
        prob.masked_fill_(special, 0.0)
        masked = torch.bernoulli(prob, generator=generator).bool()  # (B, T)
    labels[~masked] = -100
    replaced = torch.bernoulli(torch.full(labels.shape, mask_replace_prob), generator=generator).bool() & masked
    inputs[replaced] = mask_token_id
    if mask_replace_prob == 1 or random_replace_prob == 0:
        return inputs, labels
    scaled = random_replace_prob / (1 - mask_replace_prob)  # share of the non-[MASK] rest that gets a random token
    randomized = torch.bernoulli(torch.full(labels.shape, scaled), generator=generator).bool() & masked & ~replaced
    random_words = torch.randint(vocab_size, labels.shape, dtype=torch.long, generator=generator)
    inputs[randomized] = random_words[randomized]
    return inputs, labels  # the remaining chosen positions keep their token


@token_mean
def mlm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the masked positions (labels != -100), as BertForMaskedLM computes it."""
    logits = model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)


def chunk_documents(tokenizer, documents: Sequence[str], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Each document's word pieces cut into pieces of max_length - 2, each wrapped as [CLS] ... [SEP].

    Returns (ids, word_ids) per chunk; word_ids are -1 at [CLS]/[SEP]. Chunks never cross a document boundary.
    """
    if max_length < 8:
        raise ConfigError(f"max_length={max_length} is too short for masked-LM training (use >= 8)")
    body = max_length - 2
    out = []
    for enc in tokenizer.encode_batch(list(documents), add_special_tokens=False):
        for s in range(0, len(enc.ids), body):
            ids = enc.ids[s:s + body]
            if len(ids) < 4:  # a tail of a few pieces teaches nothing
                continue
            words = [-1 if w is None else w for w in enc.word_ids[s:s + body]]
            out.append(([tokenizer.cls_token_id] + ids + [tokenizer.sep_token_id], [-1] + words + [-1]))
    if not out:
        raise DataError("no text to train on: the documents are empty or shorter than a few word pieces")
    return out


class MLMBatches:
    """index -> a masked batch {input_ids, attention_mask, token_type_ids, labels} (the training loop's data).

    Batch i is a function of (seed, i) alone: which sequences (a seeded shuffle per epoch) and which positions
    are masked (a generator seeded with seed and i). Masks are new each epoch (RoBERTa's dynamic masking), and a
    resumed run draws exactly the batches the uninterrupted run would have.
    """

    def __init__(self, chunks: Sequence[tuple[list[int], list[int]]], tokenizer, batch_size: int, seed: int = 0,
                 mlm_probability: float = 0.15, whole_word_mask: bool = False, shuffle: bool = True):
        if not chunks:
            raise DataError("no sequences to build masked-LM batches from")
        self.chunks, self.tok, self.batch_size, self.seed = list(chunks), tokenizer, batch_size, seed
        self.mlm_probability, self.whole_word_mask, self.shuffle = mlm_probability, whole_word_mask, shuffle
        self.per_epoch = max(1, len(self.chunks) // batch_size)
        self._order: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.per_epoch

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._order:
            order = list(range(len(self.chunks)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = {epoch: order}
        return self._order[epoch]

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, k = divmod(index, self.per_epoch)
        rows = [self.chunks[i] for i in self._epoch_order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]]
        T = max(len(ids) for ids, _ in rows)
        pad = self.tok.pad_token_id
        ids = torch.tensor([r + [pad] * (T - len(r)) for r, _ in rows])  # (B, T)
        words = torch.tensor([w + [-1] * (T - len(w)) for _, w in rows])  # (B, T)
        attn = (torch.arange(T)[None, :] < torch.tensor([len(r) for r, _ in rows])[:, None]).long()  # (B, T)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        inputs, labels = mask_tokens(ids, special_ids=self.tok.all_special_ids, mask_token_id=self.tok.mask_token_id,
                                     vocab_size=self.tok.vocab_size, mlm_probability=self.mlm_probability,
                                     generator=g, word_ids=words if self.whole_word_mask else None)
        return {"input_ids": inputs, "attention_mask": attn, "token_type_ids": torch.zeros_like(inputs),
                "labels": labels}

    def all(self) -> list[dict[str, torch.Tensor]]:
        """Every batch of one pass, masks fixed (for a validation set that scores the same positions each time)."""
        return [self(i) for i in range(self.per_epoch)]


def masked_accuracy(model: torch.nn.Module, batches: Sequence[dict[str, Any]]) -> float:
    """Share of masked positions where the model's top prediction is the hidden token."""
    hit = total = 0
    was = model.training
    model.eval()
    with torch.inference_mode():
        for b in batches:
            logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])  # (B, T, V)
            keep = b["labels"] != -100
            hit += int((logits.argmax(-1)[keep] == b["labels"][keep]).sum())
            total += int(keep.sum())
    model.train(was)
    return hit / max(1, total)
