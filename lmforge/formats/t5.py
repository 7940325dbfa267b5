"""T5 in Hugging Face's layout: one name table read both ways, config.json both ways, and the directory I/O.

    parts = load_t5_dir("flan-t5-small/")          # model, tokenizer (Unigram tokenizer.json), generation defaults
    export_t5(model, tokenizer, "out/", generation_config)   # loads in transformers' T5ForConditionalGeneration

HF's T5 nests every sub-layer in a `layer` list (`block.3.layer.1.EncDecAttention.q`) and keeps the relative
position table in block 0 only. lmforge names the sub-layers (`blocks.3.cross_attn.q`) and keeps the table on the
stack (`decoder.rel_bias`). `NAMES` is the whole mapping; `{i}` is a block index, `{p}` a projection name.

Tied heads: transformers 5 always ties `lm_head` to `shared` unless the checkpoint carries a different lm_head, and
scales the decoder output by d_model^-0.5 unless config.json says `"tie_word_embeddings": false` (it then saves
`"scale_decoder_outputs": false` beside a forced `"tie_word_embeddings": true`; we read that key first). So an
untied model is written with its own lm_head.weight and `tie_word_embeddings: false`; a tied one without it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.formats.native import (assign_exact, generation_config, meta_device, read_weights, resolve_dtype,
                                    write_safetensors)
from lmforge.generation.config import GenerationConfig
from lmforge.models.t5 import T5, T5Config
from lmforge.tokenizers.unigram import UnigramTokenizer
from lmforge.utils import atomic_dir, atomic_write_json, read_json

# lmforge name -> HF name. {i}: block index; {p}: a projection (q, k, v, o / wi, wi_0, wi_1, wo).
NAMES = {
    "shared.weight": "shared.weight",
    "lm_head.weight": "lm_head.weight",
    "encoder.rel_bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "decoder.rel_bias.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "encoder.norm_f.weight": "encoder.final_layer_norm.weight",
    "decoder.norm_f.weight": "decoder.final_layer_norm.weight",
    "encoder.blocks.{i}.norm_attn.weight": "encoder.block.{i}.layer.0.layer_norm.weight",
    "encoder.blocks.{i}.self_attn.{p}.weight": "encoder.block.{i}.layer.0.SelfAttention.{p}.weight",
    "encoder.blocks.{i}.norm_mlp.weight": "encoder.block.{i}.layer.1.layer_norm.weight",
    "encoder.blocks.{i}.mlp.{p}.weight": "encoder.block.{i}.layer.1.DenseReluDense.{p}.weight",
    "decoder.blocks.{i}.norm_attn.weight": "decoder.block.{i}.layer.0.layer_norm.weight",
    "decoder.blocks.{i}.self_attn.{p}.weight": "decoder.block.{i}.layer.0.SelfAttention.{p}.weight",
    "decoder.blocks.{i}.norm_cross.weight": "decoder.block.{i}.layer.1.layer_norm.weight",
    "decoder.blocks.{i}.cross_attn.{p}.weight": "decoder.block.{i}.layer.1.EncDecAttention.{p}.weight",
    "decoder.blocks.{i}.norm_mlp.weight": "decoder.block.{i}.layer.2.layer_norm.weight",
    "decoder.blocks.{i}.mlp.{p}.weight": "decoder.block.{i}.layer.2.DenseReluDense.{p}.weight",
}
# HF tensors that are copies of `shared` (tied input embeddings), never separate weights
HF_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _pattern(template: str) -> re.Pattern:
    """"a.{i}.b.{p}.w" -> a regex with named groups i (digits) and p (a word)."""
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>\w+)")
    return re.compile(rf"^{rx}$")


_TO_HF = [(_pattern(ours), theirs) for ours, theirs in NAMES.items()]
_FROM_HF = [(_pattern(theirs), ours) for ours, theirs in NAMES.items()]


def rename(name: str, direction: str) -> str | None:
    """Map one tensor name with the table; "to_hf" or "from_hf". None when the table has no such name.
    >>> rename("decoder.blocks.1.cross_attn.q.weight", "to_hf")
    'decoder.block.1.layer.1.EncDecAttention.q.weight'
    """
    for rx, template in (_TO_HF if direction == "to_hf" else _FROM_HF):
        m = rx.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


# ----------------------------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------------------------
_HF_DROP = ("architectures", "transformers_version", "model_type", "is_encoder_decoder", "dense_act_fn",
            "is_gated_act", "scale_decoder_outputs", "torch_dtype", "dtype", "use_cache")


def config_from_hf(hf: Mapping[str, Any]) -> T5Config:
    """A T5Config from a Hugging Face T5 config.json (one-line ConfigError for a bad value)."""
    d = {k: v for k, v in hf.items() if k not in _HF_DROP}
    if "dropout_rate" not in d and "dropout" in d:
        d["dropout_rate"] = d.pop("dropout")
    d.setdefault("tie_word_embeddings", True)  # HF's default: the v1.0 tied head
    if "scale_decoder_outputs" in hf:  # written by transformers 5, which always says tie_word_embeddings: true
        d["tie_word_embeddings"] = bool(hf["scale_decoder_outputs"])
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = d["eos_token_id"][0]
    for k in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        if d.get(k) is None:
            d.pop(k, None)
    try:
        return T5Config.from_dict(d)
    except TypeError as e:
        raise ConfigError(f"T5 config.json: {e}") from None


def config_to_hf(config: T5Config, dtype: torch.dtype | None = None) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("name")
    d.update(model_type="t5", architectures=["T5ForConditionalGeneration"], is_encoder_decoder=True,
             use_cache=True)
    if dtype is not None:
        d["dtype"] = str(dtype).removeprefix("torch.")
    return d


# ----------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------
def state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], config: T5Config, source: str = "weights"
                       ) -> dict[str, torch.Tensor]:
    """HF T5 tensors -> lmforge names. Unknown tensors are an error (a different architecture), not dropped."""
    sd: dict[str, torch.Tensor] = {}
    for name, t in hf_sd.items():
        if name in HF_COPIES:
            continue
        ours = rename(name, "from_hf")
        if ours is None:
            raise CheckpointError(f"{source}: tensor {name!r} is not part of a T5ForConditionalGeneration")
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied checkpoint may store its (identical) head
        sd[ours] = t
    if not config.tie_word_embeddings and "lm_head.weight" not in sd and "shared.weight" in sd:
        sd["lm_head.weight"] = sd["shared.weight"]  # unscaled but tied (transformers 5 without its own head)
    if "shared.weight" not in sd:
        for copy in HF_COPIES:  # some exports keep only encoder.embed_tokens
            if copy in hf_sd:
                sd["shared.weight"] = hf_sd[copy]
                break
    return sd


def state_dict_to_hf(model: T5) -> dict[str, torch.Tensor]:
    """lmforge T5 tensors -> HF names (contiguous, on CPU), ready for safetensors."""
    out = {}
    for name, t in model.state_dict().items():
        hf = rename(name, "to_hf")
        if hf is None:
            raise CheckpointError(f"no Hugging Face name for T5 tensor {name!r}")
        out[hf] = t.detach().contiguous().cpu()
    return out


def build_t5(config: T5Config, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
             device=None, source: str = "weights") -> T5:
    """A T5 holding exactly the tensors of `sd` (every expected tensor present, every shape right)."""
    with meta_device():
        model = T5(config, init_weights=False)
    return assign_exact(model, sd, hf_name=lambda k: rename(k, "to_hf"), dtype=dtype, device=device,
                        source=source, hint=f" (feed_forward_proj={config.feed_forward_proj!r})")


# ----------------------------------------------------------------------------------------------------------------
# directories
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class T5Parts:
    model: T5
    tokenizer: UnigramTokenizer | None
    generation_config: GenerationConfig
    path: str | None = None


def is_t5_config(raw: Mapping[str, Any]) -> bool:
    return raw.get("model_type") in ("t5", "mt5")


def load_t5_dir(path: str | os.PathLike, dtype: str | torch.dtype = "auto", device=None) -> T5Parts:
    """An HF T5 directory: config.json, weights (safetensors or .bin), tokenizer.json, generation_config.json."""
    d = Path(path)
    raw = read_json(d / "config.json")
    if not is_t5_config(raw):
        raise CheckpointError(f"{d / 'config.json'}: model_type {raw.get('model_type')!r} is not t5")
    config = config_from_hf(raw)
    config.name = d.name
    hf_sd, stored = read_weights(d)
    sd = state_dict_from_hf(hf_sd, config, source=str(d))
    model = build_t5(config, sd, resolve_dtype(dtype, stored), device, source=str(d))
    tok = UnigramTokenizer.load(d) if (d / "tokenizer.json").exists() else None
    gc = generation_config(d, raw)
    if gc.eos_token_id is None:
        gc = gc.replace(eos_token_id=config.eos_token_id)
    if gc.pad_token_id is None:
        gc = gc.replace(pad_token_id=config.pad_token_id)
    return T5Parts(model, tok, gc, str(d))


def export_t5(model: T5, tokenizer: UnigramTokenizer | None, path: str | os.PathLike,
              generation_config: GenerationConfig | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write an HF T5ForConditionalGeneration directory (built beside `path`, swapped in when complete)."""
    sd = state_dict_to_hf(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    stored = next(iter(sd.values())).dtype
    gc = generation_config or GenerationConfig()
    gc_dict = {"decoder_start_token_id": model.config.decoder_start_token_id,
               "eos_token_id": model.config.eos_token_id, "pad_token_id": model.config.pad_token_id,
               **gc.to_dict()}
    for key in ("stop", "stop_token_ids"):  # lmforge-only lists: written only when set
        if not gc_dict.get(key):
            gc_dict.pop(key, None)
    with atomic_dir(path) as out:
        write_safetensors(sd, out)
        atomic_write_json(out / "config.json", config_to_hf(model.config, stored))
        atomic_write_json(out / "generation_config.json", gc_dict)
        if tokenizer is not None:
            tokenizer.save(out)
    return Path(path)
