"""LoRA vs bottleneck adapters vs prompt tuning at about the same number of trainable parameters.

    .venv/bin/python benchmarks/bench_adapters.py                 # every method, then the table and plot
    .venv/bin/python benchmarks/bench_adapters.py --methods lora,bottleneck

One base model (bench_forgetting.py's: a Llama-style model lmforge pretrains on War and Peace; made here if
missing), one task (SFT on the Alpaca set, instruction-data.json, 85/5/10 split), one seed, the same batches and
number of steps for every method. Each method gets about the same trainable budget (--budget numbers, default
about 12K: 0.6% of the 2.2M-parameter base), at its own usual learning rate (times each of --lr-scales, a small
sweep; the plot shows each method at its best, chosen on the same validation split it reports):

  lora        rank r on q_proj,v_proj of every block: 4 r C per block (C = n_embd)
  bottleneck  size m after attention and MLP of every block: 2 (2 C m + m + C) per block
  prompt      n virtual tokens: n C (they also take n of the context's positions)
  full        every weight (the reference; not a budget match)

Reported per method: trainable parameters, held-out response loss before/after (the SFT validation split),
War and Peace held-out perplexity before/after (what the method cost the base's own skill), seconds. Results
go to <work>/results.jsonl; the plot to docs/img/adapters.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_forgetting as BF  # noqa: E402  (the shared base model and SFT settings)


def sizes(C: int, n_layer: int, budget: int) -> dict[str, dict]:
    """Each method's size nearest to `budget` trainable numbers."""
    r = max(1, round(budget / (4 * C * n_layer)))
    m = max(1, round(budget / (2 * n_layer * (2 * C + 1))))
    n = max(1, round(budget / C))
    return {"lora": {"lora_r": r, "lora_alpha": 2.0 * r, "lora_dropout": 0.0, "lora_targets": ["q_proj", "v_proj"]},
            "bottleneck": {"adapter": "bottleneck", "adapter_size": m},
            "prompt": {"num_virtual_tokens": n},
            "full": {}}


BUDGET, SEED = 12288, 1337  # the defaults: runs with others get their own directories
LR = {"lora": 2e-3, "bottleneck": 2e-3, "prompt": 3e-2, "full": 1e-3}  # each method's usual range


def run_method(method: str, base: Path, work: Path, args, scale: float = 1.0) -> dict:
    import lmforge
    from lmforge.recipes.prompt_tune import PromptTuneConfig, run_prompt_tune
    from lmforge.recipes.sft import SFTConfig, run_sft

    config = lmforge.load(base).config
    kw = sizes(config.n_embd, config.n_layer, args.budget)[method]
    lr = (args.lr or LR[method]) * scale
    name = method if scale == 1 else f"{method}-lr{lr:g}"
    name += "" if args.budget == BUDGET else f"-b{args.budget}"
    name += "" if args.seed == SEED else f"-seed{args.seed}"
    settings = BF.sft_config(base, work / name, args, lr=lr, seed=args.seed, **kw)
    n_trainable = count_trainable(method, base, kw)
    t = time.time()
    if method == "prompt":  # the soft prompt is not an SFT option (the virtual tokens need the context room)
        settings.pop("forgetting_data")
        settings.pop("forgetting_tokens")
        m = run_prompt_tune(PromptTuneConfig(**settings, weight_decay=0.0))
    else:
        m = run_sft(SFTConfig(**settings))
    rec = {"stage": "adapters", "method": method, "budget": args.budget, "seed": args.seed, "settings": kw, "lr": settings["lr"], "trainable": n_trainable,
           "steps": m["steps"], "val_loss_before": round(m["val_loss_before"], 4),
           "val_loss_after": round(m["val_loss_after"], 4), "seconds": round(time.time() - t, 1)}
    if "forgetting_ppl_before" in m:
        rec.update(ppl_before=round(m["forgetting_ppl_before"], 2), ppl_after=round(m["forgetting_ppl_after"], 2))
    BF.emit(work, rec)
    return rec


