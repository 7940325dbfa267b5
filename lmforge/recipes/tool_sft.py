"""Recipe: teach a small model to call tools, by supervised fine-tuning on template-generated conversations.

A model calls tools well only if it has seen, many times, the exact layout it is served: the tool listing in the
system message, a user question, an assistant turn that is nothing but the JSON call, the `tool` turn holding the
result, and an assistant answer that uses it. Large models learn this in post-training; a 1M-parameter demo model
can learn it in a few minutes from a few hundred synthetic conversations, because the skill is mostly *format*
(pick the tool from the question's wording, copy the right words into the arguments, copy the result into the
answer), which templates teach well. Three families of questions:

    calc    "What is 17 * 23?"                -> calculator {"expression": "17 * 23"}  -> 391  -> "The answer is 391."
    file    "What does memo-kalo.txt say?"    -> read_file {"path": "memo-kalo.txt"}     -> text -> the text
    search  "Search the notes: what is the capital of Vostra?" -> search {"query": "capital of Vostra", "k": 1}
            -> "[1] facts/vostra.txt: The capital of Vostra is Brell." -> "The capital of Vostra is Brell."

Every conversation is produced by *running* the real tools (`lmforge.agents.builtin`: the ast calculator, the
confined file tools over a generated folder, search over an `lmforge.rag` BM25 retriever of generated facts), and
is rendered with the server's own tool prompt (`lmforge.serve.app.tool_prompt`, `_normalize_messages`), so the
training text is the serving text byte for byte. Names and numbers of the held-out set are disjoint from the
training set's, so a model that passes has learned to copy, not memorized.

    lmforge pretrain --config configs/pretrain/demo.yaml --out runs/agent-base --block-size 384 --batch-size 8
    python -m lmforge.recipes.tool_sft runs/agent-base --out runs/tool-sft      # data + SFT + held-out eval

`evaluate` runs each held-out question through the agent loop (in process, through the server's app) and measures:
how often the first reply is a parseable tool call, names the right tool with schema-valid arguments, has the
right arguments (the calculator's value, the path, a query that retrieves the fact), and how often the final
answer holds the expected string; with the server's constrained decoding (`tool_choice="required"`) and without.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import argconf
from lmforge.agents.builtin import calculate, calculator_tool, file_tools, search_tool
from lmforge.agents.client import ChatClient, decode_arguments
from lmforge.agents.loop import Agent, Budget
from lmforge.agents.tools import check_arguments, Tool, Toolbox
from lmforge.errors import ConfigError
from lmforge.loader import load
from lmforge.rag import BM25Retriever, Chunk
from lmforge.recipes.sft import run_sft, SFTConfig
from lmforge.serve.app import _normalize_messages, tool_prompt
from lmforge.utils import atomic_write_json

SYSTEM = "Use a tool, then answer."
_SYL = ["ka", "lo", "mi", "ren", "to", "va", "shi", "dor", "pel", "qua", "zin", "bro", "tek", "nu", "fa", "gor",
        "lin", "sa", "vex", "ho", "ri", "mun", "tas", "ble"]
_CALC = [("What is {a} {op} {b}?", "{a} {op} {b}"), ("Compute {a} {op} {b}.", "{a} {op} {b}"),
         ("Calculate {a} {op} {b}, please.", "{a} {op} {b}"), ("How much is {a} {op} {b}?", "{a} {op} {b}")]
_FILE = ["What does {path} say?", "Read {path} for me.", "Open the file {path}. What is in it?",
         "Show me the contents of {path}."]
_SEARCH = ["Search the notes: what is the capital of {land}?", "Look up the capital of {land}.",
           "Which city is the capital of {land}? Search for it.", "Find the capital of {land} in the documents."]
_THINGS = ["door code", "locker number", "meeting room", "train platform", "project budget", "wifi password"]


def _word(rng: random.Random, n: int = 2) -> str:
    return "".join(rng.choice(_SYL) for _ in range(n))


@dataclass
class World:
    """The generated environment the tools act on: a folder of small files and an index of facts."""

    root: Path
    files: dict[str, str]  # path -> text
    facts: dict[str, str]  # land -> capital

    def tools(self) -> Toolbox:
        chunks = [Chunk(doc_id=land, source=f"facts/{land.lower()}.txt", index=0, start=0, end=0,
                        text=f"The capital of {land} is {city}.") for land, city in self.facts.items()]
        ls, read, grep = file_tools(self.root)
        return Toolbox([compact(t, d) for t, d in ((calculator_tool(), "Compute arithmetic."), (read, "Read a file."),
                                                   (search_tool(BM25Retriever(chunks)), "Search the documents."))])


def compact(t: Tool, description: str) -> Tool:
    """The same tool described in fewer tokens (a short description, no parameter notes or defaults): the demo
    model's context is 384 tokens, and the full listing of three tools alone takes ~450 of its BPE tokens."""
    props = {k: {"type": v["type"]} for k, v in t.parameters["properties"].items()}
    params = {"type": "object", "properties": props, "required": t.parameters["required"]}
    return Tool(t.name, description, params, t.fn, timeout=t.timeout)


