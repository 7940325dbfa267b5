"""Recipe: Direct Preference Optimization on (prompt, chosen, rejected) triples.

    lmforge finetune dpo runs/sft --data instruction-data-with-preference.json --out runs/dpo --beta 0.1
    lmforge finetune dpo runs/sft --data prefs.json --out runs/dpo-lora --lora-r 8   # reference = adapters off

The reference model is the starting model, frozen: a copy of it, another model directory (`reference`), or —
with LoRA — the very same weights with the adapters disabled (no second copy in memory). With
`precompute_ref` its log-probs are computed once before training and the reference is dropped. Each batch holds
B chosen rows then B rejected rows; the loss is `finetune.losses.dpo_loss`. Logged: loss, rewards of chosen and
rejected, their margin, and preference accuracy, on training batches (dpo_metrics.jsonl) and held-out pairs
before and after training (metrics.json).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.finetune import common, data as D
from lmforge.finetune.losses import dpo_loss, sequence_logprobs, split_pairs
from lmforge.recipes.sft import load_splits
from lmforge.training.loop import train
from lmforge.utils import atomic_write_json


@dataclass
class DPOConfig(common.FinetuneConfig):
    beta: float = field(default=0.1, metadata={"help": "how far the policy may move from the reference (KL weight)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "assumed fraction of flipped labels (cDPO)"})
    reference: str = field(default="", metadata={
        "help": "reference model directory (default: the starting model itself, frozen)"})
    precompute_ref: bool = field(default=False, metadata={"help": "compute reference log-probs once, up front"})
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.1], metadata={
        "help": "train,val,test fractions used when no val/test files are given"})
    lr: float = field(default=5e-6, metadata={"help": "peak learning rate"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps (unless --epochs is given)"})
    eval_at_start: bool = field(default=True, metadata={"help": "held-out loss before the first step"})
    group_by_length: bool = field(default=True, metadata={"help": "batch pairs of similar length (less padding)"})

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


class DPOLoss:
    """loss_fn(model, batch) for the loop. The batch carries ref_logps when they were precomputed; otherwise the
    reference model (or the policy with its LoRA adapters disabled) scores the rows without gradients."""

    def __init__(self, beta: float, label_smoothing: float = 0.0, reference: torch.nn.Module | None = None,
                 lora_reference: bool = False):
        self.beta, self.label_smoothing = beta, label_smoothing
        self.reference, self.lora_reference = reference, lora_reference
        self.last: dict[str, float] = {}

    @torch.no_grad()
    def reference_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.lora_reference:
            from lmforge.finetune import lora

            with lora.disable_adapters(model):
                return sequence_logprobs(model, batch)
        return sequence_logprobs(self.reference, batch)

    def stats(self, model, batch) -> Any:
        pc, pr = split_pairs(sequence_logprobs(model, batch))
        rc, rr = split_pairs(self.reference_logps(model, batch).to(pc.device))
        return dpo_loss(pc, pr, rc, rr, self.beta, self.label_smoothing)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.stats(model, batch)
        if model.training:
            self.last = {"dpo_loss": out.loss.item(), "reward_chosen": out.chosen_rewards.mean().item(),
                         "reward_rejected": out.rejected_rewards.mean().item(),
                         "reward_margin": out.margins.mean().item(), "pref_accuracy": out.accuracy.item()}
        return out.loss


@torch.no_grad()
def preference_eval(model, loss: DPOLoss, batches: list[dict]) -> dict[str, float]:
    """Mean DPO loss, margin and preference accuracy over held-out pairs."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    n = tot_loss = tot_margin = correct = 0.0  # a tie (margin exactly 0, e.g. policy == reference) counts half
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        out = loss.stats(model, b)
        k = out.margins.numel()
        n += k
        tot_loss += out.loss.item() * k
        tot_margin += out.margins.sum().item()
        correct += (out.margins > 0).sum().item() + 0.5 * (out.margins == 0).sum().item()
    model.train(was)
    return {"loss": tot_loss / n, "reward_margin": tot_margin / n, "pref_accuracy": correct / n, "pairs": int(n)}


