"""safetensors weights are read into memory lmforge owns, not memory-mapped (lmforge.formats.native.read_safetensors):
the same values as safetensors' own reader for every dtype, 64-byte-aligned owned tensors, no mapping of the file
left behind, one-line errors naming the file (and tensor) for a damaged file, and a load whose peak memory is about
one copy of the weights."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmforge
from lmforge import kernels
from lmforge.errors import CheckpointError
from lmforge.formats.native import SAFETENSORS_DTYPES, read_safetensors, read_weights, write_safetensors
from lmforge.lm import LM
from lmforge.models.config import ModelConfig
from lmforge.models.decoder import Transformer

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def _mapped(path) -> bool:
    """Whether this process has any mapping of `path` (a memory-mapped tensor keeps one)."""
    return str(path) in open("/proc/self/maps").read()


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _random(dtype: torch.dtype, shape: tuple, g: torch.Generator) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)  # any bit pattern (NaNs too)
    return raw.view(dtype).view(shape)


def _all_dtypes() -> list[tuple[str, torch.dtype]]:
    import safetensors.torch as st

    theirs = set(getattr(st, "_TYPES", SAFETENSORS_DTYPES).values())
    return [(name, dt) for name, dt in SAFETENSORS_DTYPES.items() if dt in theirs]


def test_every_dtype_equals_safetensors_own_reader(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, dtype in _all_dtypes():  # a scalar, an empty tensor, small, mid-sized (>= 64 KB) and >= 2 MB ones
        for shape in [(), (0, 3), (7,), (3, 5, 11), (300, 64), (1100, 512)]:
            if dtype.itemsize * (1100 * 512) > 4 << 20 and shape == (1100, 512):
                shape = (2100, 256)  # ~2 MB or more either way, without making the file large
            sd[f"{name}.{'x'.join(map(str, shape)) or 'scalar'}"] = _random(dtype, shape, g)
    f = tmp_path / "all.safetensors"
    save_file(sd, str(f), metadata={"format": "pt"})
    got = read_safetensors(f)
    if sys.platform.startswith("linux"):
        assert not _mapped(f)  # (checked before safetensors' reader maps it)
    want = load_file(str(f))
    assert list(got) == list(want)  # same order (the file's): `read_weights` picks the stored dtype from it
    for k, w in want.items():
        t = got[k]
        assert (t.dtype, t.shape) == (w.dtype, w.shape), k
        assert _bytes(t) == _bytes(w), k
        assert t.data_ptr() % 64 == 0 and t.is_contiguous() and kernels.is_owned(t), k
        assert kernels.owned(t) is t  # the kernels take it as it is: no second copy


def test_skip_reads_nothing_of_the_skipped(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(3), "h.0.attn.bias": torch.ones(4, 4), "b": torch.zeros(2, dtype=torch.int8)}, str(f))
    assert list(read_safetensors(f, skip=lambda n: n.endswith(".attn.bias"))) == ["a", "b"]


def _tiny_gpt2(n_layer=2, n_embd=64, vocab=512) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt2", n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=vocab, block_size=128)
    return Transformer(cfg).eval()


@linux
@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_loaded_model_holds_no_mapping_and_owned_memory(tmp_path, scheme):
    model = _tiny_gpt2()
    if scheme:
        from lmforge.compress.quantize import quantize_model

        model = quantize_model(model, scheme, 32, embeddings="same", progress=False)
    LM(model, None, model.config).save(tmp_path / "m")
    lm = lmforge.load(tmp_path / "m")
    assert not _mapped(tmp_path / "m" / "model.safetensors")
    want = model.state_dict()
    for k, v in lm.model.state_dict().items():
        assert v.data_ptr() % 64 == 0, k
        assert torch.equal(v, want[k]), k
    for name, b in lm.model.named_buffers():  # quantized codes and scales: used by the kernels as loaded
        if b is not None and b.numel() and name.endswith(("qweight", "scales", "zeros")):
            assert kernels.owned(b) is b, name
    ids = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        assert torch.allclose(lm.model(ids), model(ids), atol=1e-5)


@linux
def test_sharded_checkpoint_goes_through_the_same_reader(tmp_path):
    sd = {f"w{i}": torch.randn(64, 64) for i in range(6)}
    d = tmp_path / "sharded"
    d.mkdir()
    names = write_safetensors(sd, d, max_shard_bytes=40_000)
    assert "model.safetensors.index.json" in names and len(names) > 2
    got, stored = read_weights(d)
    assert stored == "float32" and set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) and got[k].data_ptr() % 64 == 0 for k in sd)
    assert not any(_mapped(d / n) for n in names)


# ---- damaged files: one line naming the file (and the tensor at fault) -------------------------------------------
def _file(path, header, data: bytes = b"", raw_header: bytes | None = None) -> None:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I8", "shape": [4], "data_offsets": [8, 12]}}


def _bad(**changes):
    return {**GOOD, **changes}


@pytest.mark.parametrize("case,make,words", [
    ("short", lambda f: f.write_bytes(b"\x01\x00"), ["too short"]),
    ("header_past_eof", lambda f: f.write_bytes(struct.pack("<Q", 10_000) + b"{}"), ["header length 10000"]),
    ("not_json", lambda f: _file(f, None, b"", raw_header=b"{nope"), ["not valid JSON"]),
    ("not_utf8", lambda f: _file(f, None, b"", raw_header=b"\xff\xfe"), ["not UTF-8"]),
    ("not_object", lambda f: _file(f, [1, 2]), ["not a JSON object"]),
    ("bad_entry", lambda f: _file(f, _bad(b={"dtype": "I8"}), bytes(12)), ["'b'"]),
    ("bad_dtype", lambda f: _file(f, _bad(b={"dtype": "Q7", "shape": [4], "data_offsets": [8, 12]}), bytes(12)),
     ["'b'", "Q7"]),
    ("bad_shape", lambda f: _file(f, _bad(b={"dtype": "I8", "shape": [-4], "data_offsets": [8, 12]}), bytes(12)),
     ["'b'", "shape"]),
    ("size_mismatch", lambda f: _file(f, _bad(b={"dtype": "I8", "shape": [5], "data_offsets": [8, 12]}), bytes(12)),
     ["'b'", "needs 5"]),
    ("offset_past_end", lambda f: _file(f, _bad(b={"dtype": "I8", "shape": [4], "data_offsets": [8, 12]}),
                                        bytes(10)), ["'b'", "past the end"]),
    ("reversed_offsets", lambda f: _file(f, _bad(b={"dtype": "I8", "shape": [0], "data_offsets": [12, 8]}),
                                         bytes(12)), ["'b'", "data_offsets"]),
    ("overlap", lambda f: _file(f, _bad(b={"dtype": "I8", "shape": [4], "data_offsets": [4, 8]}), bytes(8)),
     ["'b'", "overlap"]),
    ("gap", lambda f: _file(f, _bad(b={"dtype": "I8", "shape": [4], "data_offsets": [10, 14]}), bytes(14)),
     ["'b'", "gap"]),
    ("trailing_bytes", lambda f: _file(f, GOOD, bytes(20)), ["8 bytes after"]),
])
def test_damaged_file_is_one_line_naming_file_and_tensor(tmp_path, case, make, words):
    f = tmp_path / f"{case}.safetensors"
    make(f)
    with pytest.raises(CheckpointError) as e:
        read_safetensors(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{f}: not a valid safetensors file (truncated or corrupt: "), msg
    for w in words:
        assert w in msg, msg
    with pytest.raises(Exception):  # never stricter than the format: safetensors' own reader refuses it too
        load_file(str(f))


def test_good_handmade_file_and_missing_file(tmp_path):
    f = tmp_path / "ok.safetensors"
    _file(f, {**GOOD, "__metadata__": {"format": "pt"}}, struct.pack("<2f", 1.5, -2.0) + bytes([1, 2, 3, 255]))
    got = read_safetensors(f)
    assert got["a"].tolist() == [1.5, -2.0] and got["b"].tolist() == [1, 2, 3, -1]
    with pytest.raises(CheckpointError, match="nope.safetensors: file not found"):
        read_safetensors(tmp_path / "nope.safetensors")


def test_truncated_model_names_file_and_tensor(tmp_path):
    LM(_tiny_gpt2(), None, _tiny_gpt2().config).save(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file \(truncated or "
                                              r"corrupt: tensor '[^']+': data_offsets .* run past the end") as e:
        lmforge.load(tmp_path / "m")
    assert "\n" not in str(e.value)


# ---- peak memory of a load: about one copy of the weights ---------------------------------------------------------
PEAK_CHILD = textwrap.dedent("""
    import gc, json, sys
    import torch, lmforge

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    lmforge.load(sys.argv[1])  # the warm-up: every lazy import and first-call allocation of a load
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident set
    before = status("VmRSS")
    lm = lmforge.load(sys.argv[2])
    print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS")}))
