"""Losses of the fine-tuning recipes: response-only cross-entropy, sequence log-probabilities and DPO.

**Sequence log-probability.** For DPO we need log π(y | x): how likely a model finds a whole response y after
prompt x. By the chain rule it is the sum of the log-probabilities of the response tokens, each given everything
before it. With targets already shifted and the prompt/padding masked to -100 (see `finetune.data`), that is

    logp(y|x) = sum_t [target_t != -100] * log softmax(logits_t)[target_t]

which is `-cross_entropy(..., reduction="none")` summed per row (ignored positions contribute exactly 0).

**DPO** (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model").
RLHF trains a reward model on human preferences and then optimizes the policy against it with PPO under a KL
penalty to a reference model. DPO shows the optimal policy of that KL-constrained problem defines an *implicit*
reward r(x, y) = β log(π(y|x) / π_ref(y|x)), so the preference likelihood can be maximized directly:

    loss = -log σ( β [ (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x)) ] )

y_w is the chosen (preferred) response, y_l the rejected one. β sets how far the policy may move from the
reference: small β lets it drift, large β keeps it close. The reference is the model before DPO, frozen; its
log-probs can be computed once up front ("precomputed reference log-probs") since they never change. With LoRA
the reference is free: the same model with its adapters disabled. What to watch while training:

* rewards/chosen = β (log π(y_w) - log π_ref(y_w)), rewards/rejected likewise; the **margin** is their difference
* **preference accuracy**: the fraction of pairs whose margin is > 0 (the policy prefers the chosen response more
  than the reference did). It starts near 50% (policy == reference gives margin 0) and should rise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.finetune.data import IGNORE_INDEX
from lmforge.training.batch import token_mean


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t) at each position, 0 where the label is -100. logits (B, T, V), labels (B, T) -> (B, T)."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), labels.reshape(B * T), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return -nll.view(B, T)


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities per row: (B,). Right padding needs no attention mask."""
    logits = model(batch["input_ids"])  # (B, T, V)
    return token_logprobs(logits, batch["labels"]).sum(-1)


@token_mean
def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of the batch (prompt and padding are -100)."""
    logits = model(batch["input_ids"])  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar, differentiable
    chosen_rewards: torch.Tensor  # (B,) β (logπ(y_w) - logπ_ref(y_w)), detached
    rejected_rewards: torch.Tensor  # (B,)
    margins: torch.Tensor  # (B,) chosen - rejected rewards
    accuracy: torch.Tensor  # scalar: fraction of pairs with chosen reward > rejected reward


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> DPOOutput:
    """The DPO loss from sequence log-probs (each (B,)). label_smoothing > 0 is conservative DPO (cDPO): it
    assumes a fraction of the preference labels are flipped."""
    chosen_logratios = policy_chosen - ref_chosen  # (B,)
    rejected_logratios = policy_rejected - ref_rejected  # (B,)
    delta = chosen_logratios - rejected_logratios  # (B,)
    losses = (-F.logsigmoid(beta * delta) * (1 - label_smoothing)
              - F.logsigmoid(-beta * delta) * label_smoothing)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    margins = chosen_rewards - rejected_rewards
    return DPOOutput(losses.mean(), chosen_rewards, rejected_rewards, margins, (margins > 0).float().mean())


def split_pairs(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (2B,) tensor of [chosen..., rejected...] rows -> (chosen (B,), rejected (B,))."""
    B = logps.shape[0] // 2
    return logps[:B], logps[B:]
