"""Serving throughput and latency: continuous batching vs the same server forced to one sequence at a time.

    .venv/bin/python benchmarks/bench_serve.py              # clients 1, 4, 16, 64 (a few minutes on 2 loaded cores)
    .venv/bin/python benchmarks/bench_serve.py --quick      # clients 1 and 16, fewer tokens

Two `lmforge serve` processes on the same model directory (a GPT-2-shaped model with random weights and the real
GPT-2 tokenizer from the shared data, or a tokenizer trained on the embedded corpus when that is absent):
`--max-batch 64` (continuous batching) and `--max-batch 1` (each request decodes alone; the others wait in the
queue). A load generator runs N concurrent streaming clients (closed loop: each client sends its next request when
the previous one ends), every request the same prompt length and exactly `--tokens` new tokens (`ignore_eos`; the
count each server reports in `usage` is what is summed, and a request that ends otherwise is flagged with `!!`).
Request i of a level opens with its own number, so that no server skips a prefill by reusing the previous
request's cached prompt (llama.cpp's servers do that for identical prompts, lmforge has no prompt cache;
`--same-prompt` measures that workload). Every request gets its own HTTP connection (`Connection: close`), on
every server alike: llama-server closes the connection after each streamed response while its headers offer
keep-alive, so a client that pools connections races the server's close (`make_client`).
Reported per N: total output tokens/s, time to first token (TTFT) p50/p99, inter-token latency (ITL) p50/p99,
and the throughput ratio batching / batch-1. The peer, llama-cpp-python's OpenAI-compatible server on the same
weights exported to GGUF (f32), is measured in the same run when llama-cpp-python and its `[server]` extra are
installed. That server runs one request at a time, so it is **not a fair peer** for continuous batching: the fair
one is llama.cpp's own `llama-server` with parallel slots (`--llama-server PATH`, built from the llama.cpp sources
in the llama-cpp-python sdist:
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-server
), started with one slot per client of the largest level, continuous batching on, the same threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import shared_data_dir  # noqa: E402


def build_model(path: Path, n_layer: int, n_embd: int) -> str:
    from lmforge.models.config import ModelConfig
    from lmforge.generation.config import GenerationConfig
    from lmforge.lm import LM
    from lmforge.models.decoder import Transformer
    from lmforge.tokenizers.bpe import Tokenizer

    gpt2 = shared_data_dir() / "gpt2"
    if (gpt2 / "encoder.json").exists():
        tok, what = Tokenizer.from_gpt2_files(gpt2 / "encoder.json", gpt2 / "vocab.bpe"), "GPT-2 BPE (50257)"
    else:
        from lmforge.training.data import builtin_corpus

        tok, what = Tokenizer.train([builtin_corpus()], vocab_size=4096, progress=False), "BPE 4096 (embedded corpus)"
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=n_layer, n_head=n_embd // 64,
                      n_embd=n_embd, qkv_bias=True, o_bias=True, mlp_bias=True, name="bench-serve")
    model = Transformer(cfg).eval()
    LM(model, tok, cfg, GenerationConfig(temperature=0)).save(path)
    return f"GPT-2-shaped, n_layer={n_layer}, n_embd={n_embd}, {model.num_params() / 1e6:.1f}M params, fp32; " \
           f"tokenizer {what}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], port: int, name: str):
        self.port, self.name = port, name
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, path: str = "/health", timeout: float = 180) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited:\n{self.log.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start in {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def request_body(model: str, prompt: str, tokens: int, eos: int, stream: bool) -> dict:
    # exactly `tokens` new tokens: lmforge reads `ignore_eos`, llama.cpp's servers a logit bias that bans EOS;
    # usage (completion_tokens) is asked for so that the tokens counted are the tokens the server says it generated
    return {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": stream,
            "ignore_eos": True, "logit_bias": {str(eos): -100}, "stream_options": {"include_usage": True}}


async def one_request(client, url: str, model: str, prompt: str, tokens: int, stats: dict, eos: int) -> None:
    body = request_body(model, prompt, tokens, eos, stream=True)
    t0 = time.perf_counter()
    last, usage, finish = None, None, None
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                finish = chunk["choices"][0]["finish_reason"]
            if not chunk["choices"] or not chunk["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            if last is None:
                stats["ttft"].append(now - t0)
            else:
                stats["itl"].append(now - last)
            last = now
    # a chunk can hold several tokens' text: count what the server reports, and flag any request that did not
    # produce exactly `tokens` tokens (a dropped or truncated request must not pass as throughput)
    got = usage["completion_tokens"] if usage else None
    stats["tokens"] += got if got is not None else tokens
    if got is None:
        stats["no_usage"] += 1
    elif got != tokens or finish != "length" or last is None:
        stats["bad"].append((got, finish, last is not None))


def make_client(clients: int):
    """One HTTP/1.1 connection per request (`Connection: close`, no keep-alive pool), for every server alike.
    llama.cpp's llama-server (cpp-httplib 0.58) closes the connection after each streamed response although its
    headers say `Keep-Alive: timeout=5, max=100` (its chunk provider ends the stream by returning false, which
    httplib treats as a cancelled write and leaves the keep-alive loop): a client that reuses the pooled
    connection sends its next request into a socket the server has closed and gets `Server disconnected without
    sending a response` (a race: it happens when the next request leaves before the server's FIN arrives)."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    return httpx.AsyncClient(limits=limits, headers={"Connection": "close"})


async def run_load(url: str, model: str, prompts: list[str], clients: int, requests: int, tokens: int,
                   eos: int) -> dict:
    stats = {"ttft": [], "itl": [], "tokens": 0, "bad": [], "no_usage": 0}
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]
    queue = iter(prompts[:requests])  # request i gets prompt i, whichever client sends it
    async with make_client(clients) as client:
        async def worker(k: int):
            for _ in range(k):
                await one_request(client, url, model, next(queue), tokens, stats, eos)

        t = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in per_client))
        stats["wall"] = time.perf_counter() - t
    return stats