""")


@linux
@pytest.mark.parametrize("scheme", [None, "int8"])
def test_peak_memory_of_a_load_is_one_copy_of_the_weights(tmp_path, scheme):
    from lmforge.compress.quantize import model_nbytes, quantize_model

    def saved(name, **shape):
        model = _tiny_gpt2(**shape)
        if scheme:
            model = quantize_model(model, scheme, 32, embeddings="same", progress=False)
        LM(model, None, model.config).save(tmp_path / name)
        return model_nbytes(model)

    saved("warm")
    nbytes = saved("big", n_layer=4, n_embd=256, vocab=4096)  # ~15 MB fp32, ~4 MB int8
    r = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(tmp_path / "warm"), str(tmp_path / "big")],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "clear_refs" in r.stderr:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["before"]
    assert growth < 1.3 * nbytes, f"a load of {nbytes / 2**20:.1f} MiB of weights raised the peak by " \
                                  f"{growth / 2**20:.1f} MiB"


# ---- building the model to load into: no initializer runs on the meta device --------------------------------------
def test_meta_device_skips_initializers_only_on_meta_tensors():
    from lmforge.formats.native import meta_device

    with meta_device():
        emb = torch.nn.Embedding(10, 4)
        real = torch.empty(3, device="cpu")
        real.normal_()  # a real tensor still gets its values
        lin = torch.nn.Linear(4, 3)
    assert emb.weight.is_meta and lin.weight.is_meta and not real.is_meta and torch.isfinite(real).all()
    assert (emb.weight.shape, lin.weight.shape, lin.bias.shape) == ((10, 4), (3, 4), (3,))
    torch.nn.init.normal_(torch.empty(2, device="meta"))  # outside the context: torch as usual


def test_a_load_imports_no_sympy(tmp_path):
    """`nn.Embedding(...)` on the bare meta device runs `normal_` through PyTorch's Python decompositions, whose first
    use imports sympy and ~830 other modules: ~1 s and ~70 MB resident in every loading process."""
    from lmforge.formats.hf import export_hf

    lm = LM(_tiny_gpt2(), None, _tiny_gpt2().config)
    lm.save(tmp_path / "native")
    export_hf(lm, tmp_path / "hf")
    code = ("import sys, lmforge; [lmforge.load(d) for d in sys.argv[1:]]; "
            "print(sorted(m for m in ('sympy', 'mpmath') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "native"), str(tmp_path / "hf")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
