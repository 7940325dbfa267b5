"""Keeping freed memory for the next step: why a CPU training loop should not hand its memory back.

Every training step allocates the same big tensors and frees them again: the logits (batch x time x vocab floats,
32 MB for 1,024 tokens of an 8,192-token vocabulary), their gradient, the MLP's activations. PyTorch's CPU tensors
come from the C library's `malloc`, and glibc's malloc treats big blocks specially:

- a block of 32 MB or more is asked from the operating system (`mmap`) and handed back on free (`munmap`);
- freed memory at the top of the heap is handed back (trimmed) once more than a threshold of it is free.

Memory fresh from the operating system is not free to use: the first touch of each 4 KiB page stops the program
(a page fault) while the kernel finds a page and fills it with zeros. On the 2-core box of BENCHMARKS.md, writing
`torch.exp(x)` into a fresh 32 MB tensor takes 43 ms; the same write into memory the process already holds takes
11 ms. A step that allocates a few such tensors spends a tenth of its time in page faults, every step, for memory
it had a moment ago.

`retain_freed_memory()` asks malloc to keep what it frees for the process: no `mmap` for big blocks (they come from
the heap, `M_MMAP_MAX = 0`), no trimming of the heap (`M_TRIM_THRESHOLD` very large), and one arena for every
thread (`M_ARENA_MAX = 1`; a thread's own arena is a 64 MB heap that glibc shrinks as it frees). The process then
holds its peak memory between steps, as PyTorch's caching allocator does on a GPU, and the next step reuses it.
(Reuse takes a few steps to settle: PyTorch asks for 64-byte-aligned blocks, glibc pads such a request, and a freed
block of exactly one tensor's size fits the next request of that size only once its free neighbours have merged
with it.) When the block ends, malloc gets glibc's steady-state defaults back (mmap from 32 MB, trim beyond 64 MB)
and `malloc_trim` returns what is held to the system. `lmforge.training.loop.train` uses it for every CPU run.

It is glibc-only (Linux); elsewhere it does nothing. If the environment sets any of glibc's own malloc tunables
(`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_ARENA_MAX`, `GLIBC_TUNABLES`), the
user has chosen, and malloc is left alone.

    python -c "from lmforge.training.heap import show_page_faults; show_page_faults()"   # the cost, measured here
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
# glibc's values once a process has freed a big mmapped block: the dynamic mmap threshold has risen to its cap
# (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB on 64-bit) and the trim threshold to twice that; DEFAULT_MMAP_MAX; and the
# arena limit of 8 per core (mallopt cannot set "automatic" back, so the number it stands for)
GLIBC_STEADY = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20, M_MMAP_MAX: 65536,
                M_ARENA_MAX: 8 * (os.cpu_count() or 1)}
# no mmap, trim only beyond 2 GiB free (mallopt takes an int), and one arena: threads that start inside the block
# allocate from the main heap too (a thread's own arena is a 64 MiB heap that glibc shrinks as it frees)
RETAIN = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1, M_ARENA_MAX: 1}
USER_TUNABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX",
                 "GLIBC_TUNABLES")

_lock = threading.Lock()
_depth = 0  # nested retain_freed_memory() blocks: the outermost one sets and restores
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet


def glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has mallopt and malloc_trim), else None."""
    global _libc
    if _libc is False:
        lib = None
        try:
            cand = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(cand, "mallopt") and hasattr(cand, "malloc_trim") and hasattr(cand, "gnu_get_libc_version"):
                lib = cand
        except OSError:
            pass
        _libc = lib
    return _libc


def _set(params: dict[int, int]) -> bool:
    lib = glibc()
    if lib is None:
        return False
    ok = True
    for key, value in params.items():
        ok &= bool(lib.mallopt(ctypes.c_int(key), ctypes.c_int(value)))
    return ok


def user_chose() -> bool:
    """Whether the environment already tunes glibc's malloc (then lmforge leaves it alone)."""
    return any(name in os.environ for name in USER_TUNABLES)


@contextlib.contextmanager
def retain_freed_memory() -> Iterator[bool]:
    """Inside the block, freed memory stays with the process for reuse (see the module docstring).

    Yields whether the policy is in force (False off glibc, or when the user tunes malloc through the
    environment). Nested blocks are fine: the outermost one sets the policy and restores glibc's defaults."""
    global _depth
    with _lock:
        active = _depth > 0 or (not user_chose() and _set(RETAIN))
        if active:
            _depth += 1
    try:
        yield active
    finally:
        if active:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    _set(GLIBC_STEADY)
                    glibc().malloc_trim(ctypes.c_size_t(0))


def page_faults() -> int:
    """Minor page faults of this process so far (pages the kernel had to supply on first touch)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def show_page_faults(mb: int = 64, repeats: int = 5) -> None:
    """Allocate, fill and free an `mb`-MB tensor `repeats` times with and without retaining freed memory: print the
    page faults and the time per fill."""
    import time

    import torch

    def run() -> tuple[float, float]:
        n = mb * (1 << 20) // 4
        torch.ones(n)  # warm-up
        f0, t0 = page_faults(), time.perf_counter()
        for _ in range(repeats):
            torch.ones(n)
        return (page_faults() - f0) / repeats, (time.perf_counter() - t0) / repeats * 1e3

    faults, ms = run()
    print(f"glibc defaults:        {faults:8.0f} page faults and {ms:6.1f} ms per {mb} MB tensor")
    with retain_freed_memory() as active:
        faults, ms = run()
    print(f"retain_freed_memory(): {faults:8.0f} page faults and {ms:6.1f} ms per {mb} MB tensor"
          + ("" if active else "  (not in force here: not glibc, or MALLOC_* set)"))
