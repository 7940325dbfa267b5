"""GGUF export checked in llama.cpp: for stories260K (and an lmforge model directory if given), each GGUF type's file
size, how many of 200 greedy tokens llama.cpp generates identically to lmforge (counted up to the first difference),
and perplexity in llama.cpp vs lmforge fp32 on the same tokens. (Speed: see bench_quantize.py, which times the
engines in interleaved rounds; single timings on this shared machine vary several-fold.)

    .venv/bin/python benchmarks/bench_gguf_llamacpp.py [--model runs/demo]

Needs llama-cpp-python (`make test-llamacpp` installs it).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lmforge  # noqa: E402
from lmforge.generation.loop import generate_ids  # noqa: E402
from lmforge.generation.sampling import SamplingParams  # noqa: E402
from lmforge.formats.gguf import export_gguf  # noqa: E402
from tests.helpers import shared_data_dir  # noqa: E402

N_GREEDY = 200


def lmforge_greedy(lm, prompt, n):
    t0 = time.perf_counter()
    out = generate_ids(lm.model, [prompt], SamplingParams(temperature=0.0, max_new_tokens=n))[0].token_ids
    return out, len(out) / (time.perf_counter() - t0)


def llamacpp_run(llama_cpp, path, prompt, n, eval_ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, len(eval_ids) + 8), n_threads=1, logits_all=True,
                          verbose=False)
    try:
        out, t0 = [], time.perf_counter()
        for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            out.append(int(t))
            if len(out) == n:
                break
        tps = len(out) / (time.perf_counter() - t0)
        llm.reset()
        llm.eval(eval_ids)
        logits = torch.from_numpy(np.array(llm.scores[:len(eval_ids)], dtype=np.float32))
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(eval_ids[1:])).item()
    finally:
        llm.close()
    return out, tps, math.exp(nll)


def report(name, lm, prompt, eval_ids, tmp):
    import llama_cpp

    n = min(N_GREEDY, lm.config.block_size - len(prompt))
    ours, ours_tps = lmforge_greedy(lm, prompt, n)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(lm.model(torch.tensor([eval_ids]))[0, :-1],
                                                torch.tensor(eval_ids[1:])).item()
    rows = [f"### {name}: lmforge fp32 perplexity {math.exp(nll):.4f} on {len(eval_ids)} tokens",
            "", "| GGUF type | file size | greedy tokens equal to lmforge (of %d) | llama.cpp perplexity |" % n,
            "|---|---|---|---|"]
    for dtype in ("f32", "f16", "q8_0", "q4_0"):
        path = export_gguf(lm, tmp / f"{name}-{dtype}.gguf", dtype)
        theirs, tps, ppl = llamacpp_run(llama_cpp, path, prompt, n, eval_ids)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        rows.append(f"| {dtype} | {path.stat().st_size / 1024:.0f} KiB | {same} | {ppl:.4f} |")
    text = "\n".join(rows)
    print(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="also check this lmforge model directory")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: run `make test-llamacpp` first")
        return 1
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    s = lmforge.load(shared_data_dir() / "stories260K" / "stories260K.bin")
    sample = generate_ids(s.model, [[1]], SamplingParams(temperature=1.0, max_new_tokens=400, seed=7))[0].token_ids
    report("stories260K", s, [1] + s.tokenizer.encode("Once upon a time"), [1] + sample, tmp)
    if args.model:
        from lmforge.training.data import builtin_corpus

        lm = lmforge.load(args.model, dtype="float32")
        ids = lm.tokenizer.encode(builtin_corpus(), allowed_special="all")
        report(Path(args.model).name, lm, lm.tokenizer.encode("The for statement"),
               ids[int(len(ids) * 0.9):][:lm.config.block_size], tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
