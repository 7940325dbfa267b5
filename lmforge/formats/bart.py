"""BART (and mBART) in Hugging Face's layout: one name table read both ways, config.json both ways, directory I/O.

    parts = load_bart_dir("bart-large-cnn/")     # model, tokenizer (RoBERTa's byte-level BPE), generation defaults
    export_bart(model, tokenizer, "out/", generation_config)   # loads in transformers' BartForConditionalGeneration

HF nests the model under `model.` and names each projection (`model.decoder.layers.3.encoder_attn.q_proj`);
lmforge uses T5's sub-layer names so one decoding cache serves both (`decoder.blocks.3.cross_attn.q`). `NAMES` is
the whole mapping; `{s}` is a stack (encoder, decoder), `{i}` a block index, `{w}` weight or bias.

Tied heads: BART's output head is the shared embedding (`lm_head.weight` in a file is a copy, or absent); a
config with `"tie_word_embeddings": false` gets its own lm_head. `final_logits_bias` is a buffer saved with the
weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.formats.native import (assign_exact, generation_config, meta_device, read_weights, resolve_dtype,
                                    write_safetensors)
from lmforge.formats.t5 import T5Parts
from lmforge.generation.config import GenerationConfig
from lmforge.generation.sampling import SamplingParams
from lmforge.models.bart import Bart, BartConfig
from lmforge.tokenizers.roberta import is_roberta_tokenizer_dir, RobertaTokenizer
from lmforge.tokenizers.unigram import UnigramTokenizer
from lmforge.utils import atomic_dir, atomic_write_json, read_json

MODEL_TYPES = {"bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration"}

# lmforge name -> HF name. {s}: encoder | decoder; {i}: block index; {w}: weight | bias.
_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
NAMES = {
    "shared.weight": "model.shared.weight",
    "lm_head.weight": "lm_head.weight",
    "final_logits_bias": "final_logits_bias",
    "{s}.embed_positions.weight": "model.{s}.embed_positions.weight",
    "{s}.norm_emb.{w}": "model.{s}.layernorm_embedding.{w}",
    "{s}.norm_f.{w}": "model.{s}.layer_norm.{w}",  # mBART only
    "{s}.blocks.{i}.norm_attn.{w}": "model.{s}.layers.{i}.self_attn_layer_norm.{w}",
    "{s}.blocks.{i}.norm_cross.{w}": "model.{s}.layers.{i}.encoder_attn_layer_norm.{w}",
    "{s}.blocks.{i}.norm_mlp.{w}": "model.{s}.layers.{i}.final_layer_norm.{w}",
    "{s}.blocks.{i}.fc1.{w}": "model.{s}.layers.{i}.fc1.{w}",
    "{s}.blocks.{i}.fc2.{w}": "model.{s}.layers.{i}.fc2.{w}",
    **{f"{{s}}.blocks.{{i}}.self_attn.{ours}.{{w}}": f"model.{{s}}.layers.{{i}}.self_attn.{hf}.{{w}}"
       for ours, hf in _PROJ.items()},
    **{f"{{s}}.blocks.{{i}}.cross_attn.{ours}.{{w}}": f"model.{{s}}.layers.{{i}}.encoder_attn.{hf}.{{w}}"
       for ours, hf in _PROJ.items()},
}
# HF tensors that are copies of `shared` (the tied input embeddings), never separate weights
HF_COPIES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template)
    for key, group in (("s", r"(?P<s>encoder|decoder)"), ("i", r"(?P<i>\d+)"), ("w", r"(?P<w>weight|bias)")):
        rx = rx.replace(rf"\{{{key}\}}", group)
    return re.compile(rf"^{rx}$")


_TO_HF = [(_pattern(ours), theirs) for ours, theirs in NAMES.items()]
_FROM_HF = [(_pattern(theirs), ours) for ours, theirs in NAMES.items()]


def rename(name: str, direction: str) -> str | None:
    """Map one tensor name with the table; "to_hf" or "from_hf". None when the table has no such name.
    >>> rename("decoder.blocks.1.cross_attn.o.bias", "to_hf")
    'model.decoder.layers.1.encoder_attn.out_proj.bias'
    """
    for rx, template in (_TO_HF if direction == "to_hf" else _FROM_HF):
        m = rx.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


# ----------------------------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------------------------
_HF_DROP = ("architectures", "transformers_version", "is_encoder_decoder", "torch_dtype", "dtype", "use_cache",
            "num_hidden_layers")


def config_from_hf(hf: Mapping[str, Any]) -> BartConfig:
    """A BartConfig from a Hugging Face BART or mBART config.json (one-line ConfigError for a bad value or an
    option transformers' BART no longer implements)."""
    kind = hf.get("model_type", "bart")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"config.json: model_type {kind!r} is not bart or mbart")
    if hf.get("static_position_embeddings") or hf.get("normalize_embedding") is False:
        raise ConfigError("BART config: static (sinusoidal) positions or no embedding LayerNorm are not supported "
                          "(transformers' BartModel does not implement them either)")
    d = {k: v for k, v in hf.items() if k not in _HF_DROP}
    d["pre_norm"] = kind == "mbart"
    d.setdefault("tie_word_embeddings", True)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if d.get(k) is None:
            d.pop(k, None)
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = d["eos_token_id"][0]
    try:
        return BartConfig.from_dict(d)
    except TypeError as e:
        raise ConfigError(f"BART config.json: {e}") from None


