"""A bidirectional transformer encoder: BERT, RoBERTa, DistilBERT and MiniLM with one block.

A decoder (GPT) reads left to right: token t sees tokens 0..t, so it can generate. An encoder sees the whole
sentence at once: every token attends to every other token, left and right. It cannot generate, but each output
vector describes its token *in context* ("bank" next to "river" differs from "bank" next to "loan"), which is what
classification, named-entity tagging, extractive question answering and sentence embeddings need.

References: Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers" (arXiv:1810.04805);
Liu et al. 2019, "RoBERTa" (arXiv:1907.11692); Sanh et al. 2019, "DistilBERT" (arXiv:1910.01108); Wang et al.
2020, "MiniLM" (arXiv:2002.10957, a small BERT: same architecture, fewer and narrower layers). The code follows
Hugging Face's `modeling_bert.py`, checked against it to 1e-5 in tests/test_encoder.py.

The whole model, for input ids (B, T):

    x = LayerNorm(wte[ids] + wpe[positions] + wtt[token_types])       embeddings           (B, T, C)
    for each of n_layer blocks (post-LN, as in the original Transformer):
        x = LayerNorm(x + Attention(x, padding mask))                   every token sees every real token
        x = LayerNorm(x + down(gelu(up(x))))                            position-wise feed-forward
    pooled = tanh(dense(x[:, 0]))                                       BERT's pooler: the [CLS] vector

Post-LN vs pre-LN: GPT-2 and Llama normalise *before* each sub-layer (x + f(norm(x))), which trains deep stacks
more stably. BERT normalises *after* the residual add (norm(x + f(x))), and the embeddings get their own LayerNorm.
Checkpoints fix this choice, so the encoder implements post-LN only.

How the families differ (all fields of `EncoderConfig`, no subclasses):

    family      token types   positions                          pooler   weight names (formats/bert.py)
    bert        2 (A/B)       0..T-1                             yes      bert.encoder.layer.N.attention.self...
    minilm      = bert (model_type "bert"; only the sizes are small)
    roberta     1 (all zero)  pad+1, pad+2, ... (pads at pad id)  yes      roberta.encoder.layer.N...
    distilbert  none          0..T-1                             no       distilbert.transformer.layer.N...

Why it does not reuse the decoder's `Attention`/`MLP` classes: those carry a KV cache, RoPE, GQA and decode fast
paths that an encoder never uses, and take a decoder `ModelConfig`. The module names are the same (`wte`, `wpe`,
`q_proj`/`k_proj`/`v_proj`/`o_proj`, `up_proj`/`down_proj`, `blocks`), so a reader who knows one knows the other.

Shape notation: B batch, T sequence length, C = n_embd, nh = n_head, hd = C // nh, H = intermediate_size,
V = vocab_size.

Public API (used by lmforge/tasks/, lmforge/encoder_lm.py, lmforge/formats/bert.py):

    config = EncoderConfig(vocab_size=..., n_layer=..., n_head=..., n_embd=..., family="bert")
    enc = Encoder(config)
    h = enc(input_ids, attention_mask=None, token_type_ids=None)           # (B, T, C) last hidden states
    h, hs = enc(input_ids, attention_mask, output_hidden_states=True)      # hs: n_layer + 1 tensors (B, T, C)
    pooled = enc.pool(h)                                                   # (B, C) tanh(dense(h[:, 0])); bert/roberta
    enc.wte                                                                # nn.Embedding (V, C): tie MLM decoders to it

Heads (small modules on top of the hidden states) live in `lmforge.models.heads`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError

FAMILIES = ("bert", "roberta", "distilbert")


@dataclass
class EncoderConfig:
    """The numbers that define an encoder. Field names follow lmforge's decoder vocabulary (n_layer, n_embd)."""

    vocab_size: int = 30522
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int | None = None  # FFN width H; None -> 4 * n_embd
    max_position_embeddings: int = 512  # rows of the position table (RoBERTa: usable length + pad + 1)
    type_vocab_size: int = 2  # token-type (segment A/B) embeddings; RoBERTa 1, DistilBERT 0 (none)
    family: Literal["bert", "roberta", "distilbert"] = "bert"
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"  # FFN non-linearity; BERT's "gelu" is the erf form
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_offset: int = 0  # RoBERTa: pad_token_id + 1 (positions count real tokens from there)
    pooler: bool = True  # BERT/RoBERTa have the [CLS] pooler (dense + tanh); DistilBERT has none
    dropout: float = 0.1  # hidden-state dropout (embeddings, attention output, FFN output)
    attn_dropout: float = 0.1  # dropout on the attention probabilities
    init_std: float = 0.02
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific HF values kept for a faithful export

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown encoder family {self.family!r}; use one of {', '.join(FAMILIES)}")
        if self.activation not in ("gelu", "gelu_tanh", "relu"):
            raise ConfigError(f"unknown encoder activation {self.activation!r}; use gelu, gelu_tanh or relu")
        for k in ("vocab_size", "n_layer", "n_head", "n_embd", "max_position_embeddings"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) <= 0:
                raise ConfigError(f"encoder config {k}={getattr(self, k)!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.type_vocab_size < 0:
            raise ConfigError(f"type_vocab_size={self.type_vocab_size} must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_length(self) -> int:
        """The longest input the position table covers (RoBERTa loses pad_token_id + 1 rows to its offset)."""
        return self.max_position_embeddings - self.position_offset

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown encoder config field {unknown[0]!r}")
        return cls(**d)


def activation_fn(name: str):
    """'gelu' -> erf GELU (BERT), 'gelu_tanh' -> tanh approximation (GPT-2's), 'relu' -> ReLU."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.relu


def position_ids_for(input_ids: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    """Absolute positions for each token.

    BERT/DistilBERT: 0, 1, 2, ... for every row.
    RoBERTa (position_offset = pad + 1 = 2): real tokens count from 2, pads sit at the pad id (1), e.g.
    ids [0, 31414, 2, 1, 1] -> positions [2, 3, 4, 1, 1]. fairseq built it this way; the checkpoints depend on it.
    """
    B, T = input_ids.shape
    if config.position_offset == 0:
        return torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
    real = (input_ids != config.pad_token_id).long()  # (B, T)
    return torch.cumsum(real, dim=1) * real + config.pad_token_id  # (B, T)


class Embeddings(nn.Module):
    """x = LayerNorm(word + position + token type), then dropout.  (B, T) ids -> (B, T, C)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)  # word embeddings
        self.wpe = nn.Embedding(config.max_position_embeddings, C)  # absolute position embeddings
        self.wtt = nn.Embedding(config.type_vocab_size, C) if config.type_vocab_size else None  # token types
        self.ln = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        if position_ids is None:
            position_ids = position_ids_for(input_ids, self.config)  # (B, T)
        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, C)
        if self.wtt is not None:
            if token_type_ids is None:  # a single sentence: every token is segment A (0)
                x = x + self.wtt.weight[0]
            else:
                x = x + self.wtt(token_type_ids)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention: softmax(q k^T / sqrt(hd) + mask) v, with padding keys masked out.

    There is no causal mask: token t attends to tokens after it too. The only mask is the padding mask: in a
    padded batch, no real token may attend to a [PAD] (it would change the result with the batch's padding).
    Rows that *are* padding still compute something; callers ignore them (pooling masks them out).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        C = config.n_embd
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C)
        self.v_proj = nn.Linear(C, C)
        self.o_proj = nn.Linear(C, C)
        self.attn_dropout = config.attn_dropout
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        # mask: (B, 1, 1, T) bool, True = a real key that may be attended to; broadcast over heads and queries
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.drop(self.o_proj(y))


