"""T5: an encoder-decoder transformer (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer"), for T5 v1.0 (ReLU feed-forward, tied head) and T5 v1.1 / flan-t5 (gated-GELU, untied).

An encoder-decoder splits the work in two. The encoder reads the whole input with *bidirectional* self-attention
(every input token sees every other one); the decoder writes the output one token at a time with *causal*
self-attention over what it has written so far, plus *cross-attention*: its queries look at the encoder's output.

    input ids (B, S) -> shared embedding -> n x EncoderBlock -> norm  = memory (B, S, C)
    EncoderBlock: x = x + self_attn(norm(x));  x = x + mlp(norm(x))                       (pre-norm residual stream)

    decoder ids (B, T) -> shared embedding -> n x DecoderBlock(memory) -> norm -> (x C^-0.5 when tied) -> lm_head
    DecoderBlock: x = x + causal_self_attn(norm(x));  x = x + cross_attn(norm(x), memory);  x = x + mlp(norm(x))

What is particular to T5:
- **Relative position buckets, no position embeddings.** Attention scores get a learned bias per head that depends
  only on the distance key - query, sorted into buckets: distances 0..7 get a bucket each, larger ones share
  logarithmically wider buckets up to `relative_attention_max_distance` (beyond it, one last bucket). The encoder's
  buckets tell left from right (bidirectional), the decoder's only look back. The bias table lives in the first
  block of each stack and is reused by every block of that stack (`relative_position_bucket`).
- **RMS norm without bias or mean subtraction** (the same `RMSNorm` as Llama, `lmforge.models.decoder`).
- **No 1/sqrt(d_kv) in attention**: the scale is folded into the initialisation of the query weights.
- **One embedding table** (`shared`) for encoder and decoder inputs. v1.0 also uses it as the output head, and then
  scales the decoder output by d_model^-0.5 first; v1.1 and flan-t5 have a separate `lm_head` and no scaling.

Decoding caches two things (`Seq2SeqCache`): the decoder's self-attention keys/values grow by one token per step,
like a decoder-only model's KV cache; the cross-attention keys/values are projections of the encoder output, which
does not change while decoding, so they are computed once per input, at the first step.

Shapes in the comments: B batch, S input (encoder) tokens, T new decoder tokens in this call, L decoder tokens in
the cache before this call, C d_model, nh heads, hd d_kv, F d_ff, V vocab_size, n layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError, GenerationError
from lmforge.models.decoder import RMSNorm

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


@dataclass
class T5Config:
    """The architecture of a T5 model; field names follow Hugging Face's T5Config, so config.json maps 1:1.

    feed_forward_proj: "relu" (T5 v1.0), "gated-gelu" (v1.1, flan-t5), or "gated-<act>" / "<act>" for relu, gelu,
    silu. tie_word_embeddings: the output head is the shared embedding (and the decoder output is scaled by
    d_model^-0.5 before it), as in v1.0; False gives a separate `lm_head` (v1.1).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # HF keys we do not use, kept for a lossless round trip

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"T5 config: {k} must be a positive integer, got {v!r}")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError("T5 config: relative_attention_num_buckets must be >= 4 (half exact, half log-spaced)")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"T5 config: dropout_rate must be in [0, 1), got {self.dropout_rate}")
        self.activation  # validates feed_forward_proj

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The name of the feed-forward activation. HF maps "gated-gelu" to the tanh-approximate GELU (gelu_new)."""
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConfigError(f"T5 config: feed_forward_proj {self.feed_forward_proj!r} is not 'relu', 'gated-gelu', "
                              "'gated-<act>' or '<act>'")
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if act not in ACTIVATIONS:
            raise ConfigError(f"T5 config: activation {act!r} is not one of {', '.join(ACTIVATIONS)}")
        return act

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d.pop("extra"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "T5Config":
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names})


# ----------------------------------------------------------------------------------------------------------------
# Relative position buckets
# ----------------------------------------------------------------------------------------------------------------
def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Map distances (key position - query position) to bucket ids in [0, num_buckets).

    Bidirectional (encoder): half the buckets for keys to the right (distance > 0), half for the left and same place.
    Causal (decoder): only distances <= 0 matter, so all buckets describe how far back the key is.
    Within a half, the first max_exact = buckets/2 distances get a bucket each; larger distances share buckets whose
    width grows logarithmically up to max_distance; everything farther falls into the last bucket.
    >>> relative_position_bucket(torch.tensor([-200, -9, -1, 0, 1, 9, 200]), True, 32, 128)
    tensor([15,  8,  1,  0, 17, 24, 31])
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)  # how far back; keys ahead count as distance 0
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced: max_exact at distance max_exact, num_buckets at max_distance (computed in fp32, as HF does)
    log_bucket = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).long()
    log_bucket = torch.clamp(log_bucket, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """A learned bias per (bucket, head), turned into a (1, nh, T, S) bias for queries at positions q0..q0+T-1
    against keys at 0..S-1."""

    def __init__(self, config: T5Config, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.weight = nn.Parameter(torch.zeros(self.num_buckets, config.num_heads))  # (buckets, nh)

    def forward(self, q_start: int, T: int, S: int) -> torch.Tensor:
        device = self.weight.device
        query = torch.arange(q_start, q_start + T, device=device)[:, None]  # (T, 1)
        key = torch.arange(S, device=device)[None, :]  # (1, S)
        bucket = relative_position_bucket(key - query, self.bidirectional, self.num_buckets, self.max_distance)
        return self.weight[bucket].permute(2, 0, 1)[None]  # (T, S, nh) -> (1, nh, T, S)


# ----------------------------------------------------------------------------------------------------------------
# Attention, feed-forward, blocks
# ----------------------------------------------------------------------------------------------------------------
class Seq2SeqAttention(nn.Module):
    """Multi-head attention for encoder-decoders. Self-attention when `k`/`v` are not given; cross-attention
    otherwise (queries from the decoder, keys/values from the encoder output). T5 has no biases and no 1/sqrt(hd)
    scale (`T5Attention`); BART has both (`lmforge.models.bart`)."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, bias: bool = False, scale: float = 1.0,
                 dropout: float = 0.0):
        super().__init__()
        self.nh, self.hd, self.scale = num_heads, head_dim, scale
        inner = self.nh * self.hd
        self.q = nn.Linear(d_model, inner, bias=bias)
        self.k = nn.Linear(d_model, inner, bias=bias)
        self.v = nn.Linear(d_model, inner, bias=bias)
        self.o = nn.Linear(inner, d_model, bias=bias)
        self.dropout = dropout

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, T, nh*hd) -> (B, nh, T, hd)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k(memory)), self.heads(self.v(memory))  # (B, nh, S, hd) each

    def forward(self, x: torch.Tensor, bias: torch.Tensor, k: torch.Tensor | None = None,
                v: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C) queries' input; bias: (B or 1, nh or 1, T, S) position bias + mask (-large where hidden);
        k, v: (B, nh, S, hd) precomputed keys/values (cache or cross-attention), else projected from x."""
        B, T, _ = x.shape
        q = self.heads(self.q(x))  # (B, nh, T, hd)
        if k is None:
            k, v = self.heads(self.k(x)), self.heads(self.v(x))  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))  # (B, T, C)

    def cached(self, h: torch.Tensor, bias: torch.Tensor, self_kv) -> torch.Tensor:
        """Self-attention of a decoder block while decoding: write this call's keys/values into the cache
        (self_kv = (cache_k, cache_v, L), each (B, nh, max_len, hd) with L tokens already there) and attend to
        all L + T of them. Without a cache (training), plain self-attention."""
        if self_kv is None:
            return self(h, bias)
        cache_k, cache_v, L = self_kv
        T = h.shape[1]
        cache_k[:, :, L:L + T] = self.heads(self.k(h))
        cache_v[:, :, L:L + T] = self.heads(self.v(h))
        return self(h, bias, cache_k[:, :, :L + T], cache_v[:, :, :L + T])


class T5Attention(Seq2SeqAttention):
    """T5's attention: no biases and no 1/sqrt(hd): T5 folds that scale into the initialisation of q."""

    def __init__(self, config: T5Config):
        super().__init__(config.d_model, config.num_heads, config.d_kv, bias=False, scale=1.0,
                         dropout=config.dropout_rate)


