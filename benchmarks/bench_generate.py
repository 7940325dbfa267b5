"""Generation speed: lmforge vs transformers `generate` on the same weights, in the same run (fp32, CPU).

    .venv/bin/python benchmarks/bench_generate.py                 # everything (several minutes on 2 loaded cores)
    .venv/bin/python benchmarks/bench_generate.py --quick         # fewer tokens, for a smoke run
    .venv/bin/python benchmarks/bench_generate.py --compile       # lmforge compile=True vs transformers (+ eager)

Measures, for a 124M GPT-2-shaped model (random weights, transformers' own init) and llama2.c's stories260K:
  * decode tokens/s, batch 1, greedy, N new tokens (EOS ignored so both produce exactly N), median of --repeats
    alternating runs, with the min-max spread;
  * batched throughput: 8 prompts in one left-padded batch vs the same prompts one at a time (lmforge);
  * time to first token for a 512-token prompt (prefill + one sampled token).
Both libraries decode greedily from identical weights; the token ids are compared and the check is printed.

--compile measures the static-shape decode step compiled with torch.compile (`generate(..., compile=True)`)
against transformers' own fastest documented path, a static KV cache (`cache_implementation="static"`) with its
forward compiled by `torch.compile` (compile against compile), and against transformers eager and lmforge's eager
default, all in the same run (decode batch 1 and batch 8); the one-time compiles are timed and printed separately.

The "floors": a decoder at batch 1 reads every weight once per token. The hardware floor divides the weight bytes
by the machine's measured memory read bandwidth (a STREAM-style read, `bench_llamacpp.read_bandwidth`). The
"torch 1-row product floor" times torch's own 1-row matmul kernels over every matrix: it is a floor for code built
on those kernels, not for the machine (llama.cpp decodes faster than it allows).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers  # noqa: E402

from lmforge.loader import load  # noqa: E402
from lmforge.generation.api import generate  # noqa: E402
from lmforge.formats.hf import from_hf_model  # noqa: E402
from tests.helpers import to_hf_model  # noqa: E402
from lmforge.lm import LM  # noqa: E402
from lmforge.generation.decode import decode_product  # noqa: E402
from tests.helpers import shared_data_dir  # noqa: E402
from benchmarks.bench_llamacpp import read_bandwidth  # noqa: E402


class Timing:
    """Wall-clock and process-CPU seconds of N runs, reported as the median with the min-max spread.

    On a machine shared with other jobs, wall time depends on how much CPU the scheduler gives us; process CPU time
    counts only the work we did, so its ratio is the steadier comparison of two implementations (1 thread).
    """

    def __init__(self):
        self.wall, self.cpu = [], []

    def run(self, fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        self.wall.append(time.perf_counter() - w)
        self.cpu.append(time.process_time() - c)
        return out

    @property
    def median(self) -> tuple[float, float]:
        return statistics.median(self.wall), statistics.median(self.cpu)

    def rate(self, n: float) -> str:
        """n / wall seconds: median [min-max] over the runs."""
        r = sorted(n / w for w in self.wall)
        return f"{statistics.median(r):.1f} [{r[0]:.1f}-{r[-1]:.1f}]"


def timed_pair(fn_a, fn_b, repeats: int):
    """Time two contenders alternately (a, b, a, b, ...) so both see the same machine load."""
    ta, tb = Timing(), Timing()
    for _ in range(repeats):
        out_a = ta.run(fn_a)
        out_b = tb.run(fn_b)
    return ta, out_a, tb, out_b


def hf_generate(hf_model, ids: list[list[int]], n: int, pad: int = 0):
    T = max(map(len, ids))
    x = torch.tensor([[pad] * (T - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ids])
    with torch.inference_mode():
        out = hf_model.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                eos_token_id=None, pad_token_id=pad)
    return out[:, T:].tolist()


def hf_compiled(hf_model):
    """transformers' fastest documented decode path: a copy of the model with a static KV cache and its forward
    compiled by torch.compile (compile against compile)."""
    import copy

    m = copy.deepcopy(hf_model).eval()
    m.generation_config.cache_implementation = "static"
    m.forward = torch.compile(m.forward, fullgraph=True)
    return m


def _matrices(model) -> list[torch.Tensor]:
    """The weight of every nn.Linear (lm_head included): what a decode step reads in full. Embedding tables
    are left out (a step reads one row of them)."""
    return [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _time_passes(products, repeats: int) -> list[list[float]]:
    """Seconds of each 1-row product, per pass over all of them: [pass][product]. Whole passes, so that no matrix
    is still in a CPU cache when it comes round again (the weights are far larger than the caches)."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            row = []
            for fn in products:
                t = time.perf_counter()
                fn()
                row.append(time.perf_counter() - t)
            times.append(row)
    return times


