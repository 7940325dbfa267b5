"""Pretraining quality: the course's the-verdict run and Tiny Shakespeare against a 5-gram baseline.

verdict:      configs/pretrain/verdict.yaml as is (GPT-2-124M shape, context 256, 10 epochs, batch 2, GPT-2 BPE):
              the course shows the training loss falling below 1 while the validation loss stalls (overfitting).
shakespeare:  configs/pretrain/shakespeare.yaml (~10M-parameter GPT, BPE 1024) trained for --minutes of wall
              time (max_steps calibrated from a short timing run so the cosine schedule ends on time); then the
              model and a 5-gram interpolated Kneser-Ney model fitted on the same training tokens are scored on the
              same validation tokens, per token and per character.

    .venv/bin/python benchmarks/bench_pretrain_quality.py verdict|shakespeare [--threads 1] [--minutes 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lmforge import argconf  # noqa: E402
from lmforge.recipes.pretrain import PretrainConfig, run_pretrain  # noqa: E402
from lmforge.training.loop import read_metrics  # noqa: E402
from tests.helpers import shared_data_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


SETS: dict = {}  # --set overrides, applied to every config this script builds


def load_cfg(name: str, **over) -> PretrainConfig:
    fields = {**argconf.load_yaml(REPO / "configs" / "pretrain" / f"{name}.yaml"), **SETS, **over}
    return argconf.build(PretrainConfig, fields)


def parse_sets(items: list[str]) -> dict:
    """--set n_layer=4 --set lr=2e-3: values parsed as YAML scalars (numbers, booleans, strings)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def verdict(args) -> None:
    out = Path(args.out) / "verdict"
    t0 = time.time()
    run_pretrain(load_cfg("verdict", out=str(out), threads=args.threads, progress=args.progress))
    wall = time.time() - t0
    recs = read_metrics(out / "metrics.jsonl")
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"])
    print("\n== the-verdict, GPT-2-124M shape (course ch. 5 setup) ==")
    print(f"steps {train[-1]['step']}, tokens seen {train[-1]['tokens']:,}, wall {wall / 60:.1f} min")
    print(f"train loss: first step {train[0]['loss']:.3f} -> last step {train[-1]['loss']:.3f}")
    print(f"val loss:   first eval {val[0]['val_loss']:.3f} (step {val[0]['step']}) -> best {best['val_loss']:.3f} "
          f"(step {best['step']}) -> last {val[-1]['val_loss']:.3f} (step {val[-1]['step']})")
    print("every 5 steps: step train_loss val_loss")
    by_step = {r["step"]: r["loss"] for r in train}
    for r in val:
        print(f"  {r['step']:4d} {by_step.get(r['step'], float('nan')):8.3f} {r['val_loss']:8.3f}")
    final_train_eval = eval_mode_train_loss(out)
    print(f"final training-set loss in eval mode (no dropout, all 9 training batches, as the course's "
          f"calc_loss_loader): {final_train_eval:.3f}")
    ok_train = final_train_eval < 1.0
    overfit = val[-1]["val_loss"] > best["val_loss"] + 0.05 and val[-1]["val_loss"] - train[-1]["loss"] > 3.0
    print(f"train loss below 1.0 at the end: {ok_train}; validation shows overfitting (last val > best val, gap to "
          f"train > 3 nats): {overfit}")


def eval_mode_train_loss(out: Path) -> float:
    """The course reports the training loss of the model in eval mode over the training loader: do the same."""
    from lmforge.loader import load
    from lmforge.training.data import Batches, SlidingWindowDataset, TokenShards, train_val_split
    from lmforge.training.loop import evaluate

    cfg = json.loads((out / "pretrain_config.json").read_text())
    lm = load(out, dtype="float32")
    tr, _ = train_val_split(TokenShards(Path(str(out) + ".shards")), cfg["val_fraction"])
    batches = Batches(SlidingWindowDataset(tr, cfg["block_size"], cfg["stride"]), cfg["batch_size"], drop_last=True)
    return evaluate(lm.model, batches)


