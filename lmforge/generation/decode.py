"""The fast decode step: speed code kept beside the readable model, chosen explicitly by the decode loop.

`Transformer.forward` (lmforge.models.decoder) is the reference: `decode_step` computes what
`model(ids, kv_cache=cache)` computes for one new token per row, to float rounding, and tests/test_decode_step.py
and tests/test_generate_compile.py hold it to that. There is one step, and two things make it fast:

* `DecodeWeights` (`fused_weights(model)`): the weights laid out for a one-token step. A one-token step multiplies
  one row of activations by every weight matrix. For a small model that is bound by how many tensor ops it
  launches, not by arithmetic; for a large one by reading the weights from memory. So a small model's q/k/v (and
  gate/up) projections are fused into one matrix (about half the ops), and a large model's weights are re-laid out
  in place as (in, out) with each product spread over all threads. Laying weights out is an explicit call
  (`Decoder.begin`), never a side effect of `forward`.
* `Decoder(model, compile=True)`: the same step with shapes that never change (per-row slots, a validity mask, the
  whole pre-allocated cache attended with a mask), so one `torch.compile` graph serves every step of every request
  of the same (B, cache size); cache sizes are bucketed so a chat or server does not recompile for every new length.

Eager, the step takes what the caller knows (every row has written the same number of slots; no padding) to attend
to the written slots only and skip the mask; compiled, it takes the model's own modules and static shapes. It is
the same function either way.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from lmforge import kernels
from lmforge.errors import GenerationError
from lmforge.models.decoder import _SDPA_GQA, Block, KVCache, Transformer, apply_rope


# ================================================================================================================
# The weights, laid out for the step
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
            p.data = kernels.owned(p.data.t(), weights=True).t()  # fresh and aligned, never a mapped file


def _no_decode_weights() -> None:
    return None


class DecodeWeights:
    """The weights a one-token decode step multiplies, laid out for it: `decode_step` runs on these.

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
    lm_head). Models the step cannot lay out (LoRA-wrapped or quantized projections) run it through their own
    modules instead (`decode_step` with weights=None).
    """

    def __init__(self, model: "Transformer", form: str):
        """`form`: what `DecodeWeights.form(model)` returned, "copies" or "in_place"."""
        self.in_place = form == "in_place"
        self.program = None  # the native step (`kernels.DecodeProgram`), for form "native"
        if form == "native":
            self.program, self.blocks = _native_program(model)
            self.head = None
        elif self.in_place:
            for lin in [m for block in model.blocks for g in _projection_groups(block) for m in g] + [model.lm_head]:
                _column_major_(lin.weight)
            self.blocks = [[[(m.weight.t(), m.bias) for m in g] for g in _projection_groups(block)]
                           for block in model.blocks]
            self.head = (model.lm_head.weight.t(), model.lm_head.bias)
        else:
            def fused(linears):  # [(w (in, sum of outs) contiguous, biases concatenated alike or None)]
                w = kernels.owned(torch.cat([lin.weight.detach() for lin in linears]).t(), weights=True)
                b = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
                return [(w, b)]

            self.blocks = [[fused(g) for g in _projection_groups(block)] for block in model.blocks]
            self.head = None
        self.stamp = DecodeWeights.stamp_of(model)

    def __reduce__(self):
        # a copied or pickled model does not take these along (they point at the original's tensors, and the
        # native program holds C pointers): it lays its own out on its first decode
        return (_no_decode_weights, ())

    @staticmethod
    def stamp_of(model: nn.Module) -> tuple:
        """Changes whenever a weight is replaced or updated in place (optimizer steps bump `_version`; fused ones
        through `_bump_versions_after_fused_step`)."""
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in [*model.parameters(), *model.buffers()])

    @staticmethod
    def form(model: "Transformer") -> str | None:
        """"native" (the whole step in one C call, see "The native step" below), else "copies" (small models), "in_place" (large
        ones on a CPU) or None: the Python forms need plain nn.Linear projections (no LoRA wrappers, no quantized
        layers)."""
        if NATIVE_STEP and _native_eligible(model):
            return "native"
        linears = [m for block in model.blocks for g in _projection_groups(block) for m in g]
        if any(type(m) is not nn.Linear for m in linears):
            return None
        if sum(m.weight.numel() for m in linears) <= FUSED_DECODE_MAX_PARAMS:
            return "copies"
        head = model.lm_head
        if type(head) is nn.Linear and head.weight.device.type == "cpu":
            return "in_place"
        return None


# ----------------------------------------------------------------------------------------------------------------
# The native step: the whole decode step as one call of lmforge's C kernels
# ----------------------------------------------------------------------------------------------------------------
# `decode_step` below is the definition. For rows that have all written the same number of slots (`dense`: one
# sequence, or a batch of equal-length ones) on a CPU in fp32, the same step runs as one call of
# `lmf_decode_step` (csrc/decode_kernels.c, through `kernels.DecodeProgram`): the products through lmforge's own
# fp32/int8/int4 kernels, the attention through `lmf_attend_one`, the norms and activations as C loops. A GPT-2
# step in Python is ~120 small calls, each a few microseconds of interpreter and dispatcher work; at 2 threads that
# bookkeeping was 1.5-4 ms of a 5-19 ms token, the gap to llama.cpp (see BENCHMARKS.md). fp32 weights stay in
# nn.Linear's own (out, in) layout (the C loop streams rows). Other steps (rows of different lengths, padding,
# torch.compile) take the Python step; with the native form its fp32 products still go through the C kernel.

NATIVE_STEP = True  # tests switch it off to exercise the Python forms


def _native_norm(norm: nn.Module, eps: float) -> tuple | None:
    """(weight, bias or None) of a LayerNorm / RMSNorm the C step computes, or None."""
    from lmforge.models.decoder import RMSNorm

    if type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None and norm.eps == eps \
            and tuple(norm.normalized_shape) == (norm.weight.numel(),):
        return norm.weight, norm.bias
    if type(norm) is RMSNorm and norm.eps == eps:
        return norm.weight, None
    return None


def _native_kind(m: nn.Module) -> str | None:
    """"f32" for a plain fp32 nn.Linear, the kernel scheme for a QuantLinear served by lmforge's gemv kernels."""
    if m._forward_hooks or m._forward_pre_hooks:
        return None
    if type(m) is nn.Linear:
        w = m.weight
        if w.dtype == torch.float32 and w.device.type == "cpu" and (m.bias is None or m.bias.dtype == torch.float32) \
                and kernels.check("f32_gemv", torch.float32, w.shape[1], w.shape[0]):
            return "f32"
        return None
    plan = getattr(m, "_gemv_plan", None)
    if plan is not None and m.use_kernels:
        p = plan()
        return p.scheme if p else None
    return None


