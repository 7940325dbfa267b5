"""The one door to private and hand-picked kernels: owned, aligned inputs, and a crash check before first use.

Most of lmforge runs on PyTorch's public operators, which accept any tensor. A few fast paths call kernels that
PyTorch does not promise to be safe for every input:

| kernel                                        | caller                         | inputs                                   |
|-----------------------------------------------|--------------------------------|------------------------------------------|
| `torch._weight_int8pack_mm`                   | `QuantLinear` (int8, CPU)      | x bf16 (M, K); w int8 (N, K); scales (N,)|
| `torch._convert_weight_to_int4pack_for_cpu`   | `QuantLinear` (int4, CPU)      | codes int32 (N, K), 0..15                |
| `torch._weight_int4pack_mm_for_cpu`           | `QuantLinear` (int4, CPU)      | x bf16 (M, K); packed; scales+zeros      |
| numpy's BLAS (`np.matmul` on tensor memory)   | `lmforge.training.cores` (training)     | fp32 weights and activations             |

Two things can go wrong with them, and both have happened:

1. **Memory they cannot read.** `lmforge.load` memory-maps safetensors files: a loaded tensor is a view into the
   file, starting wherever the file put it (`data_ptr() % 64` can be 40). The AVX-512 code path of
   `_weight_int8pack_mm` reads 64 bytes at a time with aligned loads and dies with SIGSEGV on such a view; the same
   call on a fresh tensor runs. So every tensor handed to one of these kernels first goes through `owned()`:
   contiguous, in memory this process allocated, 64-byte aligned. It copies at most once per tensor (the copy is
   marked as owned) and callers keep the copy in place of the view.
2. **A kernel that is broken on this CPU.** CPUs of the same machine type differ (AVX2 only, or AVX-512 with VNNI
   and BF16), and a private kernel's other code path may crash or compute garbage. `check()` runs each
   (kernel, dtype, shape class) once in a child process, where a crash cannot hurt, and compares its result
   with the plain reference; callers fall back to dequantize + `F.linear` when the verdict is no. Verdicts are
   cached for the life of the process.

Set `LMFORGE_KERNEL_CHECK=0` to skip the child-process check (trust the kernels); `=fallback` to never use them.

    python -c "import lmforge.kernels as k; print(k.check('int8_mm', 'bfloat16', K=64, N=48))"
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings

import torch

ALIGN = 64  # bytes: one AVX-512 register, one cache line
_OWNED_ATTR = "_lmforge_owned"

# ----------------------------------------------------------------------------------------------------------------
# Owned, contiguous, aligned memory
# ----------------------------------------------------------------------------------------------------------------


def is_aligned(t: torch.Tensor, align: int = ALIGN) -> bool:
    return t.data_ptr() % align == 0


def is_owned(t: torch.Tensor) -> bool:
    """True for a tensor `owned()` made (or marked): contiguous, aligned, in this process's own allocation."""
    return bool(getattr(t, _OWNED_ATTR, False)) and t.is_contiguous() and is_aligned(t)


def owned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when it is already owned, else a contiguous, 64-byte-aligned copy in a fresh allocation.

    A loaded tensor may be a view into a memory-mapped file, at any offset; a slice may start mid-allocation.
    Neither is safe for the kernels above, and there is no reliable way to ask a storage whether it is
    file-backed, so the rule is simple: kernel inputs are tensors this function produced.
    """
    if is_owned(t):
        return t
    if t.device.type != "cpu":  # CUDA allocations are 256-byte aligned and never file-backed
        out = t.contiguous()
    else:
        nbytes = t.numel() * t.element_size()
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)  # torch's CPU allocator aligns to 64 already;
        skip = (-raw.data_ptr()) % ALIGN  # the slack makes alignment a guarantee rather than an assumption
        out = raw[skip:skip + nbytes].view(t.dtype).view(t.shape)
        out.copy_(t)
    setattr(out, _OWNED_ATTR, True)
    assert is_aligned(out) and out.is_contiguous()
    return out


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` when it is contiguous and 64-byte aligned (a fresh activation usually is), else an owned copy."""
    return t if t.is_contiguous() and is_aligned(t) else owned(t)


def own_(module: torch.nn.Module, name: str) -> torch.Tensor:
    """Replace `module`'s buffer or parameter `name` by its owned copy (no-op when already owned); return it."""
    t = getattr(module, name)
    if t is None or is_owned(t):
        return t
    if isinstance(t, torch.nn.Parameter):
        with torch.no_grad():
            t.data = owned(t.data)
        setattr(t, _OWNED_ATTR, True)
        return t
    new = owned(t)
    module._buffers[name] = new  # the same buffer slot: state_dict and .to() see the owned tensor
    return new


