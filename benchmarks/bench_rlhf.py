"""RLHF benchmarks: a reward model on the preference set, and PPO/GRPO raising a checkable reward with bounded KL.

    .venv/bin/python benchmarks/bench_rlhf.py                          # every stage (about 20-30 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_rlhf.py --stages base,grpo       # some stages

Stages (each reuses the previous stage's output under --work):
  base    a tiny Llama-style model (byte tokenizer, 2 layers, 64 wide) fine-tuned by lmforge on "a+b=" -> "c<EOS>"
          (a, b in 0..99) for 1000 steps: it gets about a quarter of the sums right, the starting point of RL
  grpo    `lmforge finetune grpo base --reward arithmetic` (reward 1 if the answer is exactly right) on 64 training
          sums: reward of the sampled rollouts, KL to the reference, and greedy accuracy on 200 held-out sums
  ppo     `lmforge finetune ppo base --reward arithmetic`: the same with a value head and a per-token KL penalty
  reward  `lmforge finetune reward` on instruction-data-with-preference.json from llama2.c's stories260K:
          held-out (test split, never trained on) pairwise accuracy before/after
  plot    docs/img/rlhf-arithmetic.png: reward and KL curves of the grpo and ppo runs side by side

torch runs single-threaded here (`--threads`): these models are so small that extra threads only wait on each other
on a shared machine. Results are printed as JSON lines and appended to <work>/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import shared_data_dir  # noqa: E402


def emit(work: Path, rec: dict) -> None:
    rec = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **rec}
    print(json.dumps(rec), flush=True)
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def stage_base(work: Path, args) -> None:
    """Supervised "a+b=" -> "c" on a byte-level tiny model: the policy RL starts from."""
    from lmforge.finetune import data as D, rlhf
    from lmforge.finetune.losses import response_loss
    from lmforge.lm import LM
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer
    from lmforge.tokenizers.bpe import Tokenizer
    from lmforge.training.loop import TrainConfig, train

    tok = Tokenizer.train(["0123456789+="], vocab_size=257, progress=False)  # bytes + <|endoftext|> (EOS)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("llama-tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4,
                                n_kv_head=4, intermediate_size=256, block_size=32)
    model = Transformer(cfg)
    rng = random.Random(0)
    held = set(rlhf.arithmetic_prompts(1000, 99, "+", seed=124))  # the RL recipes draw held-out prompts alike
    examples = []
    while len(examples) < 20000:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if f"{a}+{b}=" in held:
            continue
        examples.append(D.encode_prompt_response(tok, f"{a}+{b}=", str(a + b)))
    batches = D.Batches(examples, 64, lambda ex: D.pad_collate(ex, tok.eos_token_id), seed=0)
    t0 = time.perf_counter()
    train(model, batches, TrainConfig(max_steps=args.base_steps, lr=3e-3, warmup_steps=20, batch_size=64,
                                      device="cpu", eval_every=0, progress=False, cores=1),
          loss_fn=response_loss, log=lambda s: None)
    lm = LM(model, tok, cfg)
    out = work / "base"
    lm.save(out)
    prompts = sorted(held)[:200]
    acc = _greedy_accuracy(model, tok, prompts)
    emit(work, {"stage": "base", "steps": args.base_steps, "params": model.num_params(),
                "minutes": round((time.perf_counter() - t0) / 60, 2), "held_out_greedy_accuracy": acc, "dir": str(out)})


def _greedy_accuracy(model, tok, prompts) -> float:
    from lmforge.finetune import rlhf
    from lmforge.generation.sampling import SamplingParams

    ro = rlhf.sample_completions(model, tok, prompts, SamplingParams(max_new_tokens=5, temperature=0.0),
                                 pad_id=tok.eos_token_id)
    return sum(rlhf.arithmetic_reward(ro.prompts, ro.completions)) / len(prompts)


def stage_rl(work: Path, args, algo: str) -> None:
    from lmforge.recipes import rlhf as R

    common = dict(model=str(work / "base"), reward="arithmetic", out=str(work / algo), overwrite=True,
                  max_new_tokens=5, eval_prompts=200, eval_every=10, log_every=10, seed=0, device="cpu",
                  max_steps=args.rl_steps, progress=False, temperature=args.temperature,
                  num_prompts=args.num_prompts)
    if algo == "grpo":
        cfg = R.GRPOConfig(**common, prompts_per_step=16, samples_per_prompt=8, lr=args.grpo_lr, beta=0.04,
                           mini_batches=args.mini_batches or 1, grpo_iterations=args.epochs or 1)
        run = R.run_grpo
    else:
        cfg = R.PPOConfig(**common, prompts_per_step=64, samples_per_prompt=1, lr=args.ppo_lr, kl_coef=0.05,
                          ppo_epochs=args.epochs or 4, mini_batches=args.mini_batches or 2, vf_coef=0.1)
        run = R.run_ppo
    m = run(cfg, log=print)
    import lmforge

    train_prompts = R.load_prompts(cfg)["train"]
    for when, d in (("before", work / "base"), ("after", work / algo)):  # greedy on the sums RL trained on
        lm = lmforge.load(d)
        m[f"train_prompts_greedy_{when}"] = _greedy_accuracy(lm.model, lm.tokenizer, train_prompts)
    emit(work, {"stage": algo, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()},
                "config": {k: getattr(cfg, k) for k in ("prompts_per_step", "samples_per_prompt", "lr", "max_steps")}})


def stage_reward(work: Path, args) -> None:
    from lmforge.recipes import rlhf as R

    data = shared_data_dir() / "instruction-data-with-preference.json"
    base = shared_data_dir() / "stories260K" / "stories260K.bin"
    if not data.is_file() or not base.is_file():
        emit(work, {"stage": "reward", "skipped": "no shared data"})
        return
    cfg = R.RewardConfig(model=str(base), data=str(data), out=str(work / "rm"), overwrite=True, batch_size=16,
                         epochs=args.rm_epochs, lr=1e-3, eval_every=50, device="cpu", progress=False, seed=0)
    t0 = time.perf_counter()
    m = R.run_reward(cfg, log=print)
    emit(work, {"stage": "reward", "base": "stories260K", "epochs": args.rm_epochs,
                "minutes": round((time.perf_counter() - t0) / 60, 2), **m})


def stage_plot(work: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.utils import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for algo, color in (("grpo", "tab:blue"), ("ppo", "tab:orange")):
        path = work / algo / "rl_metrics.jsonl"
        if not path.is_file():
            continue
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        tr = [r for r in recs if "reward" in r]
        ev = [r for r in recs if "eval_reward" in r]
        axes[0].plot([r["step"] for r in tr], [r["reward"] for r in tr], color=color, alpha=0.35,
                     label=f"{algo.upper()}: the 64 training sums, sampled")
        axes[0].plot([r["step"] for r in ev], [r["eval_reward"] for r in ev], "o-", color=color,
                     label=f"{algo.upper()}: 200 held-out sums, greedy")
        axes[1].plot([r["step"] for r in tr], [r["kl"] for r in tr], color=color, label=algo.upper())
    axes[0].set(xlabel="RL step", ylabel="reward = exact-answer accuracy", title="reward")
    axes[1].set(xlabel="RL step", ylabel="nats per completion", title="KL(policy || reference)")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("RL on 'a+b=' (a, b < 100) from a tiny SFT model (148K parameters), reward 1 if exactly right")
    fig.tight_layout()
    out = ROOT / "docs" / "img" / "rlhf-arithmetic.png"
    with atomic_write(out, "wb", encoding=None) as f:
        fig.savefig(f, format="png", dpi=110)
    emit(work, {"stage": "plot", "png": str(out)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/bench-rlhf")
    ap.add_argument("--stages", default="base,grpo,ppo,reward,plot")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base-steps", type=int, default=1000)
    ap.add_argument("--rl-steps", type=int, default=400)
    ap.add_argument("--grpo-lr", type=float, default=1e-4)
    ap.add_argument("--ppo-lr", type=float, default=1e-4)
    ap.add_argument("--mini-batches", type=int, default=0, help="optimizer steps per pass over a step's rollouts "
                    "(0: GRPO 1, PPO 2)")
    ap.add_argument("--epochs", type=int, default=0, help="passes over each step's rollouts (0: GRPO 1, PPO 4)")
    ap.add_argument("--num-prompts", type=int, default=64, help="RL training prompts (the held-out ones are others)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    ap.add_argument("--rm-epochs", type=float, default=2.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = {"base": stage_base, "grpo": lambda w, a: stage_rl(w, a, "grpo"), "ppo": lambda w, a: stage_rl(w, a, "ppo"),
              "reward": stage_reward, "plot": stage_plot}
    for name in args.stages.split(","):
        if name not in stages:
            raise SystemExit(f"unknown stage {name!r}; choose from {', '.join(stages)}")
        stages[name](work, args)


if __name__ == "__main__":
    main()
