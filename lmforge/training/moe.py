"""Training a mixture-of-experts model: the load-balancing loss, and what the routers are doing.

A router that is left alone tends to collapse: the experts that win tokens early train faster, so they win more
tokens, and the others starve (Shazeer et al. 2017). Mixtral and the Switch Transformer add a small auxiliary
loss that is lowest when the tokens are spread evenly over the experts (`lmforge.models.decoder.load_balancing_loss`):

    total loss = language-model loss + router_aux_loss_coef * load-balancing loss

`RouterAuxLoss` wraps any training `loss_fn(model, batch)` for that: it collects the router logits of the forward
the loss runs (`collect_router_logits`), adds the auxiliary term's gradient, and keeps statistics for the log.
`train()` wraps its loss this way when the model has experts; nothing changes for a dense model.

What the log shows (metrics.jsonl, one record per step, averaged over the step's micro-batches):

    aux_loss        the load-balancing loss: k (experts per token) when the load is perfectly even, up to E
                    (experts per layer) when every token goes to the same k experts
    router_load     per layer, the share of the (token, expert) assignments each expert received; 1/E each when even
    router_entropy  per layer, the mean entropy of the router's softmax divided by ln E: 1 = the router has no
                    preference yet, near 0 = confident choices

The value `RouterAuxLoss` returns stays the language-model loss, so a run's `loss` is comparable with its
`val_loss` and with a dense model's; only the gradient carries the auxiliary term (see `__call__`).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from lmforge.models.decoder import collect_router_logits, load_balancing_loss
from lmforge.utils import atomic_write


@torch.no_grad()
def router_stats(router_logits: list[torch.Tensor], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: each expert's share of the token->expert assignments (L, E), and the router's mean softmax
    entropy over ln E (L,). E.g. 2 experts, top-1, tokens routed [0, 0, 0, 1] -> load [[0.75, 0.25]]."""
    loads, entropies = [], []
    for logits in router_logits:  # (N, E) per layer
        E = logits.shape[-1]
        probs = logits.float().softmax(dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
        counts = torch.bincount(chosen.flatten(), minlength=E).float()
        loads.append(counts / counts.sum())
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
        entropies.append(entropy / math.log(E) if E > 1 else entropy)
    return torch.stack(loads), torch.stack(entropies)


class RouterAuxLoss:
    """`loss_fn(model, batch)` for a mixture-of-experts model: the same loss, plus the load-balancing gradient.

        loss_fn = RouterAuxLoss(next_token_loss, model.config)
        loss = loss_fn(model, batch); loss.backward()     # grads of LM loss + coef * aux
        stats = loss_fn.pop_stats()                       # {"aux_loss": ..., "router_load": [...], ...}

    Safe to call from several threads at once (training on several cores runs one shard per thread): each call
    collects its own forward's router logits, and the statistics are appended under a lock.
    """

    def __init__(self, loss_fn: Callable[[nn.Module, Any], torch.Tensor], config):
        self.loss_fn = loss_fn
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.coef = float(config.router_aux_loss_coef)
        # how the loss averages over a batch (cores.py shards batches by it); the auxiliary term is computed per
        # shard, as it is per micro-batch with gradient accumulation
        self.batch_mean = getattr(loss_fn, "batch_mean", None)
        self._lock = threading.Lock()
        self._stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (aux, load, entropy) per call

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with collect_router_logits() as router_logits:
            loss = self.loss_fn(model, batch)
        if not router_logits:  # the loss never ran an MoE forward
            return loss
        # forwards without autograd (a DPO loss's frozen reference pass) are not the model being trained: left out
        router_logits = [lg for lg in router_logits if lg.requires_grad] or router_logits
        aux = load_balancing_loss(router_logits, self.num_experts, self.top_k)
        load, entropy = router_stats(router_logits, self.top_k)
        with self._lock:  # kept as tensors: read back to the CPU once per step, in pop_stats
            self._stats.append((aux.detach(), load, entropy))
        # extra - extra.detach() is 0 in value and coef * d(aux) in gradient: backward sees LM loss + coef * aux,
        # while the value returned (and logged as `loss`) stays the language-model loss
        extra = self.coef * aux.to(loss.dtype)
        return loss + (extra - extra.detach())

    def pop_stats(self) -> dict[str, Any]:
        """The statistics of the calls since the last pop, averaged: aux_loss, router_load (L x E), router_entropy
        (L), rounded for metrics.jsonl. {} if there were none."""
        with self._lock:
            stats, self._stats = self._stats, []
        if not stats:
            return {}
        aux = float(torch.stack([s[0] for s in stats]).mean())
        load = torch.stack([s[1] for s in stats]).mean(0)  # (L, E)
        entropy = torch.stack([s[2] for s in stats]).mean(0)  # (L,)
        return {"aux_loss": round(aux, 5), "router_load": [[round(x, 4) for x in row] for row in load.tolist()],
                "router_entropy": [round(x, 4) for x in entropy.tolist()]}


def router_aux_loss_for(model: nn.Module, loss_fn: Callable) -> RouterAuxLoss | None:
    """`RouterAuxLoss(loss_fn, model.config)` when the model has experts (with a coefficient of 0 the loss is
    unchanged but the router statistics are still kept), else None."""
    config = getattr(model, "config", None)
    if not getattr(config, "num_experts", 0):
        return None
    return RouterAuxLoss(loss_fn, config)


def plot_router_load(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> bool:
    """PNG of each expert's share of the tokens against the step, one panel per layer (the dashed line is an even
    share, 1/E), from metrics records with `router_load`. False (nothing written) without matplotlib or data."""
    rows = [(r["step"], r["router_load"]) for r in records if "router_load" in r]
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [s for s, _ in rows]
    loads = torch.tensor([load for _, load in rows])  # (steps, L, E)
    L, E = loads.shape[1:]
    cols = min(L, 4)
    n_rows = (L + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 2.6 * n_rows), squeeze=False, sharey=True)
    for layer in range(L):
        ax = axes[layer // cols][layer % cols]
        for e in range(E):
            ax.plot(steps, loads[:, layer, e].tolist(), linewidth=1)
        ax.axhline(1 / E, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for layer in range(L, n_rows * cols):
        axes[layer // cols][layer % cols].axis("off")
    axes[0][0].set_ylabel("share of tokens")
    fig.suptitle(title or f"expert load ({E} experts per layer; dashed: even share)", fontsize=10)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True
