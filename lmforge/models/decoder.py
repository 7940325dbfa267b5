"""The transformer: one readable decoder-only model for GPT-2, Llama, Qwen2 and Mistral.

References: GPT-2 (Radford et al. 2019), nanoGPT; Llama (Touvron et al. 2023) for RMSNorm, SwiGLU and RoPE
(Su et al. 2021); GQA (Ainslie et al. 2023). Every family is the same `Block` configured by `ModelConfig`.

Notation for tensor shapes, used in every comment below:
    B  batch size                  T  new tokens in this call (queries)
    S  keys attended to (cached + new)   C  n_embd (model width)
    nh n_head (query heads)        nkv n_kv_head (key/value heads; nh % nkv == 0)
    hd head_dim                    V  vocab_size

What a causal mask hides: token t may attend to tokens 0..t only. Without the mask, training would let each
position copy the very next token it is asked to predict, and the model would learn nothing useful.

How the pieces fit:
    ids (B, T) -> token embedding (+ learned positions for GPT-2) -> n_layer x Block -> final norm -> lm_head
    Block: x = x + attn(norm_1(x));  x = x + mlp(norm_2(x))          (pre-norm residual stream)

The KV cache: when generating, the keys and values of past tokens never change, so we store them (`KVCache`) and
each new token only computes its own q/k/v. The cache keeps a length per batch row, so rows of different lengths
(left-padded batches, or a serving engine's slots) live in one tensor; `key_mask` marks which stored slots hold
real tokens (padding slots are never attended to).

Mixture of experts (`SparseMoE`, used when `config.num_experts > 0`; Mixtral, Qwen2-MoE): the MLP of each block is
replaced by several MLPs ("experts") and a router that sends each token to a few of them. See `SparseMoE`.

This file is the readable model and nothing else: every forward, training or decoding, goes through `forward`.
The fast one-token decode steps (fused weights, a static-shape step for torch.compile) are speed code kept beside
it, in `lmforge.generation.decode`, tested against this forward; callers choose them explicitly.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.models.config import ModelConfig
from lmforge.errors import ConfigError, GenerationError


# ----------------------------------------------------------------------------------------------------------------
# Normalization
# ----------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight. No mean subtraction and no bias (Llama). Computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # (no casts: each op costs microseconds in a small model's decode step)
            return self.weight * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps))  # x*x: pow(2), bitwise
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE)
# ----------------------------------------------------------------------------------------------------------------
def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation speeds theta^(-2i/hd), i = 0..hd/2-1, with optional Llama-3 / linear scaling. (hd/2,)"""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":  # positions divided by `factor` == frequencies divided by it
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, smooth blend in between
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ConfigError(f"unsupported rope_scaling type {kind!r}; lmforge supports 'linear' and 'llama3'")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (the Hugging Face layout: pairs are (i, i + hd/2))."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i+hd/2) pair of x by its position's angle. x: (B, nh, T, hd), cos/sin broadcast to it.

    The textbook form is x * cos + rotate_half(x) * sin. Here `sin` arrives with rotate_half's minus sign already
    folded into its first half ([-sin, sin], see `Transformer._rope`), so the rotation is one `roll` instead of
    chunk + neg + cat: the same numbers bit for bit, fewer and cheaper ops (it matters in a decode step).
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# ----------------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------------
class KVCache:
    """Pre-allocated keys and values for every layer (a static cache: no reallocation while decoding).

    k, v:      (n_layer, B, nkv, max_len, hd)
    lengths:   (B,)          slots written so far in each row
    key_mask:  (B, max_len)  True where the slot holds a real token (False for padding and unwritten slots)
    positions: (B,)          position id the next real token of each row gets

    `cache.rows(i, j)` is a view of rows i..j-1 that shares storage, so a serving engine can prefill one slot
    while others keep their state.

    dense_len: a plain int while every row holds the same number of real tokens and no padding (one prompt, or
    equal-length prompts): the forward then writes slots [dense_len, dense_len + T) and needs no mask and no
    per-row bookkeeping, which is most of a small model's decode step on a CPU. None once rows differ.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.dense_len: int | None = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def rows(self, start: int, stop: int) -> "KVCache":
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths, view.key_mask = self.lengths[start:stop], self.key_mask[start:stop]
        view.positions, view.max_len = self.positions[start:stop], self.max_len
        view.dense_len = None  # the rows' lengths are tracked per row only
        return view

    def reset(self, row: int | None = None) -> None:
        """Forget everything (or one row): the slots are reused, nothing is reallocated."""
        sel = slice(None) if row is None else slice(row, row + 1)
        self.lengths[sel] = 0
        self.key_mask[sel] = False
        self.positions[sel] = 0
        self.dense_len = 0 if row is None or self.batch_size == 1 else None


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # (B, T, V)
    hidden_states: list[torch.Tensor] | None = None  # n_layer + 1 tensors (B, T, C): embeddings, after each block
    attentions: list[torch.Tensor] | None = None  # n_layer tensors (B, nh, T, S) of attention weights


# ----------------------------------------------------------------------------------------------------------------
# Attention and MLP
# ----------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Causal self-attention with multi-head, grouped-query or multi-query heads.

        MHA (nkv == nh)    GQA (1 < nkv < nh)     MQA (nkv == 1)
        q: h h h h         q: h h h h             q: h h h h
        k: h h h h         k:  h   h              k:    h
    Each group of nh/nkv query heads shares one key/value head: a smaller KV cache for the same number of queries.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, nh, nkv, hd = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = nh, nkv, hd
        self.q_proj = nn.Linear(C, nh * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, nkv * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, nkv * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, C, bias=config.o_bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos=None, sin=None, mask=None, is_causal=False, cache=None, layer=0, write_idx=None,
                kv_len=None, need_weights=False):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write the new keys/values at each row's slots, then attend to slots [0, kv_len)
            ck, cv = cache.k[layer], cache.v[layer]  # (B, nkv, max_len, hd)
            if isinstance(write_idx, int):  # dense cache: every row writes slots [write_idx, write_idx + T)
                ck.narrow(2, write_idx, T).copy_(k)
                cv.narrow(2, write_idx, T).copy_(v)
            else:
                idx = write_idx[:, None, :, None].expand(B, self.n_kv_head, T, self.head_dim)  # (B, nkv, T, hd)
                ck.scatter_(2, idx, k.to(ck.dtype))
                cv.scatter_(2, idx, v.to(cv.dtype))
            k, v = ck.narrow(2, 0, kv_len), cv.narrow(2, 0, kv_len)  # (B, nkv, S, hd)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            y, weights = _attention_with_weights(q, k, v, mask, is_causal)
        else:
            gqa = self.n_kv_head != self.n_head
            if gqa and not _SDPA_GQA:  # expand shared kv heads to their query groups
                rep = self.n_head // self.n_kv_head
                k = k.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
                v = v.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
            # torch >= 2.5: SDPA maps each query group to its shared kv head itself (no copies, bitwise the same)
            gqa_arg = {"enable_gqa": True} if gqa and _SDPA_GQA else {}
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                               **gqa_arg)
            weights = None
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        y = self.o_proj(y)
        return (self.resid_dropout(y) if self.dropout else y), weights  # skipping a no-op module saves decode time


_SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa= exists


def _attention_with_weights(q, k, v, mask, is_causal):
    """The explicit softmax(q k^T / sqrt(hd) + mask) v, used when attention maps are asked for."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
    T, S = scores.shape[-2:]
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights  # (B, nh, T, hd), (B, nh, T, S)