def shakespeare(args) -> None:

    out = Path(args.out) / "shakespeare"
    cfg = load_cfg("shakespeare", out=str(out), threads=args.threads, progress=args.progress)
    if args.max_steps:
        steps = args.max_steps
    elif cfg.time_schedule:  # the schedule runs on the clock; max_steps is only an upper bound
        steps = cfg.max_steps
    else:
        steps = calibrate(args, out, cfg)
    cfg = load_cfg("shakespeare", out=str(out), threads=args.threads, progress=args.progress, max_steps=steps,
                   max_minutes=args.minutes, save_every=0,
                   eval_every=cfg.eval_every if cfg.time_schedule else max(1, steps // 10))
    report_shakespeare(args, out, cfg)


def calibrate(args, out: Path, cfg: PretrainConfig) -> int:
    """Time a few steps of the same model and batch, then size max_steps to fill the time budget."""
    probe = load_cfg("shakespeare", out=str(out) + "-probe", threads=args.threads, max_steps=6, eval_every=0,
                     sample_every=0, save_every=0, progress=False)
    t0 = time.time()
    run_pretrain(probe)
    probe_recs = [r for r in read_metrics(Path(str(out) + "-probe") / "metrics.jsonl") if "tok_per_s" in r]
    tok_s = sorted(r["tok_per_s"] for r in probe_recs[1:])[len(probe_recs[1:]) // 2]
    steps = max(50, int(args.minutes * 60 * tok_s * 0.9 / (cfg.batch_size * cfg.block_size)))
    print(f"calibration: {tok_s:,.0f} tokens/s -> max_steps {steps} for {args.minutes} min ({time.time() - t0:.0f}s)")
    return steps


def report_shakespeare(args, out: Path, cfg: PretrainConfig) -> None:
    from lmforge.training.data import TokenShards, train_val_split
    from lmforge.training.eval import ngram_baseline, per_char, perplexity

    t0 = time.time()
    cpu0 = time.process_time()
    lm = run_pretrain(cfg)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    shards = TokenShards(Path(str(out) + ".shards"))
    tr, va = train_val_split(shards, cfg.val_fraction)
    val = va.numpy()
    n_chars = len(lm.tokenizer.decode(val[1:].tolist()))
    # non-overlapping windows (each window's first tokens see little context) and sliding windows (every token
    # sees >= block_size / 2 tokens; the 5-gram always has its full 4-token context)
    chunked = per_char(perplexity(lm.model, val, cfg.block_size, 16), n_chars)
    model_res = per_char(perplexity(lm.model, val, cfg.block_size, 16, stride=cfg.block_size // 2), n_chars)
    t1 = time.time()
    base = per_char(ngram_baseline(tr, val, n=5, vocab_size=lm.config.vocab_size), n_chars)
    t_ngram = time.time() - t1
    n_params = lm.model.num_params()
    recs = read_metrics(out / "metrics.jsonl")
    train_recs = [r for r in recs if "loss" in r]
    print("\n== Tiny Shakespeare ==")
    arch = "Llama-style" if lm.config.pos_embedding == "rope" else "GPT-2-style"
    print(f"model: {arch} ({lm.config.n_layer} layers, n_embd {lm.config.n_embd}, context {lm.config.block_size}), "
          f"{n_params / 1e6:.2f}M params, BPE vocab {lm.config.vocab_size}; trained {train_recs[-1]['step']} steps, "
          f"{train_recs[-1]['tokens']:,} tokens in {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU time of this "
          f"process (incl. tokenizer + eval; {args.threads} thread(s))")
    print(f"validation: {len(val):,} tokens, {n_chars:,} characters (last 10% of the text)")
    print(f"{'':28s} {'nats/token':>10s} {'perplexity':>10s} {'nats/char':>10s} {'bits/char':>10s}")
    for name, r in (("transformer, windows", chunked), (f"transformer, sliding /{cfg.block_size // 2}", model_res),
                    ("5-gram Kneser-Ney", base)):
        print(f"{name:28s} {r['loss']:10.4f} {r['perplexity']:10.2f} {r['loss_per_char']:10.4f} {r['bits_per_char']:10.4f}")
    print(f"(5-gram fitted on {len(tr):,} training tokens in {t_ngram:.1f}s)")
    print(f"transformer / 5-gram loss ratio: {model_res['loss'] / base['loss']:.3f} (lower is better for the "
          f"transformer); margin {base['loss_per_char'] - model_res['loss_per_char']:.4f} nats/char")
    print("(windows: non-overlapping windows of the context length; sliding: a window every half context, so each "
          "token is predicted from at least half a context; the ratio and margin above use the sliding figure)")
    print(json.dumps({"transformer": model_res, "transformer_windows": chunked, "ngram5": base}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["verdict", "shakespeare", "all"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is best on a shared, loaded machine)")
    ap.add_argument("--minutes", type=float, default=10.0, help="shakespeare: training time budget")
    ap.add_argument("--max-steps", type=int, default=0, help="shakespeare: skip calibration, use this many steps")
    ap.add_argument("--out", default="/tmp/lmforge-bench-quality")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (repeatable), e.g. --set model=llama-small --set n_layer=4")
    args = ap.parse_args()
    SETS.update(parse_sets(args.set))
    os.environ.setdefault("LMFORGE_DATA", str(shared_data_dir()))
    torch.set_num_threads(args.threads)
    if args.which in ("verdict", "all"):
        verdict(args)
    if args.which in ("shakespeare", "all"):
        shakespeare(args)


if __name__ == "__main__":
    main()