def _head_layer(model: "Transformer") -> nn.Module:
    """The layer that computes the logits: the head itself, or for a head tied to a quantized embedding
    (`TiedQuantHead`) the embedding's quantized table."""
    head = model.lm_head
    emb = getattr(head, "_embedding", None)
    if emb is not None and not (head._forward_hooks or head._forward_pre_hooks):
        return emb.table
    return head


def _native_eligible(model: "Transformer") -> bool:
    cfg = model.config
    if kernels.gemv_library() is None or cfg.num_experts or cfg.head_dim > 1024 or cfg.head_dim % 2 or _global_hooks():
        return False
    # (never `.weight` of a quantized embedding or head: that dequantizes the whole table)
    emb = model.wte
    if type(emb) is nn.Embedding:
        if emb.weight.dtype != torch.float32 or emb.weight.device.type != "cpu":
            return False
    elif getattr(emb, "compute_dtype", None) != torch.float32 or model.norm_f.weight.device.type != "cpu":
        return False
    if not kernels.check("attend_one", torch.float32, cfg.head_dim, 1):
        return False
    norms = [model.norm_f] + [n for b in model.blocks for n in (b.norm_1, b.norm_2)]
    if any(_native_norm(n, cfg.norm_eps) is None or n.weight.dtype != torch.float32 for n in norms):
        return False
    for block in model.blocks:
        if type(block.mlp).__name__ != "MLP":
            return False
        for group in _projection_groups(block):
            kinds = {_native_kind(m) for m in group}
            if len(kinds) != 1 or None in kinds:
                return False
    return _native_kind(_head_layer(model)) is not None


