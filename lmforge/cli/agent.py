"""`lmforge agent`: answer a question with a model that calls tools, streaming each step to the terminal.

    lmforge agent --model runs/tool-sft --tools calc "What is 17 * 23?"            # a model directory, in process
    lmforge agent --model http://127.0.0.1:8000 --tools calc,files:docs "How many lines mention budget?"
    lmforge agent --model https://api.openai.com/v1#gpt-4o-mini --tools rag:runs/idx,time "..." --trace t.jsonl
    lmforge agent --model URL --tools fetch --allow-host 127.0.0.1:8080 "What does http://127.0.0.1:8080/ say?"

Tools: calc (arithmetic, no eval), files:ROOT (list/read/grep under ROOT only), rag:INDEX (search an
`lmforge rag index`), fetch (HTTP GET to --allow-host hosts only; none by default), time (the current date and time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lmforge.agents import Budget, format_event, run_agent


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("agent", help="answer a question with a tool-calling loop (calc, files, rag, fetch)",
                              description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question")
    p.add_argument("--model", required=True, help="lmforge model directory, or http(s)://host[/v1][#MODEL]")
    p.add_argument("--tools", default="calc", help="comma-separated: calc, files:ROOT, rag:INDEX, fetch, time")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="a host fetch may reach (repeatable; none by default)")
    b = Budget()
    p.add_argument("--max-steps", type=int, default=b.max_steps, help="model calls at most")
    p.add_argument("--max-seconds", type=float, default=b.max_seconds, help="wall-clock limit for the run")
    p.add_argument("--max-tokens", type=int, default=b.max_tokens, help="prompt + completion tokens over the run")
    p.add_argument("--max-new-tokens", type=int, default=b.max_new_tokens, help="tokens per model reply")
    p.add_argument("--tool-timeout", type=float, default=b.tool_timeout, help="seconds per tool call")
    p.add_argument("--require-tool", action="store_true",
                   help="the first step must call a tool (tool_choice=required: constrained decoding on lmforge)")
    p.add_argument("--system", default=None, help="system prompt (default: a short one about tool use)")
    p.add_argument("--trace", default=None, help="append the full trace to this JSONL file")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the steps")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.set_defaults(func=cmd_agent)


def cmd_agent(args) -> int:
    budget = Budget(max_steps=args.max_steps, max_seconds=args.max_seconds, max_tokens=args.max_tokens,
                    max_new_tokens=args.max_new_tokens, tool_timeout=args.tool_timeout)

    def show(event: dict) -> None:
        line = format_event(event)
        if line:
            print(line, file=sys.stderr, flush=True)

    extra = {"system": args.system} if args.system is not None else {}
    result = run_agent(args.model, args.question, args.tools, budget=budget, trace=args.trace,
                       on_event=None if args.json else show, require_tool=args.require_tool,
                       allow_hosts=args.allow_host, api_key=args.api_key, **extra)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    elif result.answer is not None:
        print(result.answer)
    else:
        print(f"(no answer: {result.stop_reason}{': ' + result.error if result.error else ''})")
    return 0 if result.stop_reason == "answer" else 1