def config_to_hf(config: BartConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("name")
    d.pop("pre_norm")
    d.update(architectures=[MODEL_TYPES[config.model_type]], is_encoder_decoder=True, use_cache=True,
             num_hidden_layers=config.encoder_layers)
    if dtype is not None:
        d["dtype"] = str(dtype).removeprefix("torch.")
    return d


# ----------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------
def state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], config: BartConfig, source: str = "weights"
                       ) -> dict[str, torch.Tensor]:
    """HF BART tensors -> lmforge names. Unknown tensors are an error (a different architecture), not dropped."""
    sd: dict[str, torch.Tensor] = {}
    for name, t in hf_sd.items():
        if not name.startswith("model.") and name not in ("lm_head.weight", "final_logits_bias"):
            name = "model." + name  # a BartModel checkpoint (facebook/bart-base): the same tensors, no prefix
        if name in HF_COPIES:
            continue
        ours = rename(name, "from_hf")
        if ours is None:
            raise CheckpointError(f"{source}: tensor {name!r} is not part of a {MODEL_TYPES[config.model_type]}")
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied checkpoint may store its (identical) head
        sd[ours] = t
    for copy in HF_COPIES:
        t = hf_sd.get(copy, hf_sd.get(copy.removeprefix("model.")))
        if t is None:
            continue
        if "shared.weight" not in sd:  # some exports keep only encoder.embed_tokens
            sd["shared.weight"] = t
        elif t.data_ptr() != sd["shared.weight"].data_ptr() and not torch.equal(t, sd["shared.weight"]):
            # transformers 5 unties them from `shared` when tie_word_embeddings is false; BART shares one table
            raise CheckpointError(f"{source}: {copy} differs from model.shared.weight; lmforge's BART shares one "
                                  "embedding table between encoder, decoder and (when tied) the output head")
    if not config.tie_word_embeddings and "lm_head.weight" not in sd and "shared.weight" in sd:
        sd["lm_head.weight"] = sd["shared.weight"]
    if "final_logits_bias" not in sd:  # older exports leave the (zero) bias out
        sd["final_logits_bias"] = torch.zeros(1, config.vocab_size)
    return sd


def state_dict_to_hf(model: Bart) -> dict[str, torch.Tensor]:
    """lmforge BART tensors -> HF names (contiguous, on CPU), ready for safetensors. An untied model also gets
    the encoder's and decoder's embed_tokens (copies of shared): transformers 5 does not tie those to `shared`
    when tie_word_embeddings is false, and would otherwise initialise them at random."""
    out = {}
    for name, t in model.state_dict().items():
        hf = rename(name, "to_hf")
        if hf is None:
            raise CheckpointError(f"no Hugging Face name for BART tensor {name!r}")
        out[hf] = t.detach().contiguous().cpu()
    if not model.config.tie_word_embeddings:
        for copy in HF_COPIES:
            out[copy] = out["model.shared.weight"].clone()
    return out