async def probe(url: str, model: str, prompt: str, tokens: int, eos: int) -> dict:
    """One greedy, non-streamed request: the text and usage, to compare the servers' outputs."""
    async with make_client(1) as client:
        r = await client.post(url + "/v1/completions", json=request_body(model, prompt, tokens, eos, False),
                              timeout=600)
        r.raise_for_status()
        out = r.json()
    return {"text": out["choices"][0]["text"], "finish": out["choices"][0].get("finish_reason"),
            "usage": out.get("usage") or {}}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (approximately, in tokens)")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per server process (on a shared 2-core box more threads fight the load)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--llama-server", default="", help="path to llama.cpp's llama-server binary: the fair peer")
    ap.add_argument("--no-llama-cpp-python", action="store_true", help="skip the llama-cpp-python server")
    ap.add_argument("--same-prompt", action="store_true",
                    help="send every request the same prompt (llama.cpp's servers then reuse the cached prompt "
                         "of a slot, lmforge has no prompt cache); default: request i starts with its number")
    args = ap.parse_args()
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        raise SystemExit(f"--llama-server {args.llama_server}: not an executable file")
    if args.quick:
        args.clients, args.tokens = "1,16", 24
    levels = [int(x) for x in args.clients.split(",")]

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = work / "bench-model"
    desc = build_model(model_dir, args.n_layer, args.n_embd)
    prompt = " ".join(["The server decodes many requests in one batch."] * max(1, args.prompt_tokens // 9))
    # request i of a level gets prompts[i] on every server; distinct openings, so that no server can skip the
    # prefill by reusing the previous request's cached prompt (a workload of identical prompts is --same-prompt)
    n_prompts = max(levels + [16])
    prompts = [prompt if args.same_prompt else f"Request {100 + i}: {prompt}" for i in range(n_prompts)]
    print(f"== lmforge serve: continuous batching vs --max-batch 1 (same model, same run)")
    print(f"   model: {desc}")
    print(f"   {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads/server "
          f"{args.threads}; load average at start {os.getloadavg()[0]:.1f}")
    print(f"   each request: ~{args.prompt_tokens}-token prompt "
          f"({'the same for every request' if args.same_prompt else 'request i opens with its own number'}), "
          f"{args.tokens} new tokens, greedy, streamed; requests per level = max(16, clients); one HTTP "
          f"connection per request (Connection: close) for every server")

    import lmforge

    lm = lmforge.load(model_dir)
    eos = lm.tokenizer.eos_token_id
    servers = []
    for name, batch in (("batching", max(levels)), ("batch-1", 1)):
        cmd = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--max-batch", str(batch), "--max-queue",
               "256", "--max-len", "256", "--threads", str(args.threads)]
        servers.append((name, cmd + ["--port"], f"lmforge --max-batch {batch}"))
    gguf_path = work / "bench-model.gguf"
    if args.llama_server:
        from lmforge.formats.gguf import export_gguf

        export_gguf(lm, gguf_path, dtype="f32")
        slots = max(levels)
        cmd = [args.llama_server, "-m", str(gguf_path), "--alias", "bench-model", "--host", "127.0.0.1",
               "-np", str(slots), "-c", str(256 * slots), "-t", str(args.threads), "-tb", str(args.threads),
               "--cont-batching"]
        servers.append(("llama-server", cmd + ["--port"], f"llama.cpp llama-server, {slots} parallel slots "
                                                           "(same weights, GGUF f32)"))
    try:
        if args.no_llama_cpp_python:
            raise ImportError(name="--no-llama-cpp-python")
        import llama_cpp  # noqa: F401
        import sse_starlette  # noqa: F401  (llama-cpp-python's [server] extra)

        from lmforge.formats.gguf import export_gguf

        export_gguf(lm, gguf_path, dtype="f32")
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--model_alias", "bench-model",
               "--n_ctx", "1024", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--host", "127.0.0.1", "--interrupt_requests", "False"]  # queue, do not interrupt
        servers.append(("llama.cpp", cmd + ["--port"], "llama-cpp-python server (same weights, GGUF f32)"))
        peer = True
    except ImportError as e:
        print(f"   peer llama-cpp-python server: not available here ({e.name} missing): skipped")
        peer = False

    results: dict[tuple[str, int], dict] = {}
    probes: dict[str, dict] = {}
    for name, cmd, label in servers:
        port = free_port()
        srv = Server(cmd + [str(port)], port, label)
        try:
            srv.wait("/v1/models")
            asyncio.run(run_load(srv.url, "bench-model", ["Warm-up. " + prompt] * 2, 2, 2, 4, eos))  # warm-up
            probes[name] = asyncio.run(probe(srv.url, "bench-model", prompt, args.tokens, eos))
            print(f"   -- {label}")
            for n in levels:
                s = asyncio.run(run_load(srv.url, "bench-model", prompts, n, max(16, n), args.tokens, eos))
                results[(name, n)] = s
                if s["bad"] or s["no_usage"]:
                    print(f"   !! {name} clients={n}: {len(s['bad'])} requests not ending after exactly "
                          f"{args.tokens} tokens with finish_reason 'length' (tokens, finish, any text): "
                          f"{s['bad'][:4]}; {s['no_usage']} without usage (counted as {args.tokens})")
                print(f"   {name:12s} clients={n:3d}: {s['tokens'] / s['wall']:8.1f} tok/s   "
                      f"TTFT p50 {pct(s['ttft'], 50) * 1000:7.0f} ms  p99 {pct(s['ttft'], 99) * 1000:7.0f} ms   "
                      f"ITL p50 {pct(s['itl'], 50) * 1000:6.1f} ms  p99 {pct(s['itl'], 99) * 1000:6.1f} ms   "
                      f"({s['tokens']} tokens in {s['wall']:.1f} s)", flush=True)
        except Exception:
            srv.log.seek(0)
            tail = srv.log.read().decode(errors="replace")[-3000:]
            print(f"   !! {label} failed; the last lines of its log:\n{tail}", flush=True)
            raise
        finally:
            srv.stop()

    def tps(name: str, n: int) -> float:
        r = results[(name, n)]
        return r["tokens"] / r["wall"]

    print(f"== outputs: one greedy request per server (the base prompt, {args.tokens} tokens, not streamed), "
          f"compared with lmforge --max-batch {max(levels)}")
    ref = probes["batching"]["text"]
    for name, p in probes.items():
        u = p["usage"]
        same = next((i for i, (a, b) in enumerate(zip(ref, p["text"])) if a != b), min(len(ref), len(p["text"])))
        verdict = "identical" if p["text"] == ref else f"first {same} of {len(ref)} characters identical"
        print(f"   {name:12s} prompt_tokens {u.get('prompt_tokens')}, completion_tokens "
              f"{u.get('completion_tokens')}, finish {p['finish']}: {verdict}; text {p['text'][:70]!r}")
    print("== throughput ratio, continuous batching / batch-1 (same clients, same run)")
    for n in levels:
        target = "  (target >= 4x)" if n == 16 else ""
        print(f"   clients={n:3d}: {tps('batching', n) / tps('batch-1', n):5.2f}x{target}")
    if peer:
        print("== throughput ratio, lmforge continuous batching / llama-cpp-python server (same clients, same run; "
              "not a fair peer: it serves one request at a time)")
        for n in levels:
            print(f"   clients={n:3d}: {tps('batching', n) / tps('llama.cpp', n):5.2f}x")
    if args.llama_server:
        print("== throughput ratio, lmforge continuous batching / llama.cpp llama-server with parallel slots "
              "(the fair peer; same clients, same run)")
        for n in levels:
            print(f"   clients={n:3d}: {tps('batching', n) / tps('llama-server', n):5.2f}x   TTFT p50 "
                  f"{pct(results[('batching', n)]['ttft'], 50) * 1000:.0f} vs "
                  f"{pct(results[('llama-server', n)]['ttft'], 50) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
