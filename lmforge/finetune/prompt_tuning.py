"""Prompt tuning (soft prompts): adapt a frozen model by learning the *input*, not the weights.

A hand-written prompt ("Classify the sentiment: ...") steers a model with a few tokens chosen from the
vocabulary. Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning") keeps
the idea but drops the vocabulary: it prepends `n` *virtual tokens* whose embeddings are free vectors, trained by
gradient descent while every weight of the model stays frozen:

    input ids (B, T) --wte--> (B, T, C)
    soft prompt P (n, C), expanded to (B, n, C) and concatenated in front:  (B, n + T, C)  -> the frozen model

Only n*C numbers train (20 virtual tokens on a 768-wide model: 15K parameters), and one base model serves many
tasks by swapping a few KB of prompt per task (`set_prompt`). The virtual tokens enter through the model's
`inputs_embeds` argument, so attention, positions and the KV cache treat them like real tokens (they take the
first n positions). Initializing P from the embeddings of real words ("Classify if the SMS is spam") trains
faster than random vectors (Lester et al. §3.2); `init_ids` does that.

`PromptTunedModel` returns logits for the real tokens only, (B, T, V), so every loss written for the plain
model works unchanged. (PEFT returns the n virtual positions too and pads the labels with -100; same loss.)

Files use PEFT's prompt-tuning layout: `adapter_config.json` (`peft_type: PROMPT_TUNING`, `num_virtual_tokens`,
`token_dim`, ...) and `adapter_model.safetensors` holding one tensor, `prompt_embeddings` (n, C). PEFT's
`PeftModel.from_pretrained(hf_model, dir)` loads lmforge's soft prompts and `load_prompt` loads PEFT's.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.utils import atomic_dir, atomic_write_json, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class PromptTunedModel(nn.Module):
    """A frozen base `Transformer` with named soft prompts, one of which (`active`) is prepended to every input.

    prompts: name -> Parameter (n, C). `forward` takes the base model's arguments and returns logits (B, T, V)
    for the real tokens. With a KV cache the prompt is prepended only when the cache is empty (the prefill); later
    decode steps find the virtual tokens already cached.
    """

    def __init__(self, base: nn.Module, freeze_base: bool = True):
        super().__init__()
        self.base = base
        self.prompts = nn.ParameterDict()
        self.active: str | None = None
        if freeze_base:
            for p in base.parameters():
                p.requires_grad = False

    @property
    def config(self):
        return self.base.config

    @property
    def n_virtual(self) -> int:
        return 0 if self.active is None else self.prompts[self.active].shape[0]

    def add_prompt(self, name: str = "default", n_virtual: int = 20, init_ids: torch.Tensor | list[int] | None = None,
                   activate: bool = True) -> nn.Parameter:
        """Add a soft prompt of `n_virtual` tokens: from the embeddings of `init_ids` (repeated or cut to length),
        or random vectors with the spread of the model's own token embeddings."""
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ConfigError(f"prompt name {name!r} must be letters, digits, '_' or '-'")
        if name in self.prompts:
            raise ConfigError(f"a soft prompt named {name!r} already exists")
        if not isinstance(n_virtual, int) or n_virtual <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {n_virtual!r}")
        wte = self.base.wte.weight  # (V, C)
        if init_ids is not None and len(init_ids) > 0:
            ids = torch.as_tensor(list(init_ids), dtype=torch.long)
            ids = ids.repeat((n_virtual + len(ids) - 1) // len(ids))[:n_virtual]  # PEFT: repeat, then cut
            if int(ids.max()) >= wte.shape[0]:
                raise ConfigError(f"prompt init token id {int(ids.max())} is outside the vocabulary ({wte.shape[0]})")
            init = wte.detach()[ids.to(wte.device)].clone().float()
        else:
            init = torch.randn(n_virtual, wte.shape[1], device=wte.device) * wte.detach().float().std()
        self.prompts[name] = nn.Parameter(init.to(wte.dtype))
        if activate:
            self.active = name
        return self.prompts[name]

    def set_prompt(self, name: str | None) -> None:
        """Use soft prompt `name` from now on (None: the bare base model)."""
        if name is not None and name not in self.prompts:
            raise ConfigError(f"no soft prompt named {name!r} (prompts: {', '.join(self.prompts) or 'none'})")
        self.active = name

    def new_cache(self, batch_size: int, max_len: int | None = None, **kwargs):
        max_len = (max_len or self.config.block_size) + self.n_virtual  # the virtual tokens take cache slots too
        return self.base.new_cache(batch_size, max_len, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache=None, logits_to_keep: int = 0,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        if self.active is None or (kv_cache is not None and int(kv_cache.lengths.max()) > 0):
            return self.base(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             kv_cache=kv_cache, logits_to_keep=logits_to_keep, inputs_embeds=inputs_embeds, **kwargs)
        x = self.base.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = x.shape[:2]
        P = self.prompts[self.active]
        n = P.shape[0]
        x = torch.cat([P.to(x.dtype)[None].expand(B, n, -1), x], dim=1)  # (B, n + T, C)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)  # (B, n + T)
        if position_ids is not None:  # explicit positions of the real tokens are shifted behind the prompt
            position_ids = torch.cat([torch.arange(n, device=x.device)[None].expand(B, n), position_ids + n], 1)
        ids = torch.zeros(B, n + T, dtype=torch.long, device=x.device)  # unused: inputs_embeds wins
        out = self.base(ids, attention_mask=attention_mask, position_ids=position_ids, kv_cache=kv_cache,
                        logits_to_keep=logits_to_keep, inputs_embeds=x, **kwargs)
        if logits_to_keep:  # the last positions are real tokens already
            return out
        if isinstance(out, torch.Tensor):
            return out[:, n:]  # (B, T, V)
        out.logits = out.logits[:, n:]
        return out


def add_prompt_tuning(model: nn.Module, n_virtual: int = 20, init_ids=None, name: str = "default") -> PromptTunedModel:
    """Wrap `model` (frozen) in a `PromptTunedModel` holding one new soft prompt `name`."""
    wrapped = model if isinstance(model, PromptTunedModel) else PromptTunedModel(model)
    wrapped.add_prompt(name, n_virtual, init_ids)
    return wrapped


def save_prompt(model: PromptTunedModel, path: str | Path, name: str | None = None,
                base_model_name_or_path: str | None = None, init_text: str | None = None) -> Path:
    """Write soft prompt `name` (default: the active one) in PEFT's prompt-tuning layout."""
    from safetensors.torch import save_file

    name = name or model.active
    if name not in model.prompts:
        raise ConfigError(f"no soft prompt named {name!r} to save")
    P = model.prompts[name].detach()
    cfg = model.config
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": int(P.shape[0]),
        "token_dim": int(P.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.n_head,
        "num_layers": cfg.n_layer,
        "prompt_tuning_init": "TEXT" if init_text else "RANDOM",
        "prompt_tuning_init_text": init_text,
        "tokenizer_name_or_path": base_model_name_or_path if init_text else None,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    with atomic_dir(path) as tmp:
        save_file({"prompt_embeddings": P.cpu().contiguous()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_CONFIG, config)
    return Path(path)


def load_prompt(model: nn.Module, path: str | Path, name: str = "default") -> PromptTunedModel:
    """Load a PEFT prompt-tuning adapter as soft prompt `name` (wrapping `model` if it is not wrapped yet)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: not a PEFT adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = read_json(path / ADAPTER_CONFIG)
    if cfg.get("peft_type") != "PROMPT_TUNING":
        raise CheckpointError(f"{path}: a {cfg.get('peft_type')} adapter, not PROMPT_TUNING")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError(f"{path}: encoder-decoder soft prompts are not supported")
    P = load_file(str(path / ADAPTER_WEIGHTS)).get("prompt_embeddings")
    if P is None:
        raise CheckpointError(f"{path}: no 'prompt_embeddings' tensor")
    wrapped = model if isinstance(model, PromptTunedModel) else PromptTunedModel(model)
    C = wrapped.config.n_embd
    if P.dim() != 2 or P.shape[1] != C:
        raise CheckpointError(f"{path}: soft prompt of width {P.shape[-1]} does not fit this model (n_embd={C}); "
                              f"it was made for a different base model")
    wrapped.add_prompt(name, int(P.shape[0]))
    with torch.no_grad():
        wrapped.prompts[name].copy_(P)
    return wrapped
