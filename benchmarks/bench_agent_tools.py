"""Tool use of a small fine-tuned model: how often it picks the right tool with valid arguments, and answers
correctly, on held-out questions, with and without lmforge serve's constrained tool-call decoding.

    lmforge pretrain --config configs/pretrain/demo.yaml --out runs/agent-base --block-size 384 --batch-size 8
    python benchmarks/bench_agent_tools.py --base runs/agent-base --out runs/tool-sft             # data, SFT, eval
    python benchmarks/bench_agent_tools.py --base runs/agent-base --out runs/tool-sft --eval-only # eval again

The recipe is `lmforge.recipes.tool_sft` (its docstring says what each figure counts). Constrained decoding
(`tool_choice="required"`) must make 100% of first replies parseable calls; this script exits non-zero if not.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def table(result: dict) -> str:
    rows = ["| decoding | parseable call | right tool + valid args | right args | answer correct | n | seconds |",
            "|---|---|---|---|---|---|---|"]
    for key in ("unconstrained", "constrained"):
        r = result[key]
        rows.append(f"| {key} | {r['parseable']:.1%} | {r['right_tool']:.1%} | {r['right_arguments']:.1%} | "
                    f"{r['answer_ok']:.1%} | {r['n']} | {r['seconds']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    import torch

    import lmforge
    from lmforge.agents import ChatClient
    from lmforge.recipes.tool_sft import ToolSFTConfig, evaluate, make_tasks, make_world, run_tool_sft

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/agent-base")
    p.add_argument("--out", default="runs/tool-sft")
    p.add_argument("--max-steps", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-eval", type=int, default=60)
    p.add_argument("--eval-only", action="store_true", help="evaluate the model already in OUT/model")
    args = p.parse_args(argv)
    cfg = ToolSFTConfig(model=args.base, out=args.out, max_steps=args.max_steps, batch_size=args.batch_size,
                        lr=args.lr, n_eval=args.n_eval)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    if args.eval_only:
        out = Path(args.out)
        train_world = make_world(out / "world" / "train", 40, 40, cfg.seed)
        taken = {w.lower() for w in train_world.facts} | {q[5:-4] for q in train_world.files}
        world = make_world(out / "world" / "heldout", 20, 20, cfg.seed + 1, taken)
        tasks = make_tasks(world, cfg.n_eval, cfg.seed + 99)
        result = {}
        with ChatClient.in_process(lmforge.load(out / "model")) as client:
            for constrained in (False, True):
                t0 = time.perf_counter()
                ev = evaluate(client, world, tasks, constrained)
                ev["seconds"] = round(time.perf_counter() - t0, 1)
                result["constrained" if constrained else "unconstrained"] = ev
    else:
        result = run_tool_sft(cfg)
        print(f"SFT: {cfg.max_steps} steps in {result['train_seconds']} s, val loss "
              f"{result['sft'].get('val_loss_before')} -> {result['sft'].get('val_loss_after')}")
    print(table(result))
    for key in ("unconstrained", "constrained"):
        bad = [r for r in result[key]["rows"] if not r["answer_ok"]][:2]
        for r in bad:
            print(f"  {key} miss: {r['question']!r} -> {json.dumps(r['first'])[:160]} / answer {r['answer']!r}")
    return 0 if result["constrained"]["parseable"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