class T5FeedForward(nn.Module):
    """relu:  wo(dropout(relu(wi x)))                   (T5 v1.0)
    gated: wo(dropout(act(wi_0 x) * wi_1 x))            (T5 v1.1, flan-t5: GELU-gated, Shazeer 2020)"""

    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.activation]
        self.drop = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # (B, T, F)
        return self.wo(self.drop(h))  # (B, T, C)


class T5Block(nn.Module):
    """Pre-norm residual block; a decoder block has cross-attention between self-attention and feed-forward."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.norm_attn = RMSNorm(config.d_model, eps)
        self.self_attn = T5Attention(config)
        if is_decoder:
            self.norm_cross = RMSNorm(config.d_model, eps)
            self.cross_attn = T5Attention(config)
        self.norm_mlp = RMSNorm(config.d_model, eps)
        self.mlp = T5FeedForward(config)
        self.drop = nn.Dropout(config.dropout_rate)

    def forward(self, x, self_bias, self_kv=None, cross_bias=None, cross_kv=None):
        x = x + self.drop(self.self_attn.cached(self.norm_attn(x), self_bias, self_kv))
        if cross_kv is not None:
            x = x + self.drop(self.cross_attn(self.norm_cross(x), cross_bias, *cross_kv))
        return x + self.drop(self.mlp(self.norm_mlp(x)))  # (B, T, C)


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks, one relative-position bias table shared by its blocks, a final norm."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.is_decoder = is_decoder
        self.rel_bias = RelativePositionBias(config, bidirectional=not is_decoder)
        self.blocks = nn.ModuleList(T5Block(config, is_decoder) for _ in range(n))
        self.norm_f = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.drop = nn.Dropout(config.dropout_rate)


# ----------------------------------------------------------------------------------------------------------------
# The decoding cache
# ----------------------------------------------------------------------------------------------------------------
class Seq2SeqCache:
    """What a decoding step needs besides the new token.

    self_k, self_v:    (n, B, nh, max_len, hd) decoder self-attention keys/values, `length` tokens written
    cross_k, cross_v:  (n, B, nh, S, hd) encoder output projected by each block's cross-attention (once per input)
    memory_mask:       (B, S) True for real input tokens (padding is never attended to)

    `reorder(index)` keeps rows `index` (beam search: each surviving beam continues from its parent's state).
    """

    def __init__(self, model: nn.Module, memory: torch.Tensor, memory_mask: torch.Tensor | None, max_len: int):
        blocks = model.decoder.blocks  # T5 or BART: each block has self_attn and cross_attn (Seq2SeqAttention)
        B, S, _ = memory.shape
        attn = blocks[0].self_attn
        shape = (len(blocks), B, attn.nh, max_len, attn.hd)
        self.self_k = torch.zeros(shape, dtype=memory.dtype, device=memory.device)
        self.self_v = torch.zeros(shape, dtype=memory.dtype, device=memory.device)
        kv = [blk.cross_attn.project_kv(memory) for blk in blocks]  # n x 2 x (B, nh, S, hd)
        self.cross_k = torch.stack([k for k, _ in kv])  # (n, B, nh, S, hd)
        self.cross_v = torch.stack([v for _, v in kv])
        self.memory_mask = (memory_mask.bool() if memory_mask is not None
                            else torch.ones(B, S, dtype=torch.bool, device=memory.device))
        self.length = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.self_k.shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        """Rows become rows[index] (index: (B,) long); the tensors are replaced, not resized."""
        self.self_k, self.self_v = self.self_k[:, index], self.self_v[:, index]
        self.cross_k, self.cross_v = self.cross_k[:, index], self.cross_v[:, index]
        self.memory_mask = self.memory_mask[index]


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) keep-mask -> (B, 1, 1, S) additive bias: 0 where kept, the dtype's lowest value where hidden (HF's
    convention; -inf would give NaN for a row that hides everything)."""
    return (~mask)[:, None, None, :].to(dtype) * torch.finfo(dtype).min


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
class T5(nn.Module):
    """T5ForConditionalGeneration: `forward` for training (teacher forcing), `encode` + `decode` for generation."""

    is_encoder_decoder = True

    def __init__(self, config: T5Config, init_weights: bool = True):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        if init_weights:
            self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        """Mesh TensorFlow's init, as HF's T5: each weight's std makes its outputs start at unit scale."""
        cfg, C, hd, nh = self.config, self.config.d_model, self.config.d_kv, self.config.num_heads
        if isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1.0)
        elif isinstance(m, T5Attention):
            nn.init.normal_(m.q.weight, std=(C * hd) ** -0.5)  # the missing 1/sqrt(hd) lives here
            nn.init.normal_(m.k.weight, std=C ** -0.5)
            nn.init.normal_(m.v.weight, std=C ** -0.5)
            nn.init.normal_(m.o.weight, std=(nh * hd) ** -0.5)
        elif isinstance(m, T5FeedForward):
            for lin in ([m.wi_0, m.wi_1] if m.gated else [m.wi]):
                nn.init.normal_(lin.weight, std=C ** -0.5)
            nn.init.normal_(m.wo.weight, std=cfg.d_ff ** -0.5)
        elif isinstance(m, RelativePositionBias):
            nn.init.normal_(m.weight, std=C ** -0.5)
        elif m is self and self.lm_head is not None:  # apply() visits the model itself last
            nn.init.normal_(self.lm_head.weight, std=1.0)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- encoder ------------------------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids (+ (B, S) mask, 1 = real token) -> (B, S, C) memory for the decoder."""
        B, S = input_ids.shape
        enc = self.encoder
        x = enc.drop(self.shared(input_ids))  # (B, S, C)
        bias = enc.rel_bias(0, S, S)  # (1, nh, S, S) bidirectional buckets
        if attention_mask is not None:
            bias = bias + _mask_bias(attention_mask.bool(), bias.dtype)  # (B, nh, S, S) padding keys hidden
        for blk in enc.blocks:
            x = blk(x, bias)
        return enc.drop(enc.norm_f(x))  # (B, S, C)

    # ---- decoder ------------------------------------------------------------------------------------------------
    def new_cache(self, memory: torch.Tensor, memory_mask: torch.Tensor | None, max_len: int) -> Seq2SeqCache:
        """An empty decoding cache for `max_len` decoder tokens; cross-attention keys/values computed here, once."""
        return Seq2SeqCache(self, memory, memory_mask, max_len)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor | None = None,
               memory_mask: torch.Tensor | None = None, cache: Seq2SeqCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) for decoder tokens (B, T) given the encoder memory (B, S, C) and its mask (B, S).

        With a `cache`, the T tokens continue the cached ones (positions L..L+T-1) and memory comes from the
        cache's precomputed cross-attention keys/values; without, they start at position 0 (training).
        """
        dec = self.decoder
        B, T = decoder_input_ids.shape
        L = cache.length if cache is not None else 0
        if cache is not None:
            if cache.batch_size != B:
                raise GenerationError(f"decoder cache holds {cache.batch_size} rows but the input has {B}")
            if L + T > cache.max_len:
                raise GenerationError(f"{L + T} decoder tokens exceed the cache size {cache.max_len}")
            memory_mask = cache.memory_mask
        elif memory is None:
            raise GenerationError("decode needs the encoder memory or a cache holding it")
        x = dec.drop(self.shared(decoder_input_ids))  # (B, T, C)
        # self-attention: causal buckets plus the causal mask, queries at L..L+T-1 against keys 0..L+T-1
        self_bias = dec.rel_bias(L, T, L + T)  # (1, nh, T, L+T)
        causal = torch.arange(L + T, device=x.device)[None, :] <= torch.arange(L, L + T, device=x.device)[:, None]
        self_bias = self_bias.masked_fill(~causal, torch.finfo(self_bias.dtype).min)
        # cross-attention: no position bias in T5, only the input's padding mask
        if memory_mask is None:
            memory_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=x.device)
        cross_bias = _mask_bias(memory_mask.bool(), x.dtype)  # (B, 1, 1, S)
        for i, blk in enumerate(dec.blocks):
            if cache is not None:
                x = blk(x, self_bias, (cache.self_k[i], cache.self_v[i], L), cross_bias,
                        (cache.cross_k[i], cache.cross_v[i]))
            else:
                x = blk(x, self_bias, None, cross_bias, blk.cross_attn.project_kv(memory))
        if cache is not None:
            cache.length = L + T
        x = dec.drop(dec.norm_f(x))  # (B, T, C)
        if self.lm_head is None:  # tied head: rescale so the logits keep the scale the tied embedding expects
            return F.linear(x * self.config.d_model ** -0.5, self.shared.weight)  # (B, T, V)
        return self.lm_head(x)  # (B, T, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V) for every decoder position. Give `decoder_input_ids`, or `labels`
        (B, T) (-100 = ignored) and the decoder input is labels shifted right behind the start token."""
        if decoder_input_ids is None:
            if labels is None:
                raise GenerationError("T5 forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """[[a, b, c]] -> [[start, a, b]]; ignored labels (-100) become padding. The decoder predicts labels[t]
        from start + labels[:t]."""
        out = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        out[:, 1:] = labels[:, :-1]
        return out.masked_fill(out == -100, self.config.pad_token_id)


def seq2seq_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (labels -100 are ignored): the loss_fn for `training.loop.train`.
    batch: input_ids (B, S), attention_mask (B, S), labels (B, T)."""
    logits = model(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"])  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
