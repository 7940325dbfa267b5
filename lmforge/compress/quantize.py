"""Weight-only quantization: int8 per-channel, int4 group-wise (asymmetric) and NF4, by rounding or by GPTQ.

What and why
------------
A float32 weight costs 4 bytes. Decoding one token reads every weight once, so on a CPU (and on a GPU at batch 1)
generation speed is set by memory bandwidth, and the model's size by bytes per weight. Weight-only quantization
stores each weight in 8 or 4 bits plus a few floats per row or per group that say how to turn the integers back
into real numbers; activations stay in floating point. The matmul either dequantizes the weight on the fly
(`w = (q - zero) * scale`) or calls a kernel that reads the packed integers directly (PyTorch ships
`torch._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm` for CUDA).

The three schemes (N = out_features rows, K = in_features columns, G = group size):

| scheme | code                     | parameters                     | bits / weight (G=32, fp16 params)        |
|--------|--------------------------|--------------------------------|------------------------------------------|
| int8   | q in [-127, 127]         | one scale per row (symmetric)  | 8 + 32/K                                 |
| int4   | q in [0, 15], 2 per byte | scale + integer zero per group | 4 + (16 + 8)/32 = 4.75                   |
| nf4    | index into 16 NF levels  | absmax per group               | 4 + 16/32 = 4.5                          |

- Symmetric int8: `scale = max|w_row| / 127`, `q = round(w / scale)`. Zero maps to zero exactly. One scale per
  output channel suffices because 256 levels are fine-grained enough for a whole row.
- Asymmetric int4 (Jacob et al. 2018): only 16 levels, so each group of G consecutive input weights of a row gets
  its own range `[min, max]`: `scale = (max - min) / 15`, `zero = round(-min / scale)`, `q = clamp(round(w /
  scale) + zero, 0, 15)`, `w ~ (q - zero) * scale`. Smaller groups follow outliers more closely, at the price of
  more parameters per weight.
- NF4, NormalFloat (Dettmers et al. 2023, QLoRA): trained weights are roughly normal, so instead of 16 evenly
  spaced levels NF4 places them at quantiles of N(0, 1), scaled into [-1, 1] (with an exact zero); each group is
  divided by its absmax and every weight is snapped to the nearest level. `nf4_levels()` derives the 16 values.

Round-to-nearest (RTN) rounds each weight on its own. GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers") quantizes one input column at a time and pushes the rounding
error of that column onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss `||X W^T - X Q^T||^2`, whose Hessian is `H = 2 X^T X` over calibration activations X. Where
inputs are correlated, a later column can compensate an earlier column's error; the output of the layer on real
data, not the weight itself, is what it keeps close. That is why it needs a (small) calibration set.

Everything here composes with a built model: `quantize_model` replaces `nn.Linear` / `nn.Embedding` modules by
`QuantLinear` / `QuantEmbedding` modules (gpt-fast's `WeightOnlyInt8Linear` idea), records the layout in
`model.quantization_config`, and `checkpoint.save` writes that as `quantization.json`; `prepare_for_load` rebuilds
the same empty modules so the packed state dict loads back.
"""

from __future__ import annotations

import copy
import math
import zlib
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import kernels
from lmforge.errors import CheckpointError, ConfigError
from lmforge.utils import read_json

SCHEMES = ("int8", "int4", "nf4")
METHODS = ("rtn", "gptq")
QUANT_FORMAT = "lmforge-quant"
QUANT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Number formats
# ----------------------------------------------------------------------------------------------------------------
def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat-4 levels, derived as in QLoRA's `create_normal_map(offset=0.9677083)`.

    8 positive levels are quantiles of N(0,1) at probabilities evenly spaced in [0.5, offset], 7 negative ones
    the mirror at 7 points; 0 appears once (so zero is exact) and all are divided by the largest, giving [-1, 1].
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()  # (16,)


_NF4 = None


def _nf4() -> torch.Tensor:
    global _NF4
    if _NF4 is None:
        _NF4 = nf4_levels()
    return _NF4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: column 2j in the low nibble, 2j+1 in the high one. (N, K) ints -> (N, K/2) uint8.

    >>> pack_int4(torch.tensor([[1, 2, 15, 0]])).tolist()
    [[33, 15]]
    """
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes in [0, 15] (inverse of `pack_int4`)."""
    return torch.stack([p & 0x0F, p >> 4], dim=-1).flatten(-2)