def weight_streaming_floor(model, repeats: int = 10) -> float:
    """Seconds for one 1-row matmul over every weight matrix: the memory traffic of a batch-1 decode step with
    none of its other work. Decoding is bound by it once the weights no longer fit in the CPU caches.

    Each matrix is timed three ways: (out, in) as nn.Linear stores it, (in, out) as GPT-2's Conv1D does, and
    (in, out) split across torch's threads (`lmforge.generation.decode.decode_product`; the same as the second on one thread),
    and for each matrix the fastest way's best time counts: a lower bound for any implementation that reads every
    weight once per token with these kernels."""
    mats = _matrices(model)
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in mats]
    transposed = [w.t().contiguous() for w in mats]  # (in, out)
    ways = [[lambda x=x, w=w: torch.nn.functional.linear(x, w) for x, w in zip(xs, mats)],
            [lambda x=x, w=w: x @ w for x, w in zip(xs, transposed)],
            [lambda x=x, w=w: decode_product(x, w, None) for x, w in zip(xs, transposed)]]
    passes = [_time_passes(products, repeats) for products in ways]
    return sum(min(min(p[i] for p in way) for way in passes) for i in range(len(mats)))


def hf_matmul_time(hf_model, repeats: int = 10) -> float:
    """Seconds of transformers' own weight products for one token, in its layouts (nn.Linear (out, in); GPT-2's
    Conv1D (in, out)), median pass: what its decode step costs before any other work."""
    products = []
    for m in hf_model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear):
            products.append(lambda w=w.detach(), x=torch.randn(1, w.shape[1]): torch.nn.functional.linear(x, w))
        elif type(m).__name__ == "Conv1D":
            products.append(lambda w=w.detach(), x=torch.randn(1, w.shape[0]): x @ w)
    passes = _time_passes(products, repeats)
    return sorted(sum(p) for p in passes)[len(passes) // 2]


def bench_model(name: str, lm: LM, hf_model, prompt: list[int], args, rows: list[str]) -> None:
    n, r = args.new_tokens, args.repeats
    hf_model.eval()
    # warm up both (first calls allocate and initialise lazily)
    generate(lm, prompt, temperature=0, max_new_tokens=4, ignore_eos=True)
    hf_generate(hf_model, [prompt], 4)

    t_ours, ours, t_hf, theirs = timed_pair(
        lambda: generate(lm, prompt, temperature=0, max_new_tokens=n, ignore_eos=True),
        lambda: hf_generate(hf_model, [prompt], n), r)
    (w_ours, c_ours), (w_hf, c_hf) = t_ours.median, t_hf.median
    same = ours.token_ids == theirs[0]
    print(f"[{name}] decode batch 1, {n} new tokens: lmforge {n / w_ours:.1f} tok/s, transformers "
          f"{n / w_hf:.1f} tok/s, ratio {w_hf / w_ours:.2f}x (target >= 1.5x); per CPU second: lmforge "
          f"{n / c_ours:.1f}, transformers {n / c_hf:.1f}, ratio {c_hf / c_ours:.2f}x; identical tokens: {same} "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    rows.append(f"| {name} | decode tok/s, batch 1, {n} new (wall, median [min-max] of {r}) | {t_ours.rate(n)} | "
                f"{t_hf.rate(n)} | {w_hf / w_ours:.2f}x | {'same tokens' if same else 'TOKENS DIFFER'} |")
    rows.append(f"| {name} | decode tok per CPU-second, batch 1 | {n / c_ours:.1f} | {n / c_hf:.1f} | "
                f"{c_hf / c_ours:.2f}x | process CPU time, steadier under load |")
    floor = weight_streaming_floor(lm.model)
    hf_mm = hf_matmul_time(hf_model)
    n_w = sum(w.numel() for w in _matrices(lm.model)) / 1e6
    bw = read_bandwidth(torch.get_num_threads())
    hw_floor = n_w * 1e6 * 4 / (bw * 1e9)
    print(f"[{name}] floors: the {n_w:.1f}M fp32 matrix weights are {n_w * 4:.0f} MB per token; at the measured "
          f"read bandwidth ({bw:.1f} GB/s, {torch.get_num_threads()} thread(s)) that is {hw_floor * 1000:.1f} ms = at "
          f"most {1 / hw_floor:.1f} tok/s for any engine (the hardware floor). torch's own 1-row products over them "
          f"(fastest layout each, best time) take {floor * 1000:.1f} ms ({1 / floor:.1f} tok/s): a floor for code "
          f"built on torch's kernels, not for the machine. lmforge {w_ours / n * 1000:.1f} ms/token, transformers "
          f"{w_hf / n * 1000:.1f} (its own products alone, median pass: {hf_mm * 1000:.1f})", flush=True)
    rows.append(f"| {name} | floors, ms/token: hardware (fp32 weights / {bw:.1f} GB/s read) and torch's 1-row "
                f"products | {hw_floor * 1000:.2f} / {floor * 1000:.2f} | transformers {w_hf / n * 1000:.1f} (its "
                f"products alone {hf_mm * 1000:.1f}) | - | lmforge {w_ours / n * 1000:.1f} ms/token: "
                f"{hw_floor / (w_ours / n):.0%} of the hardware floor's speed |")

    # batched throughput: 8 prompts of different lengths in one batch vs one at a time
    g = torch.Generator().manual_seed(0)
    V = lm.model.config.vocab_size
    prompts = [torch.randint(3, V, (int(k),), generator=g).tolist() for k in torch.linspace(8, 24, 8)]
    nb = args.batch_tokens
    tb = Timing()
    outs = tb.run(lambda: generate(lm, prompts, temperature=0, max_new_tokens=nb, ignore_eos=True))
    t1 = Timing()
    singles = t1.run(lambda: [generate(lm, p, temperature=0, max_new_tokens=nb, ignore_eos=True) for p in prompts])
    thb = Timing()
    hf_outs = thb.run(lambda: hf_generate(hf_model, prompts, nb))
    (w_b, c_b), (w_1, c_1), (w_hfb, c_hfb) = tb.median, t1.median, thb.median
    same_b = [o.token_ids for o in outs] == [s.token_ids for s in singles]
    same_hf = [o.token_ids for o in outs] == hf_outs
    tot = 8 * nb
    print(f"[{name}] batch of 8 x {nb} new tokens: lmforge batched {tot / w_b:.1f} tok/s vs one at a time "
          f"{tot / w_1:.1f} tok/s ({w_1 / w_b:.2f}x); transformers batched {tot / w_hfb:.1f} tok/s; per CPU second: "
          f"lmforge batched {tot / c_b:.1f}, one at a time {tot / c_1:.1f}, transformers batched {tot / c_hfb:.1f}; "
          f"batched == unbatched: {same_b}; == transformers: {same_hf}", flush=True)
    rows.append(f"| {name} | throughput tok/s, 8 prompts batched ({nb} new each) | {tot / w_b:.1f} | "
                f"{tot / w_hfb:.1f} | {w_hfb / w_b:.2f}x | lmforge batch-1 loop: {tot / w_1:.1f} tok/s "
                f"(batched is {w_1 / w_b:.2f}x faster); per CPU-s {tot / c_b:.0f} vs {tot / c_hfb:.0f}; "
                f"batched == unbatched: {same_b} |")

    # time to first token with a 512-token prompt
    L = min(512, lm.model.config.block_size - 1)
    long_prompt = torch.randint(3, V, (L,), generator=g).tolist()
    t_ttft, _, t_ttft_hf, _ = timed_pair(
        lambda: generate(lm, long_prompt, temperature=0, max_new_tokens=1, ignore_eos=True),
        lambda: hf_generate(hf_model, [long_prompt], 1), r)
    (w_t, c_t), (w_th, c_th) = t_ttft.median, t_ttft_hf.median
    print(f"[{name}] time to first token, {L}-token prompt: lmforge {w_t * 1000:.0f} ms, transformers "
          f"{w_th * 1000:.0f} ms ({w_th / w_t:.2f}x); CPU: {c_t * 1000:.0f} ms vs {c_th * 1000:.0f} ms", flush=True)
    rows.append(f"| {name} | time to first token, {L}-token prompt, ms (wall) | {w_t * 1000:.0f} | "
                f"{w_th * 1000:.0f} | {w_th / w_t:.2f}x | CPU ms {c_t * 1000:.0f} vs {c_th * 1000:.0f} |")


def bench_compiled(name: str, lm: LM, hf_model, prompt: list[int], args, rows: list[str]) -> None:
    """Decode speed with compile=True (after a separately timed compile) vs transformers and lmforge eager."""
    n, r = args.new_tokens, args.repeats
    hf_model.eval()
    mode = args.compile_mode or True
    run = lambda p, k, **kw: generate(lm, p, temperature=0, max_new_tokens=k, ignore_eos=True, **kw)  # noqa: E731
    w, c = time.perf_counter(), time.process_time()
    run(prompt, n, compile=mode)  # first call: traces and compiles the decode step (prefill stays eager)
    w_comp, c_comp = time.perf_counter() - w, time.process_time() - c
    print(f"[{name}] compile (first compile=True call, {n} tokens, mode {args.compile_mode or 'default'}): "
          f"{w_comp:.1f} s wall, {c_comp:.1f} s CPU", flush=True)
    hf_c = hf_compiled(hf_model)
    w = time.perf_counter()
    hf_generate(hf_c, [prompt], n)  # its first call compiles
    w_hcomp = time.perf_counter() - w
    print(f"[{name}] transformers static cache + torch.compile, first call: {w_hcomp:.1f} s wall", flush=True)
    run(prompt, 4)
    hf_generate(hf_model, [prompt], 4)
    tc, ts, tk, te = Timing(), Timing(), Timing(), Timing()
    for _ in range(r):  # alternate the four so they see the same load
        ours = tc.run(lambda: run(prompt, n, compile=mode))
        theirs_c = ts.run(lambda: hf_generate(hf_c, [prompt], n))
        theirs = tk.run(lambda: hf_generate(hf_model, [prompt], n))
        eager = te.run(lambda: run(prompt, n))
    (w_c, c_c), (w_s, c_s), (w_h, c_h), (w_e, c_e) = tc.median, ts.median, tk.median, te.median
    same = ours.token_ids == theirs[0] == eager.token_ids == theirs_c[0]
    print(f"[{name}] decode batch 1, {n} new tokens, compiled: lmforge compile=True {tc.rate(n)} tok/s, transformers "
          f"static cache + compile {ts.rate(n)} tok/s, ratio {w_s / w_c:.2f}x; eager: lmforge {te.rate(n)}, "
          f"transformers {tk.rate(n)} ({w_h / w_e:.2f}x); per CPU second compiled: {n / c_c:.1f} vs {n / c_s:.1f}; "
          f"identical tokens (all four): {same} (load average {os.getloadavg()[0]:.1f})", flush=True)
    rows.append(f"| {name} | compile time, first call (s, wall) | {w_comp:.1f} | {w_hcomp:.1f} | - | one-time; "
                f"Inductor caches kernels on disk |")
    rows.append(f"| {name} | decode tok/s, batch 1, {n} new, compiled vs compiled (median [min-max] of {r}) | "
                f"{tc.rate(n)} | static cache + compile {ts.rate(n)} | {w_s / w_c:.2f}x | "
                f"{'same tokens' if same else 'TOKENS DIFFER'} |")
    rows.append(f"| {name} | decode tok/s, batch 1, {n} new, eager vs eager (same run) | {te.rate(n)} | "
                f"{tk.rate(n)} | {w_h / w_e:.2f}x | lmforge compile=True vs transformers eager would be "
                f"{w_h / w_c:.2f}x: not a like-for-like comparison |")

    g = torch.Generator().manual_seed(0)
    V = lm.model.config.vocab_size
    prompts = [torch.randint(3, V, (int(k),), generator=g).tolist() for k in torch.linspace(8, 24, 8)]
    nb = args.batch_tokens
    w, c = time.perf_counter(), time.process_time()
    run(prompts, nb, compile=mode)  # batch 8 is a new shape: one more compile
    w_comp8, c_comp8 = time.perf_counter() - w, time.process_time() - c
    hf_generate(hf_c, prompts, nb)  # transformers compiles the new shape too
    tb, thb = Timing(), Timing()
    for _ in range(r):
        outs = tb.run(lambda: run(prompts, nb, compile=mode))
        hf_outs = thb.run(lambda: hf_generate(hf_c, prompts, nb))
    (w_b, c_b), (w_hb, c_hb) = tb.median, thb.median
    same_b = [o.token_ids for o in outs] == hf_outs
    tot = 8 * nb
    print(f"[{name}] batch of 8 x {nb} new tokens, compiled (compile {w_comp8:.1f} s): lmforge {tot / w_b:.1f} "
          f"tok/s, transformers static cache + compile {tot / w_hb:.1f} tok/s, ratio {w_hb / w_b:.2f}x; per CPU second {tot / c_b:.1f} vs "
          f"{tot / c_hb:.1f} ({c_hb / c_b:.2f}x); == transformers: {same_b}", flush=True)
    rows.append(f"| {name} | throughput tok/s, 8 prompts batched ({nb} new each), both compiled | {tot / w_b:.1f} | "
                f"{tot / w_hb:.1f} | {w_hb / w_b:.2f}x | per CPU-s {tot / c_b:.0f} vs {tot / c_hb:.0f} "
                f"({c_hb / c_b:.2f}x); compile {w_comp8:.1f} s; == transformers: {same_b} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=64, help="new tokens per prompt in the batch test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch intra-op threads, for both libraries (default: torch's default, one per core)")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat")
    ap.add_argument("--only", choices=["gpt2", "stories"], help="run one model")
    ap.add_argument("--compile", action="store_true", help="measure generate(..., compile=True) instead")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.batch_tokens, args.repeats = 32, 16, 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} thread(s), "
          f"{platform.machine()} with {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = ["| model | measure | lmforge | transformers | ratio | note |", "|---|---|---|---|---|---|"]

    if args.only in (None, "stories"):
        path = shared_data_dir() / "stories260K" / "stories260K.bin"
        if path.exists():
            lm = load(path)
            hf_model = to_hf_model(lm.model)
            bos = lm.tokenizer.bos_token_id
            prompt = [bos] + lm.tokenizer.encode(" Once upon a time")
            (bench_compiled if args.compile else bench_model)("stories260K", lm, hf_model, prompt, args, rows)
        else:
            print(f"skipping stories260K: {path} is absent")

    if args.only in (None, "gpt2"):
        torch.manual_seed(0)
        hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # 124M, random weights
        lm = LM(from_hf_model(hf_model).eval(), None)
        prompt = list(range(1000, 1016))
        (bench_compiled if args.compile else bench_model)("gpt2-124M", lm, hf_model, prompt, args, rows)

    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
