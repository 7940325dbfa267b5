"""The lmforge model directory: reading weights, building a model on them, and saving.

Fast, exact loading: the model is built on the `meta` device (shapes only, no memory, no random init), the
tensors are checked by name and shape against it, and `load_state_dict(assign=True)` puts the loaded tensors in
place. Random initialization of a 124M model costs more than reading its weights, so skipping it matters.

dtype: `"auto"` keeps the checkpoint's own dtype (HF `torch_dtype`/`dtype`, lmforge `dtype`), which is what the
weights were trained or published in; `"float32"`, `"bfloat16"`, `"float16"` convert on load.

The lmforge directory (`save`):

    config.json              ModelConfig fields + {"format": "lmforge", "version": 1, "dtype": ...}
    model.safetensors        weights (model-0000k-of-0000n.safetensors + model.safetensors.index.json when large)
    tokenizer.json           the tokenizer (`tok.save(dir)`)
    generation_config.json   default inference controls
    chat_template.jinja      optional
    quantization.json        optional: the quantization scheme; loading calls `lmforge.compress.quantize.prepare_for_load`

A save builds the directory next to the target and swaps it in (`lmforge.utils.atomic_dir`), so a crash never
leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.overrides import TorchFunctionMode

from lmforge import kernels
from lmforge.models.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.generation.config import GenerationConfig
from lmforge.compress.quantize import prepare_for_load, tensor_checksums, verify_checksums
from lmforge.models.decoder import Transformer, rope_inv_freq
from lmforge.tokenizers import Tokenizer, load_tokenizer
from lmforge.tokenizers.llama2c import Llama2cTokenizer
from lmforge.utils import atomic_dir, atomic_write_json, dtype_name, parse_device, parse_dtype, read_json

FORMAT_VERSION = 1


@dataclass
class Loaded:
    """What a format reader hands back: the parts `lmforge.load` wraps into an `LM` (readers know nothing of LM)."""

    model: torch.nn.Module
    tokenizer: Any
    config: Any
    generation_config: GenerationConfig
    chat_template: str | None = None
    path: str | None = None
MAX_SHARD_BYTES = 5 * 1024**3  # weights above this are split into shards with an index (as Hugging Face does)


# ----------------------------------------------------------------------------------------------------------------
# Reading weights
# ----------------------------------------------------------------------------------------------------------------
def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# safetensors dtype names -> torch dtypes (the ones safetensors.torch reads; those this torch lacks are left out)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U64", "uint64"),
    ("U32", "uint32"), ("U16", "uint16"), ("C64", "complex64"), ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2", "float8_e5m2"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu")) if hasattr(torch, attr)}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def _safetensors_header(f, size: int) -> tuple[int, list[tuple[str, torch.dtype, tuple[int, ...], int, int]]]:
    """(offset of the data region, [(name, dtype, shape, begin, end)] in file order) of an open safetensors file,
    every entry checked against the file: a ValueError (one line, naming the tensor) for anything wrong.

    The format: 8 bytes little-endian N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]},
    "__metadata__": {str: str}}, then the data region, which the tensors' [begin, end) byte ranges (relative to its
    start) tile exactly: no gaps, no overlaps, nothing after the last one."""
    if size < 8:
        raise ValueError(f"the file is {size} bytes, too short for the 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        raise ValueError(f"the header length {n} runs past the end of the file ({size} bytes)")
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"the header length {n} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(f.read(n).decode("utf-8"))  # a name given twice: the last wins, as in safetensors
    except UnicodeDecodeError:
        raise ValueError("the header is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"the header is not valid JSON ({e.msg} at byte {e.pos})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    if not isinstance(header.pop("__metadata__", {}), dict):
        raise ValueError("__metadata__ is not a JSON object")
    data_len = size - 8 - n
    entries = []
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and
                isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)):
            raise ValueError(f"tensor {name!r}: not a {{dtype, shape, data_offsets}} entry")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name!r}: unsupported dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: bad shape {shape}")
        if len(offsets) != 2 or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
            raise ValueError(f"tensor {name!r}: bad data_offsets {offsets}")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ValueError(f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes, but {info['dtype']} "
                             f"{shape} needs {nbytes}")
        if end > data_len:
            raise ValueError(f"tensor {name!r}: data_offsets {offsets} run past the end of the data "
                             f"({data_len} bytes in a {size}-byte file)")
        entries.append((name, dtype, tuple(shape), begin, end))
    entries.sort(key=lambda e: (e[3], e[4]))
    pos = 0
    for name, _, _, begin, end in entries:
        if begin != pos:
            raise ValueError(f"tensor {name!r}: data_offsets [{begin}, {end}] "
                             f"{'overlap the previous tensor' if begin < pos else 'leave a gap before them'}")
        pos = end
    if pos != data_len:
        raise ValueError(f"{data_len - pos} bytes after the last tensor's data")
    return 8 + n, entries


def read_safetensors(path: str | os.PathLike, skip: Callable[[str], Any] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file (but those `skip(name)` is true for), each read into memory of its own;
    a corrupt or truncated file is a one-line error naming the file (and the tensor, where one is at fault).

    Why not memory-map the file (what `safetensors.torch.load_file` does): every tensor would be a view into one
    file mapping, and the mapping stays (and the file pages it touched stay resident) while any tensor of the file is
    alive, even a small bias; the decode re-layout and the quantized kernels copy the large weights anyway, so the
    mapped pages and the copies were both resident (GPT-2 124M fp32, load + decode: 1,302 MiB peak; read like
    this: 896; benchmarks/bench_load_rss.py). A mapped tensor also starts wherever the file put it (`data_ptr() % 64`
    can be 40), which some CPU kernels cannot read. Here each tensor is a fresh allocation from
    `lmforge.kernels._fresh`: 64-byte aligned, 2 MB ones and larger on huge pages, marked as owned so
    `kernels.owned` takes it as it is, and freed on its own when the model drops it. The bytes go straight from the
    file into it (`readinto`, no intermediate buffer).

    Integer tensors (quantized codes and scales, which the CPU kernels stream as they are) are allocated as weights
    (mid-sized ones share huge-page chunks); floating ones are not, because the decode step re-lays large float
    matrices out in copies of its own, and a dropped matrix in a shared chunk would keep the whole chunk alive.
    """
    if sys.byteorder != "little":  # pragma: no cover - the format is little-endian; safetensors byte-swaps for us
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except Exception as e:
            raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt: {one_line(e)})") \
                from None
        return {k: v for k, v in sd.items() if not (skip and skip(k))}
    try:
        f = open(path, "rb", buffering=0)  # unbuffered: readinto goes straight into the tensor
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({one_line(e)})") from None
    out: dict[str, torch.Tensor] = {}
    try:
        with f:
            base, entries = _safetensors_header(f, os.fstat(f.fileno()).st_size)
            for name, dtype, shape, begin, end in entries:
                if skip is not None and skip(name):
                    continue
                buf = kernels._fresh(end - begin, weights=not dtype.is_floating_point)  # uint8, aligned
                view = memoryview(buf.numpy())
                f.seek(base + begin)
                got = 0
                while got < end - begin:  # one read() returns at most ~2 GB on Linux: loop
                    k = f.readinto(view[got:])
                    if not k:
                        raise ValueError(f"tensor {name!r}: the file ended while reading it (changed on disk?)")
                    got += k
                t = buf.view(dtype).view(shape)
                setattr(t, kernels._OWNED_ATTR, True)  # contiguous, aligned, ours: `kernels.owned` keeps it
                out[name] = t
    except ValueError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt: {one_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({one_line(e)})") from None
    return out


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, read with `weights_only=True` (tensors and plain containers only, no code)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the pre-1.6 (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e):  # never retry with weights_only=False: that can run code
            raise CheckpointError(f"{path}: refused: not a plain tensor checkpoint, or corrupt (torch.load with "
                                  "weights_only=True failed)") from None
        raise CheckpointError(f"{path}: cannot read PyTorch weights ({one_line(e)})") from None


def read_weights(directory: str | os.PathLike, skip: Callable[[str], Any] | None = None
                 ) -> tuple[dict[str, torch.Tensor], str | None]:
    """Every tensor in a model directory, from whichever layout it uses, and the dtype they are stored in.
    `skip(name)`: tensors the caller will drop anyway (safetensors: never read; pickles: dropped after loading).

    Order of preference: model.safetensors.index.json (sharded), model.safetensors, pytorch_model.bin.index.json,
    pytorch_model.bin.
    """
    d = Path(directory)

    def pickled(path: Path) -> dict[str, torch.Tensor]:
        sd = _read_pickle(path)
        return {k: v for k, v in sd.items() if not skip(k)} if skip is not None and isinstance(sd, dict) else sd

    def safetensors(path: Path) -> dict[str, torch.Tensor]:
        return read_safetensors(path, skip)

    for index_name, reader in (("model.safetensors.index.json", safetensors),
                               ("pytorch_model.bin.index.json", pickled)):
        index = d / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (d / shard).exists():
                    raise CheckpointError(f"{index}: shard {shard!r} is missing from {d}")
                sd.update(reader(d / shard))
            missing = [n for n in weight_map if n not in sd and not (skip and skip(n))]
            if missing:
                raise CheckpointError(f"{index}: tensor {missing[0]!r} is listed but not in its shard")
            return sd, _tensor_dtype(sd)
    if (d / "model.safetensors").exists():
        sd = read_safetensors(d / "model.safetensors", skip)
        return sd, _tensor_dtype(sd)
    if (d / "pytorch_model.bin").exists():
        sd = pickled(d / "pytorch_model.bin")
        return sd, _tensor_dtype(sd)
    others = sorted(p.name for p in d.glob("*.safetensors"))
    if others:
        raise CheckpointError(f"{d}: found {others[0]} but no model.safetensors or model.safetensors.index.json")
    raise CheckpointError(f"{d}: no weights found (model.safetensors, sharded safetensors + index, or "
                          "pytorch_model.bin)")


def _tensor_dtype(sd: Mapping[str, torch.Tensor]) -> str | None:
    for t in sd.values():
        if t.is_floating_point():
            return dtype_name(t.dtype)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Building a model from checked tensors
# ----------------------------------------------------------------------------------------------------------------
_RANDOM_FILLS = frozenset(getattr(torch.Tensor, n) for n in ("normal_", "uniform_", "erfinv_", "exponential_",
                                                            "log_normal_", "cauchy_", "geometric_", "random_",
                                                            "bernoulli_"))


class _NoInitOnMeta(TorchFunctionMode):
    """Initializers (`torch.nn.init.*`, in-place random fills) called on a meta tensor return it untouched.

    On the meta device they compute nothing anyway, but some are not free: `nn.Embedding`'s `normal_` has no native
    meta kernel, and its first call imports PyTorch's Python decompositions (sympy, mpmath, torch._refs: ~830
    modules), about 1 s and 70 MB of resident memory, in every process that loads a model."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


@contextmanager
def meta_device():
    """`with torch.device("meta")` for building a model whose every tensor is about to be loaded: shapes only, no
    memory, and no initializer runs (see `_NoInitOnMeta`). This thread only, as torch.device's context is."""
    with torch.device("meta"), _NoInitOnMeta():
        yield


def check_tensors(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], source: str) -> None:
    """Every expected tensor is present with the expected shape, or a one-line error naming the file and tensor."""
    for name, shape in expected.items():
        if name not in sd:
            raise CheckpointError(f"{source}: missing tensor {name!r}")
        if tuple(sd[name].shape) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(sd[name].shape)} but the config "
                                  f"expects {tuple(shape)}")


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    """Every tensor a model's state dict must provide (a tied lm_head is left out), name -> shape."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}


def assign_exact(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, hf_name: Callable[[str], str | None],
                 dtype: torch.dtype | None, device, source: str, hint: str = "") -> torch.nn.Module:
    """Put the tensors of `sd` into `model` (built on the meta device) when they are exactly its tensors: every
    expected name present, none extra, every shape right; else a one-line error naming the tensor by `hf_name` (the
    checkpoint's own name). Tensors that share storage (a tied head) get their own copies. Returns the model on
    `device`, in eval mode, in `dtype` (default: the checkpoint's)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {hf_name(missing[0]) or missing[0]!r} "
                              f"({len(missing)} missing)")
    extra = [k for k in sd if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {hf_name(extra[0]) or extra[0]!r} for this config{hint}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{source}: {hf_name(k)} has shape {tuple(sd[k].shape)}, the config gives {shape}")
    target_dtype = dtype or next(iter(sd.values())).dtype
    seen, tensors = set(), {}
    for k, v in sd.items():  # a checkpoint whose lm_head aliases shared: give each parameter its own storage
        v = v.to(target_dtype)
        tensors[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    model.load_state_dict(tensors, assign=True)
    return model.to(resolve_device(device)).eval()


def build_model(config: ModelConfig, state_fn: Callable[[dict[str, tuple]], Mapping[str, torch.Tensor]],
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                qconfig: dict[str, Any] | None = None, source: str = "") -> Transformer:
    """A `Transformer` for `config` holding the tensors `state_fn(expected_shapes)` returns.

    The model is created on the meta device (no memory, no random init); `state_fn` receives the name -> shape
    dict of every tensor needed and must return exactly those (it raises the one-line error naming a missing or
    mis-shaped tensor). Floating tensors are cast to `dtype` when given.
    """
    device = torch.device(device or "cpu")
    with meta_device():
        model = Transformer(config, init_weights=False)
    if qconfig:
        prepare_for_load(model, qconfig)
    expected = expected_shapes(model)
    sd = dict(state_fn(expected))
    missing = [n for n in expected if n not in sd]
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for name, t in sd.items():
        if tuple(t.shape) != tuple(expected.get(name, t.shape)):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)} but the config expects "
                                  f"{tuple(expected[name])}")
        if t.is_floating_point() and dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        sd[name] = t.to(device)
    integer = {n: t.dtype for n, t in model.state_dict().items() if not t.is_floating_point()}
    for name, want in integer.items():  # quantized codes and scales: a float tensor here is not what the scheme wrote
        if name in sd and sd[name].dtype != want:
            raise CheckpointError(f"{source or 'weights'}: tensor {name!r} is {str(sd[name].dtype)[6:]} but "
                                  f"quantization.json's scheme stores it as {str(want)[6:]}")
    unexpected = [n for n in sd if n not in expected]
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    owned = {t.data_ptr() for t in sd.values() if kernels.is_owned(t)}
    model.load_state_dict(sd, strict=False, assign=True)
    for p in model.parameters():  # assign=True wraps each tensor in a new Parameter: carry the owned mark over
        if p.data_ptr() in owned and p.is_contiguous():
            setattr(p, kernels._OWNED_ATTR, True)
    if config.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear) and \
            isinstance(model.wte, torch.nn.Embedding):  # assign=True replaced wte.weight: tie the head to it again
        model.lm_head.weight = model.wte.weight
    if config.pos_embedding == "rope":
        model.inv_freq = rope_inv_freq(config).to(device)  # a non-persistent buffer: recomputed, kept in fp32
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"tensor {left[0]!r} was not loaded")
    if qconfig:
        model.quantization_config = dict(qconfig)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers, generation config, chat template
