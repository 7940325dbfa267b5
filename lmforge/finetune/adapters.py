"""Bottleneck adapters: fine-tune a frozen model by inserting small trainable layers *inside* each block.

The idea (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): keep every pretrained weight
frozen and give each transformer block a few new layers that learn the task. Each adapter is a bottleneck, a
small two-layer network with a skip connection, applied to a sub-layer's output h (C numbers per token):

    adapter(h) = h + W_up f(W_down h + b_down) + b_up        W_down: (m, C)   W_up: (C, m)   m << C

down-project to m numbers (the bottleneck size, `size`), a nonlinearity f, up-project back to C, and add the
result to h. Houlsby et al. put one adapter after the attention sub-layer and one after the MLP of every block,
after the sub-layer's output projection and before it is added to the residual stream. lmforge's blocks are
pre-norm (x + attn(norm(x)), then x + mlp(norm(x))), so that is:

    x = x + adapter_attn(o_proj(attention(norm_1(x))))
    x = x + adapter_mlp(down_proj(mlp(norm_2(x))))

Per adapter that is 2 C m + m + C trainable numbers: with C = 768 and m = 16 about 25K, two per block, 0.6M for
GPT-2 124M (0.5%).

* **Zero up-projection.** W_up and b_up start at zero, so every adapter starts as the identity (h + 0) and the
  adapted model computes exactly what the base computes: training starts from the pretrained function. W_down
  starts random (nn.Linear's default init, zero bias), so W_up gets a useful gradient on the first step; with
  both zero neither would ever move (the same argument as LoRA's B = 0, A random; `lmforge.finetune.lora`).
  Houlsby et al. used a near-identity init (small random W_up); exactly zero is the stricter form of the same idea.
* **Why an adapter cannot be merged into the weights.** LoRA's update ΔW = B A is *linear*, so W x + B A x =
  (W + B A) x folds into one matrix and costs nothing at inference. An adapter computes W_up f(W_down h) with a
  nonlinearity f in between: no single matrix W' satisfies W' h = h + W_up f(W_down h) for every h (f(a + b) is
  not f(a) + f(b)). So the adapter stays a separate layer: two extra small products per adapter, in sequence
  with the sub-layer (the adapter needs the sub-layer's output first), which LoRA's paper measured as added
  latency at batch size 1. The win is that the nonlinearity makes a bottleneck of size m more expressive than a
  rank-m linear update.
* **Several adapters, one base.** Each wrapped projection holds named adapters; `set_adapter(model, "summarize")`
  switches tasks without touching the base weights, `set_adapter(model, None)` or `with disable_adapters(model):`
  gives the bare base back.

How lmforge does it, by composition (as LoRA): `add_adapters` replaces each block's `attn.o_proj` and/or
`mlp.down_proj` (for a mixture-of-experts MLP, which has no single down projection: the whole `mlp` layer) with
an `AdaptedProjection` that *holds* the original layer (`.base`) and adds the active adapter to its output.
There is no second model class. Generation needs nothing special: the fast decode step
(`lmforge.generation.decode`) lays out only plain `nn.Linear` projections, so a model with adapters runs the
step through its own modules (`DecodeWeights.form` returns None for it), which includes the adapters.

Files. PEFT has no bottleneck adapter, so lmforge writes its own layout, shaped like PEFT's: a small directory
with `adapter_config.json` (`"peft_type": "BOTTLENECK"`, `"format": "lmforge"`, the size, sites, activation, the
base's width and depth, and `base_model_name_or_path`) and `adapter_model.safetensors` holding tensors named by
the wrapped module, `blocks.0.attn.o_proj.down.weight` ... `blocks.3.mlp.down_proj.up.bias`. `lmforge.load(dir)`
loads the base it names and applies the adapter; `load_adapter(model, dir, name)` adds one to a model in memory.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import CheckpointError, ConfigError
from lmforge.utils import atomic_dir, atomic_write_json, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TYPE = "BOTTLENECK"  # the adapter_config.json type tag (PEFT's own types are LORA, PROMPT_TUNING, ...)
FORMAT_VERSION = 1

SITES = {"attn": "attn.o_proj", "mlp": "mlp.down_proj"}  # where an adapter goes: after this projection


def _gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")  # GPT-2's GELU


ACTIVATIONS = {"gelu": _gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


# ----------------------------------------------------------------------------------------------------------------
# The layers
# ----------------------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """The adapter's correction W_up f(W_down h + b_down) + b_up: (..., C) -> (..., C). The skip connection
    (h + ...) is added by the caller, `AdaptedProjection`."""

    def __init__(self, dim: int, size: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.size, self.activation = size, activation
        self.down = nn.Linear(dim, size)  # (m, C): nn.Linear's random init
        self.up = nn.Linear(size, dim)  # (C, m): zero, so the adapter starts as the identity
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.f = ACTIVATIONS[activation]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.f(self.down(self.dropout(h))))  # (..., C) -> (..., m) -> (..., C)

    def extra_repr(self) -> str:
        return f"size={self.size}, activation={self.activation}"


class AdaptedProjection(nn.Module):
    """A frozen output projection (`.base`) followed by the active bottleneck adapter: y = p(x) + adapter(p(x)).

    base:     the wrapped module (the block's own `o_proj` or `down_proj`; its weight keeps its identity)
    adapters: name -> Bottleneck          active: the adapter used in forward, or None for the bare base
    """

    def __init__(self, base: nn.Module, dim: int | None = None):
        """`dim`: the output width, for a base without `out_features` (a mixture-of-experts layer)."""
        super().__init__()
        if isinstance(base, AdaptedProjection):
            raise ConfigError("cannot wrap an AdaptedProjection in another one")
        self.base = base
        self.out_features = int(getattr(base, "out_features", dim or 0))
        self.in_features = int(getattr(base, "in_features", self.out_features))
        if self.out_features <= 0:
            raise ConfigError(f"cannot tell the output width of {type(base).__name__} to put an adapter after it")
        self.adapters = nn.ModuleDict()
        self.active: str | None = None

    # the wrapped layer's attributes, so code that reads `layer.weight` keeps working
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add_adapter(self, name: str, size: int, activation: str = "gelu", dropout: float = 0.0) -> None:
        if name in self.adapters:
            raise ConfigError(f"adapter {name!r} already exists on this layer")
        p = next(self.base.parameters(), None)
        adapter = Bottleneck(self.out_features, size, activation, dropout)
        if p is not None and p.is_floating_point():
            adapter.to(device=p.device, dtype=p.dtype)
        self.adapters[name] = adapter
        self.active = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., C)
        if self.active is None:
            return y
        adapter = self.adapters[self.active]
        return y + adapter(y.to(adapter.up.weight.dtype)).to(y.dtype)  # the skip connection: h + correction

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.adapters)}, active={self.active}"


# ----------------------------------------------------------------------------------------------------------------
# Adding, choosing and removing adapters
# ----------------------------------------------------------------------------------------------------------------
def _check_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ConfigError(f"adapter name {name!r} must be letters, digits, '_' or '-'")


def parse_sites(where: str | Sequence[str]) -> list[str]:
    """"attn,mlp" or ["mlp"] -> the checked sites in block order; anything else is a ConfigError."""
    if isinstance(where, str):
        where = [w.strip() for w in where.split(",") if w.strip()]
    bad = [w for w in where if w not in SITES]
    if not where or bad:
        raise ConfigError(f"adapter sites must be some of {', '.join(SITES)} (comma-separated), got "
                          f"{','.join(where) or 'nothing'}")
    return [w for w in SITES if w in where]  # a fixed order: attn before mlp


def site_module(model: nn.Module, block: int, site: str) -> str:
    """The name of the module an adapter at `site` of block `block` follows: its output projection
    (`blocks.0.attn.o_proj`, `blocks.0.mlp.down_proj`), or for a mixture-of-experts MLP, which has no single
    down projection, the whole layer (`blocks.0.mlp`: its output is the experts' weighted sum)."""
    if site == "mlp" and not hasattr(model.blocks[block].mlp, "down_proj"):
        return f"blocks.{block}.mlp"
    return f"blocks.{block}.{SITES[site]}"


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def adapter_layers(model: nn.Module) -> list[tuple[str, AdaptedProjection]]:
    """(module name, layer) of every adapted projection, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedProjection)]


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, m in adapter_layers(model):
        names += [n for n in m.adapters if n not in names]
    return names


def bottleneck_params(n_embd: int, size: int, n_adapters: int) -> int:
    """Trainable numbers of `n_adapters` bottlenecks of size m on width C: n (2 C m + m + C).

    >>> bottleneck_params(768, 16, 24)   # GPT-2 124M, m=16, after attention and MLP in 12 blocks
    608640
    """
    return n_adapters * (2 * n_embd * size + size + n_embd)


def add_adapters(model: nn.Module, size: int = 16, where: str | Sequence[str] = ("attn", "mlp"),
                 activation: str = "gelu", dropout: float = 0.0, name: str = "default",
                 freeze_base: bool = True) -> list[str]:
    """Insert bottleneck adapter `name` of size `size` after the attention and/or MLP output projection of every
    block of `model` (an lmforge `Transformer`), and make it the active one. Returns the adapted module names.

    With `freeze_base` every parameter that is not an adapter's stops requiring gradients. Calling it again with
    another name adds a second adapter beside the first (switch with `set_adapter`).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConfigError(f"adapter size must be a positive integer, got {size!r}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"adapter activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"adapter dropout must be in [0, 1), got {dropout}")
    _check_name(name)
    if name in adapter_names(model):
        raise ConfigError(f"the model already has an adapter named {name!r}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ConfigError(f"bottleneck adapters need an lmforge decoder (a model with .blocks), not "
                          f"{type(model).__name__}")
    sites, done = parse_sites(where), []
    for i in range(len(blocks)):
        for site in sites:
            lname = site_module(model, i, site)
            layer = model.get_submodule(lname)
            if not isinstance(layer, AdaptedProjection):
                layer = AdaptedProjection(layer, dim=getattr(getattr(model, "config", None), "n_embd", None))
                _set(model, lname, layer)
            layer.add_adapter(name, size, activation, dropout)
            done.append(lname)
    set_adapter(model, name)
    if freeze_base:
        freeze_non_adapter(model)
    return done


def freeze_non_adapter(model: nn.Module) -> None:
    """Only adapter parameters train (a tied lm_head/wte stays frozen with the rest)."""
    for p in model.parameters():
        p.requires_grad = False
    for _, m in adapter_layers(model):
        for p in m.adapters.parameters():
            p.requires_grad = True


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Use adapter `name` everywhere it exists from now on (None: the bare base model)."""
    if name is not None and name not in adapter_names(model):
        raise ConfigError(f"no bottleneck adapter named {name!r} in this model "
                          f"(adapters: {', '.join(adapter_names(model)) or 'none'})")
    for _, m in adapter_layers(model):
        m.active = name if name in m.adapters else None


def active_adapter(model: nn.Module) -> str | None:
    return next((m.active for _, m in adapter_layers(model) if m.active is not None), None)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model is the bare base model; the active adapters come back after."""
    saved = [(m, m.active) for _, m in adapter_layers(model)]
    try:
        for m, _ in saved:
            m.active = None
        yield
    finally:
        for m, active in saved:
            m.active = active


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; a projection left with no adapter is unwrapped (the plain layer is put back)."""
    if name not in adapter_names(model):
        raise ConfigError(f"no bottleneck adapter named {name!r} to delete")
    for lname, m in adapter_layers(model):
        if name in m.adapters:
            del m.adapters[name]
            if m.active == name:
                m.active = None
        if not len(m.adapters):
            _set(model, lname, m.base)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Every adapter removed and the plain projections put back: the base model again (nothing is merged: an
    adapter cannot be, see the module docstring)."""
    for lname, m in adapter_layers(model):
        _set(model, lname, m.base)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------
def _layout(model: nn.Module, name: str) -> dict:
    """What an adapter file must say to be rebuilt: size, sites, activation, and the base it fits."""
    layers = [(n, m) for n, m in adapter_layers(model) if name in m.adapters]
    if not layers:
        raise ConfigError(f"no bottleneck adapter named {name!r} in this model "
                          f"(adapters: {', '.join(adapter_names(model)) or 'none'})")
    first = layers[0][1].adapters[name]
    sites = [s for s in SITES if any(n == site_module(model, int(n.split(".")[1]), s) for n, _ in layers)]
    drop = first.dropout
    return {"adapter_size": first.size, "where": sites, "activation": first.activation,
            "dropout": float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
            "layers": [n for n, _ in layers]}


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors, named `<wrapped module>.<down|up>.<weight|bias>`."""
    _layout(model, name)  # a clear error for an unknown name
    return {f"{lname}.{k}": v.detach() for lname, m in adapter_layers(model) if name in m.adapters
            for k, v in m.adapters[name].state_dict().items()}


def save_adapter(model: nn.Module, path: str | Path, name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` as a small directory (adapter_config.json + adapter_model.safetensors), atomically."""
    from safetensors.torch import save_file

    layout = _layout(model, name)
    cfg = getattr(model, "config", None)
    config = {
        "peft_type": PEFT_TYPE,
        "format": "lmforge",
        "version": FORMAT_VERSION,
        "base_model_name_or_path": base_model_name_or_path,
        "adapter_size": layout["adapter_size"],
        "where": layout["where"],
        "activation": layout["activation"],
        "dropout": layout["dropout"],
        "n_layer": getattr(cfg, "n_layer", None),
        "n_embd": getattr(cfg, "n_embd", None),
        "init": "up_zero",
    }
    tensors = {k: v.cpu().contiguous() for k, v in adapter_state_dict(model, name).items()}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_CONFIG, config)
    return Path(path)


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` holds a bottleneck adapter written by `save_adapter`."""
    p = Path(path) / ADAPTER_CONFIG
    if not p.is_file():
        return False
    cfg = read_json(p)
    return isinstance(cfg, dict) and cfg.get("peft_type") == PEFT_TYPE


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", freeze_base: bool = True) -> list[str]:
    """Add the bottleneck adapter saved in `path` to `model` as adapter `name` (and make it active).

    Everything is checked before the model changes: an adapter made for another base (other width, depth or
    missing layers) raises CheckpointError naming the mismatch.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = read_json(path / ADAPTER_CONFIG)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != PEFT_TYPE:
        raise CheckpointError(f"{path}: a {cfg.get('peft_type') if isinstance(cfg, dict) else '?'} adapter, not a "
                              f"bottleneck adapter")
    if int(cfg.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: bottleneck adapter format version {cfg.get('version')} is newer than this "
                              f"lmforge reads ({FORMAT_VERSION})")
    mcfg = getattr(model, "config", None)
    for key in ("n_embd", "n_layer"):
        if cfg.get(key) is not None and getattr(mcfg, key, None) != cfg[key]:
            raise CheckpointError(f"{path}: the adapter was made for a base with {key}={cfg[key]}, this model has "
                                  f"{getattr(mcfg, key, None)}; load it onto the base it names "
                                  f"({cfg.get('base_model_name_or_path')})")
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    size, C = int(cfg["adapter_size"]), int(getattr(mcfg, "n_embd", 0) or 0)
    expected: dict[str, tuple[int, ...]] = {}
    for i in range(int(cfg.get("n_layer") or len(model.blocks))):
        for site in parse_sites(cfg["where"]):
            lname = site_module(model, i, site)
            expected.update({f"{lname}.down.weight": (size, C), f"{lname}.down.bias": (size,),
                             f"{lname}.up.weight": (C, size), f"{lname}.up.bias": (C,)})
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: the adapter file does not match its config "
                              f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, this model needs {shape}")
    done = add_adapters(model, size, cfg["where"], cfg.get("activation", "gelu"), float(cfg.get("dropout") or 0.0),
                        name=name, freeze_base=freeze_base)
    with torch.no_grad():
        for lname in done:
            adapter = model.get_submodule(lname).adapters[name]
            for k, p in adapter.state_dict().items():
                p.copy_(tensors[f"{lname}.{k}"])
    return done
