"""The one door to private and hand-picked kernels: owned, aligned inputs, and a crash check before first use.

Most of lmforge runs on PyTorch's public operators, which accept any tensor. A few fast paths call kernels that
PyTorch does not promise to be safe for every input:

| kernel                                        | caller                         | inputs                                   |
|-----------------------------------------------|--------------------------------|------------------------------------------|
| `torch._weight_int8pack_mm`                   | `QuantLinear` (int8, CPU)      | x bf16 (M, K); w int8 (N, K); scales (N,)|
| `torch._convert_weight_to_int4pack_for_cpu`   | `QuantLinear` (int4, CPU)      | codes int32 (N, K), 0..15                |
| `torch._weight_int4pack_mm_for_cpu`           | `QuantLinear` (int4, CPU)      | x bf16 (M, K); packed; scales+zeros      |
| numpy's BLAS (`np.matmul` on tensor memory)   | `lmforge.training.cores` (training)     | fp32 weights and activations             |
| lmforge's own `lmf_int8_gemv` (csrc/decode_kernels.c)   | `QuantLinear` (int8, CPU)      | x fp32 (M, K); w int8 (N, K); scales fp32|
| lmforge's own `lmf_int4_gemv` (csrc/decode_kernels.c)   | `QuantLinear` (int4, CPU)      | x fp32; codes (N, K/2); fp16 scales, zeros|
| lmforge's own `lmf_f32_gemv`, `lmf_attend_one`, `lmf_decode_step` | the decode step (`DecodeProgram`) | fp32 weights (N, K); the KV cache |

lmforge's own kernels are one C file, `lmforge/csrc/decode_kernels.c`, compiled on first use on the machine that runs it
(`cc -O3 -march=native -fopenmp`, about a second; cached under ~/.cache/lmforge/kernels, one file per source,
compiler and CPU) and loaded with ctypes. They are what makes quantized decoding fast: at batch 1 the time is the
time to stream the weights, and PyTorch's packed kernels widen every weight to float before multiplying, which
costs more than the bytes they save. Ours quantize the activations to int8 in blocks of 32 (as llama.cpp's q8_0 and
q4_0 dot products do) and multiply in integer registers (AVX-512 VNNI, AVX-VNNI or AVX2; plain C elsewhere). With
no C compiler, or `LMFORGE_GEMV=0`, QuantLinear uses PyTorch's kernels as before.

Two things can go wrong with them, and both have happened:

1. **Memory they cannot read.** A memory-mapped tensor (what `safetensors.load_file` or `torch.load(mmap=True)`
   return; lmforge's own safetensors reader now reads into owned memory instead) is a view into the file,
   starting wherever the file put it (`data_ptr() % 64` can be 40). The AVX-512 code path of
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
    python -c "import lmforge.kernels as k; print(k.gemv_library(), k.check('int8_gemv', 'float32', K=64, N=48))"
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

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


def owned(t: torch.Tensor, weights: bool = False) -> torch.Tensor:
    """`t` itself when it is already owned, else a contiguous, 64-byte-aligned copy in a fresh allocation.

    A loaded tensor may be a view into a memory-mapped file, at any offset; a slice may start mid-allocation.
    Neither is safe for the kernels above, and there is no reliable way to ask a storage whether it is
    file-backed, so the rule is simple: kernel inputs are tensors this function produced.

    weights=True: a long-lived weight a decode step streams; mid-sized ones (64 KB to 2 MB) share huge-page chunks
    (see `_fresh`).
    """
    if is_owned(t):
        return t
    if t.device.type != "cpu":  # CUDA allocations are 256-byte aligned and never file-backed
        out = t.contiguous()
    else:
        nbytes = t.numel() * t.element_size()
        out = _fresh(nbytes, weights).view(t.dtype).view(t.shape)
        out.copy_(t)
    setattr(out, _OWNED_ATTR, True)
    assert is_aligned(out) and out.is_contiguous()
    return out


HUGE_PAGE = 2 << 20  # bytes: a transparent huge page on x86-64 and most arm64 Linux kernels
MADV_HUGEPAGE = 14
_libc = None


def _madvise_huge(ptr: int, nbytes: int) -> None:
    """Ask Linux to back [ptr, ptr + nbytes) with 2 MB pages when it is first touched (best effort: no error)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.madvise(ptr, nbytes, MADV_HUGEPAGE)


