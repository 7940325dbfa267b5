"""The fast decode steps: speed code kept beside the readable model, chosen explicitly by the decode loop.

`Transformer.forward` (lmforge.models.decoder) is the reference: every step here computes what
`model(ids, kv_cache=cache)` computes for one new token per row, to float rounding, and tests/test_decode_fused.py
and tests/test_generate_compile.py hold them to it. Two steps, for two situations:

* `fused_step`: eager, a dense cache (every row holds the same number of tokens: one prompt, or equal-length
  prompts). A one-token step multiplies one row of activations by every weight matrix. For a small model that is
  bound by how many tensor ops it launches, not by arithmetic; for a large one by reading the weights from memory.
  `fused_weights(model)` lays the weights out for the step (`DecodeWeights`): a small model's q/k/v (and gate/up)
  projections fused into one matrix (about half the ops), a large model's weights re-laid out in place as
  (in, out) with each product spread over all threads. The step is a flat loop: no module calls, no (B, T, ...)
  reshapes, q and k rotated together.
* `static_decode_step` / `StaticDecoder`: shapes that never change (per-row slots, a validity mask, the whole
  pre-allocated cache attended with a mask), so one `torch.compile` graph serves every step of every request of the
  same (B, cache size); cache sizes are bucketed so a chat or server does not recompile for every new length.

The two differ in what they assume of the cache (dense and eager vs. per-row and compilable), which is why both
exist; merging them into one step is future work (it needs the fused products to compile well).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import kernels
from lmforge.errors import GenerationError
from lmforge.models.decoder import _SDPA_GQA, Block, KVCache, Transformer, apply_rope


# ================================================================================================================
# The fused eager step
# ================================================================================================================
FUSED_DECODE_MAX_PARAMS = 16_000_000  # block weights up to this many elements get fused decode copies
SPLIT_PRODUCT_MIN_WEIGHTS = 1 << 18  # decode products over matrices this large (1 MB in fp32) use every thread


def _projection_groups(block: "Block") -> tuple[tuple[nn.Module, ...], ...]:
    """A block's projections in the order a decode step multiplies them:
    (q, k, v), (o,), (gate, up) or (up,), (down,)."""
    a, mlp = block.attn, block.mlp
    return ((a.q_proj, a.k_proj, a.v_proj), (a.o_proj,),
            (mlp.gate_proj, mlp.up_proj) if mlp.swiglu else (mlp.up_proj,), (mlp.down_proj,))


def decode_product(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """h (B, K) @ w (K, N) [+ b] for a one-token step; w is laid out (in, out) and contiguous.

    A one-row product reads every weight once and does two flops with it: it runs at the speed memory delivers
    the matrix, and a BLAS runs it (a matrix-vector product) on one thread, whatever torch's thread count. With T
    threads a large fp32 matrix is cut along K into T slabs (a view: slab t is rows t*K/T .. (t+1)*K/T - 1), the T
    products (1, K/T) x (K/T, N) run as one batched product, one slab per thread, and the T partial rows are
    summed. The same sums as h @ w, added in another order: equal to float rounding.
    """
    T, (K, N) = torch.get_num_threads(), w.shape
    if T > 1 and K % T == 0 and w.numel() >= SPLIT_PRODUCT_MIN_WEIGHTS and w.dtype == torch.float32 \
            and w.device.type == "cpu" and w.is_contiguous():
        parts = torch.bmm(h.reshape(-1, T, K // T).transpose(0, 1), w.view(T, K // T, N))  # (T, B, N)
        y = parts.sum(0)  # (B, N)
        return y if b is None else y.add_(b)
    return h @ w if b is None else torch.addmm(b, h, w)


def _products(h: torch.Tensor, parts: list) -> torch.Tensor:
    """h times each (w, b) of `parts`, the outputs side by side: (B, sum of N)."""
    ys = [decode_product(h, w, b) for w, b in parts]
    return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)


def _column_major_(p: nn.Parameter) -> None:
    """Re-lay a (out, in) weight out in memory as (in, out), in place: same Parameter, shape and values; strides
    (1, out). nn.Linear's forward works on it unchanged (x @ W.t() reads a contiguous matrix), and W.t() is the
    (in, out) layout that a one-row product streams fastest."""
    if p.stride() != (1, p.shape[0]):
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, still trainable afterwards
            p.data = kernels.owned(p.data.t()).t()  # a fresh, aligned allocation, never a mapped file


class DecodeWeights:
    """The weights a one-token decode step multiplies, laid out for it: `fused_step` runs on these.

    A decode step multiplies one row of activations by every weight matrix: (1, C) x (C, N) products. Two
    regimes, so two forms:

    * small models (at most FUSED_DECODE_MAX_PARAMS block weights): the step is bound by the number of
      operations, not by arithmetic. stories260K launches dozens of tensor ops per layer, each a few
      microseconds of dispatch for almost no arithmetic. Copies of each block's projections with q, k and v
      concatenated into one (C, nq + 2 nkv) matrix (and gate with up into one (C, 2H)) turn seven products per
      layer into four. The copies cost memory, which a small model can spare.
    * large models on a CPU (`in_place`): the step is bound by reading the weights from memory; a second copy
      would double the memory of exactly the models that are short of it. Instead every projection and the
      output layer are re-laid out in place as (in, out) (see `_column_major_`), the layout a one-row product
      streams fastest here, and `decode_product` spreads each large product over all threads.

    Per block: (qkv, o, mlp_in, down), each a list of (w, b) with w (in, out): one fused entry for the copies, or
    one per projection in place. `head` is the output layer's (w, b) in place, None for the copies (the step calls
    lm_head).
    """

    def __init__(self, model: "Transformer", form: str):
        """`form`: what `DecodeWeights.form(model)` returned, "copies" or "in_place"."""
        self.in_place = form == "in_place"
        if self.in_place:
            for lin in [m for block in model.blocks for g in _projection_groups(block) for m in g] + [model.lm_head]:
                _column_major_(lin.weight)
            self.blocks = [[[(m.weight.t(), m.bias) for m in g] for g in _projection_groups(block)]
                           for block in model.blocks]
            self.head = (model.lm_head.weight.t(), model.lm_head.bias)
        else:
            def fused(linears):  # [(w (in, sum of outs) contiguous, biases concatenated alike or None)]
                w = kernels.owned(torch.cat([lin.weight.detach() for lin in linears]).t())
                b = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
                return [(w, b)]

            self.blocks = [[fused(g) for g in _projection_groups(block)] for block in model.blocks]
            self.head = None
        self.stamp = DecodeWeights.stamp_of(model)

    @staticmethod
    def stamp_of(model: nn.Module) -> tuple:
        """Changes whenever a weight is replaced or updated in place (optimizer steps bump `_version`)."""
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())

    @staticmethod
    def form(model: "Transformer") -> str | None:
        """"copies" (small models), "in_place" (large ones on a CPU) or None: the step needs plain nn.Linear
        projections (no LoRA wrappers, no quantized layers)."""
        linears = [m for block in model.blocks for g in _projection_groups(block) for m in g]
        if any(type(m) is not nn.Linear for m in linears):
            return None
        if sum(m.weight.numel() for m in linears) <= FUSED_DECODE_MAX_PARAMS:
            return "copies"
        head = model.lm_head
        if type(head) is nn.Linear and head.weight.device.type == "cpu":
            return "in_place"
        return None


def fused_weights(model: nn.Module) -> DecodeWeights | None:
    """The model's `DecodeWeights` (made once, remade after the weights change); None when the model is not
    eligible (not a plain `Transformer`, wrapped or quantized projections, weights on the meta device).

    This is an explicit call because it can change the model: for a large model on a CPU it re-lays the weights
    out in place as (in, out), once (see `_column_major_`); values and the Parameters themselves stay the same."""
    if not (isinstance(model, Transformer) and type(model).forward is Transformer.forward):
        return None
    form = DecodeWeights.form(model)
    if form is None:
        return None
    dw = getattr(model, "_decode_weights", None)
    if dw is None or dw.stamp != DecodeWeights.stamp_of(model):
        with torch.no_grad():
            dw = DecodeWeights(model, form)
        model._decode_weights = dw
    return dw

def fused_step_ok(model: nn.Module, cache: KVCache) -> bool:
    """`fused_step` covers the next step of this cache: every row holds the same L tokens (a dense cache), after
    a prefill, inside the cache and the learned positions, every cached token inside the sliding window (if any),
    the cache in the model's dtype, and no dropout to apply."""
    cfg, L = model.config, cache.dense_len
    return (L is not None and 0 < L < cache.max_len and (model.wpe is None or L < cfg.block_size)
            and cache.k.dtype == model.norm_f.weight.dtype
            and not (cfg.sliding_window and L >= cfg.sliding_window) and not (model.training and cfg.dropout))

