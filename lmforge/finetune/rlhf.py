"""RLHF: a reward model from preferences, then PPO or GRPO against it (or against a reward a program checks).

The course pipeline is SFT -> reward model -> PPO (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback"; Ziegler et al. 2019). DPO (`finetune.losses.dpo_loss`) folds the last two
stages into one supervised loss; this module does them the long way, which also works when the reward is not
a preference model at all (a unit test, a calculator, a format check).

**1. Reward model.** A language model with a scalar head on its last real token (the pooling of the course's
classifier, `finetune.classifier.last_token_hidden`): prompt + response -> r (one number). Trained on pairs
(chosen y_w, rejected y_l) with the Bradley-Terry model of preferences, P(y_w > y_l) = σ(r_w - r_l):

    loss = -log σ(r(x, y_w) - r(x, y_l))           averaged over pairs            (`bradley_terry_loss`)

Only differences of rewards are learned, so r has no natural zero; held-out *pairwise accuracy* (how often
r_w > r_l on pairs never trained on) is the number to watch. 50% is chance.

**2. The RL problem.** A policy π (the SFT model) writes a completion y for a prompt x token by token; at the end a
reward r(x, y) arrives. We maximize E[r] but keep π near the frozen reference π_ref (the SFT model), or the policy
finds text the reward model overrates ("reward hacking") and forgets how to write:

    maximize  E_y~π [ r(x, y) ]  -  β · KL(π || π_ref)

The KL of one sampled sequence is estimated from the log-probs of its own tokens (Schulman, "Approximating KL
divergence", 2020), with d_t = log π_ref(y_t) - log π(y_t):

    k1 = -d_t                  unbiased, can be negative                                (`kl_estimate`)
    k3 = exp(d_t) - 1 - d_t    unbiased, always >= 0, lower variance

**3. PPO** (Schulman et al. 2017), as TRL's PPO trainer computes it. The KL becomes a per-token penalty and the
score is added on the last token:  rewards_t = -β·kl_t  (+ r(x, y) at the last token). A *value head* V(s_t) on the
policy's hidden states predicts the return from each position; GAE (Schulman et al. 2016) turns rewards and
values into advantages, how much better token t was than expected:

    δ_t = rewards_t + γ V_{t+1} - V_t,     A_t = δ_t + γλ A_{t+1},     returns_t = A_t + V_t           (`gae`)

Then several epochs of minibatch updates on the same rollouts, each clipped so the new policy cannot move far from
the one that sampled (ratio ρ_t = π_new(y_t) / π_old(y_t)):

    policy loss = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε))                          (`ppo_policy_loss`)
    value loss  = ½ mean_t max((V_t - R_t)², (clip(V_t, V_old ± ε_v) - R_t)²)            (`ppo_value_loss`)

**4. GRPO** (Shao et al. 2024, DeepSeekMath) drops the value model: sample G completions per prompt and use the
group as the baseline. Every token of completion i gets the same advantage

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)                              (`group_advantages`)

and the loss is PPO's clipped ratio term plus β·k3 to the reference per token (`grpo_loss`), as TRL's
GRPOTrainer computes it. A group whose completions all score the same teaches nothing (all A_i = 0).

Shapes: B rollouts (prompts x samples), P prompt tokens (left-padded), T completion tokens (right-padded), C the
model width, V the vocabulary. Every per-token tensor here is (B, T) over the completion, with `mask` (B, T) = 1 on
real completion tokens (the EOS a completion ended with included: the policy learns when to stop).

Where we differ from TRL, on purpose: one mask for the policy and value terms (TRL's PPO, when pad == EOS, keeps
the EOS token out of the policy term and puts the score one token later); a value head on the policy's own trunk
(TRL's PPO uses a separate value model, usually a copy of the reward model); rollouts are whole batches (no
gradient accumulation inside a rollout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import lmforge  # lmforge.load at call time: the loader imports finetune (adapters), so not `from lmforge.loader`
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.finetune import lora
from lmforge.finetune.classifier import last_token_hidden
from lmforge.generation.loop import decode_steps
from lmforge.generation.sampling import SamplingParams
from lmforge.generation.stops import StopChecker
from lmforge.utils import atomic_dir, atomic_write_json, read_json

REWARD_CONFIG = "reward.json"
REWARD_HEAD = "reward_head.safetensors"
VALUE_HEAD = "value_head.safetensors"


# ================================================================================================================
# Masked statistics (every per-token tensor is (B, T) with a 0/1 mask of the same shape)
# ================================================================================================================
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1: masked_mean([[1, 2], [3, 9]], [[1, 1], [1, 0]]) = 2."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as TRL); shift_mean=False keeps the mean."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)  # Bessel's correction
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


# ================================================================================================================
# 1. Reward model
# ================================================================================================================
class RewardModel(nn.Module):
    """`base` (a Transformer) + `head` (C -> 1, no bias, like transformers' `score` layer):
    forward(input_ids (B, T) right-padded, attention_mask (B, T)) -> rewards (B,)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        w = base.wte.weight
        self.head = nn.Linear(base.config.n_embd, 1, bias=False, device=w.device, dtype=w.dtype)

    @property
    def config(self):
        return self.base.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(last_token_hidden(self.base, input_ids, attention_mask))[:, 0]  # (B,)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float | None = None) -> torch.Tensor:
    """-log σ(r_c - r_r [- margin]) averaged over pairs; chosen, rejected (B,). TRL's RewardTrainer loss, with its
    optional margin (Llama 2) and `center_rewards_coefficient` term coef * mean((r_c + r_r)²), which pins the
    rewards' free offset near 0 (Eisenstein et al. 2023)."""
    delta = chosen - rejected if margin is None else chosen - rejected - margin  # (B,)
    loss = -F.logsigmoid(delta).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def reward_input(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    """What a reward model reads: [BOS] prompt response EOS, its *last* max_length tokens. The reward is read at
    the final token, so a long input loses the start of its prompt, never the response's end."""
    from lmforge.finetune.data import encode_prompt_response

    return encode_prompt_response(tokenizer, prompt, response).ids[-max_length:]


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs ranked right (a tie counts half, so an untrained constant reward scores 50%)."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()


def save_reward_model(rm: RewardModel, lm, path: str | Path, max_length: int, extra: dict | None = None) -> Path:
    """`lm` (whose model is rm.base) as a model directory, plus the head and reward.json. `lmforge.load` still
    reads the directory as a language model; `load_reward_model` reads the reward model."""
    from safetensors.torch import save_file

    if lm.model is not rm.base:
        raise ConfigError("save_reward_model: lm.model must be the reward model's base")
    lm.save(path)
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in rm.head.state_dict().items()},
                  str(tmp / REWARD_HEAD), metadata={"format": "pt"})
        atomic_write_json(tmp / REWARD_CONFIG, {"pooling": "last_token", "max_length": max_length,
                                                "format": "prompt + response + EOS, last max_length tokens, right-padded", **(extra or {})})
    return Path(path)


