"""Recipes: RLHF's reward model, then PPO or GRPO against it (or against a reward a program checks).

    lmforge finetune reward runs/sft --data instruction-data-with-preference.json --out runs/rm
    lmforge finetune ppo  runs/sft --reward runs/rm --data instruction-data.json --out runs/ppo --lora-r 8
    lmforge finetune grpo runs/arith --reward arithmetic --out runs/grpo      # prompts "a+b=", reward 1 if right

`reward` trains a scalar head on the last token with the Bradley-Terry loss through the one training loop and
reports held-out pairwise accuracy (before and after) on the test split it never trained on. `ppo` and `grpo`
run `finetune.rlhf.rl_loop` (sample -> score -> update; `finetune.rlhf` holds the math): each step samples
`prompts_per_step` x `samples_per_prompt` completions with lmforge's generation, scores them, and updates the
policy with `ppo_update` or `grpo_update`. The reference is the starting model, frozen (with LoRA: the same weights, adapters off). Logged per step
to rl_metrics.jsonl: reward, KL to the reference (nats per completion), completion length and the losses; every
`eval_every` steps the greedy completions of held-out prompts are scored (`eval_reward`). rlhf.png plots reward and
KL. The rewards: `arithmetic` (prompts made up here, or the --data records' prompts ending in "a+b="), `length`
(completions of `length_target` words), or a reward model directory from `reward`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.finetune import common, data as D, rlhf
from lmforge.finetune.classifier import set_trainable
from lmforge.generation.sampling import SamplingParams
from lmforge.lm import LM
from lmforge.recipes.sft import load_splits
from lmforge.training.loop import configure_optimizer, lr_at, train
from lmforge.utils import atomic_write_json


# ================================================================================================================
# Reward model
# ================================================================================================================
@dataclass
class RewardConfig(common.FinetuneConfig):
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.1], metadata={
        "help": "train,val,test fractions used when no val/test files are given"})
    train_layers: int = field(default=-1, metadata={"help": "train the last N blocks + final norm + head (-1: all)"})
    center_rewards_coefficient: float = field(default=0.0, metadata={
        "help": "add coef * mean((r_chosen + r_rejected)^2) to keep rewards centred on 0 (TRL's option)"})
    group_by_length: bool = field(default=True, metadata={"help": "batch pairs of similar length (less padding)"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    schedule: str = field(default="constant", metadata={"help": "learning-rate schedule: cosine, constant or wsd"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps (unless --epochs is given)"})
    eval_every: int = field(default=50, metadata={"help": "evaluate every N steps (0: only at the end)"})
    eval_at_start: bool = field(default=True, metadata={"help": "held-out loss before the first step"})


class RewardLoss:
    """loss_fn(model, batch) for the loop: rows [chosen..., rejected...] -> Bradley-Terry loss; keeps the last
    training batch's accuracy and margin for the log."""

    def __init__(self, center_coef: float = 0.0):
        self.center_coef = center_coef
        self.last: dict[str, float] = {}

    def __call__(self, model: rlhf.RewardModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rc, rr = model(batch["input_ids"], batch["attention_mask"]).float().chunk(2)  # (B,), (B,)
        loss = rlhf.bradley_terry_loss(rc, rr, center_coef=self.center_coef)
        if model.training:
            self.last = {"accuracy": rlhf.pairwise_accuracy(rc, rr), "margin": (rc - rr).mean().item()}
        return loss


@torch.no_grad()
def pairwise_eval(rm: rlhf.RewardModel, batches: list[dict]) -> dict[str, float]:
    """Pairwise accuracy (ties count half), mean margin and loss over held-out pairs."""
    was = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    chosen, rejected = [], []
    for b in batches:
        rc, rr = rm(b["input_ids"].to(device), b["attention_mask"].to(device)).float().chunk(2)
        chosen.append(rc.cpu())
        rejected.append(rr.cpu())
    rm.train(was)
    rc, rr = torch.cat(chosen), torch.cat(rejected)
    return {"pairwise_accuracy": rlhf.pairwise_accuracy(rc, rr), "margin": (rc - rr).mean().item(),
            "loss": rlhf.bradley_terry_loss(rc, rr).item(), "pairs": len(rc)}


def run_reward(cfg: RewardConfig, log=print) -> dict:
    cfg.check_paths()
    lm = common.load_base(cfg)
    tok, out = lm.tokenizer, Path(cfg.out)
    parts = load_splits(cfg)
    L = common.max_length(cfg, lm.model)
    pad = common.pad_id(tok)
    # each side is prompt + response + EOS; a long one keeps its last L tokens (the reward is read at the end)
    pairs: dict[str, list[tuple[list[int], list[int]]]] = {}
    for k, v in parts.items():
        for i, r in enumerate(v):
            D.require(r, ("instruction", "chosen", "rejected"), i, f"{k} data")
        prompts = [D.alpaca_prompt(r) for r in v]
        pairs[k] = [(rlhf.reward_input(tok, p, r["chosen"], L), rlhf.reward_input(tok, p, r["rejected"], L))
                    for p, r in zip(prompts, v)]
    cut = sum(len(D.encode_prompt_response(tok, D.alpaca_prompt(r), r[s]).ids) > L
              for r in parts["train"] for s in ("chosen", "rejected"))
    if cut:
        log(f"note: {cut} of {2 * len(parts['train'])} training sequences are longer than {L} tokens; they keep "
            f"their last {L} (the start of the prompt is cut, the response is kept)")
    rm = rlhf.RewardModel(lm.model)
    uses_lora = common.maybe_lora(lm.model, cfg, log)
    set_trainable(rm, 0 if uses_lora else cfg.train_layers)  # with LoRA: adapters + final norm + head

    def collate(items) -> dict[str, torch.Tensor]:  # rows: chosen_1..chosen_B, rejected_1..rejected_B (TRL's order)
        b = D.classification_collate([(c, 0) for c, _ in items] + [(r, 0) for _, r in items], pad)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

    lengths = [max(len(c), len(r)) for c, r in pairs["train"]] if cfg.group_by_length else None
    batches = D.Batches(pairs["train"], cfg.batch_size, collate, seed=cfg.seed, lengths=lengths)
    val = D.Batches(pairs["val"], cfg.batch_size, collate, shuffle=False).all() if pairs["val"] else None
    held_name = "test" if pairs["test"] else "val"
    held = D.Batches(pairs[held_name] or pairs["train"], cfg.batch_size, collate, shuffle=False).all()
    log(f"{', '.join(f'{k} {len(v)}' for k, v in pairs.items())} pairs | max {L} tokens")
    metrics: dict[str, Any] = {"held_out_split": held_name, "before": pairwise_eval(rm, held)}
    log(f"held-out ({held_name}) pairwise accuracy before: {metrics['before']['pairwise_accuracy']:.2%} "
        f"({metrics['before']['pairs']} pairs)")
    loss = RewardLoss(cfg.center_rewards_coefficient)
    every = cfg.eval_every or 50

    def on_step(rec: dict) -> None:
        if rec["step"] % every == 0 and loss.last:
            log(f"step {rec['step']}: loss {rec.get('loss', float('nan')):.4f}, batch accuracy "
                f"{loss.last['accuracy']:.0%}, margin {loss.last['margin']:+.3f}")

    def save(d: Path) -> None:
        if not uses_lora:
            rlhf.save_reward_model(rm, lm, d, L)
        else:  # a reward directory holds a whole model: merge a copy of the adapters in
            from lmforge.finetune import lora

            base = lora.merge_and_unload(copy.deepcopy(lm.model))
            merged = rlhf.RewardModel(base)
            merged.head.load_state_dict(rm.head.state_dict())
            rlhf.save_reward_model(merged, LM(base, tok, lm.config, lm.generation_config, lm.chat_template), d, L)
        atomic_write_json(Path(d) / "finetune_config.json", dataclasses.asdict(cfg))

    train(rm, batches, cfg.train_config(len(batches)), val_data=val, loss_fn=loss, out_dir=out, save_model=save,
          on_step=on_step, log=log)
    metrics["after"] = pairwise_eval(rm, held)
    log(f"held-out ({held_name}) pairwise accuracy after: {metrics['after']['pairwise_accuracy']:.2%}, margin "
        f"{metrics['after']['margin']:+.3f} ({metrics['after']['pairs']} pairs)")
    atomic_write_json(out / "metrics.json", metrics)
    log(f"reward model directory: {out}")
    return metrics


# ================================================================================================================
# PPO and GRPO: the shared settings and loop
# ================================================================================================================
@dataclass
class RLConfig(common.FinetuneConfig):
    reward: str = field(default="", metadata={
        "help": "arithmetic, length, or a reward model directory (from `lmforge finetune reward`)"})
    data: str = field(default="", metadata={
        "help": "prompts: Alpaca records (instruction, input); optional with --reward arithmetic (made up here)"})
    num_prompts: int = field(default=2000, metadata={"help": "arithmetic without --data: training prompts to make"})
    max_operand: int = field(default=99, metadata={"help": "arithmetic without --data: operands 0..N"})
    ops: str = field(default="+", metadata={"help": "arithmetic without --data: operators to draw from (+, -, *)"})
    length_target: int = field(default=20, metadata={"help": "--reward length: the word count that scores 1.0"})
    reference: str = field(default="", metadata={
        "help": "reference model directory (default: the starting model itself, frozen)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts sampled per RL step"})
    samples_per_prompt: int = field(default=1, metadata={"help": "completions sampled per prompt"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens (0: all)"})
    mini_batches: int = field(default=1, metadata={"help": "optimizer steps per pass over a step's rollouts"})
    eval_prompts: int = field(default=64, metadata={"help": "held-out prompts scored greedily at each evaluation"})
    eval_every: int = field(default=10, metadata={"help": "evaluate every N steps (0: only at start and end)"})
    log_every: int = field(default=5, metadata={"help": "print a line every N steps"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    schedule: str = field(default="constant", metadata={"help": "learning-rate schedule: cosine, constant or wsd"})
    max_steps: int = field(default=100, metadata={"help": "RL steps (sample, score, update)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_prompts", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "mini_batches",
                     "length_target", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for sampled rollouts, got {self.temperature}")
        if self.eval_prompts < 0:
            raise ConfigError(f"eval_prompts must be >= 0, got {self.eval_prompts}")
        if self.epochs is not None:
            raise ConfigError("PPO and GRPO count RL steps (sample, score, update): use --max-steps, not --epochs")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ConfigError(f"ops must be made of +, - and *, got {self.ops!r}")

    def check_paths(self) -> None:
        from lmforge.utils import check_output

        if not self.model or not self.out:
            raise ConfigError(f"no {'model' if not self.model else 'out'} given: pass it (or set it in the config)")
        if not self.reward:
            raise ConfigError("no reward given: pass --reward arithmetic, --reward length or --reward RM_DIR")
        if self.reward not in ("arithmetic", "length") and not Path(self.reward).is_dir():
            raise ConfigError(f"--reward must be arithmetic, length or a reward model directory; got {self.reward!r}")
        if not self.data and self.reward != "arithmetic":
            raise ConfigError(f"--reward {self.reward} needs prompts: pass --data (Alpaca records)")
        check_output(self.out, overwrite=self.overwrite)


def resolve_reward(cfg: RLConfig, device, log=print) -> rlhf.RewardFn:
    if cfg.reward == "arithmetic":
        return rlhf.arithmetic_reward
    if cfg.reward == "length":
        return rlhf.length_reward(cfg.length_target)
    if Path(cfg.reward).is_dir() and rlhf.is_reward_dir(cfg.reward):
        rm_lm, rm, rcfg = rlhf.load_reward_model(cfg.reward, device=device)
        log(f"reward model {cfg.reward} ({rm_lm.model.num_params():,} parameters)")
        return rlhf.RewardModelScorer(rm, rm_lm.tokenizer, rcfg.get("max_length") or rm.config.block_size)
    if Path(cfg.reward).is_dir():
        raise ConfigError(f"--reward {cfg.reward}: not a reward model directory (no {rlhf.REWARD_CONFIG}); train "
                          f"one with `lmforge finetune reward`")
    raise ConfigError(f"--reward must be arithmetic, length or a reward model directory; got {cfg.reward!r}")


def load_prompts(cfg: RLConfig) -> dict[str, list[str]]:
    """{"train": prompts, "eval": held-out prompts}: made-up sums, or the Alpaca prompts of --data."""
    if not cfg.data:
        train_p = rlhf.arithmetic_prompts(cfg.num_prompts, cfg.max_operand, cfg.ops, seed=cfg.split_seed)
        seen = set(train_p)
        pool = rlhf.arithmetic_prompts(cfg.eval_prompts * 20 + 100, cfg.max_operand, cfg.ops, seed=cfg.split_seed + 1)
        held = [p for p in dict.fromkeys(pool) if p not in seen][:cfg.eval_prompts]
        return {"train": train_p, "eval": held}
    parts = load_splits(cfg)
    prompts = {}
    for k, v in parts.items():
        for i, r in enumerate(v):
            D.require(r, ("instruction",), i, f"{k} data")
        prompts[k] = [D.alpaca_prompt(r) for r in v]
    return {"train": prompts["train"], "eval": (prompts["test"] or prompts["val"])[:cfg.eval_prompts]}


def _run_rl(cfg: RLConfig, algo: str, make_step, log=print) -> dict:
    """What both recipes share: load, pick the reward and prompts, run `rlhf.rl_loop`, evaluate, save, plot.
    make_step(policy, uses_lora, device) -> the loop's update(rollout, scores, step)."""
    lm = common.load_base(cfg)
    tok, out = lm.tokenizer, Path(cfg.out)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    lm.model.to(device)
    reward_fn = resolve_reward(cfg, device, log)
    prompts = load_prompts(cfg)
    pad = common.pad_id(tok)
    uses_lora = common.maybe_lora(lm.model, cfg, log)
    update = make_step(lm.model, uses_lora, device)
    log(f"{algo}: {len(prompts['train'])} training prompts, {len(prompts['eval'])} held-out | "
        f"{cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples per step | reward {cfg.reward}")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "rl_metrics.jsonl"
    log_path.unlink(missing_ok=True)

    def evaluate() -> float:
        return rlhf.greedy_reward(lm.model, tok, prompts["eval"], reward_fn, cfg.max_new_tokens, pad)

    t0 = time.perf_counter()

    def on_record(rec: dict, ro: rlhf.Rollout) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if rec["step"] % cfg.log_every == 0 or rec["step"] == 1:
            ev = f", held-out {rec['eval_reward']:.3f}" if "eval_reward" in rec else ""
            log(f"step {rec['step']}/{cfg.max_steps}: reward {rec['reward']:.3f}{ev}, KL {rec['kl']:.3f}, "
                f"{rec['completion_tokens']:.1f} tokens ({time.perf_counter() - t0:.0f}s) | "
                f"sample: {ro.prompts[0][-30:]!r} -> {ro.completions[0][:40]!r}")

    metrics: dict[str, Any] = {"eval_reward_before": evaluate()}
    log(f"held-out reward (greedy) before: {metrics['eval_reward_before']:.4f}")
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None)
    records = rlhf.rl_loop(lm.model, tok, prompts["train"], reward_fn, update, steps=cfg.max_steps,
                           prompts_per_step=cfg.prompts_per_step, samples_per_prompt=cfg.samples_per_prompt,
                           params=params, seed=cfg.seed, pad_id=pad, evaluate=evaluate, eval_every=cfg.eval_every,
                           on_record=on_record)
    metrics["eval_reward_after"] = evaluate()
    final = {"step": cfg.max_steps, "eval_reward": metrics["eval_reward_after"]}
    with open(log_path, "a", encoding="utf-8") as f:  # the final evaluation, as its own record
        f.write(json.dumps(final) + "\n")
    metrics.update({"steps": cfg.max_steps, "minutes": (time.perf_counter() - t0) / 60, **rlhf.summarize(records)})
    log(f"held-out reward (greedy) after: {metrics['eval_reward_after']:.4f} | KL at the end "
        f"{metrics['kl_last_10pct']:.3f} nats (max {metrics['kl_max']:.3f})")
    lm.model.cpu()
    common.lm_saver(lm, cfg, uses_lora)(out)
    common.finish(lm, cfg, uses_lora, log)
    atomic_write_json(out / "metrics.json", metrics)
    curves = [{"step": 0, "eval_reward": metrics["eval_reward_before"]}, *records, final]
    if rlhf.plot_rl_curves(curves, out / "rlhf.png", f"{algo.upper()} on {Path(cfg.model).name}, reward {cfg.reward}"):
        log(f"reward and KL curves: {out / 'rlhf.png'}")
    return metrics


def _reference(cfg: RLConfig, lm_model, uses_lora: bool, device):
    """The frozen reference: another directory, a copy of the starting model, or None (LoRA: adapters off)."""
    if cfg.reference:
        import lmforge

        ref = lmforge.load(cfg.reference, dtype="float32", device=device).model
    elif uses_lora:
        return None
    else:
        ref = copy.deepcopy(lm_model)
    return ref.eval().requires_grad_(False)


# ================================================================================================================
# PPO
# ================================================================================================================
@dataclass
class PPOConfig(RLConfig):
    kl_coef: float = field(default=0.05, metadata={"help": "weight of the per-token KL penalty in the reward"})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimate: k1 or k3"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip epsilon"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip epsilon"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each step's rollouts"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten the per-token rewards of each batch"})

    def __post_init__(self):
        super().__post_init__()
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.kl_coef < 0 or self.cliprange <= 0 or self.cliprange_value <= 0:
            raise ConfigError("kl_coef must be >= 0, cliprange and cliprange_value > 0")


def run_ppo(cfg: PPOConfig, log=print) -> dict:
    cfg.check_paths()
    held: dict[str, Any] = {}

    def make_step(policy, uses_lora: bool, device):
        model = held["model"] = rlhf.PolicyWithValue(policy)
        ref = _reference(cfg, policy, uses_lora, device)
        tc = cfg.train_config(1)
        opt = configure_optimizer(model, tc, device.type)
        gen = torch.Generator().manual_seed(cfg.seed)  # minibatch order

        def step(ro: rlhf.Rollout, scores: torch.Tensor, i: int):
            for g in opt.param_groups:
                g["lr"] = lr_at(i, tc)
            b = rlhf.ppo_batch(model, ref, ro, scores, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
                               gamma=cfg.gamma, lam=cfg.lam, temperature=cfg.temperature,
                               whiten_rewards=cfg.whiten_rewards)
            stats = rlhf.ppo_update(model, opt, b, epochs=cfg.ppo_epochs, mini_batches=cfg.mini_batches,
                                    cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value,
                                    vf_coef=cfg.vf_coef, temperature=cfg.temperature, grad_clip=cfg.grad_clip,
                                    generator=gen)
            return stats, b.logprobs, b.ref_logprobs

        return step

    metrics = _run_rl(cfg, "ppo", make_step, log)
    rlhf.save_value_head(held["model"], Path(cfg.out))
    return metrics


# ================================================================================================================
# GRPO
# ================================================================================================================
@dataclass
class GRPOConfig(RLConfig):
    samples_per_prompt: int = field(default=8, metadata={"help": "G: completions per prompt (the group)"})
    beta: float = field(default=0.04, metadata={"help": "weight of the k3 KL to the reference (0: no reference)"})
    epsilon: float = field(default=0.2, metadata={"help": "ratio clip epsilon (lower side)"})
    epsilon_high: float = field(default=0.0, metadata={"help": "upper clip epsilon (0: same as epsilon; DAPO 0.28)"})
    loss_type: str = field(default="grpo", metadata={"help": "token averaging: grpo, bnpo or dr_grpo"})
    scale_rewards: str = field(default="group", metadata={"help": "advantage scaling: group, batch or none"})
    grpo_iterations: int = field(default=1, metadata={"help": "passes over each step's rollouts (TRL's mu)"})
    kl_ratio_correction: bool = field(default=True, metadata={
        "help": "weigh the KL term by the policy ratio (TRL's use_bias_correction_kl, its default)"})

    def __post_init__(self):
        super().__post_init__()
        if self.samples_per_prompt < 2:
            raise ConfigError(f"GRPO compares completions within a group: samples_per_prompt must be >= 2, got "
                              f"{self.samples_per_prompt}")
        if self.loss_type not in rlhf.GRPO_LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(rlhf.GRPO_LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ConfigError(f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if self.grpo_iterations < 1 or self.beta < 0 or self.epsilon <= 0 or self.epsilon_high < 0:
            raise ConfigError("grpo_iterations must be >= 1, beta >= 0, epsilon > 0 and epsilon_high >= 0")


def run_grpo(cfg: GRPOConfig, log=print) -> dict:
    cfg.check_paths()

    def make_step(policy, uses_lora: bool, device):
        ref = _reference(cfg, policy, uses_lora, device)  # with beta 0 only for the KL curve
        tc = cfg.train_config(1)
        opt = configure_optimizer(policy, tc, device.type)
        gen = torch.Generator().manual_seed(cfg.seed)  # minibatch order

        def step(ro: rlhf.Rollout, scores: torch.Tensor, i: int):
            for g in opt.param_groups:
                g["lr"] = lr_at(i, tc)
            b = rlhf.grpo_batch(policy, ref, ro, scores, cfg.samples_per_prompt, beta=cfg.beta,
                                temperature=cfg.temperature, scale=cfg.scale_rewards)
            stats = rlhf.grpo_update(policy, opt, b, epochs=cfg.grpo_iterations, mini_batches=cfg.mini_batches,
                                     beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high or None,
                                     loss_type=cfg.loss_type, max_completion_length=cfg.max_new_tokens,
                                     temperature=cfg.temperature, kl_ratio_correction=cfg.kl_ratio_correction,
                                     grad_clip=cfg.grad_clip, generator=gen)
            ref_lp = b.ref_logprobs
            if ref_lp is None:
                ref_lp = rlhf.reference_logprobs(policy, ref, ro, cfg.temperature)
            return stats, b.old_logprobs, ref_lp

        return step

    return _run_rl(cfg, "grpo", make_step, log)
