"""Task heads: small modules that turn an encoder's hidden states into task outputs.

An encoder gives one vector per token (B, T, C). A task needs something else: a word for each [MASK] (masked-LM),
one label per sentence (classification), one label per token (NER), or where an answer starts and ends in a
passage (extractive QA). Each is a layer or two on top; the encoder below is shared and fine-tuned with it.

    head                           input                      output            used by
    MLMHead(config, wte)           h (B, T, C)                logits (B, T, V)  masked-LM pretraining, fill-mask
    SequenceClassificationHead     h (B, T, C), pooled (B, C) logits (B, L)     sentence / pair classification
    TokenClassificationHead        h (B, T, C)                logits (B, T, L)  NER, POS tagging
    QuestionAnsweringHead          h (B, T, C)                start, end (B, T) extractive QA (SQuAD)

Module names follow the encoder's vocabulary; the Hugging Face names of each (BertForMaskedLM's
`cls.predictions.*`, RobertaForSequenceClassification's `classifier.dense` ...) are in lmforge/formats/bert.py.

The MLM head's output layer is *tied* to the word-embedding table: logits = transform(h) @ wte^T + bias. The same
matrix that maps a token id to a vector maps a vector back to scores over token ids; BERT was trained this way,
and it saves V x C parameters.

Sequence classification differs by family (the checkpoints fix it):
    bert        dropout(pooled) -> classifier              pooled = encoder.pool(h) = tanh(dense(h[:, 0]))
    roberta     h[:, 0] -> dropout -> dense -> tanh -> dropout -> out_proj
    distilbert  h[:, 0] -> pre_classifier -> relu -> dropout -> classifier
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.models.encoder import EncoderConfig, activation_fn


class MLMHead(nn.Module):
    """logits = LayerNorm(act(dense(h))) @ wte^T + bias.  (B, T, C) -> (B, T, V).

    Pass the encoder's `wte` to tie the output layer to it (the normal case); without it the head owns an untied
    (V, C) matrix.
    """

    def __init__(self, config: EncoderConfig, wte: nn.Embedding | None = None):
        super().__init__()
        C, V = config.n_embd, config.vocab_size
        self.dense = nn.Linear(C, C)
        self.act = activation_fn("gelu" if config.family == "roberta" else config.activation)
        self.ln = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(C, V, bias=False)
        if wte is not None:
            self.decoder.weight = wte.weight  # tied: one (V, C) parameter
        self.bias = nn.Parameter(torch.zeros(V))
        nn.init.normal_(self.dense.weight, std=config.init_std)
        nn.init.zeros_(self.dense.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.ln(self.act(self.dense(h)))  # (B, T, C)
        return self.decoder(x) + self.bias  # (B, T, V)


class SequenceClassificationHead(nn.Module):
    """One label per input: logits (B, num_labels). BERT-family heads need `pooled=encoder.pool(h)`."""

    def __init__(self, config: EncoderConfig, num_labels: int, dropout: float | None = None):
        super().__init__()
        if num_labels < 1:
            raise ConfigError(f"num_labels={num_labels} must be >= 1")
        C = config.n_embd
        self.family = config.family
        self.drop = nn.Dropout(config.dropout if dropout is None else dropout)
        if self.family == "bert":
            self.classifier = nn.Linear(C, num_labels)
        elif self.family == "roberta":
            self.dense = nn.Linear(C, C)
            self.out_proj = nn.Linear(C, num_labels)
        else:  # distilbert
            self.pre_classifier = nn.Linear(C, C)
            self.classifier = nn.Linear(C, num_labels)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=config.init_std)
                nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        if self.family == "bert":
            if pooled is None:
                raise ConfigError("a BERT classification head needs pooled=encoder.pool(h)")
            return self.classifier(self.drop(pooled))  # (B, L)
        cls = h[:, 0]  # (B, C): the [CLS] / <s> position
        if self.family == "roberta":
            x = torch.tanh(self.dense(self.drop(cls)))  # (B, C)
            return self.out_proj(self.drop(x))  # (B, L)
        x = F.relu(self.pre_classifier(cls))  # (B, C)
        return self.classifier(self.drop(x))  # (B, L)


class TokenClassificationHead(nn.Module):
    """One label per token (NER): logits = classifier(dropout(h)).  (B, T, C) -> (B, T, num_labels)."""

    def __init__(self, config: EncoderConfig, num_labels: int, dropout: float | None = None):
        super().__init__()
        if num_labels < 1:
            raise ConfigError(f"num_labels={num_labels} must be >= 1")
        self.drop = nn.Dropout(config.dropout if dropout is None else dropout)
        self.classifier = nn.Linear(config.n_embd, num_labels)
        nn.init.normal_(self.classifier.weight, std=config.init_std)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(h))  # (B, T, L)


class QuestionAnsweringHead(nn.Module):
    """Extractive QA: a start score and an end score for every token; the answer is the best span start..end."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.qa_outputs = nn.Linear(config.n_embd, 2)
        nn.init.normal_(self.qa_outputs.weight, std=config.init_std)
        nn.init.zeros_(self.qa_outputs.bias)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.qa_outputs(h)  # (B, T, 2)
        start, end = logits.unbind(dim=-1)  # (B, T) each
        return start, end
