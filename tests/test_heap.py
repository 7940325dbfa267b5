"""lmforge.training.heap: freed memory kept by the process (checked with mallinfo2, not timed), defaults restored afterwards."""

from __future__ import annotations

import contextlib
import ctypes

import pytest
import torch

from lmforge.training import heap

glibc_only = pytest.mark.skipif(heap.glibc() is None or not hasattr(heap.glibc(), "mallinfo2"),
                                reason="mallopt/malloc_trim/mallinfo2 need glibc >= 2.33 (Linux)")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> MallInfo2:
    f = heap.glibc().mallinfo2
    f.restype = MallInfo2
    return f()


def big_block() -> str:
    """Where malloc puts a block bigger than all the free memory its heap holds, and what happens on free:
    "mmap" (glibc's defaults: from the system and straight back), "heap, kept" (retain_freed_memory: the heap
    grows and keeps the memory after the free) or "heap, trimmed"."""
    size = mallinfo().fordblks + (96 << 20)
    before = mallinfo()
    t = torch.empty(size // 4)
    during = mallinfo()
    del t
    after = mallinfo()
    if during.hblkhd - before.hblkhd >= size:
        return "mmap"
    return "heap, kept" if after.arena >= during.arena else "heap, trimmed"


@pytest.fixture(autouse=True)
def no_user_tunables(monkeypatch):
    for name in heap.USER_TUNABLES:
        monkeypatch.delenv(name, raising=False)


@glibc_only
def test_freed_memory_stays_with_the_process_inside_the_block():
    assert big_block() == "mmap"  # glibc's defaults
    with heap.retain_freed_memory() as active:
        assert active
        assert big_block() == "heap, kept"
        assert big_block() == "heap, kept"
    assert big_block() == "mmap"  # the defaults are back after the block


@glibc_only
def test_nested_blocks_restore_only_at_the_outermost():
    with heap.retain_freed_memory():
        with heap.retain_freed_memory() as inner:
            assert inner
        assert heap._depth == 1
        assert big_block() == "heap, kept"  # still retained after the inner block ended
    assert heap._depth == 0
    assert big_block() == "mmap"


def test_user_tunables_win(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    calls = []
    monkeypatch.setattr(heap, "_set", lambda params: calls.append(params) or True)
    with heap.retain_freed_memory() as active:
        assert not active
    assert calls == [] and heap._depth == 0


def test_no_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(heap, "_libc", None)
    with heap.retain_freed_memory() as active:
        assert not active
    assert heap._depth == 0


def test_train_holds_freed_memory_only_when_asked_and_for_the_run_only(monkeypatch):
    from test_train import pattern_tokens, tiny_model  # the loop's own tiny model and data

    from lmforge.training import loop as train_mod
    from lmforge.training.data import PackedBatches

    events = []

    @contextlib.contextmanager
    def recording():
        events.append("enter")
        try:
            yield True
        finally:
            events.append("exit")

    monkeypatch.setattr(train_mod, "retain_freed_memory", recording)
    model = tiny_model()
    batches = PackedBatches(pattern_tokens(), 2, 16, seed=0)
    train_mod.train(model, batches, train_mod.TrainConfig(max_steps=2, batch_size=2, eval_every=0,
                                                          progress=False, cores=1))
    assert events == []  # the library leaves process-wide malloc settings alone unless its caller asks
    train_mod.train(model, batches, train_mod.TrainConfig(max_steps=2, batch_size=2, eval_every=0,
                                                          progress=False, cores=1, retain_memory=True))
    assert events == ["enter", "exit"]

    def boom(rec):
        raise RuntimeError("stop")

    events.clear()
    with pytest.raises(RuntimeError):
        train_mod.train(model, batches, train_mod.TrainConfig(max_steps=2, batch_size=2, eval_every=0,
                                                              progress=False, cores=1, retain_memory=True),
                        on_step=boom)
    assert events == ["enter", "exit"]  # released when the run fails too
