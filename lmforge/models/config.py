"""`ModelConfig`: every architecture lmforge runs is one set of these numbers and switches.

GPT-2, Llama, Qwen2 and Mistral are the same decoder-only transformer with different choices:

| field             | GPT-2          | Llama 2/3      | Qwen2          | Mistral        |
|-------------------|----------------|----------------|----------------|----------------|
| pos_embedding     | learned        | rope           | rope           | rope           |
| norm              | layernorm      | rmsnorm        | rmsnorm        | rmsnorm        |
| mlp               | gelu (tanh)    | swiglu         | swiglu         | swiglu         |
| n_kv_head         | = n_head (MHA) | < n_head (GQA) | < n_head (GQA) | < n_head (GQA) |
| qkv_bias / o_bias | yes / yes      | no / no        | yes / no       | no / no        |
| mlp_bias          | yes            | no             | no             | no             |
| tied lm_head      | yes            | 3.2: yes       | small: yes     | no             |

Mixture-of-experts families are the same again with `num_experts > 0`: each block's MLP becomes a router and
`num_experts` SwiGLU experts, of which each token uses `num_experts_per_tok` (see `SparseMoE` in
`lmforge.models.decoder`). The MoE fields are named as Hugging Face names them:

| field                           | Mixtral 8x7B      | Qwen1.5-MoE-A2.7B  |
|---------------------------------|-------------------|--------------------|
| num_experts                     | 8                 | 60                 |
| num_experts_per_tok             | 2                 | 4                  |
| moe_intermediate_size           | = intermediate    | 1408               |
| norm_topk_prob                  | yes               | no                 |
| shared_expert_intermediate_size | 0 (none)          | 5632 (sigmoid gate)|
| qkv_bias                        | no                | yes                |

Presets are data (a table of dicts), not code: `ModelConfig.from_name("gpt2")`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # context length: the most positions the model is trained/used with
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None -> n_head (multi-head); 1 -> multi-query; in between -> grouped-query
    head_dim: int | None = None  # None -> n_embd // n_head (some checkpoints use a different size)
    intermediate_size: int | None = None  # MLP hidden width; None -> 4*n_embd (gelu) or Llama's 8/3 rule (swiglu)
    pos_embedding: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    qkv_bias: bool = False  # bias on the q/k/v projections (GPT-2, Qwen2)
    o_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases in the MLP (GPT-2)
    tie_word_embeddings: bool = True  # lm_head shares the token-embedding matrix
    sliding_window: int | None = None  # Mistral: each token sees at most this many previous positions
    dropout: float = 0.0
    init_std: float = 0.02
    # Mixture of experts (Mixtral, Qwen2-MoE): num_experts > 0 replaces every block's MLP by a sparse MoE layer
    num_experts: int = 0  # experts per layer; 0 = the dense MLP
    num_experts_per_tok: int = 2  # top-k: how many experts each token is sent to
    moe_intermediate_size: int | None = None  # each expert's hidden width; None -> intermediate_size (Mixtral)
    norm_topk_prob: bool = True  # rescale the k chosen router probabilities to sum to 1 (Mixtral yes, Qwen2-MoE no)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one always-on, sigmoid-gated expert this wide; 0 = none
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss added to the training loss
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific values kept for a faithful export

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            if self.mlp == "swiglu":  # Llama: 2/3 of 4*d, rounded up to a multiple of 256
                hidden = int(2 * 4 * self.n_embd / 3)
                self.intermediate_size = 256 * ((hidden + 255) // 256)
            else:
                self.intermediate_size = 4 * self.n_embd
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.pos_embedding not in ("learned", "rope"):
            raise ConfigError(f"pos_embedding must be 'learned' or 'rope', got {self.pos_embedding!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ConfigError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ConfigError(f"num_experts must be 0 (a dense MLP) or a positive integer, got {self.num_experts!r}")
        if self.num_experts:
            if self.moe_intermediate_size is None:
                self.moe_intermediate_size = self.intermediate_size
            if self.mlp != "swiglu":
                raise ConfigError(f"mixture-of-experts layers use SwiGLU experts; set mlp='swiglu' (got {self.mlp!r})")
            if not isinstance(self.num_experts_per_tok, int) or not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"num_experts_per_tok must be between 1 and num_experts={self.num_experts}, "
                                  f"got {self.num_experts_per_tok!r}")
            if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
                raise ConfigError(f"moe_intermediate_size must be a positive integer, got "
                                  f"{self.moe_intermediate_size!r}")
            if not isinstance(self.shared_expert_intermediate_size, int) or self.shared_expert_intermediate_size < 0:
                raise ConfigError("shared_expert_intermediate_size must be 0 (no shared expert) or a positive integer, "
                                  f"got {self.shared_expert_intermediate_size!r}")
            if not self.router_aux_loss_coef >= 0:
                raise ConfigError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")

    # ---- sizes -------------------------------------------------------------------------------------------------
    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count computed from the numbers alone (no model built). `active=True` counts, for a mixture
        of experts, only the weights one token passes through (router, its k experts, the shared expert)."""
        C, V, L, hd = self.n_embd, self.vocab_size, self.n_layer, self.head_dim
        q, kv = self.n_head * hd, self.n_kv_head * hd
        attn = C * (q + 2 * kv) + q * C + (q + 2 * kv) * self.qkv_bias + C * self.o_bias
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = n_mats * C * self.intermediate_size + (self.intermediate_size + C) * self.mlp_bias
        if self.num_experts:
            used = self.num_experts_per_tok if active else self.num_experts
            shared = self.shared_expert_intermediate_size
            mlp = (C * self.num_experts + used * 3 * C * self.moe_intermediate_size  # router + experts
                   + (3 * C * shared + C if shared else 0))  # shared expert + its gate
        norm = C * (2 if self.norm == "layernorm" else 1)
        total = L * (attn + mlp + 2 * norm) + norm
        emb = V * C + (self.block_size * C if self.pos_embedding == "learned" else 0)
        head = 0 if self.tie_word_embeddings else V * C
        return total + (emb + head if include_embeddings else 0)

    # ---- (de)serialization ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown ModelConfig field {unknown[0]!r}{hint}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset, optionally with fields overridden: `ModelConfig.from_name("gpt2", block_size=256)`."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; presets: {', '.join(PRESETS)}"
            raise ConfigError(f"unknown model preset {name!r}{hint}")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides})