_ARENA_BYTES = 32 << 20  # weights of 64 KB to 2 MB are carved out of shared chunks this large
_arena: dict = {"chunk": None, "used": 0}
_arena_lock = threading.Lock()


def _fresh(nbytes: int, weights: bool = False) -> torch.Tensor:
    """nbytes of new memory as uint8, 64-byte aligned; large buffers start on a 2 MB boundary and ask for huge
    pages, and so do mid-sized weights (weights=True), several to a shared 32 MB chunk.

    Why huge pages: a decode step streams every weight once, and with 4 KB pages that is a TLB miss (a page-table
    walk) every 4 KB, and the hardware prefetcher stops at every page boundary. llama.cpp gets 2 MB pages for free
    when the kernel maps its GGUF file that way; lmforge's own copies of the weights ask for them. Measured on this
    machine's fp32 GPT-2 124M matrices: 31 GB/s with 4 KB pages, 45-50 GB/s with 2 MB pages. Linux with
    transparent huge pages in "madvise" or "always" mode only (elsewhere nothing changes); LMFORGE_HUGEPAGES=0 turns
    it off. Only whole 2 MB pages inside the buffer are advised, so no resident memory is wasted on padding.

    Most int8/int4 matrices of a model like GPT-2 are 0.5-2 MB, too small for a huge page of their own, so weights
    of that size are placed one after another in 32 MB chunks (views of one storage, like slices of a tensor; a
    chunk is freed when its last weight is; measured: GPT-2's int8 layers stream 20% faster). safetensors saves
    such disjoint views like any other tensor; `torch.save` of one would write its whole chunk."""
    huge = sys.platform.startswith("linux") and os.environ.get("LMFORGE_HUGEPAGES", "1") != "0"
    if huge and nbytes >= HUGE_PAGE:
        raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # large: fresh pages, nothing touched yet
        skip = (-raw.data_ptr()) % HUGE_PAGE
        _madvise_huge(raw.data_ptr() + skip, nbytes // HUGE_PAGE * HUGE_PAGE)
        return raw[skip:skip + nbytes]
    if huge and weights and nbytes >= 64 << 10:
        with _arena_lock:
            chunk, used = _arena["chunk"], _arena["used"]
            if chunk is None or used + nbytes > chunk.numel():
                chunk, used = _fresh(_ARENA_BYTES), 0
            _arena["chunk"], _arena["used"] = chunk, used + (nbytes + ALIGN - 1) // ALIGN * ALIGN
            return chunk[used:used + nbytes]
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)  # torch's CPU allocator aligns to 64 already;
    skip = (-raw.data_ptr()) % ALIGN  # the slack makes alignment a guarantee rather than an assumption
    return raw[skip:skip + nbytes]


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` when it is contiguous and 64-byte aligned (a fresh activation usually is), else an owned copy."""
    return t if t.is_contiguous() and is_aligned(t) else owned(t)


def own_(module: torch.nn.Module, name: str) -> torch.Tensor:
    """Replace `module`'s buffer or parameter `name` (a weight) by its owned copy (no-op when already owned); return
    it."""
    t = getattr(module, name)
    if t is None or is_owned(t):
        return t
    if isinstance(t, torch.nn.Parameter):
        with torch.no_grad():
            t.data = owned(t.data, weights=True)
        setattr(t, _OWNED_ATTR, True)
        return t
    new = owned(t, weights=True)
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
    elif op in ("int8_gemv", "int4_gemv", "f32_gemv"):  # lmforge's own C kernels (csrc/decode_kernels.c)
        import ctypes, os
        lib, P, I = ctypes.CDLL(os.environ["LMFORGE_GEMV_LIB"]), ctypes.c_void_p, ctypes.c_int64
        x = x.float().contiguous()
        y = torch.empty(M, N)
        scratch = torch.empty(M * (2 * K + K // 4) + 64, dtype=torch.uint8)
        if op == "f32_gemv":
            w, b = torch.randn(N, K), torch.randn(N)
            lib.lmf_f32_gemv.argtypes = [P, ctypes.c_int, P, P, P, P, I, I, ctypes.c_int]
            arr = lambda *ts: (P * len(ts))(*[t.data_ptr() for t in ts])
            lib.lmf_f32_gemv(x.data_ptr(), 2, arr(w[:N // 2], w[N // 2:]), arr(b[:N // 2], b[N // 2:]),
                             (I * 2)(N // 2, N - N // 2), y.data_ptr(), M, K, 2)
            ref = x @ w.t() + b
        elif op == "int8_gemv":
            w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
            s = torch.rand(N) * 0.01 + 0.001
            lib.lmf_int8_gemv.argtypes = [P, ctypes.c_int, P, P, P, P, P, P, I, I, ctypes.c_int]
            arr = lambda *ts: (P * len(ts))(*[t.data_ptr() for t in ts])
            lib.lmf_int8_gemv(x.data_ptr(), 2, arr(w[:N // 2], w[N // 2:]), arr(s[:N // 2], s[N // 2:]), (P * 2)(),
                              (I * 2)(N // 2, N - N // 2), y.data_ptr(), scratch.data_ptr(), M, K, 2)
            ref = x @ (w.float() * s[:, None]).t()
        else:
            q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
            scale = (torch.rand(N, K // G) * 0.01 + 0.001).half()
            zero = torch.randint(0, 16, (N, K // G), dtype=torch.uint8)
            qq = q.view(N, K // 64, 2, 32)
            packed = (qq[:, :, 0] | (qq[:, :, 1] << 4)).contiguous()
            lib.lmf_int4_gemv.argtypes = [P, ctypes.c_int, P, P, P, P, P, P, P, I, I, I, ctypes.c_int]
            arr = lambda t: (P * 2)(t[:N // 2].data_ptr(), t[N // 2:].data_ptr())
            lib.lmf_int4_gemv(x.data_ptr(), 2, arr(packed), arr(scale.view(torch.int16)), arr(zero), (P * 2)(),
                              (I * 2)(N // 2, N - N // 2), y.data_ptr(), scratch.data_ptr(), M, K, G, 2)
            w = (q.float() - zero.float().repeat_interleave(G, 1)) * scale.float().repeat_interleave(G, 1)
            ref = x @ w.t()
    elif op == "attend_one":  # one query per sequence against a cache (K = head size, N = slots written)
        import ctypes, math, os
        lib, P, I = ctypes.CDLL(os.environ["LMFORGE_GEMV_LIB"]), ctypes.c_void_p, ctypes.c_int64
        nh, nkv, hd, T, L = 4, 2, K, N + 8, N
        q, kn, vn = torch.randn(M, nh, hd), torch.randn(M, nkv, hd), torch.randn(M, nkv, hd)
        kc, vc = torch.randn(M, nkv, T, hd), torch.randn(M, nkv, T, hd)
        y, scratch = torch.empty(M, nh, hd), torch.empty(2 * (L + 1))
        lib.lmf_attend_one.argtypes = [P, I, P, I, P, I, P, P, P, I, I, I, I, I, I, ctypes.c_float, P, ctypes.c_int]
        kc2, vc2 = kc.clone(), vc.clone()
        lib.lmf_attend_one(q.data_ptr(), nh * hd, kn.data_ptr(), nkv * hd, vn.data_ptr(), nkv * hd, kc.data_ptr(),
                           vc.data_ptr(), y.data_ptr(), M, nh, nkv, hd, T, L, 1 / math.sqrt(hd), scratch.data_ptr(), 2)
        kc2[:, :, L], vc2[:, :, L] = kn, vn
        k, v = kc2[:, :, :L + 1].repeat_interleave(2, 1), vc2[:, :, :L + 1].repeat_interleave(2, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]
        if not (torch.equal(kc, kc2) and torch.equal(vc, vc2)):
            print("the cache was not written as expected", file=sys.stderr)
            sys.exit(3)
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
    """True when kernel `op` ("int8_mm", "int4_mm", "int8_gemv", "int4_gemv", "f32_gemv", "attend_one") runs correctly for this shape class
    on this machine (the gemv ones: lmforge's own, from `gemv_library()`; False when there is none).

    The first call for a class runs the kernel in a child process on fresh tensors of shape (M, K) x (N, K),
    M in (1, 3, 17); a crash (any signal), a wrong result or a time-out means no. Later calls read the cache.
    """
    if (op.endswith("_gemv") or op == "attend_one") and gemv_library() is None:  # ours, and not built here
        return False
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
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if op.endswith("_gemv") or op == "attend_one":
            env["LMFORGE_GEMV_LIB"] = str(gemv_library())
        try:
            r = subprocess.run([sys.executable, "-c", _CHILD, op, dtype_name, str(K), str(N), str(G or K)],
                               capture_output=True, text=True, timeout=timeout, env=env)
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


# ----------------------------------------------------------------------------------------------------------------
# lmforge's own matrix-vector kernels (csrc/decode_kernels.c): built here, on first use
# ----------------------------------------------------------------------------------------------------------------
GEMV_SOURCE = Path(__file__).with_name("csrc") / "decode_kernels.c"
_gemv_path: Path | None | bool = False  # False: not looked for yet; None: unavailable
_gemv_lib = None
_gemv_lock = threading.Lock()


def _cache_dir() -> Path:
    base = os.environ.get("LMFORGE_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    d = Path(base) / "lmforge" / "kernels"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return d
    except OSError:  # a read-only home: build in the temporary directory instead
        d = Path(tempfile.gettempdir()) / f"lmforge-kernels-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        d.mkdir(parents=True, exist_ok=True)
        return d


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's feature flags (a library built for AVX-512 must not be loaded on an
    AVX2 machine that shares the home directory)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.machine() + platform.processor()


def compile_gemv(cc: str, flags: list[str], out: Path) -> str | None:
    """Compile the source to `out` atomically; None on success, else the compiler's last line."""
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        r = subprocess.run([cc, *flags, "-o", str(tmp), str(GEMV_SOURCE), "-lm"], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            return (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        os.replace(tmp, out)  # another process building the same file at the same time writes the same bytes
        return None
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    finally:
        tmp.unlink(missing_ok=True)


def gemv_library() -> Path | None:
    """The compiled csrc/decode_kernels.c for this machine (built on the first call, then cached on disk), or None when
    `LMFORGE_GEMV=0`, or when there is no working C compiler (set CC to choose one)."""
    global _gemv_path
    if os.environ.get("LMFORGE_GEMV", "1").strip().lower() in ("0", "off", "no", "false"):
        return None
    if _gemv_path is not False:
        return _gemv_path
    with _gemv_lock:
        if _gemv_path is not False:
            return _gemv_path
        cc = os.environ.get("CC", "cc")
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            version = None
        if not version:
            warnings.warn(f"lmforge: no C compiler ({cc!r}) to build lmforge's int8/int4 decode kernels; quantized "
                          f"layers use PyTorch's slower kernels (install gcc, or set CC)", RuntimeWarning,
                          stacklevel=2)
            _gemv_path = None
            return None
        flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
        key = hashlib.sha256(GEMV_SOURCE.read_bytes() + version.encode() + _cpu_id().encode() +
                             " ".join(flags).encode()).hexdigest()[:16]
        out = _cache_dir() / f"gemv-{key}.so"
        why = None
        if not out.exists():
            why = compile_gemv(cc, flags, out)
            if why is not None:  # e.g. a compiler without OpenMP: one thread is still far faster than no kernel
                flags.remove("-fopenmp")
                why = compile_gemv(cc, flags, out)
        if why is not None:
            warnings.warn(f"lmforge: could not build lmforge's int8/int4 decode kernels ({why}); quantized layers "
                          f"use PyTorch's slower kernels", RuntimeWarning, stacklevel=2)
            _gemv_path = None
            return None
        _gemv_path = out
        return out


def load_gemv(path) -> ctypes.CDLL:
    """Load a build of csrc/decode_kernels.c, with its functions' argument types declared (ctypes releases the GIL during
    each call, so other Python threads run while a kernel does)."""
    lib = ctypes.CDLL(str(path))
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.lmf_int8_gemv.argtypes = [P, ctypes.c_int, P, P, P, P, P, P, I, I, ctypes.c_int]
    lib.lmf_int4_gemv.argtypes = [P, ctypes.c_int, P, P, P, P, P, P, P, I, I, I, ctypes.c_int]
    lib.lmf_attend_one.argtypes = [P, I, P, I, P, I, P, P, P, I, I, I, I, I, I, ctypes.c_float, P, ctypes.c_int]
    lib.lmf_f32_gemv.argtypes = [P, ctypes.c_int, P, P, P, P, I, I, ctypes.c_int]
    lib.lmf_decode_scratch.argtypes = [P, I, I, ctypes.c_int]
    lib.lmf_decode_scratch.restype = I
    lib.lmf_decode_step.argtypes = [P, P, I, P, P, I, I, P, P, P, P, ctypes.c_int]
    lib.lmf_simd_level.restype = ctypes.c_int
    return lib


def _gemv():
    global _gemv_lib
    if _gemv_lib is None:
        path = gemv_library()
        if path is None:
            raise RuntimeError("lmforge's gemv kernels are not available on this machine")
        _gemv_lib = load_gemv(path)
    return _gemv_lib


def gemv_simd() -> str:
    """Which loop the built library runs on this CPU: "vnni", "avx2" or "c" ("none" without a library)."""
    if gemv_library() is None:
        return "none"
    return {2: "vnni", 1: "avx2", 0: "c"}[_gemv().lmf_simd_level()]


_local = threading.local()


def _scratch(M: int, K: int) -> torch.Tensor:
    """Room for the kernel's int8 activations and per-block scales and sums: one buffer per thread, reused."""
    need = M * (2 * K + K // 4) + 64  # (the int4 loop also keeps a reordered copy of the int8 activations)
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.numel() < need:
        buf = torch.empty(max(need, 1 << 16), dtype=torch.uint8)
        _local.scratch = buf
    return buf


def gemv_rounded(x: torch.Tensor) -> torch.Tensor:
    """The activations as lmforge's gemv kernels see them, written in torch: each block of 32 values rounded to
    int8 with scale max|x| / 127 (half to even). x (M, K) with K % 32 == 0 -> float64 (M, K). With this, a kernel's
    output is `gemv_rounded(x) @ w.T` in exact arithmetic (tests compare the C loops against it)."""
    M, K = x.shape
    xb = x.double().view(M, K // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1)), 0)
    return (q * d).view(M, K)


_P = ctypes.c_void_p


def _ptrs(ts) -> ctypes.Array:
    return (_P * len(ts))(*[None if t is None else t.data_ptr() for t in ts])


class Gemv:
    """One call of lmforge's kernels over matrices that read the same input, side by side in the output (q, k and
    v; gate and up; or just one). The weight pointer arrays are built once; call with x (M, K) fp32 contiguous and
    one fp32 bias or None per matrix: -> (M, sum of N) fp32, x rounded to int8 per block of 32 inside.

        fp32: Gemv("f32", [(w (N, K) fp32,), ...])            (nn.Linear's own layout)
        int8: Gemv("int8", [(w (N, K) int8, wscale (N,) fp32), ...])
        int4: Gemv("int4", [(packed (N, K/2) from int4_gemv_pack, scales (N, K/G) fp16 bits, zeros (N, K/G)), ...],
                   group_size=G)

    int8 needs K % 32 == 0; int4 K % 64 == 0, G % 32 == 0, K <= 65536. Inputs are kept alive by the object.
    `lib`: another build of the kernels (tests compare the AVX2 and plain-C loops with the native one)."""

    def __init__(self, scheme: str, mats: list[tuple], group_size: int | None = None, lib: ctypes.CDLL | None = None):
        if not 1 <= len(mats) <= 16:
            raise ValueError(f"1 to 16 matrices per call, got {len(mats)}")
        self.scheme, self.mats, self.group_size, self.lib = scheme, list(mats), group_size, lib
        self.count = len(mats)
        self.K = mats[0][0].shape[1] * (2 if scheme == "int4" else 1)
        self.Ns = [m[0].shape[0] for m in mats]
        self.N = sum(self.Ns)
        self._n = (ctypes.c_int64 * self.count)(*self.Ns)
        self._args = [_ptrs([m[i] for m in mats]) for i in range(len(mats[0]))]  # one array per argument kind
        self._no_bias = (_P * self.count)()
        self._bias_key, self._bias = None, self._no_bias

    def __call__(self, x: torch.Tensor, biases: list | None = None) -> torch.Tensor:
        if _call_log is not None:  # (the C loops read unaligned memory: only tests look at these calls)
            _record(f"{self.scheme}_gemv", x, *[t for m in self.mats for t in m],
                    *[b for b in (biases or []) if b is not None])
        M, K = x.shape
        if K != self.K:
            raise ValueError(f"input width {K} != the weights' {self.K}")
        y, scratch = torch.empty(M, self.N), _scratch(M, K)  # named: a temporary would be freed before the call
        key = None if biases is None else tuple(None if b is None else b.data_ptr() for b in biases)
        if key != self._bias_key:  # the same bias tensors call after call: build their pointer array once
            self._bias_key = key
            self._bias = self._no_bias if key is None or not any(key) else _ptrs(biases)
        bias = self._bias
        lib = self.lib or _gemv()
        if self.scheme == "f32":
            lib.lmf_f32_gemv(x.data_ptr(), self.count, *self._args, bias, self._n, y.data_ptr(), M, K,
                             torch.get_num_threads())
        elif self.scheme == "int8":
            lib.lmf_int8_gemv(x.data_ptr(), self.count, *self._args, bias, self._n, y.data_ptr(), scratch.data_ptr(),
                              M, K, torch.get_num_threads())
        else:
            lib.lmf_int4_gemv(x.data_ptr(), self.count, *self._args, bias, self._n, y.data_ptr(), scratch.data_ptr(),
                              M, K, self.group_size, torch.get_num_threads())
        return y


def int8_gemv(x: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None = None,
              lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (M, K) fp32 @ (w (N, K) int8 * wscale (N,) fp32)^T (+ bias fp32) -> (M, N) fp32: one matrix (see `Gemv`)."""
    return Gemv("int8", [(w, wscale)], lib=lib)(x, [bias])


def int4_gemv_pack(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes (N, K) in 0..15 -> the layout `int4_gemv` reads: per 64 codes 32 bytes, byte j = code j (low
    nibble) | code j + 32 (high nibble). K % 64 == 0. A fresh, owned tensor."""
    N, K = codes.shape
    q = codes.to(torch.uint8).view(N, K // 64, 2, 32)
    return owned((q[:, :, 0] | (q[:, :, 1] << 4)).reshape(N, K // 2), weights=True)


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (M, K) fp32 times the int4 weight w = (q - zero) * scale per group: packed from `int4_gemv_pack`, scales
    (N, K/G) fp16 bits (int16), zeros (N, K/G) uint8: one matrix (see `Gemv`)."""
    return Gemv("int4", [(packed, scales, zeros)], group_size, lib=lib)(x, [bias])


def attend_one(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, L: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """A decode step's attention in one call (csrc/decode_kernels.c): write k_new, v_new (B, nkv, hd) to slot L of
    k_cache, v_cache (B, nkv, T, hd), then attend each query head of q (B, nh, hd) to slots 0..L of its key/value
    head -> (B, nh * hd). What `scaled_dot_product_attention` gives for one unmasked query, with the cache writes.
    All fp32 on CPU; q, k_new, v_new may be row views (each (nh|nkv, hd) block contiguous); the caches contiguous."""
    B, nh, hd = q.shape
    nkv, T = k_cache.shape[1], k_cache.shape[2]
    for t in (q, k_new, v_new):
        if t.stride(-1) != 1 or t.stride(-2) != hd:
            raise ValueError("attend_one: each sequence's heads must be contiguous")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("attend_one: the caches must be contiguous")
    if _call_log is not None:
        _call_log.append(("attend_one", [(t.data_ptr(), tuple(t.shape), t.dtype) for t in (q, k_cache, v_cache)]))
    threads = torch.get_num_threads()
    y, scratch = torch.empty(B, nh * hd), torch.empty(threads * (L + 1))
    (lib or _gemv()).lmf_attend_one(q.data_ptr(), q.stride(0), k_new.data_ptr(), k_new.stride(0), v_new.data_ptr(),
                                    v_new.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), y.data_ptr(), B, nh, nkv,
                                    hd, T, L, 1.0 / hd ** 0.5, scratch.data_ptr(), threads)
    return y


def f32_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (M, K) fp32 @ w (N, K) fp32 ^T (+ bias) -> (M, N): one matrix (see `Gemv`)."""
    return Gemv("f32", [(w,)], lib=lib)(x, [bias])


# ----------------------------------------------------------------------------------------------------------------
# A whole decode step in one call (lmf_decode_step)
# ----------------------------------------------------------------------------------------------------------------
class _Proj(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("count", ctypes.c_int32), ("K", ctypes.c_int64), ("G", ctypes.c_int64),
                ("w", _P), ("scale", _P), ("zero", _P), ("bias", _P), ("N", _P)]


class _Block(ctypes.Structure):
    _fields_ = [("n1w", _P), ("n1b", _P), ("n2w", _P), ("n2b", _P),
                ("qkv", _Proj), ("o", _Proj), ("inp", _Proj), ("down", _Proj)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layer", ctypes.c_int32), ("swiglu", ctypes.c_int32), ("rope", ctypes.c_int32),
                ("pad", ctypes.c_int32), ("C", ctypes.c_int64), ("nh", ctypes.c_int64), ("nkv", ctypes.c_int64),
                ("hd", ctypes.c_int64), ("H", ctypes.c_int64), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("blocks", _P), ("nfw", _P), ("nfb", _P), ("head", _Proj)]


_KINDS = {"f32": 0, "int8": 1, "int4": 2}


class DecodeProgram:
    """A decoder's whole one-token step as one call of `lmf_decode_step` (csrc/decode_kernels.c): per block
    norm -> q|k|v -> rope -> attention (`lmf_attend_one`) -> o -> + residual -> norm -> up (or gate|up) -> GELU (or
    SiLU * up) -> down -> + residual, then the final norm and the output layer. generation/decode.py's
    `decode_step` is the definition; this runs the same arithmetic without a Python call per operation.

    blocks: per block a dict with n1, n2 (norm weight, bias or None for RMSNorm) and qkv, o, inp, down, each a
    (`Gemv`, [bias fp32 or None per matrix]) pair. final: the final norm's (weight, bias); head: (Gemv, biases).
    Every tensor must be fp32 (norms, biases) and stay alive and in place: the object keeps references, and the
    caller remakes it when the model's weights are replaced."""

    def __init__(self, blocks: list[dict], final: tuple, head: tuple, *, n_head: int, n_kv_head: int,
                 head_dim: int, hidden: int, eps: float, swiglu: bool, rope: bool, lib: ctypes.CDLL | None = None):
        self.lib = lib or _gemv()
        self._keep: list = []  # every tensor and ctypes array the C side points to
        C = blocks[0]["qkv"][0].K

        def ptr(t):
            if t is None:
                return None
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError("DecodeProgram: norms and biases must be contiguous fp32 CPU tensors")
            self._keep.append(t)
            return t.data_ptr()

        def proj(pair):
            g, biases = pair
            bias = (_P * g.count)(*[ptr(b) for b in biases])
            self._keep += [g, bias]
            args = g._args + [None] * (3 - len(g._args))
            return _Proj(_KINDS[g.scheme], g.count, g.K, g.group_size or g.K,
                         *[ctypes.cast(a, _P) if a is not None else None for a in args],
                         ctypes.cast(bias, _P), ctypes.cast(g._n, _P))

        arr = (_Block * len(blocks))()
        for i, b in enumerate(blocks):
            arr[i] = _Block(ptr(b["n1"][0]), ptr(b["n1"][1]), ptr(b["n2"][0]), ptr(b["n2"][1]),
                            proj(b["qkv"]), proj(b["o"]), proj(b["inp"]), proj(b["down"]))
        self._blocks = arr
        self.vocab = head[0].N
        self.model = _Model(len(blocks), int(swiglu), int(rope), 0, C, n_head, n_kv_head, head_dim, hidden, eps,
                            1.0 / head_dim ** 0.5, ctypes.cast(arr, _P), ptr(final[0]), ptr(final[1]), proj(head))
        self.C, self.head_dim, self.n_kv_head = C, head_dim, n_kv_head
        self._ref = ctypes.byref(self.model)

    def __call__(self, x: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, L: int,
                 cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, C) fp32 contiguous: the new tokens' embeddings (overwritten: it becomes the residual stream).
        k_all, v_all (n_layer, M, nkv, T, hd) fp32 contiguous: every row writes slot L and attends to 0..L.
        cos, sin (hd,): position L's rotary angles (rope models). -> logits (M, V)."""
        M, T = x.shape[0], k_all.shape[3]
        if not (x.is_contiguous() and x.dtype == torch.float32 and k_all.is_contiguous() and v_all.is_contiguous()
                and tuple(k_all.shape[1:3]) == (M, self.n_kv_head) and x.shape[1] == self.C and 0 <= L < T):
            raise ValueError("DecodeProgram: inputs do not match the model or the cache")
        threads = torch.get_num_threads()
        need = self.lib.lmf_decode_scratch(self._ref, M, T, threads)
        buf = getattr(_local, "step_scratch", None)
        if buf is None or buf.numel() < need:
            buf = torch.empty(need, dtype=torch.uint8)
            _local.step_scratch = buf
        logits = torch.empty(M, self.vocab)
        cp = None if cos is None else cos.contiguous()
        sp = None if sin is None else sin.contiguous()
        self.lib.lmf_decode_step(self._ref, x.data_ptr(), M, k_all.data_ptr(), v_all.data_ptr(), T, L,
                                 None if cp is None else cp.data_ptr(), None if sp is None else sp.data_ptr(),
                                 logits.data_ptr(), buf.data_ptr(), threads)
        return logits