class MLP(nn.Module):
    """GPT-2: down(gelu(up(x))).  Llama (SwiGLU): down(silu(gate(x)) * up(x)) — a learned gate per channel.
    `hidden` overrides the width H (a mixture-of-experts layer builds its experts this way)."""

    def __init__(self, config: ModelConfig, hidden: int | None = None):
        super().__init__()
        C, H, bias = config.n_embd, hidden or config.intermediate_size, config.mlp_bias
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(C, H, bias=bias)
        self.up_proj = nn.Linear(C, H, bias=bias)
        self.down_proj = nn.Linear(H, C, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, H)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")  # (B, T, H)
        h = self.down_proj(h)
        return self.dropout(h) if self.dropout.p else h


# ----------------------------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------------------------
# Router logits of every SparseMoE forward, collected while `collect_router_logits` is active in this thread (or
# context): None otherwise, which costs the forward one lookup.
_ROUTER_LOGITS: contextvars.ContextVar[list[torch.Tensor] | None] = contextvars.ContextVar(
    "lmforge_router_logits", default=None)


class SparseMoE(nn.Module):
    """A sparse mixture-of-experts MLP: a router picks `k` of `E` SwiGLU experts for each token.

    References: Shazeer et al. 2017 (sparsely-gated MoE), Fedus et al. 2021 (Switch Transformer: top-1 and the
    load-balancing loss), Jiang et al. 2024 (Mixtral: top-2 of 8 in every block), Qwen1.5-MoE / Qwen2-MoE (many
    small experts plus a shared one). Notation: N = B*T tokens, E experts, k = experts per token, He expert width.

    The idea: a dense MLP spends every one of its weights on every token. An MoE layer holds E MLPs but runs only
    k of them per token, so the model can hold E/k times more MLP weights for the same compute per token (Mixtral
    8x7B: 47B weights, 13B used per token). Which experts a token gets is learned:

        logits = router(x)                      # (N, E)   one linear layer, no bias
        p      = softmax(logits)                # (N, E)   the router's preference over experts
        w, e   = topk(p, k)                     # (N, k)   the k best experts and their probabilities
        w      = w / w.sum(-1)   (norm_topk_prob: Mixtral; Qwen2-MoE keeps the raw probabilities)
        y      = sum_j  w[:, j] * expert_{e[:, j]}(x)
        y     += sigmoid(shared_gate(x)) * shared_expert(x)     (Qwen2-MoE only: one expert every token uses)

    Top-k is not differentiable, but the weights w are: the gradient through w teaches the router which experts
    help a token. Left alone, a router tends to collapse onto a few experts (they train faster, so they win more
    tokens); `load_balancing_loss` is the training term that pushes the load back toward uniform.

    Dispatch: rather than running every expert on every token (E times the compute), the N*k (token, expert)
    assignments are sorted by expert, so each expert runs once on exactly the rows routed to it (a gather), and
    the weighted outputs are added back into their tokens' rows (a scatter-add, `index_add_`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, E = config.n_embd, config.num_experts
        self.num_experts, self.top_k, self.norm_topk_prob = E, config.num_experts_per_tok, config.norm_topk_prob
        self.router = nn.Linear(C, E, bias=False)
        self.experts = nn.ModuleList(MLP(config, hidden=config.moe_intermediate_size) for _ in range(E))
        shared = config.shared_expert_intermediate_size
        self.shared_expert = MLP(config, hidden=shared) if shared else None
        self.shared_expert_gate = nn.Linear(C, 1, bias=False) if shared else None

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, E) router logits -> the k experts of each token (N, k) and their weights (N, k).
        The softmax runs in fp32 (as Hugging Face does), so bf16 logits pick the same experts."""
        probs = router_logits.float().softmax(dim=-1)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k) each, best first
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(router_logits.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C): routing is per token, rows and positions do not matter
        router_logits = self.router(x)  # (N, E)
        record = _ROUTER_LOGITS.get()
        if record is not None:  # training collects them for the load-balancing loss (see collect_router_logits)
            record.append(router_logits)
        weights, experts = self.route(router_logits)  # (N, k) each
        N, k = experts.shape

        # sort the N*k assignments by expert: expert e's rows are then one contiguous slice
        flat = experts.flatten()  # (N*k,) the expert of assignment a = token a // k, choice a % k
        order = flat.argsort(stable=True)  # (N*k,) assignments grouped by expert, tokens in order within a group
        token = order // k  # (N*k,) the token each sorted assignment reads
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # rows per expert
        rows = x[token]  # (N*k, C) each token copied once per expert it goes to
        outs = []
        for expert, chunk, n in zip(self.experts, rows.split(counts), counts):
            if n or self.training:  # (training runs idle experts on no rows too: every weight then has a
                outs.append(expert(chunk))  # gradient, zero, as DDP expects)
        out = torch.cat(outs) * weights.flatten()[order, None]  # (N*k, C) each expert's output, weighted
        y = torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))  # (N, C) each token: sum over its k experts
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # (N, 1) * (N, C)
        return y.view(B, T, C)


