"""LoRA: fine-tune a big model by training a small low-rank correction to some of its linear layers.

The idea (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): fine-tuning changes a weight
matrix W (out x in) by some ΔW, and in practice ΔW has low "intrinsic rank". So instead of learning ΔW with
out*in numbers, learn it as a product of two thin matrices:

    y = W x + (alpha / r) * B (A x)          A: (r, in)   B: (out, r)   r << min(in, out)

W stays frozen; only A and B train. For GPT-2 124M with r=8 on q and v that is ~0.3M numbers instead of 124M: the
optimizer state shrinks with it, and an adapter file is a few MB. Details worth knowing:

* **B starts at zero, A at random.** Then B A = 0, so at step 0 the adapted model computes *exactly* what the base
  computes: fine-tuning starts from the pretrained function, not from a randomly perturbed one. Why not both zero?
  The gradient of B is (grad_y)(A x)^T and that of A is B^T (grad_y) (x^T): with both zero both gradients vanish and
  nothing would ever train. With A random, B gets a useful gradient on the first step, and A starts moving once B
  is non-zero. (A uses PyTorch's default Linear init, kaiming-uniform, as PEFT does.)
* **scaling = alpha / r.** The update's size would otherwise grow with r; dividing by r lets you change r without
  re-tuning the learning rate. (rsLoRA uses alpha / sqrt(r) instead; `rslora=True`.)
* **Dropout** is applied to the adapter's input only (the frozen path is untouched).
* **Merge**: after training, W' = W + (alpha/r) B A is an ordinary weight — no extra latency at inference.
  `merge` adds it in place (and `unmerge` subtracts it again), `merge_and_unload` returns a plain model.
* **Several adapters, one base**: each wrapped layer can hold several named (A, B) pairs; `set_adapter(model,
  "summarize")` switches between tasks without reloading the base weights, `disable_adapters` gives the base model
  back (DPO uses that as its frozen reference model for free).

How lmforge does it: by *composition*. `add_lora` walks an already-built `Transformer` and replaces each targeted
`nn.Linear` with a `LoRALinear` that *holds* that Linear (`.base`) and adds the low-rank path. There is no second
model class: any model, any family, even a quantized base layer (QLoRA) works, as long as the wrapped module maps
(..., in_features) -> (..., out_features).

PEFT interop. Adapters are saved in Hugging Face PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`
with tensors named `base_model.model.<HF module>.lora_A.weight`), so `peft.PeftModel.from_pretrained(hf_model,
dir)` loads an lmforge adapter onto lmforge's HF export, and `load_peft` reads adapters PEFT wrote. The module
names are translated with `lmforge.formats.hf`'s tables. GPT-2 is the interesting case: HF GPT-2 keeps q, k and v in one
fused `c_attn` Conv1D (C -> 3C). A PEFT LoRA on `c_attn` is *one* A (r, C) shared by q, k and v and one B (3C, r)
whose three row-blocks are the B of q, k and v. lmforge represents that exactly: q_proj, k_proj and v_proj get
LoRA layers that share the same A parameter, and B is split in three. (Targets may be named either way:
`c_attn` or `q_proj,k_proj,v_proj`.) LoRAs on q and v with separate A's are saved as a rank-2r `c_attn` LoRA with
A = [A_q; A_v] and a block-structured B — exactly the same function, recorded in PEFT's `rank_pattern`.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import CheckpointError, ConfigError
from lmforge.formats import hf
from lmforge.utils import atomic_dir, atomic_write_json, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen linear layer (`.base`) plus named low-rank adapters: y = base(x) + sum_active s * B(A(drop(x))).

    base:    the wrapped module, usually the model's own `nn.Linear` (its weight keeps its identity, so tied
             weights and optimizers built before wrapping still see the same tensor)
    lora_A:  name -> Parameter (r, in)     lora_B: name -> Parameter (out, r)     scaling: name -> float
    active:  the adapter names used in forward (set with `set_adapter`); merged adapters are skipped in forward
             because their update already lives in base.weight.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise ConfigError("cannot wrap a LoRALinear in another LoRALinear")
        self.base = base
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []

    # the wrapped layer's attributes, so code that reads `layer.weight` keeps working
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    shared_A: nn.Parameter | None = None) -> None:
        """Add adapter `name` of rank r: A random (kaiming-uniform, or `shared_A`), B zero, so ΔW starts at 0."""
        if name in self.lora_A:
            raise ConfigError(f"adapter {name!r} already exists on this layer")
        device, dtype = self._device_dtype()
        if shared_A is None:
            A = torch.empty(r, self.in_features, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's default init, as PEFT
            shared_A = nn.Parameter(A)
        if tuple(shared_A.shape) != (r, self.in_features):
            raise ConfigError(f"LoRA A of shape {tuple(shared_A.shape)} does not fit a layer with {self.in_features} "
                              f"inputs at rank {r}")
        self.lora_A[name] = shared_A
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        if name not in self.active:
            self.active.append(name)

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where and in what dtype adapters live: the base weight's, or fp32 beside a quantized base (QLoRA)."""
        if self.quantized:
            t = next(iter(list(self.base.buffers()) + list(self.base.parameters())))
            return t.device, torch.float32
        return self.base.weight.device, self.base.weight.dtype

    @property
    def quantized(self) -> bool:
        """A base whose weight is not a float Parameter (e.g. `quantize.QuantLinear`): it cannot be merged into."""
        return not isinstance(getattr(self.base, "weight", None), nn.Parameter)

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = scaling * B @ A, (out, in), computed in fp32."""
        return (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        for name in self.active:
            if name in self.merged:
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(A.dtype))
            y = y + (F.linear(F.linear(h, A), B) * self.scaling[name]).to(y.dtype)  # (..., r) -> (..., out)
        return y

    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        if self.quantized:
            raise ConfigError("cannot merge a LoRA adapter into a quantized base layer (QLoRA); load the float "
                              "base model and merge the saved adapter into that")
        w = self.base.weight
        with torch.no_grad():
            w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        w = self.base.weight
        with torch.no_grad():
            w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))
        self.merged.remove(name)

    def remove_adapter(self, name: str) -> None:
        self.unmerge(name)
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        self.scaling.pop(name)
        if name in self.active:
            self.active.remove(name)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.rank(n)} s={self.scaling[n]:g}" for n in self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ranks}], active={self.active}"


# ----------------------------------------------------------------------------------------------------------------
# Finding and wrapping the target layers
# ----------------------------------------------------------------------------------------------------------------
def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, LoRALinear)) or (
        hasattr(m, "in_features") and hasattr(m, "out_features") and hasattr(m, "weight")
        and not isinstance(m, nn.Embedding))


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers of `model`, LoRA-wrapped ones included (not their inner `.base`)."""
    names, wrapped = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(m, LoRALinear):
            wrapped.add(name)
            names.append(name)
        elif name and _is_linear(m):
            names.append(name)
    return names


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, targets: str | list[str] | tuple[str, ...]) -> list[list[str]]:
    """Target names -> groups of lmforge module names; the modules of one group share one A.

    A target is a layer name suffix in lmforge's vocabulary (`q_proj`, `mlp.down_proj`, `blocks.0.attn.q_proj`)
    or in the Hugging Face export's (`c_attn`, `c_fc`, `c_proj` for GPT-2), or `all-linear` (every linear layer
    except the output head, as PEFT). A HF name that covers a fused module (GPT-2 `c_attn`) gives one group per
    layer: q, k and v share an A, as in PEFT. Raises ConfigError naming a target that matches nothing.
    """
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets:
        raise ConfigError("no LoRA targets given; use e.g. q_proj,v_proj or all-linear")
    linear = _linear_names(model)
    hf_map = _hf_module_map(model)  # lmforge name -> (hf name, part, n_parts) or {}
    hf_to_ours: dict[str, list[str]] = {}
    for ours, (hf, _, _) in hf_map.items():
        hf_to_ours.setdefault(hf, []).append(ours)
    groups: list[list[str]] = []
    seen: set[str] = set()

    def add(group: list[str]) -> None:
        group = [n for n in group if n not in seen]
        if group:
            seen.update(group)
            groups.append(group)

    for t in targets:
        found = False
        if t == "all-linear":
            head = _output_head_names(model)
            if hf_to_ours:  # PEFT semantics on the HF module tree (a fused c_attn is one LoRA)
                for hf, ours in hf_to_ours.items():
                    if not any(o in head for o in ours):
                        add(ours)
                        found = True
                rest = [n for n in linear if n not in hf_map and n not in head]
            else:
                rest = [n for n in linear if n not in head]
            for n in rest:
                add([n])
                found = True
        else:
            for n in linear:
                if _suffix_match(n, t):
                    add([n])
                    found = True
            for hf, ours in hf_to_ours.items():
                if _suffix_match(hf, t):
                    add(sorted(ours, key=lambda o: hf_map[o][1]))
                    found = True
        if not found:
            short = sorted({n.rpartition(".")[2] for n in linear})
            raise ConfigError(f"LoRA target {t!r} matches no linear layer in this model (layers: {', '.join(short)}, "
                              f"or all-linear)")
    return groups


