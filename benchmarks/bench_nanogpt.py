"""Pretraining time-to-quality against nanoGPT: who reaches a character-level validation loss of 1.886 first.

    .venv/bin/python benchmarks/bench_nanogpt.py [--rounds 3] [--threads 2] [--nanogpt DIR] [--eval-interval 50]

The peer is nanoGPT's own `train.py`, unmodified, run with the CPU command of its README (shakespeare-char, a
4-layer 128-wide GPT, batches of 12 x 64 characters, 2,000 iterations, evaluation every 250 iterations on 20
random batches of the train and validation splits). lmforge runs `lmforge pretrain` with
configs/pretrain/shakespeare-char.yaml. The target, 1.886, is the validation loss nanoGPT's README run reaches.

The nanoGPT checkout comes from --nanogpt DIR, or else is extracted from the local mirror
(`../.mirror/karpathy+nanoGPT/repo`) into a temporary directory. Its data is written as
data/shakespeare_char/prepare.py writes it, from the local Tiny Shakespeare (../shared/data, or --data): the
sorted characters of the text as the vocabulary (meta.pkl), the first 90% of the characters as train.bin and
the last 10% as val.bin (uint16). lmforge's recipe makes the same split itself: `tokenizer: char` and
`val_fraction: 0.1` of its token stream, which is the text's characters plus one end-of-text token, so its
validation split starts 2 characters later than nanoGPT's and ends with that token (111,539 + 1 tokens against
111,540). This preparation is not timed; lmforge's tokenization of the text is, inside its run.

Each training run is a fresh process with the same threads (OMP_NUM_THREADS / MKL_NUM_THREADS = --threads for
both, and lmforge's `--threads`; nanoGPT leaves torch at its default, which is one thread per core) and
PYTHONUNBUFFERED=1, so each line reaches us when it is printed. The clock starts just before the process is
started (imports and lmforge's tokenization count) and every line is timestamped as it streams out:

* time to target: when the first evaluation line with a validation loss <= the target appeared
  (nanoGPT: "step N: train loss X, val loss Y"; lmforge: "step N: val loss Y, perplexity P"). It is quantised
  to each side's evaluation interval, and each evaluation costs time. So nanoGPT runs twice per round: its
  README command (every 250 iterations), and the same command with --eval_interval (default 50) for a finer
  time to target at the cost of more evaluations;
* total wall time of the process, and the last validation loss it printed (its own estimate: nanoGPT's 20
  random batches of 12 x 64, lmforge's evaluation set in its config);
* full validation loss: after the timed runs, both final models are scored on the same characters, all of
  nanoGPT's val.bin in windows of each model's context length (mean cross-entropy per predicted character).
  nanoGPT's model is its last checkpoint (it saves when its validation estimate improves), read with its own
  model.py;
* peak resident memory of the training process: VmHWM from /proc/<pid>/status, read every 0.1 s while it runs.

Rounds alternate which side starts, so both see the same machine load. The figures are medians over rounds with
the min-max spread; the ratio lmforge / nanoGPT is taken per round, then its median.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIRROR = ROOT.parent / ".mirror" / "karpathy+nanoGPT" / "repo"
TARGET = 1.886
# nanoGPT's README command for a CPU (the shakespeare-char section), less nothing, plus an out_dir of ours
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
EVAL_LINE = re.compile(r"^step (\d+):.*\bval loss ([0-9.]+|nan|inf)")


def fail(msg: str) -> None:
    sys.exit(f"error: {msg}")


# ----------------------------------------------------------------------------------------------------------------
# Setup: the nanoGPT checkout and its data
# ----------------------------------------------------------------------------------------------------------------
def nanogpt_checkout(arg: str | None, tmp: Path) -> Path:
    """The nanoGPT directory to run: --nanogpt, or the local mirror extracted into `tmp`."""
    if arg:
        d = Path(arg).expanduser().resolve()
        if not (d / "train.py").is_file() or not (d / "config" / "train_shakespeare_char.py").is_file():
            fail(f"{d} is not a nanoGPT checkout (no train.py and config/train_shakespeare_char.py)")
        return d
    if not MIRROR.is_dir():
        fail("no nanoGPT checkout: run `git clone https://github.com/karpathy/nanoGPT` and pass --nanogpt DIR")
    d = tmp / "nanoGPT"
    d.mkdir()
    archive = subprocess.run(["git", f"--git-dir={MIRROR}", "archive", "HEAD"], capture_output=True)
    if archive.returncode != 0:
        fail(f"could not read the nanoGPT mirror {MIRROR}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(d)], input=archive.stdout, check=True)
    return d


def nanogpt_commit(d: Path, from_mirror: bool) -> str:
    """The commit that was run (the mirror's HEAD, or the checkout's), for the report."""
    git_dir = MIRROR if from_mirror else d / ".git"
    r = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def prepare_shakespeare_char(text_file: Path, nanogpt: Path) -> None:
    """Write data/shakespeare_char/{train,val}.bin and meta.pkl as nanoGPT's prepare.py does, from a local file."""
    import numpy as np

    data = text_file.read_text(encoding="utf-8")
    chars = sorted(set(data))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(data)
    out = nanogpt / "data" / "shakespeare_char"
    out.mkdir(parents=True, exist_ok=True)
    np.array([stoi[c] for c in data[:int(n * 0.9)]], dtype=np.uint16).tofile(out / "train.bin")
    np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16).tofile(out / "val.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)


# ----------------------------------------------------------------------------------------------------------------
# One timed training process
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    evals: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds since start, step, val loss)
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    full_val: float | None = None

    def time_to(self, target: float) -> tuple[float, int] | None:
        """(seconds, step) of the first evaluation at or below `target`, or None."""
        return next(((t, s) for t, s, v in self.evals if v <= target), None)

    @property
    def final_val(self) -> float | None:
        return self.evals[-1][2] if self.evals else None


