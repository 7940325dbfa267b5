"""`make demo`: pretrain a small language model on the embedded corpus in a few minutes, then generate from it.

What happens, step by step (each step is a library call you can make yourself):

1. Train a byte-level BPE tokenizer (vocabulary 2,048) on the embedded corpus: Python's own reference manual and
   standard-library docstrings, about 0.8 MB of English prose with code. No download.
2. Tokenize the corpus into a memory-mapped token shard, documents separated by the end-of-text token; the last 10%
   of the tokens is the validation set.
3. Build a Llama-shaped model of about a million parameters (4 layers, RoPE, RMSNorm, SwiGLU, grouped-query attention)
   and train it with AdamW, warmup + cosine decay and gradient clipping, evaluating the validation loss as it goes.
4. Write the run directory: an lmforge model directory (config.json, model.safetensors, tokenizer.json,
   generation_config.json) plus metrics.jsonl, loss.png and train_state/ (for --resume).
5. Generate from the trained model, greedy and sampled.

    python -m lmforge.demo [--out runs/demo] [--minutes 4] [--max-steps 600] [--overwrite]

The corpus is small and the model tiny: expect text that looks like Python documentation in shape (indentation,
"the ... of the ...", backquoted names) rather than in meaning.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lmforge import argconf
from lmforge.errors import LmforgeError
from lmforge.recipes.pretrain import PretrainConfig, run_pretrain

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmforge.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="run / model directory (default runs/demo)")
    ap.add_argument("--minutes", type=float, default=4.0, help="stop training after this many minutes (default 4)")
    ap.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: configs/pretrain/demo.yaml)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on a busy machine, "
                                                             "else all cores)")
    ap.add_argument("--overwrite", action="store_true", help="replace the model already in --out (a rerun)")
    args = ap.parse_args(argv)

    threads = args.threads
    if threads is None:  # oversubscribed cores make multi-threaded matmuls wait on each other: use one thread
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = 1 if load > cores else 0
        if threads == 1 and cores > 1:
            print(f"note: the machine is busy (load {load:.1f} on {cores} cores): training with 1 thread")
    values = argconf.load_yaml(DEMO_CONFIG) if DEMO_CONFIG.exists() else {}  # else PretrainConfig's defaults
    values.update(out=args.out, max_minutes=args.minutes, threads=threads, overwrite=args.overwrite)
    if args.max_steps:
        values["max_steps"] = args.max_steps
    try:
        cfg = argconf.build(PretrainConfig, values)
        t0 = time.time()
        lm = run_pretrain(cfg)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\ntrained in {(time.time() - t0) / 60:.1f} min; loss curve: {Path(args.out) / 'loss.png'}")
    for prompt in ("The for statement", "def ", "A dictionary"):
        greedy = lm.generate(prompt, max_new_tokens=40, temperature=0.0)
        sampled = lm.generate(prompt, max_new_tokens=40, temperature=0.8, top_k=40, seed=0)
        print(f"\n--- prompt: {prompt!r}\ngreedy : {prompt}{greedy}\nsampled: {prompt}{sampled}")
    print(f"\nmodel directory: {args.out}\nnext:\n  lmforge generate {args.out} --prompt \"The with statement\" "
          f"--temperature 0.8 --top-p 0.95\n  lmforge eval perplexity {args.out} --data <a text file>\n"
          f"  lmforge serve {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