@contextlib.contextmanager
def collect_router_logits() -> Iterator[list[torch.Tensor]]:
    """Within the block, each `SparseMoE` forward run by this thread appends its router logits (N, E) to the
    yielded list, first layer first (the load-balancing loss and the router statistics of training read them).

        with collect_router_logits() as router_logits:
            logits = model(ids)
        aux = load_balancing_loss(router_logits, config.num_experts, config.num_experts_per_tok)

    A context variable rather than an attribute on the modules: training on several cores runs one forward per
    thread on the same modules at once, and each thread must get its own forward's logits."""
    logits: list[torch.Tensor] = []
    token = _ROUTER_LOGITS.set(logits)
    try:
        yield logits
    finally:
        _ROUTER_LOGITS.reset(token)


def load_balancing_loss(router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer's auxiliary load-balancing loss (Fedus et al. 2021, eqs. 4-6), as Mixtral trains with.

        f_e = share of the (token, choice) assignments that went to expert e    (counts / N; sums to k)
        P_e = mean router probability of expert e                               (sums to 1)
        loss = E * sum_e f_e * P_e

    f is a count, so it has no gradient; P does, and the product pushes probability away from the experts that are
    already busy. A uniform router with uniform loads gives f_e = k/E, P_e = 1/E and loss = k, the minimum for a
    balanced load; a collapsed router that sends everything to the same k experts gives loss = E.

    router_logits: one (N, E) tensor per MoE layer (N tokens each); the layers are pooled, as in Hugging Face's
    `load_balancing_loss_func`, which this equals. attention_mask (B, T) with N = B*T leaves padding out.
    """
    logits = torch.cat([lg.float() for lg in router_logits])  # (L*N, E) every layer's tokens
    probs = logits.softmax(dim=-1)  # (L*N, E)
    chosen = probs.topk(top_k, dim=-1).indices  # (L*N, k)
    if attention_mask is None:
        keep = torch.ones(probs.shape[0], device=probs.device)  # (L*N,)
    else:
        keep = attention_mask.reshape(-1).float().to(probs.device).repeat(len(router_logits))  # (L*N,)
    counts = torch.zeros(num_experts, device=probs.device).index_add_(
        0, chosen.flatten(), keep.repeat_interleave(top_k))  # (E,) assignments per expert
    n = keep.sum()
    f = counts / n  # (E,) sums to k
    P = (probs * keep[:, None]).sum(dim=0) / n  # (E,) sums to 1
    return num_experts * (f * P).sum()


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = Attention(config)
        self.norm_2 = make_norm(config)
        self.mlp = SparseMoE(config) if config.num_experts else MLP(config)

    def forward(self, x, need_weights=False, **attn_kwargs):
        a, weights = self.attn(self.norm_1(x), need_weights=need_weights, **attn_kwargs)
        x = x + a
        x = x + self.mlp(self.norm_2(x))
        return x, weights


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, init_weights: bool = True):
        """`init_weights=False` skips the random init (used when every tensor is about to be loaded)."""
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_embedding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.pos_embedding == "rope":
            self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)  # (hd/2,)
        else:
            self.inv_freq = None
        if init_weights:
            self.apply(self._init_weights)
            for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def num_params(self, trainable_only: bool = False) -> int:
        """Unique parameters (a tied lm_head is counted once)."""
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_len` tokens (default: the context window)."""
        p = self.norm_f.weight  # device and compute dtype (a quantized wte has no cheap .weight)
        return KVCache(self.config, batch_size, max_len or self.config.block_size,
                       device=device or p.device, dtype=dtype or p.dtype)

    def rope_table(self, n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions 0..n-1, (n, hd) each, kept and grown as needed (decoding reads one row a step).
        The same numbers `_rope` computes, so a cached decode equals the uncached forward bit for bit."""
        table = getattr(self, "_rope_tables", {}).get(dtype)
        if table is None or table[0].shape[0] < n or table[0].device != self.inv_freq.device:
            size = max(n, 2 * table[0].shape[0] if table is not None else 256)
            with torch.inference_mode(False):  # usable outside inference mode too (e.g. under autograd)
                pos = torch.arange(size, device=self.inv_freq.device)[None]  # (1, size)
                cos, sin = self._rope(pos, dtype)
            table = (cos[0, 0], sin[0, 0])
            self._rope_tables = {**getattr(self, "_rope_tables", {}), dtype: table}
        return table

    def _rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for each (row, position): (B, 1, T, hd). Computed in fp32, then cast (as Hugging
        Face does). The sin's first half is negated: the sign `rotate_half` would apply (see `apply_rope`)."""
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()  # (B, T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        return (torch.cat((cos, cos), dim=-1).to(dtype)[:, None],  # (B, 1, T, hd)
                torch.cat((-sin, sin), dim=-1).to(dtype)[:, None])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | ForwardOutput:
        """Logits for every position (B, T, V), or only the last `logits_to_keep` positions.

        input_ids:      (B, T) token ids
        attention_mask: (B, T) 1 for real tokens, 0 for padding (left padding for batched generation)
        position_ids:   (B, T) optional; by default each row counts its real tokens (cached ones included)
        kv_cache:       a `KVCache`: the new tokens are appended to it and attend to everything cached before
        inputs_embeds:  (B, T, C) optional embeddings used instead of looking up input_ids (soft prompts)
        Returns logits, or a `ForwardOutput` when hidden states or attention weights are asked for.
        """
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = x.shape[:2]
        device = x.device
        new_mask = attention_mask.bool() if attention_mask is not None else None  # (B, T)
        if new_mask is not None and new_mask.shape != (B, T):
            raise GenerationError(f"attention_mask shape {tuple(new_mask.shape)} does not match input {(B, T)}")

        # --- positions, and the mask over keys -------------------------------------------------------------
        mask, is_causal, write_idx, kv_len = None, False, None, None
        span = None  # (lo, hi) when every row's positions are lo..hi-1: one slice of the cached position tables
        dense = (kv_cache is not None and kv_cache.dense_len is not None and new_mask is None
                 and position_ids is None)
        if kv_cache is not None and kv_cache.batch_size != B:
            raise GenerationError(f"KV cache holds {kv_cache.batch_size} rows but the input has {B}")
        if dense:  # every row: L real tokens cached, T new ones at slots and positions L..L+T-1
            L = write_idx = kv_cache.dense_len
            kv_len = L + T
            span = (L, kv_len)
            if kv_len > kv_cache.max_len:
                raise GenerationError(f"sequence of {kv_len} tokens exceeds the KV cache size {kv_cache.max_len}")
            if L == 0 and not self.config.sliding_window:
                is_causal = True  # prefill of an empty cache: the fast causal kernel
            elif T > 1 or (self.config.sliding_window and kv_len > self.config.sliding_window):
                slots = torch.arange(kv_len, device=device)  # (S,)
                new = torch.arange(L, kv_len, device=device)[:, None]  # (T, 1)
                causal = slots <= new  # (T, S)
                if self.config.sliding_window:
                    causal &= slots > new - self.config.sliding_window
                mask = causal[None, None]  # (1, 1, T, S)
            # else: one new token that may see every cached slot, no mask at all
        elif kv_cache is not None:
            write_idx = kv_cache.lengths[:, None] + torch.arange(T, device=device)  # (B, T) slot of each new token
            kv_len = int(kv_cache.lengths.max()) + T
            if kv_len > kv_cache.max_len:
                raise GenerationError(f"sequence of {kv_len} tokens exceeds the KV cache size {kv_cache.max_len}")
            valid = new_mask if new_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
            if position_ids is None:
                position_ids = kv_cache.positions[:, None] + valid.long().cumsum(1) - 1  # (B, T)
                position_ids = position_ids.clamp(min=0)
            kv_cache.key_mask.scatter_(1, write_idx, valid)
            keys = kv_cache.key_mask[:, :kv_len]  # (B, S)
            slots = torch.arange(kv_len, device=device)[None, None, :]  # (1, 1, S)
            causal = slots <= write_idx[:, :, None]  # (B, T, S)
            if self.config.sliding_window:
                causal &= slots > write_idx[:, :, None] - self.config.sliding_window
            # a padding query sees only itself (a softmax over nothing would be NaN); real queries never see padding
            mask = (causal & (keys[:, None, :] | (slots == write_idx[:, :, None])))[:, None]  # (B, 1, T, S)
            if T == 1 and not self.config.sliding_window and bool(mask.all()):
                mask = None  # one new token that may see every cached slot: no mask needed
            elif kv_len == T and new_mask is None and not self.config.sliding_window:
                mask, is_causal = None, True  # prefill of an empty cache, no padding: the fast causal kernel
        else:
            if position_ids is None and new_mask is None:
                span = (0, T)  # positions 0..T-1 in every row (training, a plain forward)
            elif position_ids is None:
                position_ids = (new_mask.long().cumsum(1) - 1).clamp(min=0)
            if new_mask is None and not self.config.sliding_window:
                is_causal = True
            else:
                causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
                if self.config.sliding_window:
                    causal = causal.triu(-(self.config.sliding_window - 1))
                mask = causal[None, None]  # (1, 1, T, T)
                if new_mask is not None:
                    mask = mask & new_mask[:, None, None, :]  # (B, 1, T, T)
                    # a fully padded query row would softmax over nothing (NaN): let it see itself
                    mask = mask | torch.eye(T, dtype=torch.bool, device=device)[None, None]

        if span is not None:  # positions lo..hi-1 for every row: a slice of the cached tables, broadcast over rows
            lo, hi = span
            if self.wpe is not None:
                if hi > self.config.block_size:
                    raise GenerationError(f"position {hi - 1} is beyond the context window of "
                                          f"{self.config.block_size}")
                x = x + self.wpe(torch.arange(lo, hi, device=device))  # (B, T, C)
                cos = sin = None
            else:  # the same numbers `_rope` computes, made once rather than every forward
                cos, sin = self.rope_table(hi, x.dtype)
                cos, sin = cos[lo:hi], sin[lo:hi]  # (T, hd), broadcasts to (B, nh, T, hd)
        elif self.wpe is not None:
            if int(position_ids.max()) >= self.config.block_size:
                raise GenerationError(
                    f"position {int(position_ids.max())} is beyond the context window of {self.config.block_size}")
            x = x + self.wpe(position_ids)  # (B, T, C)
            cos = sin = None
        else:
            cos, sin = self._rope(position_ids, x.dtype)  # (B, 1, T, hd)
        if self.drop.p:
            x = self.drop(x)

        hidden, attentions = ([x] if output_hidden_states else None), ([] if output_attentions else None)
        for i, block in enumerate(self.blocks):
            x, w = block(x, need_weights=output_attentions, cos=cos, sin=sin, mask=mask, is_causal=is_causal,
                         cache=kv_cache, layer=i, write_idx=write_idx, kv_len=kv_len)
            if output_hidden_states:
                hidden.append(x)
            if output_attentions:
                attentions.append(w)
        if dense:
            kv_cache.key_mask[:, L:kv_len] = True
            kv_cache.lengths += T
            kv_cache.positions += T
            kv_cache.dense_len = kv_len
        elif kv_cache is not None:
            kv_cache.dense_len = None
            kv_cache.lengths += T
            last = position_ids.masked_fill(~valid, -1).max(1).values + 1  # (B,) next position of each row
            kv_cache.positions.copy_(torch.maximum(kv_cache.positions, last))
        x = self.norm_f(x)  # (B, T, C)
        if output_hidden_states:
            hidden[-1] = x  # as Hugging Face: the last hidden state is after the final norm
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (B, T, V)
        if output_hidden_states or output_attentions:
            return ForwardOutput(logits=logits, hidden_states=hidden, attentions=attentions)
        return logits
