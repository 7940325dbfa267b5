"""Quantization report: scheme / bits per weight / size on disk / perplexity (delta vs fp32) / decode tokens/s,
for a model pretrained by lmforge and for llama2.c's stories260K, plus memory (RSS) of a GPT-2-124M-shaped model
and decode speed against llama.cpp on the same GGUF file, all in one run.

    .venv/bin/python benchmarks/bench_quantize.py [--model runs/demo] [--out benchmarks/results/compress.md]

--model: an lmforge model directory (default runs/demo, trained by `make demo` if absent). --data FILE: score
perplexity on the last 10% of FILE's tokens (real text, e.g. Tiny Shakespeare for a model trained on it, whose
recipe held the same last 10% out) and calibrate GPTQ on its first 85%; without it, the embedded corpus. stories260K
is read from the shared data directory. One CPU thread everywhere (the machine is shared), for lmforge and llama.cpp.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lmforge  # noqa: E402
from lmforge.training.eval import perplexity  # noqa: E402
from lmforge.generation.loop import generate_ids  # noqa: E402
from lmforge.generation.sampling import SamplingParams  # noqa: E402
from lmforge.compress.quantize import QuantLinear, model_nbytes, quantize_model  # noqa: E402
from tests.helpers import shared_data_dir  # noqa: E402

DECODE_TOKENS = 64


def decode_tps(model, prompt, n=DECODE_TOKENS, repeats=5) -> float:
    """Greedy decode tokens/s at batch 1 with the KV cache (median of `repeats`, after one warm-up call)."""
    generate_ids(model, [prompt], SamplingParams(temperature=0.0, max_new_tokens=4))
    tps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate_ids(model, [prompt], SamplingParams(temperature=0.0, max_new_tokens=n))[0]
        tps.append(len(out.token_ids) / (time.perf_counter() - t0))
    return statistics.median(tps)


def disk_size(lm, d: Path) -> int:
    lm.save(d)
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def schemes_for(cfg):
    """(label, scheme, group, method, fallback): g32 needs widths divisible by 32 (stories260K's MLP is 172 wide)."""
    fb = "int8" if cfg.intermediate_size % 32 or cfg.n_embd % 32 else None
    return [("int8", "int8", None, "rtn", None),
            ("int4 g32 rtn", "int4", 32, "rtn", fb), ("int4 g32 gptq", "int4", 32, "gptq", fb),
            ("int4 g128 rtn", "int4", 128, "rtn", "int8"), ("int4 g128 gptq", "int4", 128, "gptq", "int8"),
            ("nf4 g32 rtn", "nf4", 32, "rtn", fb), ("nf4 g32 gptq", "nf4", 32, "gptq", fb)]


def report_model(name, lm, eval_tokens, calib, prompt, tmp: Path, block):
    rows = []
    base = lm.model.eval()
    n_params = base.num_params()
    ppl0 = perplexity(base, eval_tokens, block)["perplexity"]
    tps0 = decode_tps(base, prompt)
    rows.append(dict(scheme="fp32", bits=32.0, disk=disk_size(lm, tmp / f"{name}-fp32"), mem=model_nbytes(base),
                     ppl=ppl0, delta=0.0, tps=tps0))
    for label, scheme, group, method, fb in schemes_for(lm.config):
        if group and lm.config.n_embd % group:  # every layer would fall back to int8: not an int4 row
            continue
        q = quantize_model(copy.deepcopy(base), scheme, group or 32, calibration=calib if method == "gptq" else None,
                           method=method, fallback=fb, progress=False)
        qlm = lmforge.lm.LM(q, lm.tokenizer, lm.config, lm.generation_config, lm.chat_template)
        ppl = perplexity(q, eval_tokens, block)["perplexity"]
        rows.append(dict(scheme=label + (" (+int8 fallback)" if fb and scheme != "int8" and group == 32 else ""),
                         bits=8 * model_nbytes(q) / n_params, disk=disk_size(qlm, tmp / f"{name}-{label}".replace(" ", "-")),
                         mem=model_nbytes(q), ppl=ppl, delta=100 * (ppl / ppl0 - 1), tps=decode_tps(q, prompt)))
        if scheme == "int8":  # the same int8 model with the reference path (dequantize, fp32 matmul)
            QuantLinear.use_kernels = False
            try:
                rows.append(dict(scheme="int8 (dequant fp32 path)", bits=rows[-1]["bits"], disk=rows[-1]["disk"],
                                 mem=rows[-1]["mem"], ppl=perplexity(q, eval_tokens, block)["perplexity"],
                                 delta=None, tps=decode_tps(q, prompt)))
                rows[-1]["delta"] = 100 * (rows[-1]["ppl"] / ppl0 - 1)
            finally:
                QuantLinear.use_kernels = True
    return rows


def table(rows, fp32_disk):
    out = ["| scheme | bits/weight (whole model) | size on disk | % of fp32 | perplexity | delta vs fp32 | decode tok/s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scheme']} | {r['bits']:.2f} | {r['disk'] / 1024:.0f} KiB | {100 * r['disk'] / fp32_disk:.1f}% "
                   f"| {r['ppl']:.3f} | {r['delta']:+.2f}% | {r['tps']:.0f} |")
    return "\n".join(out)


def rss_of(model_dir: str) -> float:
    """Resident memory (MiB) a fresh process gains by loading a model directory and running one forward pass."""
    code = ("import gc, torch, lmforge, lmforge.formats.native, lmforge.compress.quantize\n"
            "def rss():\n"
            "    for l in open('/proc/self/status'):\n"
            "        if l.startswith('VmRSS'): return int(l.split()[1]) / 1024\n"
            "r0 = rss(); lm = lmforge.load(%r)\n"
            "with torch.no_grad(): lm.model(torch.tensor([[1, 2, 3]]))  # touch every weight (safetensors is mmapped)\n"
            "gc.collect(); print(rss() - r0)\n" % model_dir)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def memory_section(tmp: Path) -> str:
    from lmforge.models.config import ModelConfig
    from lmforge.lm import LM
    from lmforge.models.decoder import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt2")
    model = Transformer(cfg).eval()
    lines = ["| GPT-2 124M shape (random weights) | parameter+buffer bytes | RSS gained by load + 1 forward "
             "| decode tok/s (32 tokens) |", "|---|---|---|---|"]
    for label, scheme in (("fp32", None), ("int8", "int8"), ("int4 g32 (+int8 emb)", "int4")):
        m = model if scheme is None else quantize_model(copy.deepcopy(model), scheme, 32, progress=False)
        d = tmp / f"gpt2-{label.split()[0]}"
        LM(m, None, cfg).save(d)
        tps = decode_tps(m, list(range(1, 9)), n=32, repeats=1)
        lines.append(f"| {label} | {model_nbytes(m) / 2**20:.0f} MiB | {rss_of(str(d)):.0f} MiB | {tps:.1f} |")
        del m
    return "\n".join(lines)


def llamacpp_section(lm, eval_tokens, prompt, tmp: Path, rounds: int = 5) -> str:
    """lmforge fp32/int8 and llama.cpp f32/q8_0 on the same GGUF export. The four engines are timed in turns,
    `rounds` times, and each reports its median round: interleaving gives every engine the same machine load.
    (A small model: per-token overhead, not weight reads, decides these speeds; benchmarks/bench_llamacpp.py
    compares the engines on GPT-2 124M.)"""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python is not installed: llama.cpp comparison skipped (`make test-llamacpp` installs it)."
    import numpy as np

    from lmforge.formats.gguf import export_gguf

    ids = [int(t) for t in eval_tokens[:1024]]
    q8 = quantize_model(copy.deepcopy(lm.model), "int8", progress=False)
    llms = {}
    for dtype in ("f32", "q8_0"):
        path = export_gguf(lm, tmp / f"model-{dtype}.gguf", dtype)
        llms[f"llama.cpp {dtype}"] = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=1, logits_all=True,
                                                     verbose=False)

    def llama_tps(llm) -> float:
        llm.reset()
        t0, n = time.perf_counter(), 0
        for _tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            n += 1
            if n == DECODE_TOKENS:
                break
        return n / (time.perf_counter() - t0)

    timers = {"lmforge fp32": lambda: decode_tps(lm.model, prompt, repeats=1),
              "lmforge int8": lambda: decode_tps(q8, prompt, repeats=1),
              **{k: (lambda llm=llm: llama_tps(llm)) for k, llm in llms.items()}}
    runs = {k: [] for k in timers}
    for _ in range(rounds):
        for k, fn in timers.items():
            runs[k].append(fn())
    best = {k: statistics.median(v) for k, v in runs.items()}  # the median round of each engine
    ppl = {}
    for label, model in (("lmforge fp32", lm.model), ("lmforge int8", q8)):
        with torch.no_grad():
            ppl[label] = math.exp(torch.nn.functional.cross_entropy(model(torch.tensor([ids]))[0, :-1],
                                                                    torch.tensor(ids[1:])).item())
    for k, llm in llms.items():
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
        ppl[k] = math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
        llm.close()
    lines = [f"| engine / weights | decode tok/s (median of {rounds} interleaved rounds) | perplexity (first "
             f"{len(ids):,} eval tokens) |", "|---|---|---|"]
    lines += [f"| {k}{' (same GGUF export)' if k.startswith('llama') else ''} | {best[k]:.0f} | {ppl[k]:.3f} |"
              for k in timers]
    lines.append("")
    lines.append(f"ratios: lmforge int8 / lmforge fp32 = {best['lmforge int8'] / best['lmforge fp32']:.2f}x; "
                 f"lmforge fp32 / llama.cpp f32 = {best['lmforge fp32'] / best['llama.cpp f32']:.2f}x; "
                 f"lmforge int8 / llama.cpp q8_0 = {best['lmforge int8'] / best['llama.cpp q8_0']:.2f}x")
    print(lines[-1])
    return "\n".join(lines)