def _watch_rss(pid: int, run: Run, done: threading.Event) -> None:
    """Keep the process's VmHWM (peak resident set, kB) up to date until it exits."""
    path = f"/proc/{pid}/status"
    while not done.is_set():
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        run.peak_rss_mb = max(run.peak_rss_mb, int(line.split()[1]) / 1024)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return
        done.wait(0.1)


def timed_run(name: str, cmd: list[str], cwd: Path, env: dict[str, str], log_file: Path) -> Run:
    """Run `cmd`, timestamp its evaluation lines as they stream out, and record its wall time and peak RSS."""
    run = Run(name)
    done = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    watcher = threading.Thread(target=_watch_rss, args=(proc.pid, run, done), daemon=True)
    watcher.start()
    with open(log_file, "w") as log:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            log.write(f"{t:9.3f} {line}")
            m = EVAL_LINE.match(line.strip())
            if m:
                run.evals.append((t, int(m.group(1)), float(m.group(2))))
    proc.wait()
    run.wall_s = time.perf_counter() - t0
    done.set()
    watcher.join()
    if proc.returncode != 0:
        tail = log_file.read_text().splitlines()[-5:]
        fail(f"{name} exited with status {proc.returncode}; the end of its log ({log_file}):\n" + "\n".join(tail))
    return run


