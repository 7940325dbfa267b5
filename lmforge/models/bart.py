"""BART: a denoising encoder-decoder (Lewis et al. 2019, "BART: Denoising Sequence-to-Sequence Pre-training for
Natural Language Generation, Translation, and Comprehension"), and mBART's pre-norm variant (Liu et al. 2020).

BART is pretrained by corrupting text (masking spans, deleting and shuffling sentences) and training the decoder
to write the original back. The shape is T5's (`lmforge.models.t5`): an encoder reads the input bidirectionally,
a decoder writes the output causally and cross-attends to the encoder's output, and decoding reuses T5's cache
(`Seq2SeqCache`: self-attention keys/values grow by one token per step, cross-attention keys/values are computed
once per input). The blocks differ in five places, each a choice of the paper's time:

    input ids -> shared embedding (x sqrt(C) if scale_embedding) + learned position -> LayerNorm -> n x block
    EncoderBlock (post-LN, BART):  x = LN(x + self_attn(x));  x = LN(x + fc2(gelu(fc1(x))))
    DecoderBlock (post-LN, BART):  x = LN(x + causal_self_attn(x));  x = LN(x + cross_attn(x, memory));
                                   x = LN(x + fc2(gelu(fc1(x))))
    logits = x @ shared^T + final_logits_bias

- **Learned absolute positions** (`embed_positions`, as BERT and GPT-2), not T5's relative buckets. The table has
  two extra rows: position p reads row p + 2 (fairseq reserved the first rows for padding, and the checkpoints
  kept the layout).
- **Post-LN with LayerNorm** (mean and variance, weight and bias), as the original Transformer and BERT: the
  residual sum is normalised after each sub-layer. `layernorm_embedding` normalises the embeddings before the first
  block. mBART (`pre_norm`) moves to pre-LN, T5's order, and adds a final LayerNorm to each stack, which
  trains more stably at depth.
- **Biases everywhere** and the usual 1/sqrt(head_dim) attention scale (T5 drops both).
- **GELU** feed-forward (`activation_function`), no gating.
- **Tied output head with a bias**: the logits use the shared embedding and add `final_logits_bias` (a (1, V)
  buffer, zeros in the released checkpoints, kept so files round-trip). `scale_embedding` multiplies the input
  embeddings by sqrt(d_model) (mBART, Marian) or not (BART).

Generation starts the decoder from `decoder_start_token_id` (`</s>` for BART) and the checkpoints ask generation
to force `<s>` as the first token (`forced_bos_token_id`) and `</s>` at the length limit (`forced_eos_token_id`):
`lmforge.seq2seq_lm` applies those rules, the model only computes logits.

Shapes in the comments: B batch, S input tokens, T new decoder tokens, L decoder tokens already cached, C d_model,
nh heads, hd head size, F ffn size, V vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError, GenerationError
from lmforge.models.t5 import ACTIVATIONS, Seq2SeqAttention, Seq2SeqCache, _mask_bias

POSITION_OFFSET = 2  # BART's learned positions: position p is row p + 2 of embed_positions


@dataclass
class BartConfig:
    """The architecture of a BART (or mBART) model; field names follow Hugging Face's BartConfig, so config.json
    maps 1:1, except `pre_norm`: pre-LN blocks and a final LayerNorm per stack (model_type "mbart"); False is
    BART's post-LN (transformers' BART is always post-LN, whatever an old config's "normalize_before" says)."""

    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = False
    pre_norm: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2
    model_type: str = "bart"
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # HF keys we do not use, kept for a lossless round trip

    def __post_init__(self):
        for k in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                  "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"BART config: {k} must be a positive integer, got {v!r}")
        for k in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, k):
                raise ConfigError(f"BART config: d_model {self.d_model} is not divisible by {k} {getattr(self, k)}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"BART config: activation_function {self.activation_function!r} is not one of "
                              f"{', '.join(ACTIVATIONS)}")
        for k in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ConfigError(f"BART config: {k} must be in [0, 1), got {getattr(self, k)}")

    @property
    def feed_forward_proj(self) -> str:  # what Seq2SeqLM prints for the model's feed-forward
        return self.activation_function

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d.pop("extra"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BartConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names})


class BartBlock(nn.Module):
    """One encoder or decoder layer; post-LN (BART) or pre-LN (mBART). Sub-layer names follow T5Block's so the
    decoding cache and the generation code serve both families."""

    def __init__(self, config: BartConfig, is_decoder: bool):
        super().__init__()
        C = config.d_model
        nh = config.decoder_attention_heads if is_decoder else config.encoder_attention_heads
        ffn = config.decoder_ffn_dim if is_decoder else config.encoder_ffn_dim
        hd = C // nh

        def attention():
            return Seq2SeqAttention(C, nh, hd, bias=True, scale=hd ** -0.5, dropout=config.attention_dropout)

        self.pre_norm = config.pre_norm
        self.self_attn, self.norm_attn = attention(), nn.LayerNorm(C)
        if is_decoder:
            self.cross_attn, self.norm_cross = attention(), nn.LayerNorm(C)
        self.fc1, self.fc2 = nn.Linear(C, ffn), nn.Linear(ffn, C)
        self.norm_mlp = nn.LayerNorm(C)
        self.act = ACTIVATIONS[config.activation_function]
        self.drop = nn.Dropout(config.dropout)
        self.act_drop = nn.Dropout(config.activation_dropout)

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, sublayer) -> torch.Tensor:
        """Post-LN: LN(x + f(x)). Pre-LN: x + f(LN(x))."""
        if self.pre_norm:
            return x + self.drop(sublayer(norm(x)))
        return norm(x + self.drop(sublayer(x)))

    def forward(self, x, self_bias, self_kv=None, cross_bias=None, cross_kv=None):
        x = self._residual(x, self.norm_attn, lambda h: self.self_attn.cached(h, self_bias, self_kv))
        if cross_kv is not None:
            x = self._residual(x, self.norm_cross, lambda h: self.cross_attn(h, cross_bias, *cross_kv))
        return self._residual(x, self.norm_mlp, lambda h: self.fc2(self.act_drop(self.act(self.fc1(h)))))