# ----------------------------------------------------------------------------------------------------------------
# Each kernel once in a child process
# ----------------------------------------------------------------------------------------------------------------
_verdicts: dict[tuple, bool] = {}
_lock = threading.Lock()

# The child imports only torch: it runs the kernel on fresh aligned tensors and compares with the reference.
_CHILD = r"""
import sys, torch
op, dtype, K, N, G = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
for M in (1, 3, 17):
    x = torch.randn(M, K).to(dtype)
    if op == "int8_mm":
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        s = (torch.rand(N) * 0.01 + 0.001).to(dtype)
        y = torch._weight_int8pack_mm(x, w, s)
        ref = x.float() @ (w.float() * s.float()[:, None]).t()
    elif op == "int4_mm":
        q = torch.randint(0, 16, (N, K), dtype=torch.int32)
        scale = (torch.rand(N, K // G) * 0.01 + 0.001).to(dtype)
        zero = torch.zeros(N, K // G, dtype=dtype)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(x, packed, G, sz)
        w = (q.float() - 8).view(N, K // G, G) * scale.float()[..., None]
        ref = x.float() @ w.view(N, K).t()
    else:
        sys.exit(4)
    err = (y.float() - ref).abs().max().item()
    tol = 0.02 * ref.abs().max().item() + 1e-3
    if not err <= tol:
        print(f"M={M}: max error {err:.3g} > {tol:.3g}", file=sys.stderr)
        sys.exit(3)
"""


def _mode() -> str:
    return os.environ.get("LMFORGE_KERNEL_CHECK", "1").strip().lower()


def shape_class(op: str, dtype, K: int, N: int, G: int = 0) -> tuple:
    """Shapes a kernel treats alike: the same op, dtype and group size, and the same residues of K and N modulo
    the widths its inner loops block on (a vector register's worth of K, 16 rows of N)."""
    return (op, str(dtype).replace("torch.", ""), G, K % 64, N % 16)


def check(op: str, dtype, K: int, N: int, G: int = 0, timeout: float = 120.0) -> bool:
    """True when kernel `op` ("int8_mm" or "int4_mm") runs correctly for this shape class on this machine.

    The first call for a class runs the kernel in a child process on fresh tensors of shape (M, K) x (N, K),
    M in (1, 3, 17); a crash (any signal), a wrong result or a time-out means no. Later calls read the cache.
    """
    mode = _mode()
    if mode in ("0", "off", "trust"):
        return True
    if mode == "fallback":
        return False
    key = shape_class(op, dtype, K, N, G)
    known = _verdicts.get(key)  # every forward of a quantized layer asks: answer from the cache without the lock
    if known is not None:
        return known
    with _lock:
        if key in _verdicts:  # another thread checked it while this one waited
            return _verdicts[key]
        dtype_name = key[1]
        try:
            r = subprocess.run([sys.executable, "-c", _CHILD, op, dtype_name, str(K), str(N), str(G or K)],
                               capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
            ok, why = r.returncode == 0, (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            if r.returncode < 0:
                why = f"killed by signal {-r.returncode}"
        except subprocess.TimeoutExpired:
            ok, why = False, f"no answer in {timeout:.0f} s"
        except OSError as e:
            ok, why = False, f"could not start the check ({e})"
        if not ok:
            warnings.warn(f"lmforge: kernel {op} ({dtype_name}, K={K}, N={N}, group {G or K}) failed its check on "
                          f"this CPU ({why}); using dequantize + F.linear instead", RuntimeWarning, stacklevel=2)
        _verdicts[key] = ok
        return ok


def verdicts() -> dict[tuple, bool]:
    """The checks this process has run so far: shape class -> verdict."""
    return dict(_verdicts)


# ----------------------------------------------------------------------------------------------------------------
# The calls themselves: every private kernel lmforge uses goes through one of these
# ----------------------------------------------------------------------------------------------------------------
_call_log: list | None = None  # tests set a list here to see what reached the kernels


def _record(op: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type == "cpu" and not (t.is_contiguous() and is_aligned(t)):
            raise AssertionError(f"{op}: input of shape {tuple(t.shape)} is not contiguous and 64-byte aligned")
    if _call_log is not None:
        _call_log.append((op, [(t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors]))


def int8_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (w (N, K) int8 * scales (N,))^T -> (M, N). All three must be owned (see `owned`)."""
    _record("int8_mm", x, w, scales)
    return torch._weight_int8pack_mm(x, w, scales)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """int32 codes (N, K) in 0..15 -> the CPU int4 kernel's packed layout (a fresh tensor)."""
    _record("int4_pack", q)
    return owned(torch._convert_weight_to_int4pack_for_cpu(q, 1))


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x (M, K) times the packed int4 weight, dequantized per group as (q - 8) * scale + zero."""
    _record("int4_mm", x, packed, scales_zeros)
    return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_zeros)