def is_reward_dir(path: str | Path) -> bool:
    return (Path(path) / REWARD_CONFIG).is_file()


def load_reward_model(path: str | Path, device=None):
    """(lm, reward model in eval mode, config dict) from a directory written by `save_reward_model`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_reward_dir(path):
        raise CheckpointError(f"{path}: not a reward model directory (no {REWARD_CONFIG}); train one with "
                              f"`lmforge finetune reward`")
    cfg = read_json(path / REWARD_CONFIG)
    lm = lmforge.load(path, device=device, dtype="float32")
    rm = RewardModel(lm.model)
    try:
        rm.head.load_state_dict(load_file(str(path / REWARD_HEAD)))
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{path / REWARD_HEAD}: unreadable or the wrong shape ({str(e).splitlines()[0]})") from None
    rm.eval().requires_grad_(False)
    return lm, rm, cfg


# ================================================================================================================
# Rewards a policy is trained against: fn(prompts, completions) -> one float each (TRL's reward-function shape)
# ================================================================================================================
RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]

_SUM = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)\s*=\s*$")


def arithmetic_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """1.0 when the completion is exactly the answer of the prompt's "a+b=" (or a-b=, a*b=), else 0.0.

    >>> arithmetic_reward(["12+7=", "3*4="], ["19", " 11"])
    [1.0, 0.0]
    The prompt is parsed with a regular expression, never evaluated."""
    out = []
    for p, c in zip(prompts, completions):
        m = _SUM.search(p)
        if m is None:
            raise DataError(f"arithmetic reward: prompt {p[-40:]!r} does not end in 'a+b=', 'a-b=' or 'a*b='")
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(1.0 if c.strip() == str(answer) else 0.0)
    return out


def arithmetic_prompts(n: int, max_operand: int = 99, ops: str = "+", seed: int = 0) -> list[str]:
    """n prompts "a+b=" with operands 0..max_operand, drawn with a seeded RNG."""
    import random

    rng = random.Random(seed)
    return [f"{rng.randint(0, max_operand)}{rng.choice(ops)}{rng.randint(0, max_operand)}=" for _ in range(n)]


def length_reward(target_words: int = 20) -> RewardFn:
    """1 - |words - target| / target (1.0 at exactly `target_words` words, lower both ways)."""
    def reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [1.0 - abs(len(c.split()) - target_words) / target_words for c in completions]

    return reward


class RewardModelScorer:
    """A trained reward model as a reward function: it scores prompt + completion + EOS, as it was trained."""

    def __init__(self, rm: RewardModel, tokenizer, max_length: int, batch_size: int = 16):
        self.rm, self.tokenizer, self.max_length, self.batch_size = rm, tokenizer, max_length, batch_size

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        from lmforge.finetune.data import classification_collate

        device = next(self.rm.parameters()).device
        rows = [reward_input(self.tokenizer, p, c, self.max_length) for p, c in zip(prompts, completions)]
        out: list[float] = []
        for s in range(0, len(rows), self.batch_size):
            batch = classification_collate([(r, 0) for r in rows[s:s + self.batch_size]], pad_id=0)
            out += self.rm(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().tolist()
        return out


# ================================================================================================================
# Rollouts: sample completions with lmforge's generation loop
# ================================================================================================================
@dataclass
class Rollout:
    """B sampled completions. input_ids = [prompt (left-padded) | completion (right-padded)]."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (B, T) right-padded
    completion_mask: torch.Tensor  # (B, T) 1 on generated tokens (the ending EOS included)
    prompts: list[str]  # (B,) prompt text of each row
    completions: list[str]  # (B,) completion text (no EOS)
    group: list[int] = field(default_factory=list)  # (B,) index of the prompt each row was sampled for

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (B, P + T)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # (B, P + T)

    def select(self, idx: torch.Tensor) -> "Rollout":
        i = idx.tolist()
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx],
                       self.completion_mask[idx], [self.prompts[k] for k in i], [self.completions[k] for k in i],
                       [self.group[k] for k in i] if self.group else [])


