"""Loading and saving models: one `load` for every format, one directory layout for saving.

`lmforge.load(path_or_id)` looks at what it was given and picks the reader:

| input                                   | reader                                                        |
|-----------------------------------------|---------------------------------------------------------------|
| lmforge directory (config.json has `"format": "lmforge"`) | `ModelConfig` + model.safetensors                |
| Hugging Face directory (config.json has `model_type`)      | `lmforge.formats.hf`: key + name maps, GPT-2 transposes  |
| llama2.c `.bin` file (+ its tokenizer `.bin`)             | `lmforge.formats.llama2c`                                 |
| `.gguf` file                            | `lmforge.formats.gguf.load_gguf`                                      |
| Hub id such as `openai-community/gpt2`  | `huggingface_hub.snapshot_download`, then the directory above |

Why safetensors: a `.bin` (pickle) file can run code when unpickled; safetensors is a JSON header plus raw arrays,
so loading it cannot execute anything, and it can be memory-mapped: tensors are read from the page cache when
touched instead of being copied through Python. Pickled checkpoints are read with `torch.load(weights_only=True)`,
which refuses anything but tensors and plain containers.

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

import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from lmforge.models.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError, LmforgeError, NetworkError
from lmforge.lm import LM, GenerationConfig
from lmforge.models.decoder import Transformer, rope_inv_freq
from lmforge.utils import atomic_dir, atomic_write_json, dtype_name, parse_device, parse_dtype, read_json

FORMAT_VERSION = 1
MAX_SHARD_BYTES = 5 * 1024**3  # weights above this are split into shards with an index (as Hugging Face does)


# ----------------------------------------------------------------------------------------------------------------
# Reading weights
# ----------------------------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file, memory-mapped; a corrupt or truncated file is a one-line error."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises SafetensorError / OSError for bad headers and short files
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt: {_one_line(e)})") from None


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
        raise CheckpointError(f"{path}: cannot read PyTorch weights ({_one_line(e)})") from None


def read_weights(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """Every tensor in a model directory, from whichever layout it uses, and the dtype they are stored in.

    Order of preference: model.safetensors.index.json (sharded), model.safetensors, pytorch_model.bin.index.json,
    pytorch_model.bin.
    """
    d = Path(directory)
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", _read_pickle)):
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
            missing = [n for n in weight_map if n not in sd]
            if missing:
                raise CheckpointError(f"{index}: tensor {missing[0]!r} is listed but not in its shard")
            return sd, _tensor_dtype(sd)
    if (d / "model.safetensors").exists():
        sd = read_safetensors(d / "model.safetensors")
        return sd, _tensor_dtype(sd)
    if (d / "pytorch_model.bin").exists():
        sd = _read_pickle(d / "pytorch_model.bin")
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
def check_tensors(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], source: str) -> None:
    """Every expected tensor is present with the expected shape, or a one-line error naming the file and tensor."""
    for name, shape in expected.items():
        if name not in sd:
            raise CheckpointError(f"{source}: missing tensor {name!r}")
        if tuple(sd[name].shape) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(sd[name].shape)} but the config "
                                  f"expects {tuple(shape)}")


def build_model(config: ModelConfig, state_fn: Callable[[dict[str, tuple]], Mapping[str, torch.Tensor]],
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                qconfig: dict[str, Any] | None = None, source: str = "") -> Transformer:
    """A `Transformer` for `config` holding the tensors `state_fn(expected_shapes)` returns.

    The model is created on the meta device (no memory, no random init); `state_fn` receives the name -> shape
    dict of every tensor needed and must return exactly those (it raises the one-line error naming a missing or
    mis-shaped tensor). Floating tensors are cast to `dtype` when given.
    """
    from lmforge.formats.hf import expected_shapes

    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(config, init_weights=False)
    if qconfig:
        from lmforge.compress.quantize import prepare_for_load

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
    model.load_state_dict(sd, strict=False, assign=True)
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
def _load_tokenizer(d: Path):
    """The tokenizer stored in a directory, or None when there is none.

    tokenizer.json (with tokenizer_config.json: special tokens, BOS rule, chat template) is the most complete
    description and goes through `Tokenizer.load`. A directory with only vocab.json/merges.txt (older GPT-2-style
    checkpoints) takes lmforge's GPT-2 path: those are the very files OpenAI published as encoder.json/vocab.bpe.
    """
    if (d / "tokenizer.bin").exists() and not (d / "tokenizer.json").exists():  # llama2.c's format, kept as is
        from lmforge.formats.llama2c import Llama2cTokenizer

        return Llama2cTokenizer.load(d / "tokenizer.bin")
    if not any((d / f).exists() for f in ("tokenizer.json", "vocab.json")):
        return None
    from lmforge.tokenizers.bpe import Tokenizer

    if (d / "tokenizer.json").exists():
        return Tokenizer.load(d)
    if (d / "vocab.json").exists() and (d / "merges.txt").exists():
        return Tokenizer.from_gpt2_files(d / "vocab.json", d / "merges.txt")
    return None


def _chat_template(d: Path) -> str | None:
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "tokenizer_config.json").exists():
        tmpl = read_json(d / "tokenizer_config.json").get("chat_template")
        if isinstance(tmpl, str):
            return tmpl
    return None


def _generation_config(d: Path, hf: Mapping[str, Any] | None = None) -> GenerationConfig:
    if (d / "generation_config.json").exists():
        data = read_json(d / "generation_config.json")
        data.pop("transformers_version", None)
        data.pop("_from_model_config", None)
        return GenerationConfig.from_dict(data)
    hf = hf or {}
    return GenerationConfig(eos_token_id=hf.get("eos_token_id"), bos_token_id=hf.get("bos_token_id"),
                            pad_token_id=hf.get("pad_token_id"))


def _resolve_dtype(dtype, stored: str | None) -> torch.dtype | None:
    want = parse_dtype(dtype)
    if want is not None:
        return want
    if stored:
        try:
            return parse_dtype(stored)
        except ConfigError:
            return None
    return None


def _resolve_device(device) -> torch.device:
    return torch.device("cpu") if device is None else parse_device(device)


# ----------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------
def load_lmforge_dir(d: Path, dtype="auto", device=None) -> LM:
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
    torch_dtype = _resolve_dtype(dtype, raw.get("dtype") or stored)
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
        from lmforge.compress.quantize import verify_checksums

        verify_checksums(sd, qconfig["checksums"], d)
        qconfig = {k: v for k, v in qconfig.items() if k != "checksums"}  # they describe the file, not the model
    model = build_model(config, state_fn, dtype=torch_dtype, device=_resolve_device(device), qconfig=qconfig,
                        source=source)
    tok = _load_tokenizer(d)
    return LM(model, tok, config, _generation_config(d), _chat_template(d), path=str(d))


def load_hf_dir(d: Path, dtype="auto", device=None) -> LM:
    """A Hugging Face model directory: config.json with `model_type`, and safetensors or pytorch_model.bin."""
    from lmforge.formats import hf

    hf_config = read_json(d / "config.json")
    try:
        config = hf.config_from_hf(hf_config)
    except (ConfigError, KeyError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{d / 'config.json'}: {msg}") from None
    family = hf.model_type_of(hf_config)
    if not config.name:
        config.name = d.name
    sd, stored = read_weights(d)
    torch_dtype = _resolve_dtype(dtype, hf._hf_dtype(hf_config) or stored)
    model = build_model(config, lambda expected: hf.state_dict_from_hf(sd, config, expected, str(d), family),
                        dtype=torch_dtype, device=_resolve_device(device))
    tok = _load_tokenizer(d)
    return LM(model, tok, config, _generation_config(d, hf_config), _chat_template(d), path=str(d))


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def download(repo_id: str, revision: str | None = None, config_only: bool = False) -> Path:
    """Download a Hub repository's config, weights (safetensors when it has them) and tokenizer files.

    `config_only=True` fetches just the JSON files (enough for `lmforge info`). With no network: a one-line
    `NetworkError`. Files already in the local Hugging Face cache are reused.
    """
    try:
        from huggingface_hub import model_info, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:  # pragma: no cover - a declared dependency
        raise CheckpointError("downloading from the Hub needs huggingface_hub (pip install huggingface_hub)") from None
    meta_files = ["*.json", "*.jinja", "*.txt", "tokenizer.model"]
    try:
        try:
            if config_only:
                return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json"]))
            # model_info fails fast offline (the file-tree listing retries with back-off for ~30 s)
            files = [s.rfilename for s in (model_info(repo_id, revision=revision).siblings or [])]
            weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=meta_files + weights))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:
            # offline: a complete earlier download in the cache still works
            try:
                return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
            except Exception:
                raise e from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(f"{repo_id}: no such local path, and no accessible Hub repository of that name "
                              f"({type(e).__name__})") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"Hub repository {repo_id!r} has no revision {revision!r}") from None
    except LmforgeError:
        raise
    except Exception as e:  # connection refused, DNS failure, timeouts: httpx / OSError subclasses
        raise NetworkError(f"cannot download {repo_id!r} from the Hugging Face Hub: network unreachable "
                           f"({type(e).__name__}: {_one_line(e)[:120]})") from None


def load(path_or_id: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
         tokenizer: str | os.PathLike | None = None) -> LM:
    """Load a model from any supported source (see the module docstring) as an `LM`.

    dtype:     "auto" (the checkpoint's own), "float32", "bfloat16" or "float16"
    device:    None -> cpu; "auto" -> the best available; or "cpu", "cuda", "cuda:1", "mps"
    tokenizer: for a llama2.c `.bin`: its tokenizer `.bin` (default: tokenizer.bin / tok<vocab>.bin beside it)
    """
    parse_dtype(dtype)  # a bad dtype fails before any file is touched
    p = Path(path_or_id)
    if p.is_file():
        if p.suffix == ".gguf":
            from lmforge.formats.gguf import load_gguf

            return load_gguf(p, dtype, device)
        if p.suffix == ".bin":
            from lmforge.formats.llama2c import load_llama2c

            return load_llama2c(p, tokenizer, dtype=dtype, device=device)
        if p.name == "config.json" or p.suffix == ".safetensors":
            return load(p.parent, dtype, device)
        raise CheckpointError(f"{p}: unknown model file type (expected a directory, .gguf or llama2.c .bin)")
    if p.is_dir():
        if (p / "adapter_config.json").exists() and not (p / "config.json").exists():
            from lmforge.finetune.lora import load_adapter_dir  # a PEFT adapter (LoRA or soft prompt) on its base model

            return load_adapter_dir(p, dtype, device)
        if (p / "config.json").exists():
            raw = read_json(p / "config.json")
            if not isinstance(raw, dict):
                raise CheckpointError(f"{p / 'config.json'}: not a JSON object")
            if raw.get("format") == "lmforge":
                return load_lmforge_dir(p, dtype, device)
            if "model_type" in raw or "architectures" in raw:
                return load_hf_dir(p, dtype, device)
            raise CheckpointError(f"{p / 'config.json'}: neither an lmforge config (format: lmforge) nor a Hugging "
                                  "Face config (model_type)")
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return load(ggufs[0], dtype, device)
        bins = sorted(b for b in p.glob("*.bin") if not b.name.startswith("tok") and b.name != "pytorch_model.bin")
        if len(bins) == 1:
            return load(bins[0], dtype, device, tokenizer)
        raise CheckpointError(f"{p}: no config.json and no single .gguf or llama2.c .bin model file")
    if isinstance(path_or_id, str) and HUB_ID.match(path_or_id):  # not a local path: try the Hub
        lm = load(download(path_or_id), dtype, device, tokenizer)
        lm.config.name = path_or_id  # not the snapshot's commit-hash directory name
        return lm
    raise CheckpointError(f"{path_or_id}: no such file or directory")


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


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
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


def save(lm: LM, path: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `lm` as an lmforge model directory at `path` (atomically; other files already there are kept)."""
    model = _unwrap(lm.model)
    config: ModelConfig = lm.config
    sd = _unique_state_dict(model)
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
            from lmforge.compress.quantize import tensor_checksums  # a bit flip in packed codes would load silently otherwise

            atomic_write_json(tmp / "quantization.json", {**qconfig, "checksums": tensor_checksums(sd)})
        elif (tmp / "quantization.json").exists():
            (tmp / "quantization.json").unlink()
    lm.path = str(path)
    return Path(path)


def export_hf(lm: LM, path: str | os.PathLike, dtype: str | torch.dtype | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `lm` as a Hugging Face directory that `AutoModelForCausalLM`/`AutoTokenizer` load with no custom code."""
    from lmforge.formats import hf

    if getattr(lm.model, "quantization_config", None):
        raise CheckpointError("cannot export a quantized model to Hugging Face layout; export the original model")
    config: ModelConfig = lm.config
    want = parse_dtype(dtype) if dtype not in (None, "auto") else None
    sd = {k: (v.to(want) if want is not None and v.is_floating_point() else v)
          for k, v in _unique_state_dict(lm.model).items()}
    out_dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    hf_config = hf.config_to_hf(config, out_dtype)
    gen = lm.generation_config
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(gen, key, None)
        if value is None and lm.tokenizer is not None:
            value = getattr(lm.tokenizer, key, None)
        if value is not None:
            hf_config[key] = value
    hf_sd = hf.state_dict_to_hf(sd, config)
    with atomic_dir(path) as tmp:
        write_safetensors(hf_sd, tmp, max_shard_bytes)
        atomic_write_json(tmp / "config.json", hf_config)
        gen_dict = {k: v for k, v in gen.to_dict().items()
                    if k in ("bos_token_id", "eos_token_id", "pad_token_id", "temperature", "top_k", "top_p",
                             "max_new_tokens", "repetition_penalty")}
        if gen.temperature == 0:
            gen_dict.pop("temperature")
            gen_dict["do_sample"] = False
        elif gen.top_k or gen.top_p or gen.temperature != 1.0:
            gen_dict["do_sample"] = True
        atomic_write_json(tmp / "generation_config.json", gen_dict)
        if lm.tokenizer is not None:
            from lmforge.formats.hf import save_hf_tokenizer

            save_hf_tokenizer(lm.tokenizer, tmp, chat_template=lm.chat_template, model_max_length=config.block_size)
    return Path(path)