def count_trainable(method: str, base: Path, kw: dict) -> int:
    """Trainable numbers of `method` on the base, counted on the model itself (not from a formula)."""
    import lmforge
    from lmforge.finetune import adapters, lora, prompt_tuning

    model = lmforge.load(base).model
    if method == "lora":
        lora.add_lora(model, kw["lora_targets"], r=kw["lora_r"], alpha=kw["lora_alpha"])
    elif method == "bottleneck":
        adapters.add_adapters(model, kw["adapter_size"])
    elif method == "prompt":
        model = prompt_tuning.add_prompt_tuning(model, kw["num_virtual_tokens"])
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def stage_plot(work: Path, budget: int = 12288, seed: int = 1337) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed; skipped")
        return
    from lmforge.utils import atomic_write

    runs: dict[str, dict] = {}  # each method's best learning rate (lowest held-out loss)
    for line in (work / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") != "adapters" or rec.get("seed", SEED) != seed:
            continue
        if rec["method"] != "full" and rec.get("budget", BUDGET) != budget:  # full fine-tuning has no budget
            continue
        if rec["method"] not in runs or rec["val_loss_after"] < runs[rec["method"]]["val_loss_after"]:
            runs[rec["method"]] = rec
    order = [m for m in ("lora", "bottleneck", "prompt", "full") if m in runs]
    if not order:
        print("plot: no results yet")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{m}\n{runs[m]['trainable']:,} params\nlr {runs[m]['lr']:g}" for m in order]
    a1.bar(range(len(order)), [runs[m]["val_loss_after"] for m in order], 0.5, color="#5a8f29")
    a1.axhline(runs[order[0]]["val_loss_before"], color="gray", ls="--", lw=1, label="base, before training")
    for i, m in enumerate(order):
        a1.text(i, runs[m]["val_loss_after"], f"{runs[m]['val_loss_after']:.3f}", ha="center", va="bottom", fontsize=8)
    a1.set_ylim(0, max([runs[m]["val_loss_after"] for m in order] + [runs[order[0]]["val_loss_before"]]) * 1.15)
    a1.set_xticks(range(len(order)), labels, fontsize=8)
    a1.set_ylabel("held-out response loss (nats/token)")
    a1.set_title("Alpaca SFT: held-out response loss (lower is better)", fontsize=10)
    a1.legend(fontsize=8)
    with_ppl = [m for m in order if "ppl_after" in runs[m]]
    a2.bar(range(len(with_ppl)), [runs[m]["ppl_after"] for m in with_ppl], 0.5, color="#d9822b")
    if with_ppl:
        a2.axhline(runs[with_ppl[0]]["ppl_before"], color="gray", ls="--", lw=1, label="base")
    for i, m in enumerate(with_ppl):
        a2.text(i, runs[m]["ppl_after"], f"{runs[m]['ppl_after']:.1f}", ha="center", va="bottom", fontsize=8)
    if with_ppl:
        a2.set_ylim(0, max([runs[m]["ppl_after"] for m in with_ppl] + [runs[with_ppl[0]]["ppl_before"]]) * 1.15)
    a2.set_xticks(range(len(with_ppl)), [f"{m}" for m in with_ppl], fontsize=8)
    a2.set_ylabel("perplexity")
    a2.set_title("War and Peace held-out perplexity after SFT", fontsize=10)
    a2.legend(fontsize=8)
    fig.suptitle(f"Same base, data, {runs[order[0]]['steps']} steps and seed; about {budget:,} trainable numbers each "
                 f"(full: all); each method at its best learning rate",
                 fontsize=10)
    fig.tight_layout()
    tag = ("" if budget == BUDGET else f"-{budget}") + ("" if seed == SEED else f"-seed{seed}")
    out = ROOT / "docs" / "img" / f"adapters{tag}.png"
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    print(f"plot: {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-forgetting"), help="holds base/ (made if missing)")
    ap.add_argument("--methods", default="lora,bottleneck,prompt,full")
    ap.add_argument("--budget", type=int, default=BUDGET, help="trainable numbers per method (about)")
    ap.add_argument("--seed", type=int, default=SEED, help="seed of the SFT runs (batch order, init of adapters)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.0, help="one learning rate for every method (0: each its own)")
    ap.add_argument("--lr-scales", default="1", help="run each method at its learning rate times each of these "
                    "(a small sweep; the plot keeps each method's best)")
    ap.add_argument("--forgetting-tokens", type=int, default=16384)
    ap.add_argument("--pretrain-minutes", type=float, default=20.0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = BF.stage_pretrain(work, args)
    adapters_work = work / "adapters"
    adapters_work.mkdir(exist_ok=True)
    for method in [m for m in args.methods.split(",") if m]:
        for scale in [float(x) for x in args.lr_scales.split(",")]:
            run_method(method, base, adapters_work, args, scale)
    stage_plot(adapters_work, args.budget, args.seed)


if __name__ == "__main__":
    main()