def _check_group(K: int, group_size: int, name: str = "") -> None:
    if group_size <= 0 or group_size % 2:
        raise ConfigError(f"group_size must be a positive even number, got {group_size}")
    if K % group_size:
        where = f" of {name}" if name else ""
        raise ConfigError(f"group_size {group_size} does not divide the input width {K}{where}")


def group_params(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantization parameters for groups of weights: w (..., G) -> scale (...,), zero (...,) or None.

    Scales are rounded to fp16 here (that is how they are stored), so codes are computed with the stored value.
    """
    w = w.float()
    if scheme == "int8":
        scale = (w.abs().amax(-1) / 127).clamp(min=1e-7).half().float()
        return scale, None
    if scheme == "nf4":
        scale = w.abs().amax(-1).clamp(min=1e-8).half().float()
        return scale, None
    if scheme == "int4":
        lo = w.amin(-1).clamp(max=0.0)  # the range always contains 0, so zero is exactly representable
        hi = w.amax(-1).clamp(min=0.0)
        scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()
        zero = torch.round(-lo / scale).clamp(0, 15)
        return scale, zero
    raise ConfigError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: str) -> torch.Tensor:
    """Round weights to codes, given parameters broadcastable to w. Returns float codes (exact integers)."""
    w = w.float()
    if scheme == "int8":
        return torch.round(w / scale).clamp(-127, 127)
    if scheme == "int4":
        return (torch.round(w / scale) + zero).clamp(0, 15)
    if scheme == "nf4":
        levels = _nf4().to(w.device)
        x = (w / scale).clamp(-1, 1)
        # nearest level: the 15 midpoints between sorted levels split [-1, 1] into 16 bins
        mids = (levels[1:] + levels[:-1]) / 2
        return torch.bucketize(x, mids).float()
    raise ConfigError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: str) -> torch.Tensor:
    if scheme == "int8":
        return q.float() * scale
    if scheme == "int4":
        return (q.float() - zero) * scale
    return _nf4().to(q.device)[q.long()] * scale  # nf4


# ----------------------------------------------------------------------------------------------------------------
# Quantized modules
# ----------------------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A drop-in replacement for `nn.Linear` whose weight is stored quantized (buffers, not parameters).

    Buffers: `qweight` int8 (N, K) for int8, packed uint8 (N, K/2) for int4/nf4; `scales` (N,) for int8 or
    (N, K/G) for int4/nf4; `zeros` uint8 (N, K/G) for int4. `bias` stays a float parameter.
    The scales are fp16 numbers kept bit for bit in an int16 buffer (`scale` views them as fp16): `model.to(dtype)`
    and checkpoint loaders cast every floating tensor, and the scales must stay exactly what the codes were
    computed with.
    On CPU in inference, int8 and int4 use lmforge's own kernels (`lmforge.kernels`, csrc/decode_kernels.c: activations
    rounded to int8 per block of 32, integer products, as llama.cpp does), or where those cannot be built PyTorch's
    packed kernels (activations cast to `kernel_dtype`); otherwise (training, CUDA, nf4) the weight is dequantized on the fly and multiplied with `F.linear`.
    """

    use_kernels = True  # class-wide switch: False -> always dequantize, then F.linear in the input dtype
    kernel_dtype = torch.bfloat16  # activation dtype inside the CPU int8/int4 kernels

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, group_size: int | None = None,
                 device=None):
        super().__init__()
        if scheme not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
        N, K = out_features, in_features
        self.in_features, self.out_features, self.scheme = K, N, scheme
        if scheme == "int8":
            self.group_size = K
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(N, dtype=torch.float16, device=device).view(torch.int16))
            self.zeros = None
        else:
            G = int(group_size or 32)
            _check_group(K, G)
            self.group_size = G
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(N, K // G, dtype=torch.float16, device=device).view(torch.int16))
            if scheme == "int4":
                self.register_buffer("zeros", torch.zeros(N, K // G, dtype=torch.uint8, device=device))
            else:
                self.zeros = None
        self.bias = nn.Parameter(torch.zeros(N, device=device)) if bias else None
        self._kernel_cache: dict = {}

    # ---- building ------------------------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: str, group_size: int | None = None,
                   codes: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   zero: torch.Tensor | None = None) -> "QuantLinear":
        """Round-to-nearest quantization of a Linear, or packing of codes/params computed elsewhere (GPTQ)."""
        N, K = linear.weight.shape
        m = cls(K, N, linear.bias is not None, scheme, group_size, device=linear.weight.device)
        if codes is None:
            codes, scale, zero = _rtn(linear.weight.detach(), scheme, m.group_size)
        m.set_codes(codes, scale, zero)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return m

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """codes (N, K) integer-valued; scale/zero (N,) for int8 or (N, K/G) for group schemes."""
        if self.scheme == "int8":
            self.qweight.copy_(codes.to(torch.int8))
            self.scales.copy_(scale.reshape(-1).to(torch.float16).view(torch.int16))
        else:
            self.qweight.copy_(pack_int4(codes))
            self.scales.copy_(scale.to(torch.float16).view(torch.int16))
            if self.zeros is not None:
                self.zeros.copy_(zero.to(torch.uint8))
        self._kernel_cache.clear()

    # ---- using ---------------------------------------------------------------------------------------------------
    @property
    def scale(self) -> torch.Tensor:
        """The fp16 scales: (N,) for int8, (N, K/G) for int4/nf4."""
        return self.scales.view(torch.float16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) float weight these codes stand for."""
        N, K = self.out_features, self.in_features
        if self.scheme == "int8":
            return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]
        G = self.group_size
        q = unpack_int4(self.qweight).view(N, K // G, G)  # (N, K/G, G)
        scale = self.scale.float()[..., None]  # (N, K/G, 1)
        zero = self.zeros.float()[..., None] if self.zeros is not None else None
        return dequantize_codes(q, scale, zero, self.scheme).view(N, K).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (computed on demand, for code that reads `.weight` of a Linear)."""
        return self.dequantize(torch.float32)

    def _int4_kernel_args(self, x: torch.Tensor):
        key = ("int4", x.device, x.dtype)
        if key not in self._kernel_cache:
            q = unpack_int4(self.qweight).to(torch.int32)  # (N, K), a fresh tensor
            scale = self.scale.to(x.dtype)
            # the kernel computes w = (q - 8) * scale + zero_f: our (q - zero) * scale has zero_f = (8 - zero) * scale
            zero_f = (8 - self.zeros.to(x.dtype)) * scale
            sz = kernels.owned(torch.stack([scale, zero_f], -1).transpose(0, 1))  # (K/G, N, 2)
            packed = kernels.int4_pack(q)
            self._kernel_cache.clear()
            self._kernel_cache[key] = (packed, sz)
        return self._kernel_cache[key]

    def _int8_kernel_args(self, x: torch.Tensor):
        key = ("int8", x.device, x.dtype)
        if key not in self._kernel_cache:
            kernels.own_(self, "qweight")  # a loaded buffer may be an unaligned view into the mapped file
            self._kernel_cache.clear()
            self._kernel_cache[key] = (self.qweight, kernels.owned(self.scale.to(x.dtype)))
        return self._kernel_cache[key]

    def _int8_gemv_args(self):
        key = ("int8_gemv",)
        if key not in self._kernel_cache:
            kernels.own_(self, "qweight")
            self._kernel_cache[key] = (self.qweight, kernels.owned(self.scale.float(), weights=True))
        return self._kernel_cache[key]

    def _int4_gemv_args(self):
        key = ("int4_gemv",)
        if key not in self._kernel_cache:
            packed = kernels.int4_gemv_pack(unpack_int4(self.qweight))  # (N, K/2) in the kernel's own layout
            self._kernel_cache[key] = (packed, kernels.owned(self.scales, weights=True),
                                       kernels.owned(self.zeros, weights=True))
        return self._kernel_cache[key]

    def _fp32_bias(self) -> torch.Tensor | None:
        """The bias as an owned fp32 tensor, remade only when the parameter is replaced or updated in place."""
        b = self.bias
        if b is None:
            return None
        stamp = (b.data_ptr(), b._version, b.dtype)
        cached = self._kernel_cache.get("bias")
        if cached is None or cached[0] != stamp:
            cached = (stamp, kernels.owned(b.detach().float()))
            self._kernel_cache["bias"] = cached
        return cached[1]

    def _gemv_plan(self):
        """lmforge's own kernel for this layer as a function of (x fp32 (M, K), bias) -> y fp32 (M, N), with its
        weight arguments bound, or False when this layer uses another path. Made once (a decode step calls every
        layer, and the checks and lookups would cost more than a small layer's product); cleared with the cache."""
        plan = self._kernel_cache.get("gemv")
        if plan is None:
            kernel = self._kernel()
            if kernel == "int8_gemv":
                plan = kernels.Gemv("int8", [self._int8_gemv_args()])
            elif kernel == "int4_gemv":
                plan = kernels.Gemv("int4", [self._int4_gemv_args()], self.group_size)
            else:
                plan = False
            self._kernel_cache["gemv"] = plan
        return plan

    @staticmethod
    def group_forward(x: torch.Tensor, layers: list["QuantLinear"]) -> torch.Tensor | None:
        """The outputs of several layers that read the same input, side by side: (B, sum of N), in one kernel
        call (one rounding of x, one parallel region) when they all use lmforge's kernels with the same scheme;
        None otherwise (the caller runs them one by one). The decode step calls it for q, k, v and gate, up."""
        first = layers[0]
        if not (first.use_kernels and x.device.type == "cpu" and x.dim() == 2 and not x.requires_grad):
            return None
        plans = [m._gemv_plan() if isinstance(m, QuantLinear) else False for m in layers]
        key = ("group", tuple(id(m) for m in layers))
        made = first._kernel_cache.get(key)
        if made is None or made[0] != [id(p) for p in plans]:  # new, or a layer's own plan was remade (new codes)
            same = all(p and p.scheme == plans[0].scheme and p.K == plans[0].K and
                       p.group_size == plans[0].group_size for p in plans)
            group = kernels.Gemv(plans[0].scheme, [p.mats[0] for p in plans], plans[0].group_size) if same else False
            made = ([id(p) for p in plans], group, plans)  # (the plans are kept so their ids stay theirs)
            first._kernel_cache[key] = made
        plan = made[1]
        if not plan:
            return None
        x2 = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        y = plan(x2, [m._fp32_bias() for m in layers])
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _kernel(self, torch_only: bool = False) -> str | None:
        """Which CPU kernel serves this layer on this machine: lmforge's own "int8_gemv" / "int4_gemv" (csrc/decode_kernels.c)
        when they are built and pass their check, else (or with torch_only) PyTorch's "int8_mm" / "int4_mm", else
        None (dequantize)."""
        N, K, dt = self.out_features, self.in_features, self.kernel_dtype
        if not torch_only and self.scheme == "int8" and K % 32 == 0 and kernels.check("int8_gemv", torch.float32, K, N):
            return "int8_gemv"
        if (not torch_only and self.scheme == "int4" and K % 64 == 0 and self.group_size % 32 == 0 and K <= 65536
                and kernels.check("int4_gemv", torch.float32, K, N, self.group_size)):
            return "int4_gemv"
        if self.scheme == "int8" and K % 8 == 0:  # other widths crash the CPU kernel (2.13)
            return "int8_mm" if kernels.check("int8_mm", dt, K, N) else None
        if self.scheme == "int4" and self.group_size in (32, 64, 128, 256) and N % 16 == 0:
            return "int4_mm" if kernels.check("int4_mm", dt, K, N, self.group_size) else None
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.use_kernels and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            compiling = torch.compiler.is_compiling()  # a compiled graph cannot call into ctypes: PyTorch's kernels
            # PyTorch's CPU weight-only kernels are fast in bf16 (on an AVX2 CPU, int8 x bf16 reads 4x fewer
            # bytes than fp32 and runs ~2x faster); their fp32 variants are slower than a plain fp32 matmul. So
            # activations go through the kernel in `kernel_dtype` and come back in their own dtype. Every input
            # is owned and 64-byte aligned, and the kernel passed its check on this CPU (lmforge.kernels).
            plan = not compiling and self._gemv_plan()
            if plan:
                # lmforge's own kernels: fp32 in and out, the activations rounded to int8 per block of 32 inside
                x2 = x.reshape(-1, self.in_features)  # (B*T, K)
                if x2.dtype != torch.float32 or not x2.is_contiguous():
                    x2 = x2.float().contiguous()
                y = plan(x2, [self._fp32_bias()])
                return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*shape[:-1], self.out_features)
            kernel = self._kernel(torch_only=compiling)
            if kernel is not None:
                x2 = kernels.aligned(x.reshape(-1, self.in_features).to(self.kernel_dtype))  # (B*T, K)
                if kernel == "int8_mm":
                    y = kernels.int8_mm(x2, *self._int8_kernel_args(x2))
                else:
                    packed, sz = self._int4_kernel_args(x2)
                    y = kernels.int4_mm(x2, packed, self.group_size, sz)
                y = y.to(x.dtype)
                if self.bias is not None:
                    y = y + self.bias.to(y.dtype)
                return y.view(*shape[:-1], self.out_features)
        w = self.dequantize(x.dtype)  # (N, K)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_cache.clear()  # loaded codes replace the ones the kernel arguments were made from
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._kernel_cache.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        g = "" if self.scheme == "int8" else f", group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}{g}")