class _Bound:
    """A projection group's `kernels.Gemv` with its biases bound: h (B, K) fp32 -> (B, sum of N)."""

    __slots__ = ("gemv", "biases")

    def __init__(self, gemv: kernels.Gemv, biases: list):
        self.gemv, self.biases = gemv, biases

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.gemv(h if h.is_contiguous() else h.contiguous(), self.biases)


def _native_group(group) -> tuple:
    """(Gemv, biases) for one projection group (q|k|v, o, gate|up or up, down) of one kind."""
    if type(group[0]) is nn.Linear:
        with torch.no_grad():
            for m in group:  # nn.Linear's own (out, in) rows, owned and aligned (undoes an earlier (in, out) layout);
                # a loaded weight already is (the loader reads into owned memory): no copy
                if not kernels.is_owned(m.weight):
                    with torch.inference_mode(False):
                        if not m.weight.is_contiguous():
                            m.weight.data = m.weight.data.contiguous()
                        kernels.own_(m, "weight")
        return (kernels.Gemv("f32", [(m.weight.detach(),) for m in group]),
                [None if m.bias is None else m.bias.detach() for m in group])
    plans = [m._gemv_plan() for m in group]
    if not all(p.K == plans[0].K and p.group_size == plans[0].group_size for p in plans):
        raise ValueError("projections of one group differ in shape or group size")
    return (kernels.Gemv(plans[0].scheme, [p.mats[0] for p in plans], plans[0].group_size),
            [m._fp32_bias() for m in group])


def _native_program(model: "Transformer") -> tuple:
    """(the model's `kernels.DecodeProgram`, per block the groups the Python step multiplies when the native one
    does not apply: fp32 groups as `_Bound` C products, quantized ones as their modules)."""
    cfg = model.config
    blocks, fallback = [], []
    for block in model.blocks:
        groups = [_native_group(g) for g in _projection_groups(block)]
        names = dict(zip(("qkv", "o", "inp", "down"), groups))
        blocks.append({"n1": _native_norm(block.norm_1, cfg.norm_eps), "n2": _native_norm(block.norm_2, cfg.norm_eps),
                       **names})
        fallback.append([[_Bound(*p)] if p[0].scheme == "f32" else list(g)
                         for p, g in zip(groups, _projection_groups(block))])
    head = _native_group((_head_layer(model),))
    program = kernels.DecodeProgram(
        blocks, _native_norm(model.norm_f, cfg.norm_eps), head,
        n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, head_dim=cfg.head_dim,
        hidden=blocks[0]["down"][0].K, eps=cfg.norm_eps, swiglu=model.blocks[0].mlp.swiglu,
        rope=model.wpe is None)
    return program, fallback