def run_dpo(cfg: DPOConfig, log=print) -> dict:
    cfg.check_paths()
    lm = common.load_base(cfg)
    tok, out = lm.tokenizer, Path(cfg.out)
    parts = load_splits(cfg)
    L = common.max_length(cfg, lm.model)
    pad = common.pad_id(tok)
    pairs = {k: [tuple(D.truncate(e, L) for e in D.preference_examples(tok, r, i, f"{k} data"))
                 for i, r in enumerate(v)] for k, v in parts.items()}
    uses_lora = common.maybe_lora(lm.model, cfg, log)
    reference = None
    if cfg.reference:
        import lmforge

        reference = lmforge.load(cfg.reference, dtype="float32").model
    elif not uses_lora:
        reference = copy.deepcopy(lm.model)
    if reference is not None:
        reference.eval().requires_grad_(False)
    loss = DPOLoss(cfg.beta, cfg.label_smoothing, reference, lora_reference=reference is None)

    def collate(items) -> dict[str, torch.Tensor]:
        batch = D.preference_collate([(c, r) for c, r, *_ in items], pad, L)
        if items and len(items[0]) == 3:  # precomputed reference log-probs ride along
            batch["ref_logps"] = torch.tensor([x[2][0] for x in items] + [x[2][1] for x in items])
        return batch

    if cfg.precompute_ref:
        log("precomputing reference log-probs")
        for k, v in pairs.items():
            logps = []
            for s in range(0, len(v), cfg.batch_size):
                logps += _pair_logps(loss, lm.model, collate(v[s:s + cfg.batch_size]))
            pairs[k] = [(c, r, lp) for (c, r), lp in zip(v, logps)]
        loss.reference = None
        del reference
    lengths = [max(len(p[0]), len(p[1])) for p in pairs["train"]] if cfg.group_by_length else None
    batches = D.Batches(pairs["train"], cfg.batch_size, collate, seed=cfg.seed, lengths=lengths)
    val = D.Batches(pairs["val"], cfg.batch_size, collate, shuffle=False).all() if pairs["val"] else None
    held = D.Batches(pairs["test"] or pairs["val"], cfg.batch_size, collate, shuffle=False).all()
    metrics: dict[str, Any] = {"before": preference_eval(lm.model, loss, held)}
    log(f"held-out preference accuracy before: {metrics['before']['pref_accuracy']:.2%} "
        f"({metrics['before']['pairs']} pairs)")
    out.mkdir(parents=True, exist_ok=True)
    dpo_log = out / "dpo_metrics.jsonl"
    dpo_log.unlink(missing_ok=True)

    every = cfg.eval_every or 50

    def on_step(rec: dict) -> None:  # reopened each time: checkpoints swap the run directory in
        with open(dpo_log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": rec["step"], **loss.last}) + "\n")
        if rec["step"] % every == 0 and loss.last:
            log(f"step {rec['step']}: dpo loss {loss.last['dpo_loss']:.4f}, rewards chosen "
                f"{loss.last['reward_chosen']:+.3f} rejected {loss.last['reward_rejected']:+.3f}, margin "
                f"{loss.last['reward_margin']:+.3f}, preference accuracy {loss.last['pref_accuracy']:.0%}")

    train(lm.model, batches, cfg.train_config(len(batches)), val_data=val, loss_fn=loss, out_dir=out,
          save_model=common.lm_saver(lm, cfg, uses_lora), on_step=on_step, log=log)
    metrics["after"] = preference_eval(lm.model, loss, held)
    log(f"held-out preference accuracy after: {metrics['after']['pref_accuracy']:.2%}, "
        f"margin {metrics['after']['reward_margin']:.3f}")
    common.finish(lm, cfg, uses_lora, log)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _pair_logps(loss: DPOLoss, model, batch) -> list[tuple[float, float]]:
    c, r = split_pairs(loss.reference_logps(model, batch))
    return list(zip(c.tolist(), r.tolist()))