def _output_head_names(model: nn.Module) -> set[str]:
    """The output layer(s): PEFT's all-linear leaves them out (they are usually tied or replaced, not adapted)."""
    return {n for n in _linear_names(model) if n.rpartition(".")[2] in ("lm_head", "score", "classifier", "head")}


def add_lora(model: nn.Module, targets: str | list[str] = ("q_proj", "v_proj"), r: int = 8, alpha: float = 16,
             dropout: float = 0.0, adapter_name: str = "default", rslora: bool = False,
             freeze_base: bool = True) -> list[str]:
    """Wrap the targeted linear layers of `model` in `LoRALinear` and add adapter `adapter_name` to them.

    Returns the wrapped module names. With `freeze_base` every non-LoRA parameter stops requiring gradients
    (unfreeze a new head yourself afterwards). Calling it again with another name adds a second adapter.
    """
    if not isinstance(r, int) or r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name):
        raise ConfigError(f"adapter name {adapter_name!r} must be letters, digits, '_' or '-'")
    groups = resolve_targets(model, targets)
    done = []
    for group in groups:
        shared = None
        for name in group:
            layer = _get(model, name)
            if not isinstance(layer, LoRALinear):
                layer = LoRALinear(layer)
                _set(model, name, layer)
            layer.add_adapter(adapter_name, r, alpha, dropout, rslora=rslora, shared_A=shared)
            shared = layer.lora_A[adapter_name]  # the next layer of a fused group shares this A
            done.append(name)
    if freeze_base:
        freeze_non_lora(model)
    return done


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, m in lora_layers(model):
        names += [n for n in m.lora_A if n not in names]
    return names


