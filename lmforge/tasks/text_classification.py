"""Sequence classification: one label for a sentence (spam or ham) or for a pair of sentences (NLI).

An encoder gives a vector per token; a classifier needs one per input. BERT trains its [CLS] position for this:
the first token attends to every other, and after fine-tuning its vector (through the pooler, tanh(dense(h[CLS])))
carries what the label needs. logits = classifier(dropout(pooled)), one score per label; softmax gives
probabilities (lmforge.models.heads.SequenceClassificationHead has each family's exact layout).

Sentence pairs. Natural-language inference asks whether a hypothesis follows from a premise (entailment,
neutral, contradiction). Both go into one input, "[CLS] premise [SEP] hypothesis [SEP]", with token type 0 for
the first segment and 1 for the second, so every token of one can attend to every token of the other; that
cross-attention is why a cross-encoder beats comparing two separate sentence embeddings on NLI.

`text_classification` returns what transformers' text-classification pipeline returns: {"label", "score"} for
the top label, or with top_k (None = all) a list of them, best first. Scores are a softmax over the labels
(a sigmoid for a single-label regression-style head, as in transformers).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, DataError
from lmforge.tasks.common import check_texts, forward_batches, labels_of, task_model
from lmforge.training.batch import row_mean


def encode_inputs(tokenizer, texts: Sequence[str], text_pairs: Sequence[str] | None, max_length: int) -> list:
    """Encodings of single texts or pairs ([CLS] a [SEP] b [SEP]), cut to max_length (longest first)."""
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise DataError(f"{len(texts)} texts but {len(text_pairs)} second sentences; give one pair per text")
    return tokenizer.encode_batch(list(texts), None if text_pairs is None else list(text_pairs), truncation=True,
                                  max_length=max_length)


def text_classification(lm: Any, texts: str | Sequence[str], text_pairs: str | Sequence[str] | None = None,
                        top_k: int | None = 1, function_to_apply: str | None = None, batch_size: int = 16,
                        model: torch.nn.Module | None = None) -> Any:
    """Labels of each text (or pair). top_k=1: {"label", "score"}; top_k=k or None: a list, best first.
    One text in -> one result; a list in -> a list of results."""
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k={top_k!r} must be a positive integer or None (all labels)")
    items, single = check_texts(texts)
    pairs = None
    if text_pairs is not None:
        pairs, _ = check_texts(text_pairs, "second sentence")
    model = model if model is not None else task_model(lm, "sequence_classification")
    n_labels = model.head.classifier.out_features if hasattr(model.head, "classifier") else model.head.out_proj.out_features
    labels = labels_of(lm) or [f"LABEL_{i}" for i in range(n_labels)]
    fn = function_to_apply or ("sigmoid" if n_labels == 1 else "softmax")
    if fn not in ("softmax", "sigmoid", "none"):
        raise ConfigError(f"function_to_apply={function_to_apply!r}; use softmax, sigmoid or none")
    encs = encode_inputs(lm.tokenizer, items, pairs, min(lm.max_seq_length, lm.tokenizer.model_max_length))
    logits = torch.cat(forward_batches(model, lm.tokenizer, encs, batch_size)).numpy()  # (N, L)
    results = []
    for row in logits:
        if fn == "softmax":
            e = np.exp(row - row.max())
            scores = e / e.sum()
        elif fn == "sigmoid":
            scores = 1.0 / (1.0 + np.exp(-row))
        else:
            scores = row
        if top_k == 1:
            results.append({"label": labels[int(scores.argmax())], "score": float(scores.max())})
        else:
            ranked = sorted(({"label": labels[i], "score": float(s)} for i, s in enumerate(scores)),
                            key=lambda d: d["score"], reverse=True)
            results.append(ranked if top_k is None else ranked[:top_k])
    return results[0] if single else results


@row_mean
def classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the label of each input, as BertForSequenceClassification computes it."""
    logits = model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))  # (B, L)
    return F.cross_entropy(logits.float(), batch["labels"])


def predict_label_ids(model: torch.nn.Module, tokenizer, encodings: list, batch_size: int = 32) -> list[int]:
    """argmax label id of each encoding (for accuracy on a split)."""
    return torch.cat(forward_batches(model, tokenizer, encodings, batch_size)).argmax(-1).tolist()