def fused_step(model: nn.Module, input_ids: torch.Tensor, cache: KVCache, weights: DecodeWeights) -> torch.Tensor:
    """One new token per row on a dense cache, through `weights` (from `fused_weights(model)`): (B, 1) ids ->
    (B, 1, V) logits; the cache gains the new keys and values, exactly as `model(ids, kv_cache=cache)` adds them.

    The same computation as `forward` (the numbers differ only by float rounding: fused products sum in
    another order), written as a flat loop: no module calls, no (B, T, ...) reshapes, q and k rotated together.
    """
    cfg = model.config
    B, nh, nkv, hd = input_ids.shape[0], cfg.n_head, cfg.n_kv_head, cfg.head_dim
    nq, nk = nh * hd, nkv * hd
    L = cache.dense_len
    S = L + 1
    x = model.wte(input_ids[:, 0])  # (B, C)
    if model.wpe is not None:
        x = x + model.wpe.weight[L]
    else:
        cos, sin = model.rope_table(S, x.dtype)
        cos, sin = cos[L], sin[L]  # (hd,) the new position's angles
    gqa = {"enable_gqa": True} if nkv != nh and _SDPA_GQA else {}
    rep = 1 if gqa or nkv == nh else nh // nkv
    for i, (block, (qkv_w, o_w, in_w, down_w)) in enumerate(zip(model.blocks, weights.blocks)):
        h = block.norm_1(x)
        qkv = _products(h, qkv_w)  # (B, nq + 2 nk)
        qk = qkv[:, :nq + nk].view(B, nh + nkv, hd)  # q heads then k heads
        if model.wpe is None:
            qk = apply_rope(qk, cos, sin)
        ck, cv = cache.k[i], cache.v[i]  # (B, nkv, max_len, hd)
        ck[:, :, L] = qk[:, nh:]
        cv[:, :, L] = qkv[:, nq + nk:].view(B, nkv, hd)
        k, v = ck[:, :, :S], cv[:, :, :S]  # (B, nkv, S, hd)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(qk[:, :nh].view(B, nh, 1, hd), k, v, **gqa)  # (B, nh, 1, hd)
        x = x + decode_product(y.view(B, nq), *o_w[0])
        h = block.norm_2(x)
        if block.mlp.swiglu:  # [gate | up] fused, or gate and up apart
            gate, up = (_products(h, in_w).chunk(2, dim=1) if len(in_w) == 1 else
                        (decode_product(h, *wb) for wb in in_w))  # (B, H) each
            h = F.silu(gate) * up
        else:
            h = F.gelu(decode_product(h, *in_w[0]), approximate="tanh")  # (B, H)
        x = x + decode_product(h, *down_w[0])
    cache.key_mask[:, L] = True
    cache.lengths += 1
    cache.positions += 1
    cache.dense_len = S
    x = model.norm_f(x)
    head = weights.head
    return (model.lm_head(x) if head is None else decode_product(x, *head))[:, None]  # (B, 1, V)