# ----------------------------------------------------------------------------------------------------------------
# The same full-validation-set score for both final models
# ----------------------------------------------------------------------------------------------------------------
def _mean_window_loss(forward, ids, block: int) -> float:
    """Mean cross-entropy per predicted token over `ids` cut into windows of `block` (+1 target) tokens."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for a in range(0, len(ids) - 1, block * 16):  # 16 windows per forward
            rows = [ids[s:s + block + 1] for s in range(a, min(a + block * 16, len(ids) - 1), block)]
            for r in ([x for x in rows if len(x) == block + 1], [x for x in rows if len(x) < block + 1]):
                if not r:
                    continue
                x = torch.stack([t[:-1] for t in r])
                y = torch.stack([t[1:] for t in r])
                logits = forward(x)
                total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
                count += y.numel()
    return total / count


def nanogpt_full_val(nanogpt: Path, out_dir: Path) -> tuple[float, int]:
    """(loss, iteration) of nanoGPT's saved checkpoint on all of val.bin, with its own model.py."""
    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu")
    model = mod.GPT(mod.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    val = torch.from_numpy(np.fromfile(nanogpt / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16)
                           .astype(np.int64))
    # GPT.forward(idx, targets): with targets it returns logits for every position
    loss = _mean_window_loss(lambda x: model(x, torch.zeros_like(x))[0], val, model.config.block_size)
    return loss, int(ckpt["iter_num"])


def lmforge_full_val(nanogpt: Path, out_dir: Path) -> float:
    """lmforge's final model on the same characters: nanoGPT's val.bin decoded with its meta.pkl."""
    import numpy as np
    import torch

    import lmforge

    d = nanogpt / "data" / "shakespeare_char"
    itos = pickle.loads((d / "meta.pkl").read_bytes())["itos"]
    text = "".join(itos[int(i)] for i in np.fromfile(d / "val.bin", dtype=np.uint16))
    lm = lmforge.load(out_dir)
    ids = torch.tensor(lm.tokenizer.encode(text), dtype=torch.int64)
    lm.model.eval()
    return _mean_window_loss(lm.model, ids, lm.config.block_size)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def spread(xs: list[float], fmt: str) -> str:
    """'median (min-max)' of the values, or '-' when there are none."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"


def table(rows: dict[str, list[Run]], target: float) -> str:
    head = ("| run | reached ≤ target | time to target (s) | at step | total wall (s) | last val (own eval) | "
            "full val set | peak RSS (MB) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, runs in rows.items():
        hits = [r.time_to(target) for r in runs]
        reached = [h for h in hits if h]
        steps = sorted({s for _, s in reached})
        lines.append(
            f"| {name} | {len(reached)}/{len(runs)} | {spread([t for t, _ in reached], '.1f')} | "
            f"{', '.join(map(str, steps)) or '-'} | {spread([r.wall_s for r in runs], '.1f')} | "
            f"{spread([r.final_val for r in runs if r.final_val is not None], '.4f')} | "
            f"{spread([r.full_val for r in runs if r.full_val is not None], '.4f')} | "
            f"{spread([r.peak_rss_mb for r in runs], '.0f')} |")
    return "\n".join(lines)


def ratios(lm_runs: list[Run], peer_runs: list[Run], target: float) -> list[float]:
    """Per round: lmforge's time to target / the peer's (rounds where both reached it)."""
    out = []
    for a, b in zip(lm_runs, peer_runs):
        ta, tb = a.time_to(target), b.time_to(target)
        if ta and tb:
            out.append(ta[0] / tb[0])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every side once (default 3)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both sides (default 2)")
    p.add_argument("--nanogpt", help="a nanoGPT checkout (default: extract the local mirror into a temp dir)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"),
                   help="Tiny Shakespeare input.txt")
    p.add_argument("--config", default=str(ROOT / "configs" / "pretrain" / "shakespeare-char.yaml"),
                   help="lmforge's pretrain config")
    p.add_argument("--target", type=float, default=TARGET, help=f"validation loss to reach (default {TARGET})")
    p.add_argument("--eval-interval", type=int, default=50,
                   help="nanoGPT's second row evaluates every this many iterations (0: skip that row)")
    p.add_argument("--json", help="also write the raw runs here")
    p.add_argument("--keep", help="keep the logs and models in this directory (default: a temp dir, removed)")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.threads < 1 or a.eval_interval < 0:
        fail("--rounds and --threads must be >= 1 and --eval-interval >= 0")
    data, config = Path(a.data).expanduser(), Path(a.config).expanduser()
    if not data.is_file():
        fail(f"{data}: no such file (Tiny Shakespeare's input.txt; pass --data)")
    if not config.is_file():
        fail(f"{config}: no such config file")

    work = Path(a.keep).resolve() if a.keep else Path(tempfile.mkdtemp(prefix="bench_nanogpt"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        nanogpt = nanogpt_checkout(a.nanogpt, work)
        prepare_shakespeare_char(data, nanogpt)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(a.threads),
               "MKL_NUM_THREADS": str(a.threads)}
        sides = {"nanoGPT, README command (eval every 250)": ("nanogpt", [])}
        if a.eval_interval:
            sides[f"nanoGPT, --eval_interval={a.eval_interval}"] = ("nanogpt", [f"--eval_interval={a.eval_interval}"])
        sides["lmforge, " + config.name] = ("lmforge", [])
        rows: dict[str, list[Run]] = {name: [] for name in sides}
        names = list(sides)
        print(f"nanoGPT {nanogpt_commit(nanogpt, not a.nanogpt)} in {nanogpt}; {a.threads} threads; target val loss {a.target}")
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # a different side starts each round
            for name in order:
                kind, extra = sides[name]
                out = work / f"r{r}_{kind}_{names.index(name)}"
                if kind == "nanogpt":
                    cmd = [sys.executable, "train.py", *NANOGPT_ARGS, *extra, f"--out_dir={out}"]
                    cwd = nanogpt
                else:
                    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(config.resolve()),
                           "--data", str(data.resolve()), "--out", str(out), "--threads", str(a.threads),
                           "--progress", "false"]
                    cwd = ROOT
                run = timed_run(name, cmd, cwd, env, work / f"{out.name}.log")
                hit = run.time_to(a.target)
                print(f"round {r + 1}/{a.rounds} {name}: " +
                      (f"val <= {a.target} at step {hit[1]} after {hit[0]:.1f} s" if hit else "target not reached") +
                      f", total {run.wall_s:.1f} s, last val {run.final_val}, peak RSS {run.peak_rss_mb:.0f} MB",
                      flush=True)
                rows[name].append(run)
                if kind == "nanogpt":
                    run.full_val, it = nanogpt_full_val(nanogpt, out)
                    run.name += f" (checkpoint of iter {it})"
                else:
                    run.full_val = lmforge_full_val(nanogpt, out)

        print()
        print(table(rows, a.target))
        lm_runs = rows[names[-1]]
        for peer in names[:-1]:
            rs = ratios(lm_runs, rows[peer], a.target)
            print(f"\nlmforge / {peer}, time to target: {spread(rs, '.2f')} over {len(rs)} rounds")
        if a.json:
            Path(a.json).write_text(json.dumps({n: [r.__dict__ for r in runs] for n, runs in rows.items()}, indent=1))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
