"""Structured pruning: remove whole attention heads, MLP channels or layers, then heal with distillation.

Unstructured pruning zeroes individual weights; the matrices keep their shape, so nothing gets faster or smaller
without sparse kernels. *Structured* pruning removes whole rows and columns — a head is a slice of q/k/v rows and
of o_proj columns, an MLP channel is one row of gate/up and one column of down — so the result is an ordinary,
smaller dense model: a new `ModelConfig` with fewer heads, a narrower MLP or fewer layers.

Which parts to remove is decided by an importance score measured on a little calibration text, as in Minitron
(Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"), which uses
activation magnitudes because they need only forward passes:

- MLP channel j: mean |h_j| over calibration tokens, where h is the input of down_proj (act(gate) * up).
- attention head h: mean L2 norm of that head's output (its slice of o_proj's input); with grouped-query attention
  a key/value head and the query heads sharing it are kept or removed together (a "group").
- layer: how much the block changes the residual stream, 1 - cos(x_in, x_out) averaged over tokens (ShortGPT,
  Men et al. 2024: layers that barely rotate the hidden state matter least).

Pruning hurts; a short distillation from the unpruned model ("heal", `lmforge.compress.distill`) recovers much of it at a
fraction of the cost of training the small model from scratch; `lmforge.recipes.compress.prune_and_heal` composes
the two.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from lmforge.models.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.models.decoder import Transformer


@torch.no_grad()
def importance_scores(model: Transformer, calibration: torch.Tensor | list[torch.Tensor]) -> dict[str, Any]:
    """Activation-based importance on calibration token ids (n, T).

    Returns {"heads": (n_layer, n_kv_head) group scores, "mlp": (n_layer, intermediate_size), "layers": (n_layer,)}.
    """
    cfg = model.config
    L, nh, nkv, hd, H = cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size
    heads = torch.zeros(L, nh)
    mlp = torch.zeros(L, H)
    layers = torch.zeros(L)
    counts = {"tok": 0}
    hooks = []

    for i, block in enumerate(model.blocks):
        def o_hook(mod, inp, out, i=i):
            x = inp[0].detach().float().reshape(-1, nh, hd)  # (N, nh, hd)
            heads[i] += x.norm(dim=-1).sum(0).cpu()

        def down_hook(mod, inp, out, i=i):
            mlp[i] += inp[0].detach().float().reshape(-1, H).abs().sum(0).cpu()

        def block_hook(mod, inp, out, i=i):
            x_in = inp[0].detach().float().reshape(-1, cfg.n_embd)
            x_out = out[0].detach().float().reshape(-1, cfg.n_embd)
            layers[i] += (1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)).sum().cpu()

        hooks += [block.attn.o_proj.register_forward_hook(o_hook), block.mlp.down_proj.register_forward_hook(down_hook),
                  block.register_forward_hook(block_hook)]
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids in batches:
            ids = ids if ids.dim() == 2 else ids[None]
            model(ids.to(device))
            counts["tok"] += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = max(counts["tok"], 1)
    groups = (heads / n).view(L, nkv, nh // nkv).sum(-1)  # (L, nkv): a kv head and its query heads together
    return {"heads": groups, "mlp": mlp / n, "layers": layers / n}


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def prune_model(model: Transformer, calibration, n_kv_head: int | None = None, intermediate_size: int | None = None,
                n_layer: int | None = None, scores: dict[str, Any] | None = None) -> Transformer:
    """A new, smaller `Transformer` keeping the most important groups of heads, MLP channels and layers.

    n_kv_head:         key/value heads to keep per layer (each with its n_head/n_kv_head query heads; for MHA
                       models such as GPT-2 this is simply the number of heads)
    intermediate_size: MLP channels to keep per layer
    n_layer:           layers to keep
    The original model is left untouched.
    """
    cfg = model.config
    if getattr(model, "quantization_config", None):
        raise ConfigError("prune the float model, then quantize")
    if getattr(cfg, "num_experts", 0):
        raise ConfigError(f"pruning a mixture-of-experts model ({cfg.num_experts} experts per layer) is not supported: "
                          "prune scores dense MLP channels and heads; distill the model into a dense student instead")
    targets = {"n_kv_head": (n_kv_head, cfg.n_kv_head), "intermediate_size": (intermediate_size, cfg.intermediate_size),
               "n_layer": (n_layer, cfg.n_layer)}
    for name, (want, have) in targets.items():
        if want is not None and not 1 <= want <= have:
            raise ConfigError(f"{name}={want} must be between 1 and the model's {have}")
    scores = scores or importance_scores(model, calibration)
    group = cfg.n_head // cfg.n_kv_head
    new_kv = n_kv_head or cfg.n_kv_head
    new_h = intermediate_size or cfg.intermediate_size
    keep_layers = _keep_top(scores["layers"], n_layer or cfg.n_layer).tolist()
    new_cfg = ModelConfig.from_dict({**cfg.to_dict(), "n_layer": len(keep_layers), "n_kv_head": new_kv,
                                     "n_head": new_kv * group, "head_dim": cfg.head_dim, "intermediate_size": new_h,
                                     "name": (cfg.name or "model") + "-pruned"})
    with torch.device("meta"):
        small = Transformer(new_cfg)
    small = small.to_empty(device=next(model.parameters()).device)
    if model.wpe is not None:
        small.wpe.weight.copy_(model.wpe.weight)
    small.wte.weight.copy_(model.wte.weight)
    small.norm_f.load_state_dict(model.norm_f.state_dict())
    if not new_cfg.tie_word_embeddings:
        small.lm_head.weight.copy_(model.lm_head.weight)
    else:
        small.lm_head.weight = small.wte.weight
    if new_cfg.pos_embedding == "rope":
        small.inv_freq = model.inv_freq.clone()
    hd = cfg.head_dim
    for j, i in enumerate(keep_layers):
        src, dst = model.blocks[i], small.blocks[j]
        dst.norm_1.load_state_dict(src.norm_1.state_dict())
        dst.norm_2.load_state_dict(src.norm_2.state_dict())
        g = _keep_top(scores["heads"][i], new_kv)  # kept kv heads
        q_heads = (g[:, None] * group + torch.arange(group)[None]).reshape(-1)  # their query heads, in order
        q_rows = (q_heads[:, None] * hd + torch.arange(hd)[None]).reshape(-1)
        kv_rows = (g[:, None] * hd + torch.arange(hd)[None]).reshape(-1)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            _copy_outputs(getattr(src.attn, name), getattr(dst.attn, name), rows)
        _copy_inputs(src.attn.o_proj, dst.attn.o_proj, q_rows)
        ch = _keep_top(scores["mlp"][i], new_h)
        names = ("gate_proj", "up_proj") if new_cfg.mlp == "swiglu" else ("up_proj",)
        for name in names:
            _copy_outputs(getattr(src.mlp, name), getattr(dst.mlp, name), ch)
        _copy_inputs(src.mlp.down_proj, dst.mlp.down_proj, ch)
    small.train(model.training)
    return small


def _copy_outputs(src: torch.nn.Linear, dst: torch.nn.Linear, rows: torch.Tensor) -> None:
    """dst keeps the output features `rows` of src (weight rows and their biases)."""
    dst.weight.copy_(src.weight[rows])
    if src.bias is not None:
        dst.bias.copy_(src.bias[rows])


def _copy_inputs(src: torch.nn.Linear, dst: torch.nn.Linear, cols: torch.Tensor) -> None:
    """dst reads only the input features `cols` of src (weight columns; the bias is per output, kept whole)."""
    dst.weight.copy_(src.weight[:, cols])
    if src.bias is not None:
        dst.bias.copy_(src.bias)
