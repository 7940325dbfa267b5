"""Mixture of experts against the dense demo: same data, schedule, attention and compute per token.

Four `lmforge pretrain` runs on the embedded corpus, each with the demo's settings (configs/pretrain/demo.yaml and
configs/pretrain/moe-demo.yaml; --max-steps shortens both alike):

    dense       llama-tiny: SwiGLU MLP of width 384 in every block
    moe         mixtral-tiny: top-2 of 8 experts of width 192 (same MLP compute per token, 4x the MLP weights),
                load-balancing loss weighted 0.01
    moe-noaux   the same with router_aux_loss_coef = 0: what the routers do with no balancing term
    moe-aux0.1  the same with router_aux_loss_coef = 0.1 (ten times the demo's)

Reported per run: parameters (all / used per token), final validation loss, training tokens/s, and for the MoE runs
the load-balancing loss, the busiest and the idlest expert's share of its layer's (token, expert) assignments over
all layers (even = 1/8 = 0.125; 0.5 = every token picks that expert) and the router entropy over ln 8, averaged over
the last 10% of the steps.

    .venv/bin/python benchmarks/bench_moe.py [--max-steps 300] [--runs dense,moe,moe-noaux,moe-aux0.1] [--out ...]

`--layer` instead times one MoE layer's forward (mixtral-tiny's shape, 2048 tokens): the sorted dispatch that
`SparseMoE` uses against running every expert on every token and masking, and against transformers' Mixtral block.

    .venv/bin/python benchmarks/bench_moe.py --layer
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge import argconf  # noqa: E402
from lmforge.models.config import PRESETS, ModelConfig  # noqa: E402
from lmforge.recipes.pretrain import PretrainConfig, run_pretrain  # noqa: E402
from lmforge.training.loop import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# the balancing term off, or ten times stronger: presets of their own, so the recipe builds them like any other
PRESETS["mixtral-tiny-noaux"] = dict(PRESETS["mixtral-tiny"], router_aux_loss_coef=0.0)
PRESETS["mixtral-tiny-aux0.1"] = dict(PRESETS["mixtral-tiny"], router_aux_loss_coef=0.1)
RUNS = {"dense": ("demo", {}), "moe": ("moe-demo", {}), "moe-noaux": ("moe-demo", {"model": "mixtral-tiny-noaux"}),
        "moe-aux0.1": ("moe-demo", {"model": "mixtral-tiny-aux0.1"})}


def run(name: str, args) -> None:
    yaml_name, over = RUNS[name]
    fields = {**argconf.load_yaml(REPO / "configs" / "pretrain" / f"{yaml_name}.yaml"), **over,
              "out": str(Path(args.out) / name), "max_steps": args.max_steps, "overwrite": True,
              "progress": args.progress, "sample_every": 0, "save_every": 0}
    run_pretrain(argconf.build(PretrainConfig, fields))


def summarize(name: str, out: Path) -> dict:
    """One row of the report from a finished run's directory (config.json and metrics.jsonl)."""
    mc = ModelConfig.from_dict({k: v for k, v in json.loads((out / "config.json").read_text()).items()
                                if k not in ("format", "version", "dtype")})
    recs = read_metrics(out / "metrics.jsonl")
    steps = [r for r in recs if "loss" in r]
    tail = steps[-max(1, len(steps) // 10):]
    row = {"run": name, "steps": len(steps), "params": mc.num_params(), "active_params": mc.num_params(active=True),
           "val_loss": [r["val_loss"] for r in recs if "val_loss" in r][-1],
           "tok_per_s": statistics.median(r["tok_per_s"] for r in steps[1:])}
    if "aux_loss" in steps[-1]:
        L = len(tail[0]["router_load"])
        row["aux_loss"] = statistics.mean(r["aux_loss"] for r in tail)
        row["busiest"] = [statistics.mean(max(r["router_load"][i]) for r in tail) for i in range(L)]
        row["idle"] = [statistics.mean(sum(x < 0.01 for x in r["router_load"][i]) for r in tail) for i in range(L)]
        row["router_entropy"] = statistics.mean(statistics.mean(r["router_entropy"]) for r in tail)
    return row


def layer_timing(n_tokens: int = 2048, repeats: int = 20) -> None:
    import torch

    from lmforge.models.decoder import SparseMoE

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("mixtral-tiny")
    moe = SparseMoE(cfg).eval()
    x = torch.randn(1, n_tokens, cfg.n_embd)

    def all_experts(x):  # what the dispatch avoids: E expert forwards over all N tokens, then a weighted mask
        h = x.reshape(-1, cfg.n_embd)
        weights, chosen = moe.route(moe.router(h))  # (N, k)
        dense = torch.zeros(h.shape[0], cfg.num_experts).scatter(1, chosen, weights)  # (N, E) zero unless chosen
        return sum(dense[:, e:e + 1] * expert(h) for e, expert in enumerate(moe.experts))

    fns = {"SparseMoE (sorted dispatch)": lambda: moe(x), "every expert on every token": lambda: all_experts(x)}
    try:
        import transformers

        hf_cfg = transformers.MixtralConfig(hidden_size=cfg.n_embd, intermediate_size=cfg.moe_intermediate_size,
                                            num_local_experts=cfg.num_experts, num_experts_per_tok=2)
        hf = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(hf_cfg).eval()
        for p in hf.parameters():  # (created empty)
            torch.nn.init.normal_(p, std=cfg.init_std)
        fns["transformers MixtralSparseMoeBlock"] = lambda: hf(x)
    except Exception as e:  # transformers is a test extra
        print(f"(transformers' block not timed: {type(e).__name__})")
    print(f"one MoE layer forward, {n_tokens} tokens, C={cfg.n_embd}, E={cfg.num_experts}, k=2, "
          f"He={cfg.moe_intermediate_size}, {torch.get_num_threads()} threads, median of {repeats} (interleaved)")
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for name, fn in fns.items():
            fn()  # warm-up
        for _ in range(repeats):  # the ways take turns, so a busy moment of the machine hits them alike
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"  {name:36s} {statistics.median(ts) * 1e3:7.2f} ms")
    with torch.no_grad():  # the two ways compute the same thing
        torch.testing.assert_close(moe(x).reshape(-1, cfg.n_embd), all_experts(x), atol=1e-5, rtol=1e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--runs", default="dense,moe,moe-noaux,moe-aux0.1")
    ap.add_argument("--out", default="runs/bench-moe")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--layer", action="store_true", help="time one MoE layer's dispatch instead")
    ap.add_argument("--report-only", action="store_true", help="summarize the runs already in --out, train nothing")
    args = ap.parse_args()
    if args.layer:
        return layer_timing()
    names = args.runs.split(",")
    if not args.report_only:
        for name in names:
            run(name, args)
    rows = [summarize(name, Path(args.out) / name) for name in names]
    print("\n(batch 16 x 128 tokens, the demo's schedule; router columns: mean of the last 10% of the steps; share =")
    print(" share of a layer's (token, expert) assignments, even = 0.125, 0.5 = every token picks that expert)")
    print("| run | steps | params (all / per token) | val loss | tok/s | aux loss | busiest expert's share, per layer "
          "| experts under 1%, per layer | router entropy / ln E |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        moe = (f"{r['aux_loss']:.3f} | {' '.join(f'{x:.2f}' for x in r['busiest'])} | "
               f"{' '.join(f'{x:.1f}' for x in r['idle'])} | {r['router_entropy']:.3f}"
               if "aux_loss" in r else "- | - | - | -")
        print(f"| {r['run']} | {r['steps']} | {r['params'] / 1e6:.2f}M / {r['active_params'] / 1e6:.2f}M | "
              f"{r['val_loss']:.4f} | {r['tok_per_s']:,.0f} | {moe} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