def _bump_versions_after_fused_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Make a fused optimizer's in-place update visible to `DecodeWeights.stamp_of`.

    The stamp notices an in-place update through the tensor's version counter, which every in-place torch op
    bumps. The fused optimizers (`AdamW(fused=True)`, lmforge's default for training) update the weights inside one
    kernel that does not, so without this a model trained with one would keep decoding with the copies made
    before training (measured: greedy ids of the untrained model after `train`). Registered once for every torch
    optimizer, a global step hook that bumps the counters of a fused optimizer's parameters, as a non-fused step
    does; it changes no value. (Writes through `p.data` bypass the counter too: after those, call
    `model._decode_weights = None`.)"""
    if optimizer.defaults.get("fused"):
        torch.autograd.graph.increment_version([p for g in optimizer.param_groups for p in g["params"]])


register_optimizer_step_post_hook(_bump_versions_after_fused_step)


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

# ================================================================================================================
# The decode step: one function, eager or compiled
# ================================================================================================================
#
# Why eager decoding is slow for small models: a decode step of stories260K is ~300 tiny ops (norms, projections,
# rope, attention per layer), each costing a few microseconds of Python and dispatcher overhead while its actual
# arithmetic takes less. Two cures, and the step below takes both:
#
# * fewer ops: the weights laid out for the step (`DecodeWeights`), a flat loop with no module calls and no
#   (B, T, ...) reshapes, q and k rotated together;
# * a compiler (gpt-fast, Fu et al. 2023) that fuses the elementwise work into a few loops and drops the per-op
#   overhead. A compiler needs the step to look the same every time, so the step can run with *static shapes*:
#
#     input ids      (B, 1)                  always one new token per row
#     keys/values    (B, nkv, max_len, hd)   the whole pre-allocated cache, not the first S slots of it
#     mask           (B, 1, 1, max_len)      the cache's `key_mask` (slots written so far): unwritten slots are
#                                            masked out, so attending over all max_len slots == attending over S
#     rope cos/sin   table[position]         a (max_positions, hd) table computed once, indexed per step
#
#   Nothing depends on Python integers read back from tensors (no `int(lengths.max())`), so one compiled graph
#   (`torch.compile(fullgraph=True, dynamic=False)`) serves every step of every request with the same (B, max_len).
#   The cache size is rounded up to a multiple of `STATIC_BUCKET` so requests of similar length share a graph.
#
# Eager, the caller usually knows more than the tensors say: in `generate` every row has written the same number of
# slots, so the step attends to slots [0, span) only (`span`), and with no padding and no finished row no mask is
# needed at all (`dense`). Prefill (T new tokens at once) stays in the model's forward: it runs once per request.

STATIC_BUCKET = 128  # compiled steps: cache sizes are rounded up to this, so few distinct shapes (graphs) exist


def _run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x), skipping nn.Module.__call__'s hook bookkeeping when there are no hooks to run (neither on m nor
    registered globally): a GPT-2 step calls about 75 modules, and the bookkeeping costs a few microseconds each."""
    if m._forward_hooks or m._forward_pre_hooks or _global_hooks():
        return m(x)
    return m.forward(x)


def _global_hooks() -> bool:
    mod = torch.nn.modules.module
    return bool(getattr(mod, "_global_forward_hooks", None) or getattr(mod, "_global_forward_pre_hooks", None))


def _output_layer(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The step's logits, (B, C) -> (B, V). A plain fp32 nn.Linear on a CPU runs as W (V, C) @ x^T: PyTorch's CPU
    BLAS runs nn.Linear's x @ W^T for a few rows of a large row-major W slowly, on one thread (measured by the serve
    engine on a 50257 x 384 head, 2 threads: 1 row 7.1 -> 1.9 ms, 4 rows 12.2 -> 2.9 ms). A single row goes in
    twice: a matrix times one column takes the one-threaded matrix-vector routine. Same sums, to float rounding."""
    if type(head) is not nn.Linear:  # (not even `.weight`: a quantized head's weight is a dequantized copy)
        return _run(head, x)
    w = head.weight
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and w.is_contiguous() and not torch.compiler.is_compiling()
            and not (head._forward_hooks or head._forward_pre_hooks or _global_hooks())):
        B = x.shape[0]
        cols = (torch.cat((x, x)) if B == 1 else x).t()  # (C, B or 2)
        y = torch.mm(w, cols) if head.bias is None else torch.addmm(head.bias[:, None], w, cols)
        return y.t()[:B]  # (B, V), a transposed view (the samplers take it as it is)
    return _run(head, x)


def _group(h: torch.Tensor, parts: list) -> torch.Tensor:
    """The outputs of one projection group side by side, (B, sum of N): `parts` are (w, b) pairs laid out for
    `decode_product`, or the model's own modules (LoRA-wrapped, quantized, or under torch.compile)."""
    if len(parts) == 1:
        p = parts[0]
        if isinstance(p, _Bound):
            return p(h)
        return _run(p, h) if isinstance(p, nn.Module) else decode_product(h, *p)
    # layers that can run several products on one input in one call (quantized ones, `group_forward`) do so
    grouped = getattr(type(parts[0]), "group_forward", None) if isinstance(parts[0], nn.Module) else None
    if grouped is not None and not torch.compiler.is_compiling():
        y = grouped(h, parts)
        if y is not None:
            return y
    return torch.cat([_run(p, h) if isinstance(p, nn.Module) else decode_product(h, *p) for p in parts], dim=-1)


def decode_step(model: nn.Module, weights: DecodeWeights | None, ids: torch.Tensor, valid: torch.Tensor,
                k_all: torch.Tensor, v_all: torch.Tensor, key_mask: torch.Tensor, lengths: torch.Tensor,
                positions: torch.Tensor, cos_table: torch.Tensor | None, sin_table: torch.Tensor | None,
                span: int | None = None, dense: bool = False) -> torch.Tensor:
    """One new token per row: (B, 1) ids -> (B, V) logits. The cache gains the new keys and values exactly as
    `model(ids, attention_mask=valid[:, None], kv_cache=cache)` adds them, and the logits are that forward's, to
    float rounding (fused products sum in another order).

    weights: the model's `DecodeWeights` (fused copies, or in-place (in, out) views), or None for the model's own
    projection modules. valid (B,): False for a finished row fed padding (it takes no position, and no later token
    sees it). k_all/v_all (n_layer, B, nkv, max_len, hd), key_mask (B, max_len), lengths (B,), positions (B,) are a
    `KVCache`'s tensors. span: attend to slots [0, span) only, when the caller knows every row has written
    span - 1 slots (None: the whole cache, static shapes). dense: every slot in [0, span) holds a real token that
    every row may see (no padding, no finished row, no sliding window cut), so no mask is built.
    """
    cfg = model.config
    program = None if weights is None else weights.program
    if (program is not None and dense and span is not None and k_all.dtype == torch.float32
            and ids.device.type == "cpu" and k_all.is_contiguous() and v_all.is_contiguous()
            and not torch.compiler.is_compiling()):  # the same step, as one C call (see "The native step" above)
        L = span - 1
        x = model.wte(ids[:, 0])  # (B, C)
        if model.wpe is not None:
            x = x + model.wpe.weight[L]
        key_mask[:, L] = True
        rope = model.wpe is None
        logits = program(x.float().contiguous(), k_all, v_all, L, cos_table[L] if rope else None,
                         sin_table[L] if rope else None)
        lengths.add_(1)
        positions.add_(1)
        return logits
    B, nh, nkv, hd = ids.shape[0], cfg.n_head, cfg.n_kv_head, cfg.head_dim
    nq, nk = nh * hd, nkv * hd
    S = key_mask.shape[1] if span is None else span
    # where each row writes this step: eager, the caller's plain int (every row writes slot span - 1, cheap
    # slicing); static, each row's own `lengths` (index tensors, no Python value read back from a tensor)
    L = None if span is None else span - 1
    if L is None:
        slot = lengths[:, None]  # (B, 1)
        key_mask.scatter_(1, slot, valid[:, None])
        rows = torch.arange(B, device=ids.device)[:, None]  # (B, 1)
        heads = torch.arange(nkv, device=ids.device)[None, :]  # (1, nkv)
    else:
        slot = torch.full((B, 1), L, dtype=torch.long, device=ids.device) if not dense else None
        key_mask[:, L] = True if dense else valid
    mask = None
    if not dense:
        slots = torch.arange(S, device=ids.device)[None, :]  # (1, S)
        here = slots == slot  # (B, S)
        mask = key_mask[:, :S] & (slots <= slot)  # (B, S) real tokens up to this one
        if cfg.sliding_window:
            mask = mask & (slots > slot - cfg.sliding_window)
        mask = (mask | here)[:, None, None, :]  # (B, 1, 1, S); a padding query sees only itself (no NaN)
    x = model.wte(ids[:, 0])  # (B, C)
    if model.wpe is not None:
        x = x + (model.wpe.weight[L] if dense else model.wpe(positions))
    elif dense:  # no padding: every row's position is its slot
        cos, sin = cos_table[L], sin_table[L]  # (hd,)
    else:
        cos, sin = cos_table[positions][:, None], sin_table[positions][:, None]  # (B, 1, hd) each row's angles
    cast = k_all.dtype != x.dtype
    # eager, no mask, fp32 on a CPU: the cache writes and the attention of each layer as one call of lmforge's own
    # kernel (kernels.attend_one) instead of a dozen small tensor operations
    one_call = (dense and L is not None and not cast and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.compiler.is_compiling() and kernels.check("attend_one", torch.float32, hd, 1))
    gqa = {"enable_gqa": True} if nkv != nh and _SDPA_GQA else {}
    rep = 1 if gqa or nkv == nh else nh // nkv
    for i, block in enumerate(model.blocks):
        qkv_p, o_p, in_p, down_p = weights.blocks[i] if weights is not None else _projection_groups(block)
        h = _run(block.norm_1, x)
        qkv = _group(h, qkv_p)  # (B, nq + 2 nk)
        qk = qkv[:, :nq + nk].view(B, nh + nkv, hd)  # q heads then k heads
        if model.wpe is None:
            qk = apply_rope(qk, cos, sin)
        k_new, v_new = qk[:, nh:], qkv[:, nq + nk:].view(B, nkv, hd)  # (B, nkv, hd)
        if one_call:
            y = kernels.attend_one(qk[:, :nh], k_new, v_new, k_all[i], v_all[i], L)  # (B, nq)
        else:
            ck, cv = k_all[i], v_all[i]  # (B, nkv, max_len, hd)
            if L is not None:
                ck[:, :, L] = k_new
                cv[:, :, L] = v_new
            else:  # one index_put_ on the whole cache tensor (not a scatter into a per-layer view, which the
                # compiler turns into a copy of the whole cache per layer): write k/v at [layer i, row b, head h,
                # slot[b]]
                where = (torch.full((), i, dtype=torch.long, device=ids.device), rows, heads, slot)
                k_all.index_put_(where, k_new.to(k_all.dtype))
                v_all.index_put_(where, v_new.to(v_all.dtype))
            k, v = ck[:, :, :S], cv[:, :, :S]  # (B, nkv, S, hd)
            if cast:
                k, v = k.to(x.dtype), v.to(x.dtype)
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(qk[:, :nh].reshape(B, nh, 1, hd), k, v, attn_mask=mask,
                                               **gqa).view(B, nq)
        x = x + _group(y, o_p)  # (B, C)
        h = _run(block.norm_2, x)
        if block.mlp.swiglu:  # [gate | up] side by side
            gate, up = _group(h, in_p).chunk(2, dim=-1)  # (B, H) each
            h = F.silu(gate) * up
        else:
            h = F.gelu(_group(h, in_p), approximate="tanh")  # (B, H)
        x = x + _group(h, down_p)
    lengths.add_(1)
    positions.add_(1 if dense else valid.long())
    x = _run(model.norm_f, x)
    head = None if weights is None else weights.head
    return _output_layer(model.lm_head, x) if head is None else decode_product(x, *head)  # (B, V)


class Decoder:
    """Runs `decode_step` for one model, eagerly (through its `DecodeWeights` where it has them) or compiled with
    torch.compile (static shapes; graphs are kept per (B, max_len)).

        dec = decoder_for(model)                     # or decoder_for(model, compile=True)
        dec.begin()                                  # once per generation: (re)lays out the weights if needed
        cache = model.new_cache(B, dec.cache_len(T + steps)); model(prompt, kv_cache=cache)   # eager prefill
        logits = dec.step(next_ids, valid, cache, span=T + 1, dense=True)                     # (B, V)

    compile=True costs a one-time compile (seconds for a tiny model, about a minute or more for a 124M model on a
    slow CPU; a C++ compiler is needed for torch.compile on CPU). `mode` is passed to torch.compile. The compiled
    step always runs static shapes through the model's own modules (`span`/`dense` are ignored).
    """

    def __init__(self, model: torch.nn.Module, compile: bool = False, mode: str | None = None):
        # only a weak reference to the model: decoders are kept in a WeakKeyDictionary keyed by the model, and a
        # strong one would keep every model that ever generated alive
        self._model = weakref.ref(model)
        self.compiled = compile
        self.weights: DecodeWeights | None = None
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        ref = self._model

        def static_step(*tensors):
            return decode_step(ref(), None, *tensors)

        self._compiled = torch.compile(static_step, fullgraph=True, dynamic=False, mode=mode) if compile else None

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    def begin(self) -> "Decoder":
        """Before a generation: the eager step takes the model's decode weights, remade if the weights changed since
        (see `fused_weights`; this may re-lay a large model's weights out in place, once)."""
        if not self.compiled:
            self.weights = fused_weights(self.model)
        return self

    def cache_len(self, needed: int) -> int:
        """The cache size to allocate for `needed` slots: compiled, rounded up to STATIC_BUCKET (at most the context
        window) so similar lengths share a graph; eager, exactly `needed`."""
        if not self.compiled:
            return needed
        bs = self.model.config.block_size
        return max(needed, min(bs, -(-needed // STATIC_BUCKET) * STATIC_BUCKET))

    def _rope(self, n: int):
        model = self.model
        if model.wpe is not None:
            return None, None
        if not self.compiled:
            return model.rope_table(n, model.norm_f.weight.dtype)
        if self._table is None or self._table[0].shape[0] < n:
            size = self.cache_len(n)  # a fixed size per cache size: the compiled graph sees stable shapes
            cos, sin = model.rope_table(size, model.norm_f.weight.dtype)
            self._table = (cos[:size], sin[:size])
        return self._table

    def step(self, ids: torch.Tensor, valid: torch.Tensor, cache: KVCache, span: int | None = None,
             dense: bool = False) -> torch.Tensor:
        """(B, 1) ids, (B,) bool valid -> (B, V) logits; the cache gains one slot per row (see `decode_step`)."""
        cos, sin = self._rope(cache.max_len)
        args = (ids, valid, cache.k, cache.v, cache.key_mask, cache.lengths, cache.positions, cos, sin)
        if not self.compiled:
            out = decode_step(self.model, self.weights, *args, span=span, dense=dense)
            cache.dense_len = cache.dense_len + 1 if dense and cache.dense_len is not None else None
            return out
        cache.dense_len = None  # the static step keeps per-row lengths only
        try:
            return self._compiled(*args)
        except Exception as e:  # e.g. no C++ compiler for Inductor: one line, and how to run without it
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise GenerationError(f"torch.compile of the decode step failed ({type(e).__name__}: {first}); "
                                  f"generate without compile=True") from e


_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def decoder_for(model: torch.nn.Module, compile: bool = False, mode: str | None = None) -> Decoder | None:
    """The model's `Decoder` (kept with the model, so compiled graphs are reused across generate calls), or None
    when the step does not apply: not lmforge's `Transformer` (a wrapper with another forward, e.g. a fake), a
    model in training mode with dropout (the step applies none), or a mixture of experts."""
    if not (isinstance(model, Transformer) and type(model).forward is Transformer.forward):
        return None
    if model.training and model.config.dropout:
        return None
    if model.config.num_experts:  # the step lays out dense MLPs only; a mixture of experts decodes by its forward
        return None
    per_model = _DECODERS.setdefault(model, {})
    key = (compile, mode)
    if key not in per_model:
        per_model[key] = Decoder(model, compile=compile, mode=mode)
    return per_model[key]