class FeedForward(nn.Module):
    """down(act(up(x))), applied to each position on its own: C -> H -> C."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd)
        self.act = activation_fn(config.activation)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down_proj(self.act(self.up_proj(x))))  # (B, T, H) inside, (B, T, C) out


class EncoderBlock(nn.Module):
    """Post-LN: x = ln_1(x + attn(x)); x = ln_2(x + ffn(x))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, mask))  # (B, T, C)
        x = self.ln_2(x + self.mlp(x))  # (B, T, C)
        return x


class Pooler(nn.Module):
    """BERT's sentence vector: tanh(dense(h[:, 0])), the [CLS] position through one trained layer.

    It was trained for next-sentence prediction, which is why raw [CLS]/pooler vectors make poor sentence
    embeddings without fine-tuning (see docs/encoders.md and lmforge.embeddings).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))  # (B, C)


class Encoder(nn.Module):
    """Embeddings, n_layer post-LN blocks, and (BERT/RoBERTa) the pooler."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layer))
        self.pooler = Pooler(config) if config.pooler else None
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) for linears and embeddings, zero biases, LayerNorm = identity."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=self.config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=self.config.init_std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def wte(self) -> nn.Embedding:
        """The word-embedding table (V, C); the MLM head ties its output layer to it."""
        return self.embeddings.wte

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False):
        """input_ids (B, T); attention_mask (B, T) 1 = real token, 0 = padding; token_type_ids (B, T) 0/1.

        Returns the last hidden states (B, T, C); with output_hidden_states=True, also the list of the embedding
        output and every block's output (n_layer + 1 tensors, as Hugging Face's `hidden_states`).
        """
        if input_ids.dim() != 2:
            raise ConfigError(f"input_ids must be (batch, seq) but has shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.config.max_length:
            raise ConfigError(f"input of {T} tokens is longer than this encoder's {self.config.max_length} "
                              "positions; truncate it (tokenizer truncation=True, max_length=...)")
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, C)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):  # no padding -> no mask (faster)
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T): which keys each query may see
        hidden = [x]
        for block in self.blocks:
            x = block(x, mask)  # (B, T, C)
            if output_hidden_states:
                hidden.append(x)
        return (x, hidden) if output_hidden_states else x

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """BERT's pooler output (B, C) for last hidden states (B, T, C)."""
        if self.pooler is None:
            raise ConfigError(f"a {self.config.family} encoder has no pooler; use the [CLS] vector h[:, 0]")
        return self.pooler(h)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