@torch.no_grad()
def sample_completions(model: nn.Module, tokenizer, prompts: Sequence[str], params: SamplingParams,
                       samples_per_prompt: int = 1, seed: int = 0, pad_id: int = 0) -> Rollout:
    """Sample `samples_per_prompt` completions of each prompt (rows prompt-major: p0 p0 .. p1 p1 ..).

    Each row gets its own generator, seeded from (seed, row), so the G samples of one prompt differ and a run is
    reproducible. Generation stops at EOS (kept as the completion's last token), after max_new_tokens, or at the
    end of the model's context."""
    from lmforge.finetune.data import encode_prompt_response

    eos = getattr(tokenizer, "eos_token_id", None)
    stops = list(params.stop_token_ids) + ([eos] if eos is not None else [])
    enc = [encode_prompt_response(tokenizer, p, "", add_eos=False).ids for p in prompts]  # [BOS] prompt, as in SFT
    block = model.config.block_size
    for p, ids in zip(prompts, enc):
        if len(ids) >= block:
            raise DataError(f"a prompt of {len(ids)} tokens leaves no room in the model's {block}-token context "
                            f"({p[:40]!r}...): shorten the prompts or use a model with a longer context")
    rows = [ids for ids in enc for _ in range(samples_per_prompt)]
    texts = [p for p in prompts for _ in range(samples_per_prompt)]
    group = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
    device = next(model.parameters()).device
    gens = []
    for r in range(len(rows)):
        g = torch.Generator(device=device)
        g.manual_seed(seed * 1_000_003 + r)
        gens.append(g)
    checkers = [StopChecker(tokenizer, [], stops, context_ids=ids) for ids in rows]
    for c in checkers:  # the loop records each sampled token's log-prob here when params.logprobs is set
        c.logprobs = [] if params.logprobs else None
        c.top_logprobs = [] if params.top_logprobs else None
    was = model.training
    model.eval()
    try:
        for _ in decode_steps(model, rows, params, checkers, pad_id=pad_id, generators=gens,
                              max_len=block):
            pass
    finally:
        model.train(was)
    outs = [c.token_ids + ([c.stop_reason] if c.finish_reason == "stop" and isinstance(c.stop_reason, int) else [])
            for c in checkers]
    P, T = max(len(r) for r in rows), max(1, max(len(o) for o in outs))
    prompt_ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(len(rows), P, dtype=torch.long)
    completion_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (p, o) in enumerate(zip(rows, outs)):
        prompt_ids[b, P - len(p):] = torch.tensor(p)
        prompt_mask[b, P - len(p):] = 1
        if o:
            completion_ids[b, :len(o)] = torch.tensor(o)
            completion_mask[b, :len(o)] = 1
    completions = [c.text for c in checkers]
    return Rollout(prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device),
                   completion_mask.to(device), texts, completions, group)


