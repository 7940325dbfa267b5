"""Mixture of experts against the dense demo: same data, schedule, attention and compute per token.

Three `lmforge pretrain` runs on the embedded corpus, each with the demo's settings (configs/pretrain/demo.yaml and
configs/pretrain/moe-demo.yaml; --max-steps shortens both alike):

    dense       llama-tiny: SwiGLU MLP of width 384 in every block
    moe         mixtral-tiny: top-2 of 8 experts of width 192 (same MLP compute per token, 4x the MLP weights),
                load-balancing loss weighted 0.01
    moe-noaux   the same with router_aux_loss_coef = 0: what the routers do with no balancing term

Reported per run: parameters (all / used per token), final validation loss, training tokens/s, and for the MoE runs
the load-balancing loss and the busiest expert's share of its layer's tokens (even = 1/8 = 0.125), averaged over the
last 10% of the steps.

    .venv/bin/python benchmarks/bench_moe.py [--max-steps 300] [--runs dense,moe,moe-noaux] [--out runs/bench-moe]

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
# the balancing term switched off: a preset of its own, so the recipe builds it like any other
PRESETS["mixtral-tiny-noaux"] = dict(PRESETS["mixtral-tiny"], router_aux_loss_coef=0.0)
RUNS = {"dense": ("demo", {}), "moe": ("moe-demo", {}), "moe-noaux": ("moe-demo", {"model": "mixtral-tiny-noaux"})}


def run(name: str, args) -> dict:
    yaml_name, over = RUNS[name]
    out = Path(args.out) / name
    fields = {**argconf.load_yaml(REPO / "configs" / "pretrain" / f"{yaml_name}.yaml"), **over,
              "out": str(out), "max_steps": args.max_steps, "overwrite": True, "progress": args.progress,
              "sample_every": 0, "save_every": 0}
    cfg = argconf.build(PretrainConfig, fields)
    t0 = time.time()
    lm = run_pretrain(cfg)
    wall = time.time() - t0
    recs = read_metrics(out / "metrics.jsonl")
    steps = [r for r in recs if "loss" in r]
    tail = steps[-max(1, len(steps) // 10):]
    mc: ModelConfig = lm.config
    row = {"run": name, "params": lm.model.num_params(), "active_params": mc.num_params(active=True),
           "val_loss": [r["val_loss"] for r in recs if "val_loss" in r][-1], "wall_s": round(wall, 1),
           "tok_per_s": statistics.median(r["tok_per_s"] for r in steps[1:])}
    if "aux_loss" in steps[-1]:
        row["aux_loss"] = statistics.mean(r["aux_loss"] for r in tail)
        row["max_load"] = statistics.mean(max(map(max, r["router_load"])) for r in tail)
        row["min_load"] = statistics.mean(min(map(min, r["router_load"])) for r in tail)
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
    ap.add_argument("--runs", default="dense,moe,moe-noaux")
    ap.add_argument("--out", default="runs/bench-moe")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--layer", action="store_true", help="time one MoE layer's dispatch instead")
    args = ap.parse_args()
    if args.layer:
        return layer_timing()
    rows = [run(name, args) for name in args.runs.split(",")]
    print(f"\n{args.max_steps} steps each (batch 16 x 128 tokens, the demo's schedule)")
    print("| run | params (all / per token) | val loss | tok/s | aux loss | busiest / idlest expert share | "
          "router entropy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        moe = (f"{r['aux_loss']:.3f} | {r['max_load']:.3f} / {r['min_load']:.3f} | {r['router_entropy']:.3f}"
               if "aux_loss" in r else "- | - | -")
        print(f"| {r['run']} | {r['params'] / 1e6:.2f}M / {r['active_params'] / 1e6:.2f}M | {r['val_loss']:.4f} | "
              f"{r['tok_per_s']:,.0f} | {moe} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