def freeze_non_lora(model: nn.Module) -> None:
    """requires_grad = True exactly for the LoRA A/B parameters."""
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad = ".lora_A." in name or ".lora_B." in name


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) unique parameters; a tied or shared tensor is counted once."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


def _human(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}" if n < 100 * div else f"{n / div:.0f}{unit}"
    return str(n)


def trainable_report(model: nn.Module) -> str:
    """'trainable 295K / 124M params (0.24%)' — the course's one-line summary."""
    t, n = count_params(model)
    return f"trainable {_human(t)} / {_human(n)} params ({100 * t / max(n, 1):.2f}%)"


# ----------------------------------------------------------------------------------------------------------------
# Choosing, merging and removing adapters
# ----------------------------------------------------------------------------------------------------------------
def _check_name(model: nn.Module, name: str) -> None:
    names = adapter_names(model)
    if name not in names:
        raise ConfigError(f"no LoRA adapter named {name!r} in this model (adapters: {', '.join(names) or 'none'})")


def set_adapter(model: nn.Module, name: str | list[str] | None) -> None:
    """Use adapter `name` (or several, summed; or None for the bare base) in every LoRA layer from now on."""
    names = [] if name is None else [name] if isinstance(name, str) else list(name)
    for n in names:
        _check_name(model, n)
    for _, m in lora_layers(model):
        if any(n in m.merged for n in m.lora_A if n not in names):
            raise ConfigError("unmerge the merged adapter before switching adapters")
        m.active = [n for n in names if n in m.lora_A]


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model is the bare base model (merged adapters are unmerged and re-merged after)."""
    saved = {name: (list(m.active), list(m.merged)) for name, m in lora_layers(model)}
    try:
        for _, m in lora_layers(model):
            for n in list(m.merged):
                m.unmerge(n)
            m.active = []
        yield
    finally:
        for name, m in lora_layers(model):
            active, merged = saved[name]
            m.active = active
            for n in merged:
                m.merge(n)


def merge(model: nn.Module, name: str | None = None) -> None:
    """Add ΔW of the active adapter(s) (or `name`) into the base weights: same function, no extra compute."""
    for _, m in lora_layers(model):
        for n in ([name] if name else m.active):
            if n in m.lora_A:
                if not m.quantized and m.base.weight is _tied_weight(model, m):
                    raise ConfigError("cannot merge a LoRA on lm_head into weights tied to the token embedding")
                m.merge(n)


def unmerge(model: nn.Module) -> None:
    """Subtract every merged ΔW again (exact up to float rounding)."""
    for _, m in lora_layers(model):
        for n in list(m.merged):
            m.unmerge(n)


def _tied_weight(model: nn.Module, layer: LoRALinear) -> torch.Tensor | None:
    wte = getattr(model, "wte", None)
    return wte.weight if isinstance(wte, nn.Embedding) else None


def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Merge the active adapter(s) (or `name`) and put the plain base layers back: an ordinary model again."""
    merge(model, name)
    for lname, m in list(lora_layers(model)):
        _set(model, lname, m.base)
    for p in model.parameters():
        p.requires_grad = True
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; a layer left with no adapter is unwrapped."""
    _check_name(model, name)
    for lname, m in list(lora_layers(model)):
        if name in m.lora_A:
            m.remove_adapter(name)
        if not m.lora_A:
            _set(model, lname, m.base)


# ----------------------------------------------------------------------------------------------------------------
# PEFT layout: lmforge module names <-> Hugging Face module names
# ----------------------------------------------------------------------------------------------------------------
def _hf_module_map(model: nn.Module) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    """lmforge linear-layer name -> (HF module name, row block, sizes of all row blocks), from `lmforge.formats.hf`'s tables.

    GPT-2: "blocks.0.attn.k_proj" -> ("transformer.h.0.attn.c_attn", 1, (C, C, C)): k is the second row block of
    the fused c_attn output. Llama: "blocks.0.attn.k_proj" -> ("model.layers.0.self_attn.k_proj", 0, (nkv*hd,)).
    A model that no HF family can hold gets {} (LoRA still works; only PEFT saving needs the names).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "n_layer"):
        return {}
    try:
        family = hf.family_for(config)
    except ConfigError:
        return {}
    linear = set(_linear_names(model))
    parts: dict[str, list[tuple[str, str]]] = {}  # HF module -> [(part tag, lmforge module)]
    table = hf.expand_names(hf.NAME_MAPS[family], config.n_layer, getattr(config, "num_experts", 0))  # {j}: experts
    for ours, theirs in table.items():
        module = ours.removesuffix(".weight")
        if not ours.endswith(".weight") or module not in linear:
            continue
        hf_name, _, tag = theirs.partition("#")
        parts.setdefault(hf_name.removesuffix(".weight"), []).append((tag, module))
    order = {"": 0, "q": 0, "k": 1, "v": 2}
    out: dict[str, tuple[str, int, tuple[int, ...]]] = {}
    for hf_module, members in parts.items():
        members.sort(key=lambda tm: order[tm[0]])
        sizes = tuple(int(_get(model, m).out_features) for _, m in members)
        for i, (_, m) in enumerate(members):
            out[m] = (hf_module, i, sizes)
    return out