# ================================================================================================================
# Log-probs and values of completion tokens
# ================================================================================================================
def completion_logprobs(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0
                        ) -> torch.Tensor:
    """log softmax(logits / temperature)[token]: logits (B, T, V) predicting each completion token -> (B, T).
    (TRL divides by the sampling temperature too, so the ratio compares the distributions that sampled.)"""
    logp = (logits.float() / temperature).log_softmax(-1)  # (B, T, V)
    return logp.gather(-1, completion_ids[..., None])[..., 0]  # (B, T)


def policy_logprobs(model: nn.Module, rollout: Rollout, temperature: float = 1.0, *, hidden: bool = False):
    """log π(completion token t | everything before it): (B, T); with hidden=True also the final hidden states at
    the same positions, (B, T, C), for a value head."""
    T = rollout.completion_ids.shape[1]
    out = model(rollout.input_ids, attention_mask=rollout.attention_mask, output_hidden_states=hidden,
                logits_to_keep=T + 1)
    logits = (out.logits if hidden else out)[:, :-1]  # (B, T, V): position P-1+t predicts completion token t
    logp = completion_logprobs(logits, rollout.completion_ids, temperature)
    if not hidden:
        return logp
    return logp, out.hidden_states[-1][:, -T - 1:-1]  # (B, T), (B, T, C)


