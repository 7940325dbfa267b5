"""Generation speed: lmforge vs transformers `generate` on the same weights, in the same run (fp32, CPU).

    .venv/bin/python benchmarks/bench_generate.py                 # everything (several minutes on 2 loaded cores)
    .venv/bin/python benchmarks/bench_generate.py --quick         # fewer tokens, for a smoke run
    .venv/bin/python benchmarks/bench_generate.py --compile       # lmforge compile=True vs transformers (+ eager)

Measures, for a 124M GPT-2-shaped model (random weights, transformers' own init) and llama2.c's stories260K:
  * decode tokens/s, batch 1, greedy, N new tokens (EOS ignored so both produce exactly N), best of --repeats;
  * batched throughput: 8 prompts in one left-padded batch vs the same prompts one at a time (lmforge);
  * time to first token for a 512-token prompt (prefill + one sampled token).
Both libraries decode greedily from identical weights; the token ids are compared and the check is printed.

--compile measures the static-shape decode step compiled with torch.compile (`generate(..., compile=True)`)
against transformers `generate` and lmforge's eager default in the same run (decode batch 1 and batch 8); the
one-time compile (the first call, which also warms Inductor's kernel cache) is timed and printed separately.
"""

from __future__ import annotations

import argparse
import os
import platform
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


class Timing:
    """Best-of-N wall-clock seconds and CPU seconds of this process.

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
    def best(self) -> tuple[float, float]:
        return min(self.wall), min(self.cpu)


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
    (w_ours, c_ours), (w_hf, c_hf) = t_ours.best, t_hf.best
    same = ours.token_ids == theirs[0]
    print(f"[{name}] decode batch 1, {n} new tokens: lmforge {n / w_ours:.1f} tok/s, transformers "
          f"{n / w_hf:.1f} tok/s, ratio {w_hf / w_ours:.2f}x (target >= 1.5x); per CPU second: lmforge "
          f"{n / c_ours:.1f}, transformers {n / c_hf:.1f}, ratio {c_hf / c_ours:.2f}x; identical tokens: {same} "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    rows.append(f"| {name} | decode tok/s, batch 1, {n} new (wall) | {n / w_ours:.1f} | {n / w_hf:.1f} | "
                f"{w_hf / w_ours:.2f}x | {'same tokens' if same else 'TOKENS DIFFER'} |")
    rows.append(f"| {name} | decode tok per CPU-second, batch 1 | {n / c_ours:.1f} | {n / c_hf:.1f} | "
                f"{c_hf / c_ours:.2f}x | process CPU time, steadier under load |")
    floor = weight_streaming_floor(lm.model)
    hf_mm = hf_matmul_time(hf_model)
    n_w = sum(w.numel() for w in _matrices(lm.model)) / 1e6
    print(f"[{name}] memory-bandwidth floor: one pass over the {n_w:.1f}M fp32 matrix weights (a 1-row matmul each "
          f"in its fastest way, best time of each, nothing else) takes {floor * 1000:.1f} ms = at most "
          f"{1 / floor:.1f} tok/s for any implementation that reads every weight once per token; transformers "
          f"takes {w_hf / n * 1000:.1f} ms/token, of which its own weight products alone (its layouts, median "
          f"pass) are {hf_mm * 1000:.1f} ms; so no fp32 decoder can beat it by more than {w_hf / n / floor:.2f}x "
          f"here, even with no work besides the products (lmforge: {w_ours / n * 1000:.1f} ms/token)", flush=True)
    rows.append(f"| {name} | bandwidth floor: all fp32 weights read once, ms/token | {floor * 1000:.1f} | "
                f"{w_hf / n * 1000:.1f} (transformers ms/token; its products alone {hf_mm * 1000:.1f}) | "
                f"{w_hf / n / floor:.2f}x | the best ratio any fp32 decoder could reach; lmforge "
                f"{w_ours / n * 1000:.1f} ms/token |")

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
    (w_b, c_b), (w_1, c_1), (w_hfb, c_hfb) = tb.best, t1.best, thb.best
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
    (w_t, c_t), (w_th, c_th) = t_ttft.best, t_ttft_hf.best
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
    run(prompt, 4)
    hf_generate(hf_model, [prompt], 4)
    tc, tk, te = Timing(), Timing(), Timing()
    for _ in range(r):  # alternate the three so they see the same load
        ours = tc.run(lambda: run(prompt, n, compile=mode))
        theirs = tk.run(lambda: hf_generate(hf_model, [prompt], n))
        eager = te.run(lambda: run(prompt, n))
    (w_c, c_c), (w_h, c_h), (w_e, c_e) = tc.best, tk.best, te.best
    same = ours.token_ids == theirs[0] == eager.token_ids
    print(f"[{name}] decode batch 1, {n} new tokens, compiled: lmforge {n / w_c:.1f} tok/s, transformers "
          f"{n / w_h:.1f} tok/s, ratio {w_h / w_c:.2f}x (target >= 1.5x); per CPU second: lmforge {n / c_c:.1f}, "
          f"transformers {n / c_h:.1f}, ratio {c_h / c_c:.2f}x; lmforge eager {n / w_e:.1f} tok/s ({n / c_e:.1f} "
          f"per CPU-s); identical tokens (compiled, transformers, eager): {same} "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    rows.append(f"| {name} | compile time, first compile=True call (s, wall / CPU) | {w_comp:.1f} / {c_comp:.1f} "
                f"| - | - | one-time; Inductor caches kernels on disk |")
    rows.append(f"| {name} | decode tok/s, batch 1, {n} new, compiled (wall) | {n / w_c:.1f} | {n / w_h:.1f} | "
                f"{w_h / w_c:.2f}x | eager lmforge {n / w_e:.1f}; {'same tokens' if same else 'TOKENS DIFFER'} |")
    rows.append(f"| {name} | decode tok per CPU-second, batch 1, compiled | {n / c_c:.1f} | {n / c_h:.1f} | "
                f"{c_h / c_c:.2f}x | eager lmforge {n / c_e:.1f} |")

    g = torch.Generator().manual_seed(0)
    V = lm.model.config.vocab_size
    prompts = [torch.randint(3, V, (int(k),), generator=g).tolist() for k in torch.linspace(8, 24, 8)]
    nb = args.batch_tokens
    w, c = time.perf_counter(), time.process_time()
    run(prompts, nb, compile=mode)  # batch 8 is a new shape: one more compile
    w_comp8, c_comp8 = time.perf_counter() - w, time.process_time() - c
    tb, thb = Timing(), Timing()
    for _ in range(r):
        outs = tb.run(lambda: run(prompts, nb, compile=mode))
        hf_outs = thb.run(lambda: hf_generate(hf_model, prompts, nb))
    (w_b, c_b), (w_hb, c_hb) = tb.best, thb.best
    same_b = [o.token_ids for o in outs] == hf_outs
    tot = 8 * nb
    print(f"[{name}] batch of 8 x {nb} new tokens, compiled (compile {w_comp8:.1f} s): lmforge {tot / w_b:.1f} "
          f"tok/s, transformers {tot / w_hb:.1f} tok/s, ratio {w_hb / w_b:.2f}x; per CPU second {tot / c_b:.1f} vs "
          f"{tot / c_hb:.1f} ({c_hb / c_b:.2f}x); == transformers: {same_b}", flush=True)
    rows.append(f"| {name} | throughput tok/s, 8 prompts batched ({nb} new each), compiled | {tot / w_b:.1f} | "
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