def _peft_config(model: nn.Module, name: str, hf_rank: dict[str, int], hf_scale: dict[str, float],
                 fused: bool, base_model_name_or_path: str | None) -> dict:
    ranks, alphas = {h: r for h, r in hf_rank.items()}, {h: hf_scale[h] * hf_rank[h] for h in hf_rank}
    # the most common (r, alpha) becomes the default; the rest go to rank_pattern / alpha_pattern
    counts: dict[tuple[int, float], int] = {}
    for h in ranks:
        counts[(ranks[h], alphas[h])] = counts.get((ranks[h], alphas[h]), 0) + 1
    r0, a0 = max(counts, key=counts.get)
    first = next(m for _, m in lora_layers(model) if name in m.lora_A)
    drop = first.lora_dropout[name]
    a0 = int(a0) if float(a0).is_integer() else a0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
        "target_modules": sorted(ranks),
        "fan_in_fan_out": fused,  # HF GPT-2's Conv1D stores weights (in, out)
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {h: ranks[h] for h in sorted(ranks) if ranks[h] != r0},
        "alpha_pattern": {h: alphas[h] for h in sorted(ranks) if (ranks[h], alphas[h]) != (r0, a0)
                          and alphas[h] != a0},
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def peft_state_dict(model: nn.Module, name: str = "default",
                    base_model_name_or_path: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Adapter `name` as PEFT tensors (HF names) and adapter_config.json contents."""
    _check_name(model, name)
    hf_map = _hf_module_map(model)
    if not hf_map:
        raise ConfigError("this model has no Hugging Face name table, so its adapter cannot be saved in PEFT layout")
    by_hf: dict[str, tuple[tuple[int, ...], dict[int, LoRALinear]]] = {}
    for lname, m in lora_layers(model):
        if name not in m.lora_A:
            continue
        if lname not in hf_map:
            raise ConfigError(f"LoRA layer {lname!r} has no Hugging Face counterpart; it cannot be saved for PEFT")
        hf, idx, sizes = hf_map[lname]
        by_hf.setdefault(hf, (sizes, {}))[1][idx] = m
    tensors, hf_rank, hf_scale = {}, {}, {}
    fused = any(len(v[2]) > 1 for v in hf_map.values())  # GPT-2 layout: Conv1D modules
    for hf, (sizes, parts) in by_hf.items():
        layers = [parts.get(i) for i in range(len(sizes))]
        present = [m for m in layers if m is not None]
        As = []  # distinct A parameters, in order
        for m in present:
            if not any(m.lora_A[name] is a for a in As):
                As.append(m.lora_A[name])
        scales = {m.scaling[name] for m in present}
        if len(sizes) == 1 or (len(As) == 1 and len(present) == len(sizes) and len(scales) == 1):
            A = As[0].detach()
            B = torch.cat([m.lora_B[name].detach() for m in present], 0)  # (sum sizes, r)
            scale = present[0].scaling[name]
        else:  # block form: A = [A_1; A_2; ...], B's row block i uses only the columns of its own A
            A = torch.cat([a.detach() for a in As], 0)  # (R, in)
            offsets = [0]
            for a in As:
                offsets.append(offsets[-1] + a.shape[0])
            B = A.new_zeros(sum(sizes), offsets[-1])  # (sum sizes, R)
            scale = 1.0  # each block carries its own scaling, folded into B
            row = 0
            for m, size in zip(layers, sizes):
                if m is not None:
                    j = next(k for k, a in enumerate(As) if m.lora_A[name] is a)
                    B[row:row + size, offsets[j]:offsets[j + 1]] = m.lora_B[name].detach() * m.scaling[name]
                row += size
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = B.contiguous()
        hf_rank[hf], hf_scale[hf] = A.shape[0], scale
    return tensors, _peft_config(model, name, hf_rank, hf_scale, fused, base_model_name_or_path)


def save_peft(model: nn.Module, path: str | Path, name: str = "default",
              base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    tensors, cfg = peft_state_dict(model, name, base_model_name_or_path)
    with atomic_dir(path) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_CONFIG, cfg)
    return Path(path)


def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():  # PEFT's get_pattern_key: the key matches a name suffix (regex)
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "layer_replication": "layer replication",
                "trainable_token_indices": "trainable tokens"}


def load_peft(model: nn.Module, path: str | Path, name: str = "default", freeze_base: bool = True) -> list[str]:
    """Load a PEFT LoRA adapter directory (written by PEFT or by `save_peft`) as adapter `name` of `model`.

    Returns the wrapped lmforge module names. An adapter whose modules or shapes do not fit `model` (trained for
    another base) raises CheckpointError naming the first mismatch.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: not a PEFT adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = read_json(path / ADAPTER_CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: a {cfg.get('peft_type')} adapter, not LoRA")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise CheckpointError(f"{path}: uses {what} ({key}), which lmforge does not support")
    if name in adapter_names(model):
        raise ConfigError(f"the model already has an adapter named {name!r}")
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    hf_map = _hf_module_map(model)
    hf_to_ours: dict[str, list[str]] = {}
    for ours, (hf, _, _) in hf_map.items():
        hf_to_ours.setdefault(hf, []).append(ours)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_\-]+)?\.weight", key)
        if not m:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} in a LoRA adapter")
        modules.setdefault(m.group(1), {})[m.group(2)] = t
    plan = []  # (hf name, lmforge names by part, A, B, scaling): check everything before changing the model
    for hf, ab in sorted(modules.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{path}: module {hf!r} lacks its lora_A or lora_B tensor")
        ours = sorted(hf_to_ours.get(hf, []), key=lambda o: hf_map[o][1])
        if not ours:
            raise CheckpointError(f"{path}: adapter module {hf!r} does not exist in this model; the adapter was "
                                  f"made for a different base model")
        A, B = ab["lora_A"], ab["lora_B"]
        sizes = hf_map[ours[0]][2]
        in_features = _get(model, ours[0]).in_features
        r = A.shape[0]
        if A.shape[1] != in_features or B.shape != (sum(sizes), r):
            raise CheckpointError(
                f"{path}: {hf} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, but this model needs "
                f"({r}, {in_features}) / ({sum(sizes)}, {r}); the adapter was made for a different base model")
        alpha = _pattern_value(cfg.get("alpha_pattern"), hf, cfg.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        plan.append((hf, ours, A, B, r, scaling))
    if not plan:
        raise CheckpointError(f"{path}: the adapter holds no LoRA tensors")
    dropout = float(cfg.get("lora_dropout") or 0.0)
    done = []
    for hf, ours, A, B, r, scaling in plan:
        sizes, shared, row = hf_map[ours[0]][2], None, 0
        for lname, size in zip(ours, sizes):
            layer = _get(model, lname)
            if not isinstance(layer, LoRALinear):
                layer = LoRALinear(layer)
                _set(model, lname, layer)
            layer.add_adapter(name, r, alpha=scaling * r, dropout=dropout, shared_A=shared)
            layer.scaling[name] = scaling
            with torch.no_grad():
                if shared is None:
                    layer.lora_A[name].copy_(A)
                layer.lora_B[name].copy_(B[row:row + size])
            shared = layer.lora_A[name]
            row += size
            done.append(lname)
    if freeze_base:
        freeze_non_lora(model)
    return done