class BartStack(nn.Module):
    """The encoder or the decoder: learned positions, the embedding LayerNorm, blocks (and mBART's final norm)."""

    def __init__(self, config: BartConfig, is_decoder: bool):
        super().__init__()
        n = config.decoder_layers if is_decoder else config.encoder_layers
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.d_model)
        self.norm_emb = nn.LayerNorm(config.d_model)
        self.blocks = nn.ModuleList(BartBlock(config, is_decoder) for _ in range(n))
        self.norm_f = nn.LayerNorm(config.d_model) if config.pre_norm else None
        self.drop = nn.Dropout(config.dropout)

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """(B, T, C) token embeddings (already scaled) at positions start..start+T-1 -> the first block's input."""
        T = tokens.shape[1]
        pos = torch.arange(start, start + T, device=tokens.device) + POSITION_OFFSET
        return self.drop(self.norm_emb(tokens + self.embed_positions(pos)[None]))  # (B, T, C)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_f(x) if self.norm_f is not None else x


class Bart(nn.Module):
    """BartForConditionalGeneration (and MBartForConditionalGeneration): `forward` for training, `encode` +
    `decode` + `new_cache` for generation, the same interface as `lmforge.models.t5.T5`."""

    is_encoder_decoder = True

    def __init__(self, config: BartConfig, init_weights: bool = True):
        super().__init__()
        self.config = config
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = BartStack(config, is_decoder=False)
        self.decoder = BartStack(config, is_decoder=True)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size,
                                                                         bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        if init_weights:
            self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        """HF's BART init: normal(0, init_std) weights, zero biases, unit LayerNorms."""
        std = self.config.init_std
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- encoder ------------------------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids (+ (B, S) mask, 1 = real token) -> (B, S, C) memory for the decoder."""
        enc = self.encoder
        x = enc.embed(self.shared(input_ids) * self.embed_scale, 0)  # (B, S, C)
        bias = torch.zeros(1, 1, 1, input_ids.shape[1], dtype=x.dtype, device=x.device)
        if attention_mask is not None:
            bias = _mask_bias(attention_mask.bool(), x.dtype)  # (B, 1, 1, S): padding keys hidden
        for blk in enc.blocks:
            x = blk(x, bias)
        return enc.finish(x)  # (B, S, C)

    # ---- decoder ------------------------------------------------------------------------------------------------
    def new_cache(self, memory: torch.Tensor, memory_mask: torch.Tensor | None, max_len: int) -> Seq2SeqCache:
        """An empty decoding cache for `max_len` decoder tokens; cross-attention keys/values computed here, once."""
        if max_len > self.config.max_position_embeddings:
            raise GenerationError(f"{max_len} decoder positions exceed BART's max_position_embeddings "
                                  f"{self.config.max_position_embeddings}")
        return Seq2SeqCache(self, memory, memory_mask, max_len)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor | None = None,
               memory_mask: torch.Tensor | None = None, cache: Seq2SeqCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) for decoder tokens (B, T) given the encoder memory (B, S, C) and its mask (B, S).
        With a `cache`, the T tokens continue the cached ones (positions L..L+T-1); without, they start at 0."""
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
        if L + T > self.config.max_position_embeddings:
            raise GenerationError(f"decoder position {L + T} is past BART's max_position_embeddings "
                                  f"{self.config.max_position_embeddings}")
        x = dec.embed(self.shared(decoder_input_ids) * self.embed_scale, L)  # (B, T, C)
        # causal self-attention: queries at L..L+T-1 see keys 0..L+T-1 up to their own position
        causal = torch.arange(L + T, device=x.device)[None, :] <= torch.arange(L, L + T, device=x.device)[:, None]
        self_bias = torch.zeros(T, L + T, dtype=x.dtype, device=x.device).masked_fill(
            ~causal, torch.finfo(x.dtype).min)[None, None]  # (1, 1, T, L+T)
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
        x = dec.finish(x)  # (B, T, C)
        head = self.shared.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head) + self.final_logits_bias.to(x.dtype)  # (B, T, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V). Give `decoder_input_ids`, or `labels` (B, T) (-100 = ignored), and
        the decoder input is labels shifted right behind the start token."""
        if decoder_input_ids is None:
            if labels is None:
                raise GenerationError("BART forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """[[a, b, c]] -> [[start, a, b]]; ignored labels (-100) become padding (HF's shift_tokens_right).
        mBART starts each row with its labels' last real token instead (the target language code)."""
        pad = self.config.pad_token_id
        labels = labels.masked_fill(labels == -100, pad)
        out = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        out[:, 1:] = labels[:, :-1]
        if self.config.model_type == "mbart":
            last = (labels.ne(pad).sum(dim=1) - 1).clamp(min=0)[:, None]  # (B, 1) index of the last real token
            out[:, 0] = labels.gather(1, last)[:, 0]
        return out