def make_world(root: Path, n_files: int, n_facts: int, seed: int, taken: set[str] = frozenset()) -> World:
    """Files and facts with fresh names (none in `taken`), written under `root`."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files, facts, used = {}, {}, set(taken)

    def fresh(n: int) -> str:
        while True:
            w = _word(rng, n)
            if w not in used:
                used.add(w)
                return w

    for _ in range(n_files):
        path = f"memo-{fresh(2)}.txt"
        text = f"The {rng.choice(_THINGS)} is {rng.randint(100, 9999)}."
        (root / path).write_text(text + "\n", encoding="utf-8")
        files[path] = text
    for _ in range(n_facts):
        facts[fresh(3).capitalize()] = fresh(2).capitalize()
    return World(root, files, facts)


def _example(kind: str, rng: random.Random, world: World) -> dict[str, Any]:
    """One task: question, the expected call and the string the answer must contain."""
    if kind == "calc":
        op = rng.choice(["+", "-", "*"])
        a, b = rng.randint(2, 999), rng.randint(2, 99 if op == "*" else 999)
        q, e = rng.choice(_CALC)
        expr = e.format(a=a, op=op, b=b)
        return {"kind": kind, "question": q.format(a=a, op=op, b=b), "tool": "calculator",
                "arguments": {"expression": expr}, "expected": str(calculate(expr))}
    if kind == "file":
        path = rng.choice(sorted(world.files))
        return {"kind": kind, "question": rng.choice(_FILE).format(path=path), "tool": "read_file",
                "arguments": {"path": path}, "expected": world.files[path].split(" is ")[-1].rstrip(".")}
    land = rng.choice(sorted(world.facts))
    return {"kind": kind, "question": rng.choice(_SEARCH).format(land=land), "tool": "search",
            "arguments": {"query": f"capital of {land}", "k": 1}, "expected": world.facts[land]}


def _answer(task: dict, observation: str) -> str:
    if task["kind"] == "calc":
        return f"The answer is {observation}."
    if task["kind"] == "file":
        return observation.strip()
    return observation.split(": ", 1)[-1].strip()  # "[1] facts/x.txt: The capital of X is Y."


def conversation(task: dict, toolbox: Toolbox, chat_template: str | None = None) -> list[dict[str, str]]:
    """The training conversation of a task, by running the tool, in the server's prompt format."""
    obs = toolbox.run(task["tool"], task["arguments"])
    if not obs.ok:
        raise ConfigError(f"generated task failed its own tool call: {obs.content}")
    call = {"id": "call_0", "type": "function",
            "function": {"name": task["tool"], "arguments": json.dumps(task["arguments"], ensure_ascii=False)}}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task["question"]},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_0", "content": obs.content},
                {"role": "assistant", "content": _answer(task, obs.content)}]
    messages, template_tools = tool_prompt(_normalize_messages(messages), toolbox.schemas(), chat_template)
    if template_tools is not None:
        raise ConfigError("this chat template renders tools itself; tool SFT data supports the system-prompt "
                          "layout (ChatML without a tools variable) only")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def make_tasks(world: World, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    kinds = ["calc", "file", "search"]
    return [_example(kinds[i % 3], rng, world) for i in range(n)]


# ---- evaluation -----------------------------------------------------------------------------------------------
def evaluate(client: ChatClient, world: World, tasks: list[dict], constrained: bool,
             max_new_tokens: int = 48) -> dict[str, Any]:
    """Run each task through the agent loop; return the rates (see the module docstring) and per-task rows."""
    toolbox = world.tools()
    rows = []
    for task in tasks:
        agent = Agent(client, toolbox, Budget(max_steps=2, max_new_tokens=max_new_tokens, max_seconds=60),
                      system=SYSTEM, first_tool_choice="required" if constrained else "auto")
        r = agent.run(task["question"])
        first = r.messages[2] if len(r.messages) > 2 else {}
        calls = first.get("tool_calls") or []
        row = {"kind": task["kind"], "question": task["question"], "parseable": False, "right_tool": False,
               "right_arguments": False, "answer_ok": False, "answer": r.answer, "first": first}
        if len(calls) == 1 and calls[0]["function"]["name"] in toolbox:
            fn = calls[0]["function"]
            args, why = decode_arguments(fn["arguments"])
            row["parseable"] = why is None
            schema = toolbox.tools[fn["name"]].parameters
            row["right_tool"] = why is None and fn["name"] == task["tool"] and check_arguments(schema, args) is None
            if row["right_tool"]:
                obs = r.calls[0].content if r.calls else ""
                row["right_arguments"] = task["expected"] in obs
        row["answer_ok"] = bool(r.answer) and task["expected"] in r.answer
        rows.append(row)
    n = max(1, len(rows))
    rates = {k: sum(r[k] for r in rows) / n for k in ("parseable", "right_tool", "right_arguments", "answer_ok")}
    return {"n": len(rows), "constrained": constrained, **rates, "rows": rows}


# ---- the recipe -----------------------------------------------------------------------------------------------
@dataclass
class ToolSFTConfig:
    model: str = field(default="", metadata={"help": "base model directory (e.g. a demo pretrain)"})
    out: str = field(default="", metadata={"help": "output directory: data/, world/, the model, tool_eval.json"})
    n_train: int = field(default=600, metadata={"help": "training conversations"})
    n_eval: int = field(default=60, metadata={"help": "held-out questions (new names and numbers)"})
    max_steps: int = field(default=300, metadata={"help": "SFT optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "conversations per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: train all weights, best for a tiny model)"})
    block_size: int = field(default=576, metadata={
        "help": "context for fine-tuning and serving (0: the base model's); a conversation with the tool listing "
                "takes ~480 demo-BPE tokens, more than the demo's 128"})
    seed: int = field(default=0, metadata={"help": "seed of the generated worlds, tasks and training"})

    def __post_init__(self):
        if not self.model or not self.out:
            raise ConfigError("tool SFT needs a base model and --out")
        if self.n_train < 3 or self.n_eval < 3:
            raise ConfigError("n_train and n_eval must be >= 3 (one of each kind of question)")


def write_data(cfg: ToolSFTConfig, template: str | None) -> tuple[World, World, Path, Path]:
    out = Path(cfg.out)
    train_world = make_world(out / "world" / "train", 40, 40, cfg.seed)
    taken = {w.lower() for w in train_world.facts} | {p[5:-4] for p in train_world.files}
    eval_world = make_world(out / "world" / "heldout", 20, 20, cfg.seed + 1, taken)
    box = train_world.tools()
    records = [{"messages": conversation(t, box, template)} for t in make_tasks(train_world, cfg.n_train, cfg.seed)]
    val = [{"messages": conversation(t, box, template)} for t in make_tasks(train_world, 24, cfg.seed + 7)]
    (out / "data").mkdir(parents=True, exist_ok=True)
    train_path, val_path = out / "data" / "train.jsonl", out / "data" / "val.jsonl"
    for path, recs in ((train_path, records), (val_path, val)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return train_world, eval_world, train_path, val_path


def run_tool_sft(cfg: ToolSFTConfig, log=print) -> dict[str, Any]:
    """Generate data, fine-tune with the SFT recipe, evaluate held-out with and without constrained decoding."""
    base = load(cfg.model)
    train_world, eval_world, train_path, val_path = write_data(cfg, base.chat_template)
    base_dir = cfg.model
    if cfg.block_size and cfg.block_size != base.config.block_size:
        # Context extension by fine-tuning: RoPE has no learned position table, so the same weights run at any
        # length; positions past the pretraining context are learned during SFT (Chen et al. 2023 interpolate
        # instead, which matters for large extensions; here the conversations are what SFT trains on).
        if getattr(base.config, "pos_embedding", "rope") != "rope":
            raise ConfigError(f"block_size {cfg.block_size} != the base model's {base.config.block_size}, and only "
                              f"RoPE models can change context; set block_size 0")
        base.config.block_size = cfg.block_size
        base_dir = str(Path(cfg.out) / "base")
        base.save(base_dir)
        log(f"base model's context set to {cfg.block_size} tokens ({base_dir})")
    model_dir = Path(cfg.out) / "model"
    t0 = time.perf_counter()
    sft = SFTConfig(model=base_dir, data=str(train_path), val_data=str(val_path), out=str(model_dir),
                    max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, lora_r=cfg.lora_r,
                    merge=cfg.lora_r > 0, eval_generate=0, seed=cfg.seed, warmup_steps=20,
                    eval_every=max(50, cfg.max_steps // 4))
    metrics = run_sft(sft, log=log)
    train_seconds = time.perf_counter() - t0
    tasks = make_tasks(eval_world, cfg.n_eval, cfg.seed + 99)
    result: dict[str, Any] = {"train_seconds": round(train_seconds, 1), "sft": metrics}
    lm = load(model_dir)
    with ChatClient.in_process(lm) as client:
        for constrained in (False, True):
            t1 = time.perf_counter()
            ev = evaluate(client, eval_world, tasks, constrained)
            ev["seconds"] = round(time.perf_counter() - t1, 1)
            key = "constrained" if constrained else "unconstrained"
            result[key] = ev
            log(f"{key:>13}: parseable {ev['parseable']:.1%}  right tool+valid args {ev['right_tool']:.1%}  "
                f"right args {ev['right_arguments']:.1%}  answer correct {ev['answer_ok']:.1%}  (n={ev['n']})")
    atomic_write_json(Path(cfg.out) / "tool_eval.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmforge.recipes.tool_sft", description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    argconf.add_arguments(p, ToolSFTConfig, skip=("model",))
    args = p.parse_args(argv)
    run_tool_sft(argconf.from_cli(ToolSFTConfig, args, model=args.model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