class QuantEmbedding(nn.Module):
    """A quantized `nn.Embedding` (V, C): rows are dequantized when looked up. Holds a `QuantLinear` of the same
    matrix, so a tied LM head (`TiedQuantHead`) can reuse it as the (V, C) output projection."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str, group_size: int | None = None,
                 device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.table = QuantLinear(embedding_dim, num_embeddings, False, scheme, group_size, device=device)
        self.compute_dtype = torch.float32  # dtype of the embeddings it returns (follows model.to(dtype))

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.compute_dtype))  # what would .to()/.half() do to a float tensor?
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return super()._apply(fn, recurse)

    @classmethod
    def from_float(cls, emb: nn.Embedding, scheme: str, group_size: int | None = None) -> "QuantEmbedding":
        V, C = emb.weight.shape
        m = cls(V, C, scheme, group_size, device=emb.weight.device)
        m.compute_dtype = emb.weight.dtype
        codes, scale, zero = _rtn(emb.weight.detach(), scheme, m.table.group_size)
        m.table.set_codes(codes, scale, zero)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        rows = ids.reshape(-1)  # (B*T,)
        if t.scheme == "int8":
            w = t.qweight[rows].float() * t.scale[rows, None].float()  # (B*T, C)
        else:
            G = t.group_size
            q = unpack_int4(t.qweight[rows]).view(-1, t.in_features // G, G)  # (B*T, C/G, G)
            zero = t.zeros[rows].float()[..., None] if t.zeros is not None else None
            w = dequantize_codes(q, t.scale[rows].float()[..., None], zero, t.scheme).view(-1, t.in_features)
        return w.to(self.compute_dtype).view(*ids.shape, self.embedding_dim)  # (B, T, C)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.dequantize(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.table.scheme}"


class TiedQuantHead(nn.Module):
    """The LM head of a model whose head is tied to its (quantized) token embedding: no state of its own."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # a reference, not a submodule: saved once, under wte

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embedding.table(x)  # (B, T, V)

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight


def _rtn(w: torch.Tensor, scheme: str, group_size: int):
    """Round-to-nearest: w (N, K) -> codes (N, K), scale, zero (shapes as `QuantLinear.set_codes` expects)."""
    N, K = w.shape
    w = w.float()
    if scheme == "int8":
        scale, _ = group_params(w, "int8")  # (N,)
        return quantize_codes(w, scale[:, None], None, "int8"), scale, None
    G = group_size
    wg = w.view(N, K // G, G)
    scale, zero = group_params(wg, scheme)  # (N, K/G)
    codes = quantize_codes(wg, scale[..., None], None if zero is None else zero[..., None], scheme)
    return codes.view(N, K), scale, zero


# ----------------------------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def gptq_quantize_weight(w: torch.Tensor, H: torch.Tensor, scheme: str, group_size: int, damp: float = 0.01,
                         block_size: int = 128):
    """GPTQ for one weight matrix. w (N, K), H (K, K) = 2 X^T X / n over calibration inputs X (n, K).

    Columns are quantized left to right. After column j is rounded, the error e_j = (w_j - q_j) / [H^-1]_jj is
    subtracted from the remaining columns times the row j of the (Cholesky factor of the) inverse Hessian: the
    optimal least-squares update (Optimal Brain Surgeon) given that column j is now fixed. Updates are batched
    in blocks of `block_size` columns ("lazy batch updates") so most work is matmuls.
    Returns codes (N, K), scale, zero like `_rtn`.
    """
    N, K = w.shape
    W = w.detach().float().clone()
    H = H.float().clone()
    G = K if scheme == "int8" else group_size
    dead = torch.diag(H) == 0  # inputs that were always zero: any value works, fix them to 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, device=H.device)  # dampening keeps H well conditioned
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper factor U of H^-1 = U^T U
    codes = torch.zeros(N, K, device=W.device)
    n_groups = K // G
    scales = torch.zeros(N, n_groups, device=W.device)
    zeros = torch.zeros(N, n_groups, device=W.device) if scheme == "int4" else None
    if scheme == "int8":  # one scale per row, from the whole (original) row
        s, _ = group_params(W, "int8")
        scales[:, 0] = s
    bs = max(block_size // G, 1) * G if G < K else block_size  # blocks hold whole groups
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = W[:, i1:i2].clone()  # (N, b)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col // G
            if scheme != "int8" and col % G == 0:  # new group: its range from the already-updated weights
                s, z = group_params(W1[:, i:i + G], scheme)
                scales[:, g] = s
                if zeros is not None:
                    zeros[:, g] = z
            s = scales[:, g]
            z = zeros[:, g] if zeros is not None else None
            w_col = W1[:, i]
            q = quantize_codes(w_col, s, z, scheme)
            codes[:, col] = q
            err = (w_col - dequantize_codes(q, s, z, scheme)) / Hinv1[i, i]  # (N,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if scheme == "int8":
        return codes, scales[:, 0], None
    return codes, scales, zeros


# ----------------------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------------------
def _linear_names(model: nn.Module) -> list[str]:
    """Linear layers inside the transformer blocks, in forward order. A mixture of experts' routers stay float (as
    GPTQ/AWQ tools keep Mixtral's gate): a rounding error there flips which experts a token gets; they are tiny."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")
            and not n.endswith(".mlp.router")]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _layer_schemes(model: nn.Module, names: Iterable[str], scheme: str, group_size: int,
                   fallback: str | None) -> dict[str, str]:
    """The scheme of each layer: `scheme`, or `fallback` for layers the group size does not divide."""
    out = {}
    for n in names:
        if scheme != "int8" and model.get_submodule(n).in_features % group_size:
            if fallback is None:
                _check_group(model.get_submodule(n).in_features, group_size, n)  # raises the one-line error
            out[n] = fallback
        else:
            out[n] = scheme
    return out


def _as_batches(calibration) -> list[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration] if calibration.dim() == 2 else [calibration[None]]
    out = [c if c.dim() == 2 else c[None] for c in calibration]
    if not out:
        raise ConfigError("calibration data is empty")
    return out


@torch.no_grad()
def _collect_hessians(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """H = 2/n * sum x x^T of the inputs each named Linear sees while the model runs the calibration batches."""
    hs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(mod, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (n, K)
            n0, n1 = counts.get(name, 0), x.shape[0]
            h = hs.get(name)
            if h is None:
                h = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            h *= n0 / (n0 + n1)  # running mean of 2 x x^T
            h += (2.0 / (n0 + n1)) * (x.T @ x)
            hs[name], counts[name] = h, n0 + n1
        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(hook(n)))
    try:
        device = next(model.parameters()).device
        for ids in batches:
            model(ids.to(device))
    finally:
        for h in hooks:
            h.remove()
    return hs


def quantize_model(model: nn.Module, scheme: str = "int8", group_size: int = 32, calibration=None,
                   method: str | None = None, embeddings: str = "int8", fallback: str | None = None,
                   progress: bool = True) -> nn.Module:
    """Quantize a `Transformer` in place (and return it).

    scheme:      "int8" (per output channel), "int4" (group-wise asymmetric) or "nf4" (group-wise NormalFloat)
    group_size:  input columns per group for int4/nf4 (must divide every quantized layer's input width)
    calibration: token ids (n, T) or a list of (B, T) tensors; with it the default method is GPTQ
    method:      "rtn" (round to nearest) or "gptq" (needs calibration); None -> gptq if calibration else rtn
    embeddings:  what to do with the token embedding and LM head: "keep" (float), "int8", or "same" (scheme)
    fallback:    None -> a layer whose width the group size does not divide is an error; "int8" -> quantize that
                 layer per channel instead (as llama.cpp keeps such tensors in another type)
    Sets `model.quantization_config`, which `checkpoint.save` writes as quantization.json.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    method = method or ("gptq" if calibration is not None else "rtn")
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    if method == "gptq" and calibration is None:
        raise ConfigError("method 'gptq' needs calibration data (token ids)")
    if embeddings not in ("keep", "int8", "same"):
        raise ConfigError(f"embeddings must be 'keep', 'int8' or 'same', got {embeddings!r}")
    if getattr(model, "quantization_config", None):
        raise ConfigError("model is already quantized")
    if fallback not in (None, "int8"):
        raise ConfigError(f"fallback must be None or 'int8', got {fallback!r}")
    if scheme != "int8":
        _check_group(2 * group_size, group_size)  # group_size itself must be a positive even number
    names = _linear_names(model)
    schemes = _layer_schemes(model, names, scheme, group_size, fallback)
    emb_scheme = {"keep": None, "int8": "int8", "same": scheme}[embeddings]
    if emb_scheme and emb_scheme != "int8":
        _check_group(model.config.n_embd, group_size, "wte")
    modules: dict[str, dict[str, Any]] = {}

    def gs_of(sch: str) -> int | None:
        return None if sch == "int8" else group_size

    from tqdm.auto import tqdm

    if method == "gptq":
        # Sequential GPTQ: block by block, each block's Hessians measured with the earlier blocks already
        # quantized, so later layers learn to compensate for the error that really reaches them.
        batches = _as_batches(calibration)
        n_blocks = len(model.blocks)
        bar = tqdm(total=len(names), desc=f"gptq {scheme}", unit="layer", disable=not progress)
        was_training = model.training
        model.eval()
        for b in range(n_blocks):
            block_names = [n for n in names if n.startswith(f"blocks.{b}.")]
            hs = _collect_hessians(model, block_names, batches)
            for n in block_names:
                lin, sch = model.get_submodule(n), schemes[n]
                if n not in hs:  # an expert no calibration token was routed to: nothing to weigh, round to nearest
                    codes, s, z = _rtn(lin.weight.detach(), sch, group_size)
                else:
                    codes, s, z = gptq_quantize_weight(lin.weight.detach(), hs[n], sch, group_size)
                _set_module(model, n, QuantLinear.from_float(lin, sch, gs_of(sch), codes=codes, scale=s, zero=z))
                modules[n] = {"scheme": sch, "group_size": gs_of(sch)}
                bar.update(1)
        bar.close()
        model.train(was_training)
    else:
        for n in tqdm(names, desc=f"rtn {scheme}", unit="layer", disable=not progress):
            sch = schemes[n]
            _set_module(model, n, QuantLinear.from_float(model.get_submodule(n), sch, gs_of(sch)))
            modules[n] = {"scheme": sch, "group_size": gs_of(sch)}

    if emb_scheme:
        egs = None if emb_scheme == "int8" else group_size
        tied = model.lm_head.weight is model.wte.weight
        if not tied:
            model.lm_head = QuantLinear.from_float(model.lm_head, emb_scheme, egs)
            modules["lm_head"] = {"scheme": emb_scheme, "group_size": egs}
        model.wte = QuantEmbedding.from_float(model.wte, emb_scheme, egs)
        modules["wte"] = {"scheme": emb_scheme, "group_size": egs, "kind": "embedding"}
        if tied:
            model.lm_head = TiedQuantHead(model.wte)
            modules["lm_head"] = {"scheme": emb_scheme, "group_size": egs, "kind": "tied"}
    model.quantization_config = {
        "format": QUANT_FORMAT, "version": QUANT_VERSION, "scheme": scheme, "group_size": gs_of(scheme),
        "method": method,
        "embeddings": embeddings, "modules": modules,
    }
    return model


def prepare_for_load(model: nn.Module, qconfig_dict: dict[str, Any]) -> nn.Module:
    """Swap a freshly built model's layers for empty quantized ones so a quantized state dict loads into it.

    Called by `lmforge.formats.native.load_lmforge_dir` when a model directory has quantization.json.
    """
    if qconfig_dict.get("format") != QUANT_FORMAT:
        raise ConfigError(f"quantization.json: unknown format {qconfig_dict.get('format')!r}; expected {QUANT_FORMAT!r}")
    if int(qconfig_dict.get("version", 0)) > QUANT_VERSION:
        raise ConfigError(f"quantization.json version {qconfig_dict.get('version')} is newer than this lmforge "
                          f"({QUANT_VERSION})")
    modules = qconfig_dict.get("modules", {})
    device = next(model.parameters()).device
    for name, spec in modules.items():
        kind = spec.get("kind", "linear")
        if kind == "tied":
            continue  # after the embedding, below
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"quantization.json names module {name!r}, which this model does not have") from None
        if kind == "embedding":
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, spec["scheme"], spec.get("group_size"),
                                 device=device)
        else:
            new = QuantLinear(old.in_features, old.out_features, old.bias is not None, spec["scheme"],
                              spec.get("group_size"), device=device)
        _set_module(model, name, new)
    for name, spec in modules.items():
        if spec.get("kind") == "tied":
            _set_module(model, name, TiedQuantHead(model.get_submodule("wte")))
    model.quantization_config = dict(qconfig_dict)
    return model