@torch.no_grad()
def reference_logprobs(policy: nn.Module, reference: nn.Module | None, rollout: Rollout,
                       temperature: float = 1.0) -> torch.Tensor:
    """log π_ref of the completion tokens (B, T). reference=None: the policy with its LoRA adapters disabled."""
    if reference is not None:
        return policy_logprobs(reference, rollout, temperature)
    with lora.disable_adapters(policy):
        return policy_logprobs(policy, rollout, temperature)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from the sampled tokens' log-probs (B, T) -> (B, T).

    >>> kl_estimate(torch.tensor([-1.0]), torch.tensor([-2.0]), "k1"), kl_estimate(torch.tensor([-1.0]), torch.tensor([-2.0]), "k3")
    (tensor([1.]), tensor([0.3679]))"""
    d = ref_logprobs - logprobs  # log π_ref/π
    if estimator == "k1":
        return -d
    if estimator == "k3":
        return d.exp() - 1 - d
    raise ConfigError(f"unknown KL estimator {estimator!r}; use k1 or k3")


# ================================================================================================================
# PPO
# ================================================================================================================
class PolicyWithValue(nn.Module):
    """The policy (a Transformer) and a value head V: C -> 1 on its final hidden states (one shared trunk, as in
    TRL's original AutoModelForCausalLMWithValueHead). forward(rollout) -> (logprobs (B, T), values (B, T))."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        w = policy.wte.weight
        self.value_head = nn.Linear(policy.config.n_embd, 1, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.value_head.weight)  # start predicting 0 everywhere: no wild early advantages
        nn.init.zeros_(self.value_head.bias)

    def forward(self, rollout: Rollout, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        logp, h = policy_logprobs(self.policy, rollout, temperature, hidden=True)
        return logp, self.value_head(h.to(self.value_head.weight.dtype))[..., 0].float()  # (B, T), (B, T)


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float, estimator: str = "k1"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * kl_t on every completion token, plus the score on the last one.
    scores (B,), the rest (B, T) -> (rewards (B, T), kl (B, T)), both 0 outside the mask."""
    m = mask.float()
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * m  # (B, T)
    rewards = -kl_coef * kl
    last = (mask.long().cumsum(1).argmax(1))  # (B,) index of each row's last real token
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, backwards over the completion: (B, T) each -> (advantages, returns).

    V after the last token is 0 (the episode ends); positions outside the mask count as reward 0, value 0."""
    m = mask.float()
    rewards, values = rewards * m, values * m
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv, adv + values


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate objective (as a loss to minimize), mean over masked tokens; (B, T) inputs."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(loss1, loss2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss2 > loss1).float(), mask).item(),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask).item()}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """½ max((V - R)², (clip(V, V_old ± ε_v) - R)²), mean over masked tokens; (B, T) inputs."""
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(l1, l2), mask)
    return loss, {"vf_clipfrac": masked_mean((l2 > l1).float(), mask).item()}


def save_value_head(model: PolicyWithValue, path: str | Path) -> Path:
    """The value head beside the policy (`value_head.safetensors`), so a PPO run can be continued or inspected."""
    from safetensors.torch import save as save_bytes

    from lmforge.utils import atomic_write_bytes

    state = {k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()}
    atomic_write_bytes(Path(path) / VALUE_HEAD, save_bytes(state, metadata={"format": "pt"}))
    return Path(path) / VALUE_HEAD


def _step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float) -> None:
    """Clip, step, and mark the weights as changed. PyTorch's fused AdamW (what `training.loop.configure_optimizer`
    builds) updates weights without bumping their version counters, and the generation loop's fast decode step
    keeps copies of the weights that it remakes only when those counters move (`generation.decode.fused_weights`):
    without the bump, the next rollout would be sampled by the weights of the first one."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    torch.autograd.graph.increment_version(params)


@dataclass
class PPOBatch:
    """A rollout with everything PPO's epochs reuse (all (B, T) but scores (B,)), computed once, no gradients."""

    rollout: Rollout
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor  # whitened over the batch's tokens
    returns: torch.Tensor


@torch.no_grad()
def ppo_batch(model: PolicyWithValue, reference: nn.Module | None, rollout: Rollout, scores: torch.Tensor, *,
              kl_coef: float = 0.05, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
              temperature: float = 1.0, whiten_rewards: bool = False) -> PPOBatch:
    """Score a rollout for PPO: old log-probs and values, reference log-probs, KL-penalized rewards, GAE."""
    mask = rollout.completion_mask
    was = model.training
    model.eval()  # no dropout while scoring the rollout
    logprobs, values = model(rollout, temperature)
    model.train(was)
    ref = reference_logprobs(model.policy, reference, rollout, temperature)
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef, kl_estimator)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    adv, returns = gae(rewards, values, mask, gamma, lam)
    adv = masked_whiten(adv, mask) * mask
    return PPOBatch(rollout, logprobs, ref, values * mask, scores, kl, adv, returns)