def build_bart(config: BartConfig, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
               device=None, source: str = "weights") -> Bart:
    """A Bart holding exactly the tensors of `sd` (every expected tensor present, every shape right)."""
    with meta_device():
        model = Bart(config, init_weights=False)
    return assign_exact(model, sd, hf_name=lambda k: rename(k, "to_hf"), dtype=dtype or sd["shared.weight"].dtype, device=device,
                        source=source, hint=f" (model_type={config.model_type!r})")


# ----------------------------------------------------------------------------------------------------------------
# directories
# ----------------------------------------------------------------------------------------------------------------
def is_bart_config(raw: Mapping[str, Any]) -> bool:
    return raw.get("model_type") in MODEL_TYPES


def load_bart_tokenizer(d: Path):
    """RoBERTa's byte-level BPE (BART), a Unigram tokenizer.json (mBART's SentencePiece), or None."""
    if is_roberta_tokenizer_dir(d):
        return RobertaTokenizer.load(d)
    if (d / "tokenizer.json").exists():
        return UnigramTokenizer.load(d)
    return None


def load_bart_dir(path: str | os.PathLike, dtype: str | torch.dtype = "auto", device=None) -> T5Parts:
    """An HF BART directory: config.json, weights (safetensors or .bin), tokenizer files, generation_config.json."""
    d = Path(path)
    raw = read_json(d / "config.json")
    if not is_bart_config(raw):
        raise CheckpointError(f"{d / 'config.json'}: model_type {raw.get('model_type')!r} is not bart or mbart")
    config = config_from_hf(raw)
    config.name = d.name
    hf_sd, stored = read_weights(d)
    sd = state_dict_from_hf(hf_sd, config, source=str(d))
    model = build_bart(config, sd, resolve_dtype(dtype, stored), device, source=str(d))
    gc = generation_config(d, raw)
    if gc.eos_token_id is None:
        gc = gc.replace(eos_token_id=config.eos_token_id)
    if gc.pad_token_id is None:
        gc = gc.replace(pad_token_id=config.pad_token_id)
    return T5Parts(model, load_bart_tokenizer(d), gc, str(d))


def export_bart(model: Bart, tokenizer, path: str | os.PathLike, generation_config: GenerationConfig | None = None,
                dtype: torch.dtype | None = None) -> Path:
    """Write an HF BartForConditionalGeneration (or mBART) directory (built beside `path`, swapped in when
    complete)."""
    sd = state_dict_to_hf(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    stored = sd["model.shared.weight"].dtype
    cfg = model.config
    gc = generation_config or GenerationConfig()
    gc_dict = {"decoder_start_token_id": cfg.decoder_start_token_id, "bos_token_id": cfg.bos_token_id,
               "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
               "forced_eos_token_id": cfg.forced_eos_token_id, **gc.to_dict()}
    if cfg.forced_bos_token_id is not None:
        gc_dict.setdefault("forced_bos_token_id", cfg.forced_bos_token_id)
    for key in ("stop", "stop_token_ids"):  # lmforge-only lists: written only when set
        if not gc_dict.get(key):
            gc_dict.pop(key, None)
    if "max_length" in gc.extra and gc.max_new_tokens == SamplingParams.max_new_tokens:
        gc_dict.pop("max_new_tokens")  # the directory's max_length is the limit (transformers prefers max_new_tokens)
    gc_dict = {k: v for k, v in gc_dict.items() if v is not None}
    with atomic_dir(path) as out:
        write_safetensors(sd, out)
        atomic_write_json(out / "config.json", config_to_hf(cfg, stored))
        atomic_write_json(out / "generation_config.json", gc_dict)
        if tokenizer is not None:
            tokenizer.save(out)
    return Path(path)