# ----------------------------------------------------------------------------------------------------------------
def load_dir_tokenizer(d: Path):
    """The tokenizer stored in a directory, or None when there is none.

    tokenizer.json (with tokenizer_config.json: special tokens, BOS rule, chat template) is the most complete
    description and goes through `load_tokenizer`. A directory with only vocab.json/merges.txt (older GPT-2-style
    checkpoints) takes lmforge's GPT-2 path: those are the very files OpenAI published as encoder.json/vocab.bpe.
    """
    if (d / "tokenizer.bin").exists() and not (d / "tokenizer.json").exists():  # llama2.c's format, kept as is
        return Llama2cTokenizer.load(d / "tokenizer.bin")
    if not any((d / f).exists() for f in ("tokenizer.json", "vocab.json")):
        return load_tokenizer(d) if any(d.glob("*.tiktoken")) else None  # an OpenAI rank file (tiktoken_file)
    if (d / "tokenizer.json").exists():
        return load_tokenizer(d)
    if (d / "vocab.json").exists() and (d / "merges.txt").exists():
        return Tokenizer.from_gpt2_files(d / "vocab.json", d / "merges.txt")
    return None


def chat_template(d: Path) -> str | None:
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "tokenizer_config.json").exists():
        tmpl = read_json(d / "tokenizer_config.json").get("chat_template")
        if isinstance(tmpl, str):
            return tmpl
    return None