def ppo_update(model: PolicyWithValue, optimizer: torch.optim.Optimizer, batch: PPOBatch, *, epochs: int = 4,
               mini_batches: int = 1, cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1,
               temperature: float = 1.0, grad_clip: float = 1.0, generator: torch.Generator | None = None
               ) -> dict[str, float]:
    """`epochs` passes over the batch in `mini_batches` shuffled pieces, one optimizer step each. Mean stats."""
    B = batch.scores.shape[0]
    size = max(1, B // mini_batches)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    totals: dict[str, float] = {}
    n = 0
    for _ in range(epochs):
        order = torch.randperm(B, generator=generator)
        for s in range(0, B, size):
            idx = order[s:s + size].to(batch.scores.device)
            mb = batch.rollout.select(idx)
            mask = mb.completion_mask
            logprobs, values = model(mb, temperature)
            pg, pg_stats = ppo_policy_loss(logprobs, batch.logprobs[idx], batch.advantages[idx], mask, cliprange)
            vf, vf_stats = ppo_value_loss(values, batch.values[idx], batch.returns[idx], mask, cliprange_value)
            loss = pg + vf_coef * vf
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _step(optimizer, params, grad_clip)
            for k, v in {"policy_loss": pg.item(), "value_loss": vf.item(), **pg_stats, **vf_stats}.items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
    return {k: v / n for k, v in totals.items()}


# ================================================================================================================
# GRPO
# ================================================================================================================
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """(r - mean of its group) / (std of its group + 1e-4), rows prompt-major in groups of `group_size`. (B,) -> (B,)

    std is the unbiased (n-1) one, as TRL's `nanstd`; scale="batch" divides by the whole batch's std instead,
    "none" only subtracts the group mean (Dr. GRPO)."""
    if rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.view(-1, group_size)  # (n_prompts, G)
    mean = g.mean(1, keepdim=True).expand_as(g).reshape(-1)
    if scale == "group":
        std = (g.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])).expand_as(g).reshape(-1)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif scale == "none":
        return rewards - mean
    else:
        raise ConfigError(f"unknown advantage scaling {scale!r}; use group, batch or none")
    return (rewards - mean) / (std + 1e-4)


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.04, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "grpo", max_completion_length: int | None = None,
              kl_ratio_correction: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's loss from per-token log-probs (B, T) and per-sequence advantages (B,).

    per token: -min(ρ A, clip(ρ, 1-ε, 1+ε_high) A) + β k3(π, π_ref), the k3 term times ρ when
    `kl_ratio_correction` (TRL's default `use_bias_correction_kl`, from DeepSeek-V3.2: the tokens were sampled by
    π_old, so weighting by ρ makes the KL gradient the unbiased one; ρ = 1 in value on-policy, not in gradient).
    Averaged as `loss_type` says:
      grpo     mean over each sequence's tokens, then over sequences (the paper; favours short right answers)
      bnpo     mean over all tokens of the batch (TRL's "dapo" too, when one batch is one optimizer step)
      dr_grpo  sum over tokens / (B * max_completion_length) (Dr. GRPO: no length bias)"""
    m = mask.float()
    A = advantages[:, None]  # (B, 1)
    ratio = (logprobs - old_logprobs).exp()
    clipped = ratio.clamp(1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    per_token = -torch.min(ratio * A, clipped * A)  # (B, T)
    kl = None
    if beta != 0.0:
        kl = kl_estimate(logprobs, ref_logprobs, "k3")
        if kl_ratio_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (per_token.shape[0] * (max_completion_length or per_token.shape[1]))
    else:
        raise ConfigError(f"unknown GRPO loss_type {loss_type!r}; use one of {', '.join(GRPO_LOSS_TYPES)}")
    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (A < 0)
        high = (ratio > 1 + (epsilon if epsilon_high is None else epsilon_high)) & (A > 0)
        stats = {"clip_ratio": masked_mean((low | high).float(), m).item(),
                 "kl_k3": masked_mean(kl, m).item() if kl is not None else 0.0}
    return loss, stats


@dataclass
class GRPOBatch:
    rollout: Rollout
    old_logprobs: torch.Tensor  # (B, T)
    ref_logprobs: torch.Tensor | None  # (B, T)
    rewards: torch.Tensor  # (B,)
    advantages: torch.Tensor  # (B,)


@torch.no_grad()
def grpo_batch(policy: nn.Module, reference: nn.Module | None, rollout: Rollout, rewards: torch.Tensor,
               group_size: int, *, beta: float = 0.04, temperature: float = 1.0, scale: str = "group") -> GRPOBatch:
    was = policy.training
    policy.eval()
    old = policy_logprobs(policy, rollout, temperature)
    policy.train(was)
    ref = reference_logprobs(policy, reference, rollout, temperature) if beta != 0.0 else None
    return GRPOBatch(rollout, old, ref, rewards, group_advantages(rewards, group_size, scale))


def grpo_update(policy: nn.Module, optimizer: torch.optim.Optimizer, batch: GRPOBatch, *, epochs: int = 1,
                mini_batches: int = 1, beta: float = 0.04, epsilon: float = 0.2, epsilon_high: float | None = None,
                loss_type: str = "grpo", max_completion_length: int | None = None, temperature: float = 1.0,
                kl_ratio_correction: bool = True, grad_clip: float = 1.0, generator: torch.Generator | None = None
                ) -> dict[str, float]:
    """`epochs` (TRL's num_iterations) passes over the batch in shuffled mini-batches, one step each."""
    B = batch.rewards.shape[0]
    size = max(1, B // mini_batches)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    totals: dict[str, float] = {}
    n = 0
    for _ in range(epochs):
        order = torch.randperm(B, generator=generator)
        for s in range(0, B, size):
            idx = order[s:s + size].to(batch.rewards.device)
            mb = batch.rollout.select(idx)
            logp = policy_logprobs(policy, mb, temperature)
            loss, stats = grpo_loss(logp, batch.old_logprobs[idx],
                                    batch.ref_logprobs[idx] if batch.ref_logprobs is not None else None,
                                    batch.advantages[idx], mb.completion_mask, beta=beta, epsilon=epsilon,
                                    epsilon_high=epsilon_high, loss_type=loss_type,
                                    max_completion_length=max_completion_length,
                                    kl_ratio_correction=kl_ratio_correction)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _step(optimizer, params, grad_clip)
            for k, v in {"loss": loss.item(), **stats}.items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
    return {k: v / n for k, v in totals.items()}


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over sequences of sum_t (log π - log π_ref): the k1 estimate of KL(π || π_ref) per completion (nats);
    what the RL curves plot (TRL's objective/kl)."""
    return ((logprobs - ref_logprobs) * mask.float()).sum(1).mean().item()


# ================================================================================================================
# The loop PPO and GRPO share: sample -> score -> update
# ================================================================================================================
@torch.no_grad()
def greedy_reward(policy: nn.Module, tokenizer, prompts: Sequence[str], reward_fn: RewardFn, max_new_tokens: int,
                  pad_id: int = 0, batch_size: int = 32) -> float:
    """Mean reward of the greedy completions of `prompts` (the held-out score of a policy); nan for no prompts."""
    if not prompts:
        return float("nan")
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    scores: list[float] = []
    for s in range(0, len(prompts), batch_size):
        ro = sample_completions(policy, tokenizer, prompts[s:s + batch_size], greedy, pad_id=pad_id)
        scores += reward_fn(ro.prompts, ro.completions)
    return sum(scores) / len(scores)


UpdateFn = Callable[[Rollout, torch.Tensor, int], tuple[dict, torch.Tensor, torch.Tensor]]


def rl_loop(policy: nn.Module, tokenizer, prompts: Sequence[str], reward_fn: RewardFn, update: UpdateFn, *,
            steps: int, prompts_per_step: int, params: SamplingParams, samples_per_prompt: int = 1, seed: int = 0,
            pad_id: int = 0, evaluate: Callable[[], float] | None = None, eval_every: int = 0,
            on_record: Callable[[dict, Rollout], None] | None = None) -> list[dict]:
    """`steps` times: take the next `prompts_per_step` prompts (a fresh seeded shuffle each pass over them), sample
    `samples_per_prompt` completions of each with `policy`, score them with `reward_fn`, and hand rollout and
    scores (B,) to update(rollout, scores, step) -> (stats, log π (B, T), log π_ref (B, T)).

    Returns one record per step: reward (mean score), kl (`sequence_kl`), completion_tokens and the update's stats,
    plus eval_reward from `evaluate()` every `eval_every` steps; `on_record(record, rollout)` sees each as it comes.
    """
    import random

    rng = random.Random(seed)
    order: list[int] = []
    records = []
    for step in range(steps):
        while len(order) < prompts_per_step:
            perm = list(range(len(prompts)))
            rng.shuffle(perm)
            order += perm
        batch = [prompts[i] for i in order[:prompts_per_step]]
        del order[:prompts_per_step]
        ro = sample_completions(policy, tokenizer, batch, params, samples_per_prompt, seed=seed + step, pad_id=pad_id)
        device = ro.completion_ids.device
        scores = torch.tensor(reward_fn(ro.prompts, ro.completions), dtype=torch.float32, device=device)
        stats, logprobs, ref_logprobs = update(ro, scores, step)
        rec = {"step": step + 1, "reward": scores.mean().item(),
               "kl": sequence_kl(logprobs, ref_logprobs, ro.completion_mask),
               "completion_tokens": ro.completion_mask.sum(1).float().mean().item(), **stats}
        if evaluate is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            rec["eval_reward"] = evaluate()
        records.append(rec)
        if on_record is not None:
            on_record(rec, ro)
    return records


def summarize(records: Sequence[dict]) -> dict[str, float]:
    """Mean reward of the first and last 10% of the steps, mean KL of the last 10%, and the largest KL."""
    trained = [r for r in records if "reward" in r]
    if not trained:
        return {}
    k = max(1, len(trained) // 10)
    return {"reward_first_10pct": sum(r["reward"] for r in trained[:k]) / k,
            "reward_last_10pct": sum(r["reward"] for r in trained[-k:]) / k,
            "kl_last_10pct": sum(r["kl"] for r in trained[-k:]) / k,
            "kl_max": max(r["kl"] for r in trained)}


# ================================================================================================================
# Curves
# ================================================================================================================
def plot_rl_curves(records: Sequence[dict], path: str | Path, title: str = "") -> bool:
    """Reward (and held-out reward, when logged) and KL per step, two panels, to a PNG. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from lmforge.utils import atomic_write

    steps = [r["step"] for r in records if "reward" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [r["reward"] for r in records if "reward" in r], label="reward (sampled rollouts)")
    ev = [(r["step"], r["eval_reward"]) for r in records if "eval_reward" in r]
    if ev:
        a.plot(*zip(*ev), "o-", label="held-out reward (greedy)")
    a.set_xlabel("step")
    a.set_ylabel("reward")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(steps, [r["kl"] for r in records if "reward" in r], color="tab:red")
    b.set_xlabel("step")
    b.set_ylabel("KL(π || π_ref) per completion (nats)")
    b.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb", encoding=None) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True

