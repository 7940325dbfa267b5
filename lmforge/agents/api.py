"""The one-call Python API: `run_agent(model, question, tools=...)`, the same thing `lmforge agent` runs.

    from lmforge.agents import run_agent
    result = run_agent("runs/tool-sft", "What is 17 * 23?", tools="calc")          # a model directory, in process
    result = run_agent("http://127.0.0.1:8000", "Summarize notes.txt", tools="files:docs")   # any OpenAI-style URL
    print(result.answer, result.stop_reason)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from lmforge.agents.builtin import tools_from_spec
from lmforge.agents.client import ChatClient
from lmforge.agents.loop import DEFAULT_SYSTEM, Agent, AgentResult, Budget
from lmforge.agents.tools import Tool, function_tool


def open_client(model: Any, api_key: str | None = None, model_name: str | None = None) -> ChatClient:
    """A `ChatClient` for a URL (http/https: an OpenAI-compatible server, `#MODEL` names the model), a model directory or a loaded `LM`
    (both in process, through lmforge serve's app), or a `ChatClient` (returned as is)."""
    if isinstance(model, ChatClient):
        return model
    if isinstance(model, (str, os.PathLike)) and str(model).startswith(("http://", "https://")):
        url, _, name = str(model).partition("#")  # http://host/v1#MODEL names the model (as `lmforge rag` does)
        return ChatClient(url, model=model_name or name or None, api_key=api_key or os.environ.get("OPENAI_API_KEY"))
    if isinstance(model, (str, os.PathLike)):
        import lmforge

        model = lmforge.load(str(model))
    return ChatClient.in_process(model, model_name=model_name or "model")


def build_tools(tools: str | Sequence[str | Tool | Callable] = "calc", allow_hosts: Sequence[str] = (),
                searcher: Any = None) -> list[Tool]:
    """Tools from a spec string ("calc,files:ROOT,rag:INDEX,fetch,time"), `Tool`s, or typed functions."""
    if isinstance(tools, str):
        return tools_from_spec(tools, allow_hosts=allow_hosts, searcher=searcher)
    out: list[Tool] = []
    for t in tools:
        if isinstance(t, Tool):
            out.append(t)
        elif isinstance(t, str):
            out.extend(tools_from_spec(t, allow_hosts=allow_hosts, searcher=searcher))
        else:
            out.append(function_tool(t))
    return out


def run_agent(model: Any, question: str, tools: str | Sequence[str | Tool | Callable] = "calc", *,
              budget: Budget | None = None, trace: str | Path | None = None,
              on_event: Callable[[dict], None] | None = None, system: str | None = DEFAULT_SYSTEM,
              require_tool: bool = False, allow_hosts: Sequence[str] = (), searcher: Any = None,
              api_key: str | None = None, model_name: str | None = None) -> AgentResult:
    """Answer `question` with `model` and `tools` inside `budget` (see `Agent`). `require_tool=True` makes the
    first step a tool call (`tool_choice="required"`: constrained decoding on lmforge serve)."""
    toolbox = build_tools(tools, allow_hosts, searcher)
    client = open_client(model, api_key=api_key, model_name=model_name)
    try:
        agent = Agent(client, toolbox, budget, system=system, first_tool_choice="required" if require_tool else "auto")
        return agent.run(question, on_event=on_event, trace=trace)
    finally:
        if client is not model:
            client.close()