def generation_config(d: Path, hf: Mapping[str, Any] | None = None) -> GenerationConfig:
    if (d / "generation_config.json").exists():
        data = read_json(d / "generation_config.json")
        data.pop("transformers_version", None)
        data.pop("_from_model_config", None)
        return GenerationConfig.from_dict(data, source=str(d / "generation_config.json"))
    hf = hf or {}
    return GenerationConfig(eos_token_id=hf.get("eos_token_id"), bos_token_id=hf.get("bos_token_id"),
                            pad_token_id=hf.get("pad_token_id"))


def resolve_dtype(dtype, stored: str | None) -> torch.dtype | None:
    want = parse_dtype(dtype)
    if want is not None:
        return want
    if stored:
        try:
            return parse_dtype(stored)
        except ConfigError:
            return None
    return None


def resolve_device(device) -> torch.device:
    return torch.device("cpu") if device is None else parse_device(device)


# ----------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------
def load_lmforge_dir(d: Path, dtype="auto", device=None) -> Loaded:
    """An lmforge model directory (see the module docstring)."""
    raw = read_json(d / "config.json")
    if raw.get("version", 1) > FORMAT_VERSION:
        raise CheckpointError(f"{d / 'config.json'}: lmforge format version {raw['version']} is newer than this "
                              f"lmforge ({FORMAT_VERSION}); upgrade lmforge")
    fields = {k: v for k, v in raw.items() if k not in ("format", "version", "dtype")}
    try:
        config = ModelConfig.from_dict(fields)
    except ConfigError as e:
        raise CheckpointError(f"{d / 'config.json'}: {e}") from None
    qconfig = read_json(d / "quantization.json") if (d / "quantization.json").exists() else None
    sd, stored = read_weights(d)
    torch_dtype = resolve_dtype(dtype, raw.get("dtype") or stored)
    source = str(d)

    def state_fn(expected):
        if config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        check_tensors(sd, expected, source)
        extra = [n for n in sd if n not in expected]
        if extra:
            raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r} (does config.json match the weights? "
                                  f"n_layer={config.n_layer})")
        return sd

    if qconfig and "checksums" in qconfig:
        verify_checksums(sd, qconfig["checksums"], d)
        qconfig = {k: v for k, v in qconfig.items() if k != "checksums"}  # they describe the file, not the model
    model = build_model(config, state_fn, dtype=torch_dtype, device=resolve_device(device), qconfig=qconfig,
                        source=source)
    tok = load_dir_tokenizer(d)
    return Loaded(model, tok, config, generation_config(d), chat_template(d), path=str(d))


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside `torch.compile` (`_orig_mod`) or DDP/FSDP-style (`module`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (getattr(model, "module", None) if not
                                                     hasattr(model, "config") else None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the tied lm_head (safetensors refuses two names for one storage)."""
    model = _unwrap(model)
    sd = model.state_dict()
    cfg = getattr(model, "config", None)
    if cfg is not None and cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def write_safetensors(sd: Mapping[str, torch.Tensor], d: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """Write weights into directory `d` as model.safetensors, or as shards + model.safetensors.index.json.

    Stale weight files from an earlier save in `d` are removed first. Returns the file names written.
    """
    from safetensors.torch import save_file

    for old in list(d.glob("model*.safetensors")) + list(d.glob("model.safetensors.index.json")):
        old.unlink()
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(d / "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / fname), metadata=metadata)
        names.append(fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    atomic_write_json(d / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                           "weight_map": weight_map})
    return names + ["model.safetensors.index.json"]


ADAPTER_WRAPPERS = ("LoRALinear", "AdaptedProjection")  # finetune's wrappers (named, not imported: it sits above)


def save(lm, path: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `lm` as an lmforge model directory at `path` (atomically; other files already there are kept)."""
    model = _unwrap(lm.model)
    wrapped = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ADAPTER_WRAPPERS})
    if wrapped:  # their `.base.weight` keys would make a directory no loader reads back
        raise ConfigError(f"the model carries adapters ({', '.join(wrapped)}): save them as an adapter directory "
                          "(lmforge.finetune.lora.save_peft / lmforge.finetune.adapters.save_adapter), or merge LoRA "
                          "into the weights first (lora.merge_and_unload) / drop them (adapters.remove_adapters)")
    config: ModelConfig = lm.config
    sd = unique_state_dict(model)
    dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    qconfig = getattr(model, "quantization_config", None)
    with atomic_dir(path) as tmp:
        write_safetensors(sd, tmp, max_shard_bytes)
        atomic_write_json(tmp / "config.json", {"format": "lmforge", "version": FORMAT_VERSION,
                                                "dtype": dtype_name(dtype), **config.to_dict()})
        if lm.tokenizer is not None:
            lm.tokenizer.save(tmp)
        atomic_write_json(tmp / "generation_config.json", lm.generation_config.to_dict())
        if lm.chat_template:
            (tmp / "chat_template.jinja").write_text(lm.chat_template, encoding="utf-8")
        elif (tmp / "chat_template.jinja").exists():
            (tmp / "chat_template.jinja").unlink()
        if qconfig:
            atomic_write_json(tmp / "quantization.json", {**qconfig, "checksums": tensor_checksums(sd)})
        elif (tmp / "quantization.json").exists():
            (tmp / "quantization.json").unlink()
    lm.path = str(path)
    return Path(path)
