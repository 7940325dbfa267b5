"""Model benchmark: lmforge vs transformers on the same weights, same process, same threads.

1. Forward throughput (tokens/s, fp32, CPU) of a 124M GPT-2-shaped and a ~100M Llama-shaped random model.
2. Load time of a ~500 MB fp32 safetensors checkpoint (GPT-2 124M): `lmforge.load` vs `from_pretrained`.

Runs alternate between the two implementations and report medians, so a machine shared with other work slows
both alike. Usage:

    .venv/bin/python benchmarks/bench_model.py [--batch 4] [--seq 256] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _median_pair(fn_a, fn_b, rounds: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(rounds):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            gc.collect()
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def bench_forward(name: str, hf_model, batch: int, seq: int, rounds: int) -> dict:
    from lmforge.formats.hf import from_hf_model

    hf_model.eval()
    ours = from_hf_model(hf_model).eval()
    n = sum(p.numel() for p in {id(p): p for p in ours.parameters()}.values())
    ids = torch.randint(0, hf_model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ours(ids), hf_model(ids).logits  # warm-up, and the exactness check
        diff = (a - b).abs().max().item()
        t_ours, t_hf = _median_pair(lambda: ours(ids), lambda: hf_model(ids, use_cache=False), rounds)
    toks = batch * seq
    res = dict(name=name, params=n, ours=toks / t_ours, hf=toks / t_hf, diff=diff)
    print(f"{name:<22} {n / 1e6:6.1f}M  lmforge {res['ours']:8.0f} tok/s   transformers {res['hf']:8.0f} tok/s   "
          f"ratio {res['ours'] / res['hf']:.2f}x   max|dlogits| {diff:.1e}", flush=True)
    return res


def bench_load(rounds: int) -> dict:
    import transformers

    import lmforge

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "gpt2-124m"
        hf.save_pretrained(d)
        del hf
        size = sum(f.stat().st_size for f in d.iterdir())
        lmforge.load(d)  # warm the page cache for both
        t_ours, t_hf = _median_pair(lambda: lmforge.load(d),
                                    lambda: transformers.AutoModelForCausalLM.from_pretrained(d), rounds)
    print(f"load {size / 1e6:.0f} MB safetensors:  lmforge {t_ours:.2f} s   transformers {t_hf:.2f} s   "
          f"ratio {t_ours / t_hf:.2f}x (lower is faster)", flush=True)
    return dict(size=size, ours=t_ours, hf=t_hf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch} x seq {args.seq}, fp32 CPU, median of {args.rounds}", flush=True)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    bench_forward("gpt2 (124M)", gpt2, args.batch, args.seq, args.rounds)
    del gpt2
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True))
    bench_forward("llama-shaped (GQA)", llama, args.batch, args.seq, args.rounds)
    del llama
    gc.collect()
    bench_load(args.rounds)


if __name__ == "__main__":
    main()
