"""`lmforge.load`: one call for every model source, and the Hub download behind it.

`lmforge.load(path_or_id)` looks at what it was given and picks the reader:

| input                                                     | reader                                            |
|-----------------------------------------------------------|---------------------------------------------------|
| lmforge directory (config.json has `"format": "lmforge"`) | `lmforge.formats.native`: ModelConfig + safetensors |
| Hugging Face directory (config.json has `model_type`)     | `lmforge.formats.hf`: key + name maps, GPT-2 transposes |
| PEFT adapter directory (adapter_config.json, no config.json) | its base model, then `lmforge.finetune.lora` / `prompt_tuning` / `adapters` |
| llama2.c `.bin` file (+ its tokenizer `.bin`)             | `lmforge.formats.llama2c`                         |
| `.gguf` file                                              | `lmforge.formats.gguf`                            |
| Hub id such as `openai-community/gpt2`                    | `huggingface_hub.snapshot_download`, then the directory above |

Readers return the parts (model, tokenizer, config, generation defaults, chat template); this module wraps them in
an `LM`. It is the one module that knows every format, so the formats never import each other upward.

Why safetensors: a `.bin` (pickle) file can run code when unpickled; safetensors is a JSON header plus raw arrays,
so loading it cannot execute anything (each tensor is read into memory of its own, not memory-mapped:
`formats.native.read_safetensors` says why). Pickled checkpoints are read with `torch.load(weights_only=True)`,
which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from lmforge.errors import CheckpointError, LmforgeError, NetworkError
from lmforge.finetune import adapters, lora, prompt_tuning
from lmforge.formats.gguf import load_gguf
from lmforge.formats.hf import load_hf_dir
from lmforge.formats.llama2c import load_llama2c
from lmforge.formats.native import Loaded, load_lmforge_dir, one_line
from lmforge.lm import LM
from lmforge.utils import parse_dtype, read_json


def _lm(parts: Loaded) -> LM:
    return LM(parts.model, parts.tokenizer, parts.config, parts.generation_config, parts.chat_template,
              path=parts.path)


def load_adapter(path: Path, dtype="auto", device=None, merge: bool = True) -> LM:
    """A PEFT adapter directory: its base (`base_model_name_or_path`) loaded, then the adapter applied.

    A LoRA adapter is merged into the float base (same function, no extra cost per token) unless `merge=False`;
    a prompt-tuning adapter wraps the base in a `PromptTunedModel`; bottleneck adapters (`finetune.adapters`)
    are inserted into its blocks.
    """
    cfg = read_json(path / lora.ADAPTER_CONFIG)
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{path}: adapter_config.json names no base model (base_model_name_or_path); load the "
                              f"base with lmforge.load and apply the adapter with lora.load_peft")
    kind = cfg.get("peft_type", "LORA")
    if kind not in ("LORA", "PROMPT_TUNING", adapters.PEFT_TYPE):
        raise CheckpointError(f"{path}: unsupported adapter type {kind!r} (lmforge reads LORA, PROMPT_TUNING and "
                              f"{adapters.PEFT_TYPE})")
    lm = load(base, dtype=dtype, device=device)
    if kind == "PROMPT_TUNING":
        lm.model = prompt_tuning.load_prompt(lm.model, path).eval()
    elif kind == adapters.PEFT_TYPE:  # bottleneck adapters cannot be merged: they stay layers of the model
        adapters.load_adapter(lm.model, path)
        lm.model.eval()
    else:
        lora.load_peft(lm.model, path)
        if merge:
            lora.merge_and_unload(lm.model)
        lm.model.eval()
    lm.path = str(path)
    return lm


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
                           f"({type(e).__name__}: {one_line(e)[:120]})") from None



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
            return _lm(load_gguf(p, dtype, device))
        if p.suffix == ".bin":
            return _lm(load_llama2c(p, tokenizer, dtype=dtype, device=device))
        if p.name == "config.json" or p.suffix == ".safetensors":
            return load(p.parent, dtype, device)
        raise CheckpointError(f"{p}: unknown model file type (expected a directory, .gguf or llama2.c .bin)")
    if p.is_dir():
        if (p / "adapter_config.json").exists() and not (p / "config.json").exists():
            return load_adapter(p, dtype, device)  # a PEFT adapter (LoRA or soft prompt) on its base model
        if (p / "config.json").exists():
            raw = read_json(p / "config.json")
            if not isinstance(raw, dict):
                raise CheckpointError(f"{p / 'config.json'}: not a JSON object")
            if raw.get("format") == "lmforge":
                return _lm(load_lmforge_dir(p, dtype, device))
            if raw.get("model_type") in ("bert", "roberta", "distilbert"):  # encoders: EncoderLM, not LM
                from lmforge.encoder_lm import load_encoder_dir

                return load_encoder_dir(p, dtype, device)
            if raw.get("model_type") in ("t5", "mt5", "bart", "mbart"):  # encoder-decoders: Seq2SeqLM, not LM
                from lmforge.seq2seq_lm import load_seq2seq

                return load_seq2seq(p, dtype, device)
            if "model_type" in raw or "architectures" in raw:
                return _lm(load_hf_dir(p, dtype, device))
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