_GPT2 = dict(vocab_size=50257, block_size=1024, pos_embedding="learned", norm="layernorm", mlp="gelu",
             qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True)
_LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, o_bias=False, mlp_bias=False)

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 family (Radford et al. 2019); 124M is the course's model.
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # Small GPT/Llama shapes for CPU training (vocab set by the tokenizer you train).
    "gpt-tiny": dict(_GPT2, vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "gpt-small": dict(_GPT2, vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_embd=384),
    "llama-tiny": dict(_LLAMA, vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                       intermediate_size=384, norm_eps=1e-5, tie_word_embeddings=True),
    "llama-small": dict(_LLAMA, vocab_size=8192, block_size=512, n_layer=8, n_head=8, n_kv_head=4, n_embd=384,
                        intermediate_size=1024, norm_eps=1e-5, tie_word_embeddings=True),
    # Hugging Face families (shapes of the public checkpoints).
    "llama-2-7b": dict(_LLAMA, vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_kv_head=32, n_embd=4096,
                       intermediate_size=11008, norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3.2-1b": dict(_LLAMA, vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_kv_head=8,
                         n_embd=2048, intermediate_size=8192, norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(_LLAMA, vocab_size=128256, block_size=131072, n_layer=32, n_head=32, n_kv_head=8,
                         n_embd=4096, intermediate_size=14336, norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(_LLAMA, vocab_size=151936, block_size=32768, n_layer=24, n_head=14, n_kv_head=2,
                         n_embd=896, intermediate_size=4864, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_LLAMA, vocab_size=151936, block_size=32768, n_layer=28, n_head=12, n_kv_head=2,
                         n_embd=1536, intermediate_size=8960, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                         tie_word_embeddings=True),
    "mistral-7b": dict(_LLAMA, vocab_size=32768, block_size=32768, n_layer=32, n_head=32, n_kv_head=8,
                       n_embd=4096, intermediate_size=14336, norm_eps=1e-5, rope_theta=1000000.0,
                       tie_word_embeddings=False),
    # Mixture of experts: Mixtral's block (top-2 of 8 SwiGLU experts) in a CPU-sized model. Each expert is half
    # llama-tiny's MLP, so a token's compute matches llama-tiny's while the MLP holds 4x the weights.
    "mixtral-tiny": dict(_LLAMA, vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                         intermediate_size=192, norm_eps=1e-5, tie_word_embeddings=True, num_experts=8,
                         num_experts_per_tok=2, router_aux_loss_coef=0.01),
    "mixtral-8x7b": dict(_LLAMA, vocab_size=32000, block_size=32768, n_layer=32, n_head=32, n_kv_head=8,
                         n_embd=4096, intermediate_size=14336, norm_eps=1e-5, rope_theta=1000000.0,
                         tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02),
    "tinyllama-1.1b": dict(_LLAMA, vocab_size=32000, block_size=2048, n_layer=22, n_head=32, n_kv_head=4,
                           n_embd=2048, intermediate_size=5632, norm_eps=1e-5, tie_word_embeddings=False),
}