# ================================================================================================================
# The static-shape step (one graph for every step, optionally compiled)
# ================================================================================================================
#
# Why eager decoding is slow for small models: a decode step of stories260K is ~300 tiny ops (norms, projections,
# rope, attention per layer), each costing a few microseconds of Python and dispatcher overhead while its actual
# arithmetic takes less. The cure (gpt-fast, Fu et al. 2023) is to hand the whole step to a compiler that fuses
# the elementwise work into a few loops and drops the per-op overhead. A compiler needs the step to look the same
# every time, so the step is written with *static shapes*:
#
#     input ids      (B, 1)                  always one new token per row
#     keys/values    (B, nkv, max_len, hd)   the whole pre-allocated cache, not the first S slots of it
#     mask           (B, 1, 1, max_len)      the cache's `key_mask` (slots written so far): unwritten slots are
#                                            masked out, so attending over all max_len slots == attending over S
#     rope cos/sin   table[position]         a (max_positions, hd) table computed once, indexed per step
#
# Nothing depends on Python integers read back from tensors (no `int(lengths.max())`), so one compiled graph
# (`torch.compile(fullgraph=True, dynamic=False)`) serves every step of every request with the same (B, max_len).
# The cache size is rounded up to a multiple of `STATIC_BUCKET` so requests of similar length share a graph.
# Prefill (T new tokens at once) stays in the eager model: it runs once per request.