def tensor_checksums(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """CRC-32 of each tensor's bytes, recorded in quantization.json. safetensors has no checksum, and a flipped bit
    in packed int4 codes or fp16 scales still loads: these catch it (about 1 GB/s, once per load)."""
    return {name: f"{zlib.crc32(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())) :08x}"
            for name, t in sd.items()}


def verify_checksums(sd: dict[str, torch.Tensor], checksums: Any, directory) -> None:
    """One-line CheckpointError naming the file and tensor whose bytes differ from quantization.json's record."""
    from pathlib import Path

    d = Path(directory)
    if not isinstance(checksums, dict):
        raise CheckpointError(f"{d / 'quantization.json'}: 'checksums' is not a name -> checksum object")
    for name, want in checksums.items():
        if name not in sd:
            raise CheckpointError(f"{d / 'quantization.json'}: lists tensor {name!r}, which the weights do not have")
        got = tensor_checksums({name: sd[name]})[name]
        if got != want:
            index = d / "model.safetensors.index.json"
            shard = (read_json(index).get("weight_map", {}).get(name) if index.exists() else None)
            raise CheckpointError(f"{d / (shard or 'model.safetensors')}: tensor {name!r} is corrupt (checksum {got}, "
                                  f"quantization.json recorded {want})")


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (shared storage counted once, non-persistent buffers too)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def bits_per_weight(model: nn.Module) -> float:
    """Average stored bits per weight over the quantized layers (codes + scales + zeros)."""
    bits, n = 0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            n += m.in_features * m.out_features
            bits += 8 * sum(t.numel() * t.element_size() for t in (m.qweight, m.scales, m.zeros) if t is not None)
    return bits / n if n else 32.0


def calibration_batches(tokenizer, text: str, n_samples: int = 32, seq_len: int = 256,
                        add_bos: bool | None = None) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens taken from places spread evenly over `text`: a calibration set. (n, T)

    GPTQ needs only a few thousand tokens of text like the text the model will see; more samples give a better
    estimate of each layer's input covariance (the Hessian), at a cost linear in their number. Only the slices
    used are tokenized (a slow tokenizer on a whole corpus would take minutes).
    """
    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    body = seq_len - (1 if bos is not None else 0)
    chars = 12 * body  # generous: English BPE averages 3-5 characters per token
    n = max(1, min(n_samples, len(text) // chars))
    rows = []
    for start in torch.linspace(0, max(len(text) - chars, 0), n).long().tolist():
        ids = list(tokenizer.encode(text[start:start + chars]))
        if len(ids) >= body:
            rows.append(([bos] if bos is not None else []) + ids[:body])
    if not rows:
        raise ConfigError(f"calibration text is too short for one sequence of seq_len={seq_len} tokens")
    return torch.tensor(rows, dtype=torch.long)  # (n, T)


def quantize(lm, scheme: str = "int8", group_size: int = 32, calibration=None, inplace: bool = False, **kwargs):
    """`lmforge.compress.quantize(lm, "int8")`: an `LM` whose linear layers hold quantized weights (see `quantize_model` for
    the options). The original is left as it was unless `inplace=True`; tokenizer and settings are shared."""
    model = lm.model if inplace else copy.deepcopy(lm.model)
    q = quantize_model(model, scheme, group_size, calibration=calibration, **kwargs)
    if inplace:
        lm.model = q
        return lm
    return type(lm)(q, lm.tokenizer, lm.config, lm.generation_config, lm.chat_template, path=None)

