"""lmforge.agents: a language model in a loop with tools (plan -> call -> observe -> answer).

    from lmforge.agents import run_agent, tool
    @tool
    def stock(item: str) -> int:
        '''How many of an item are in stock.

        Args:
            item: the item's name
        '''
        return {"apples": 3}.get(item, 0)
    result = run_agent("http://127.0.0.1:8000", "How many apples are left, times 7?", tools=["calc", stock])

    tools.py    typed Python function -> JSON schema; argument checks; time limits; errors become observations
    builtin.py  calculator (ast, no eval), files under one root, RAG search, allow-listed fetch, current time
    client.py   OpenAI-compatible chat client (httpx), or an lmforge model in process through serve's own app
    loop.py     the loop, its budgets (steps, seconds, tokens) and the JSONL trace
    api.py      run_agent / open_client / build_tools: what `lmforge agent` calls

docs/agents.md explains the cycle and its risks (prompt injection, confinement, budgets).
"""

from lmforge.agents.api import build_tools, open_client, run_agent
from lmforge.agents.builtin import (Confinement, RetrieverSearcher, calculate, calculator_tool, fetch_tool,
                                    file_tools, open_rag_searcher, search_tool, time_tool, tools_from_spec)
from lmforge.agents.client import ChatClient, ChatReply, EndpointError
from lmforge.agents.loop import Agent, AgentResult, Budget, format_event
from lmforge.agents.tools import Observation, Tool, ToolError, Toolbox, function_tool, tool

__all__ = [
    "build_tools", "open_client", "run_agent", "Confinement", "RetrieverSearcher", "calculate", "calculator_tool",
    "fetch_tool", "file_tools", "open_rag_searcher", "search_tool", "time_tool", "tools_from_spec", "ChatClient",
    "ChatReply", "EndpointError", "Agent", "AgentResult", "Budget", "format_event", "Observation", "Tool",
    "ToolError", "Toolbox", "function_tool", "tool",
]