def kernel_note() -> str:
    """Which kernels the int8/int4 rows ran through (perplexity and speed alike)."""
    from lmforge import kernels

    simd = kernels.gemv_simd()
    if simd == "none":
        return ("int8/int4 use PyTorch's CPU weight-only kernels with bf16 activations (`QuantLinear.kernel_dtype`; "
                "lmforge's own kernels were not built here)")
    return (f"int8/int4 use lmforge's own kernels (lmforge/csrc/decode_kernels.c, {simd} loop: activations rounded to int8 "
            "per block of 32, integer dot products), so perplexity and speed are both measured through them")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo"), help="lmforge model directory")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compress.md"))
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for perplexity")
    ap.add_argument("--data", default="", help="a text file: held-out = its last 10%% (default: the embedded corpus)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the GPT-2-124M memory measurement")
    ap.add_argument("--skip-llamacpp", action="store_true", help="skip the llama.cpp section")
    ap.add_argument("--skip-stories", action="store_true", help="skip the stories260K section")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    sections = []

    # --- the lmforge-pretrained model: held-out = the last 10% of the embedded corpus (its validation split) ---
    if not Path(args.model, "config.json").exists():
        print(f"{args.model} not found: training it with `python -m lmforge.demo` (a few minutes)")
        subprocess.run([sys.executable, "-m", "lmforge.demo", "--out", args.model], cwd=ROOT, check=True)
    from lmforge.training.data import builtin_corpus
    from lmforge.compress.quantize import calibration_batches

    lm = lmforge.load(args.model, dtype="float32")
    if args.data:
        if not Path(args.data).is_file():
            raise SystemExit(f"--data {args.data}: no such file")
        text = Path(args.data).read_text(encoding="utf-8")
        source = f"last 10% of {Path(args.data).name}"
    else:
        text, source = builtin_corpus(), "last 10% of the embedded corpus"
    ids = lm.tokenizer.encode(text, allowed_special="all")
    cut = int(len(ids) * 0.9)
    cut_chars = int(len(text) * 0.9)
    block = lm.config.block_size
    eval_tokens = ids[cut:cut + args.eval_tokens]
    calib = calibration_batches(lm.tokenizer, text[: int(len(text) * 0.85)], 32, block)  # training text only
    prompt = lm.tokenizer.encode(text[cut_chars:cut_chars + 40] if args.data else "The for statement")
    rows = report_model("lmforge", lm, eval_tokens, list(calib.split(8)), prompt, tmp, block)
    title = (f"### lmforge-pretrained model `{args.model}` ({lm.config.name}, {lm.model.num_params() / 1e6:.2f}M "
             f"params, vocab {lm.config.vocab_size}); perplexity on {len(eval_tokens):,} held-out tokens "
             f"({source}); GPTQ calibration: 32 x {block} tokens of the training text")
    sections.append(title + "\n\n" + table(rows, rows[0]["disk"]))
    print(sections[-1])
    if not args.skip_llamacpp:
        sections.append("### llama.cpp on the same GGUF export (lmforge-pretrained model, 1 thread)\n\n"
                        + llamacpp_section(lm, eval_tokens, prompt, tmp))
        print(sections[-1])

    # --- stories260K: evaluated on text sampled from the fp32 model itself (no TinyStories data offline) ---
    sbin = shared_data_dir() / "stories260K" / "stories260K.bin"
    if sbin.exists() and not args.skip_stories:
        s = lmforge.load(sbin)
        gen = lambda seed: generate_ids(s.model, [[1]], SamplingParams(temperature=1.0, max_new_tokens=511,
                                                                       seed=seed))[0].token_ids
        eval_s, calib_s = [], []
        for k in range(12):
            eval_s += [1] + gen(1000 + k)
        for k in range(8):
            calib_s.append(torch.tensor([([1] + gen(2000 + k) + [0] * 512)[:256]]))
        prompt_s = [1] + s.tokenizer.encode("Once upon a time")
        rows = report_model("stories", s, eval_s, calib_s, prompt_s, tmp, 512)
        sections.append(f"### stories260K (llama2.c, {s.model.num_params() / 1e3:.0f}K params, MLP width 172); "
                        f"perplexity on {len(eval_s):,} tokens sampled (T=1) from the fp32 model; GPTQ calibration: "
                        "8 x 256 other samples. Group 32 does not divide 172, so the MLP down projections fall back "
                        "to int8 (marked)\n\n" + table(rows, rows[0]["disk"]))
        print(sections[-1])

    if not args.skip_memory:
        sections.append("### Memory: a GPT-2 124M-shaped model saved and loaded back in a fresh process\n\n"
                        + memory_section(tmp))
        print(sections[-1])

    header = (f"# Compression benchmarks\n\ncommand: `.venv/bin/python benchmarks/bench_quantize.py "
              f"--model {args.model}{' --data ' + args.data if args.data else ''}`\nmachine: {os.cpu_count()}-core "
              f"{platform.machine()}, load average {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}, "
              f"1 thread; date: {datetime.date.today()}\n\n"
              "Decode tok/s: greedy, batch 1, KV cache, 64 new tokens, median of 5 after a warm-up call. "
              f"{kernel_note()}; the 'dequant fp32 path' row "
              "is the same int8 model computing in fp32. bits/weight: all parameter and buffer bytes x 8 / fp32 "
              "parameter count (embeddings and LM head are int8 in every quantized row).\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from lmforge.utils import atomic_write

    with atomic_write(args.out) as f:
        f.write(header + "\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
