"""Forgetting: what instruction fine-tuning costs a model on its pretraining text, and what replay buys back.

    .venv/bin/python benchmarks/bench_forgetting.py                    # pretrain (or reuse) the base, then 2 SFT runs
    .venv/bin/python benchmarks/bench_forgetting.py --stages pretrain   # only the base

Stages (each reuses the previous stage's output under --work, default runs/bench-forgetting):
  pretrain  a Llama-style model pretrained by lmforge on War and Peace (../shared/data), its last 10% held out
  sft       full fine-tuning on the Alpaca set (instruction-data.json, 85/5/10) twice from that base, same seed,
            steps and data: without replay, and with --replay-ratio of the batches plain LM batches of War and
            Peace's first 90%. Each run reports War and Peace held-out perplexity before/after
            (--forgetting-data) and the SFT held-out response loss before/after.
  plot      docs/img/forgetting.png: perplexity before/after and SFT loss, both runs

Results are printed as JSON lines and appended to <work>/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import shared_data_dir  # noqa: E402


def emit(work: Path, rec: dict) -> None:
    rec = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **rec}
    print(json.dumps(rec), flush=True)
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def corpus() -> str:
    return str(shared_data_dir() / "war_and_peace" / "warpeace_input.txt")


def stage_pretrain(work: Path, args) -> Path:
    from lmforge.recipes.pretrain import PretrainConfig, run_pretrain

    out = work / "base"
    if (out / "model.safetensors").exists():
        print(f"pretrain: reusing {out}")
        return out
    cfg = PretrainConfig(data=[corpus()], tokenizer="train", vocab_size=2048, model="llama-small", n_layer=4,
                         n_head=4, n_kv_head=4, n_embd=192, intermediate_size=512, block_size=256, dropout=0.0,
                         batch_size=16, max_steps=5000, max_minutes=args.pretrain_minutes, time_schedule=True,
                         lr=2e-3, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.1, beta2=0.99,
                         val_fraction=0.1, eval_every=200, eval_batches=10, save_every=500, seed=1337,
                         out=str(out), progress=not args.quiet, device="cpu")
    t = time.time()
    run_pretrain(cfg)
    emit(work, {"stage": "pretrain", "data": "war_and_peace", "minutes": args.pretrain_minutes,
                "seconds": round(time.time() - t, 1)})
    return out


def sft_config(base: Path, out: Path, args, **kw):
    """The one SFT setting every run of both benchmarks shares (bench_adapters reuses it): Alpaca 85/5/10 split,
    batch 8, `--steps` steps, cosine to 10%, seed 1337, War and Peace held-out perplexity before and after."""
    settings = dict(model=str(base), data=str(shared_data_dir() / "instruction-data.json"), out=str(out),
                    overwrite=True, max_steps=args.steps, batch_size=8, lr=1e-3, warmup_steps=10, eval_every=0,
                    eval_batches=0, eval_generate=0, progress=not args.quiet, device="cpu", seed=1337,
                    forgetting_data=corpus(), forgetting_tokens=args.forgetting_tokens)
    settings.update(kw)
    return settings


def stage_sft(work: Path, args) -> None:
    from lmforge.recipes.sft import SFTConfig, run_sft

    base = work / "base"
    for ratio in [float(r) for r in args.ratios.split(",")]:
        name = "no-replay" if ratio == 0 else f"replay-{ratio:g}"
        replay = dict(replay_data=corpus(), replay_ratio=ratio) if ratio else {}
        cfg = SFTConfig(**sft_config(base, work / name, args, **replay))
        t = time.time()
        m = run_sft(cfg)
        emit(work, {"stage": "sft", "run": name, "replay_ratio": ratio, "steps": m["steps"],
                    "ppl_before": round(m["forgetting_ppl_before"], 2),
                    "ppl_after": round(m["forgetting_ppl_after"], 2),
                    "ppl_tokens": m["forgetting_tokens"], "sft_val_loss_before": round(m["val_loss_before"], 4),
                    "sft_val_loss_after": round(m["val_loss_after"], 4), "seconds": round(time.time() - t, 1)})


def stage_plot(work: Path, args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); skipped")
        return
    from lmforge.utils import atomic_write

    runs: dict[str, dict] = {}
    for line in (work / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == "sft":
            runs[rec["run"]] = rec  # the latest record of each run
    if not runs:
        print("plot: no sft results yet")
        return
    names = sorted(runs, key=lambda n: runs[n]["replay_ratio"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(names))
    before = [runs[n]["ppl_before"] for n in names]
    after = [runs[n]["ppl_after"] for n in names]
    a1.bar([i - 0.2 for i in x], before, 0.4, label="before SFT", color="#9bb7d4")
    a1.bar([i + 0.2 for i in x], after, 0.4, label="after SFT", color="#d9822b")
    for i, (b, a) in enumerate(zip(before, after)):
        a1.text(i + 0.2, a, f"{a:.1f}\n({a / b - 1:+.0%})", ha="center", va="bottom", fontsize=8)
    a1.set_xticks(list(x), names)
    a1.set_ylabel("perplexity")
    a1.set_title("War and Peace held-out perplexity (lower is better)", fontsize=10)
    a1.legend(fontsize=8)
    a1.set_ylim(0, max(after + before) * 1.25)
    losses = [runs[n]["sft_val_loss_after"] for n in names]
    a2.bar(list(x), losses, 0.5, color="#5a8f29")
    for i, v in enumerate(losses):
        a2.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    a2.axhline(runs[names[0]]["sft_val_loss_before"], color="gray", ls="--", lw=1, label="before SFT")
    a2.set_ylim(0, max(losses + [runs[names[0]]["sft_val_loss_before"]]) * 1.15)
    a2.set_xticks(list(x), names)
    a2.set_ylabel("response loss (nats/token)")
    a2.set_title("Alpaca held-out response loss after SFT", fontsize=10)
    a2.legend(fontsize=8)
    fig.suptitle(f"Forgetting: full SFT, {runs[names[0]]['steps']} steps, same seed; replay = share of batches "
                 f"of pretraining text", fontsize=10)
    fig.tight_layout()
    out = ROOT / "docs" / "img" / "forgetting.png"
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    print(f"plot: {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-forgetting"))
    ap.add_argument("--stages", default="pretrain,sft,plot")
    ap.add_argument("--pretrain-minutes", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=200, help="SFT optimizer steps per run (batch 8)")
    ap.add_argument("--ratios", default="0,0.1,0.3", help="replay ratios to run (0: no replay)")
    ap.add_argument("--forgetting-tokens", type=int, default=16384)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    if "pretrain" in stages:
        stage_pretrain(work, args)
    if "sft" in stages:
        stage_sft(work, args)
    if "plot" in stages:
        stage_plot(work, args)


if __name__ == "__main__":
    main()