STATIC_BUCKET = 128  # cache sizes are rounded up to this, so few distinct shapes (graphs) exist


def static_decode_step(model: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor, k_all: torch.Tensor,
                       v_all: torch.Tensor, key_mask: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor,
                       cos_table: torch.Tensor | None, sin_table: torch.Tensor | None) -> torch.Tensor:
    """One decode step with shapes that never change: (B, 1) ids -> (B, V) logits; updates the cache in place.

    ids (B, 1) the new token of each row; valid (B,) bool, False for a finished row fed padding (it takes no
    position and no later token sees it). k_all/v_all (n_layer, B, nkv, S, hd), key_mask (B, S), lengths (B,),
    positions (B,) are a `KVCache`'s tensors, updated exactly as `Transformer.forward(kv_cache=...)` updates them.
    """
    cfg = model.config
    B = ids.shape[0]
    S = key_mask.shape[1]
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    slot = lengths  # (B,) the slot each row writes this step
    slots = torch.arange(S, device=ids.device)[None, :]  # (1, S)
    key_mask.scatter_(1, slot[:, None], valid[:, None])
    here = slots == slot[:, None]  # (B, S)
    mask = key_mask & (slots <= slot[:, None])  # (B, S) real tokens up to this one
    if cfg.sliding_window:
        mask = mask & (slots > slot[:, None] - cfg.sliding_window)
    mask = (mask | here)[:, None, None, :]  # (B, 1, 1, S); a padding query sees only itself (no NaN)
    pos = positions[:, None]  # (B, 1) position of the new token
    x = model.wte(ids)  # (B, 1, C)
    if model.wpe is not None:
        x = x + model.wpe(pos)
        cos = sin = None
    else:
        cos, sin = cos_table[pos][:, None], sin_table[pos][:, None]  # (B, 1, 1, hd)
    rows = torch.arange(B, device=ids.device)[:, None]  # (B, 1)
    heads = torch.arange(nkv, device=ids.device)[None, :]  # (1, nkv)
    slot_idx = slot[:, None]  # (B, 1)
    gqa = {"enable_gqa": True} if nkv != nh else {}
    for i, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm_1(x)
        q = attn.q_proj(h).view(B, 1, nh, hd).transpose(1, 2)  # (B, nh, 1, hd)
        k = attn.k_proj(h).view(B, 1, nkv, hd).transpose(1, 2)  # (B, nkv, 1, hd)
        v = attn.v_proj(h).view(B, 1, nkv, hd).transpose(1, 2)  # (B, nkv, 1, hd)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # one index_put_ on the whole cache tensor (not a scatter into a per-layer view, which the compiler turns
        # into a copy of the whole cache per layer): write k/v at [layer i, row b, head h, slot[b]]
        where = (torch.full((), i, dtype=torch.long, device=ids.device), rows, heads, slot_idx)
        k_all.index_put_(where, k[:, :, 0].to(k_all.dtype))  # values (B, nkv, hd)
        v_all.index_put_(where, v[:, :, 0].to(v_all.dtype))
        y = torch.nn.functional.scaled_dot_product_attention(
            q, k_all[i].to(q.dtype), v_all[i].to(q.dtype), attn_mask=mask, **gqa)  # (B, nh, 1, hd)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, 1, nh * hd))
        x = x + block.mlp(block.norm_2(x))
    lengths.add_(1)
    positions.add_(valid.long())
    return model.lm_head(model.norm_f(x))[:, -1]  # (B, V)


class StaticDecoder:
    """Runs `static_decode_step` for one model, eagerly or compiled; compiled graphs are kept per (B, max_len).

        dec = StaticDecoder(model, compile=True)
        cache = model.new_cache(B, dec.cache_len(T + steps)); model(prompt, kv_cache=cache)   # eager prefill
        logits = dec.step(next_ids, valid, cache)                                               # (B, V)

    compile=True costs a one-time compile (seconds for a tiny model, about a minute or more for a 124M model on a
    slow CPU; a C++ compiler is needed for torch.compile on CPU). `mode` is passed to torch.compile.
    """

    def __init__(self, model: torch.nn.Module, compile: bool = False, mode: str | None = None):
        # only a weak reference to the model: decoders are kept in a WeakKeyDictionary keyed by the model, and a
        # strong one would keep every model that ever generated alive
        self._model = weakref.ref(model)
        self.compiled = compile
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        ref = self._model

        def fn(*tensors):
            return static_decode_step(ref(), *tensors)

        self._fn = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode) if compile else fn

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    def cache_len(self, needed: int) -> int:
        """The cache size to allocate for `needed` slots: rounded up to STATIC_BUCKET, at most the context window."""
        bs = self.model.config.block_size
        return max(needed, min(bs, -(-needed // STATIC_BUCKET) * STATIC_BUCKET))

    def _rope(self, n: int):
        if self.model.wpe is not None:
            return None, None
        if self._table is None or self._table[0].shape[0] < n:
            size = self.cache_len(n)  # a fixed size per cache size: the compiled graph sees stable shapes
            cos, sin = self.model.rope_table(size, self.model.wte.weight.dtype)
            self._table = (cos[:size], sin[:size])
        return self._table

    def step(self, ids: torch.Tensor, valid: torch.Tensor, cache) -> torch.Tensor:
        """(B, 1) ids, (B,) bool valid -> (B, V) logits; the cache gains one slot per row."""
        cos, sin = self._rope(cache.max_len)
        cache.dense_len = None  # the step keeps per-row lengths only
        args = (ids, valid, cache.k, cache.v, cache.key_mask, cache.lengths, cache.positions, cos, sin)
        if not self.compiled:
            return self._fn(*args)
        try:
            return self._fn(*args)
        except Exception as e:  # e.g. no C++ compiler for Inductor: one line, and how to run without it
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise GenerationError(f"torch.compile of the decode step failed ({type(e).__name__}: {first}); "
                                  f"generate without compile=True") from e


_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def static_decoder(model: torch.nn.Module, compile: bool = False, mode: str | None = None) -> StaticDecoder:
    """The model's StaticDecoder (kept with the model, so compiled graphs are reused across generate calls)."""
    per_model = _DECODERS.setdefault(model, {})
    key = (compile, mode)
    if key not in per_model:
        per_model[key] = StaticDecoder(model, compile=compile, mode=mode)
    return per_model[key]


def supports_static_decode(model: torch.nn.Module) -> bool:
    """The static step needs lmforge's Transformer (not a wrapper with a different forward, e.g. a fake)."""
    return type(model).forward is Transformer.forward and isinstance(model, Transformer)


