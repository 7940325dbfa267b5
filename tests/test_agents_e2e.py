"""End to end: the agent against `lmforge serve` on 127.0.0.1 (a tiny random model), constrained tool calls, the
official `openai` client accepting the history the loop built, and the in-process client equal to the server."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest

from lmforge.agents import Agent, Budget, ChatClient, EndpointError, function_tool, run_agent
from test_agents_helpers import check_openai_conversation
from test_serve_helpers import build_tiny_model, start_server

STOCK = {"apples": 3, "pears": 5, "plums": 0}


def stock(item: Literal["apples", "pears", "plums"]) -> int:
    """How many of a fruit are in stock.

    Args:
        item: the fruit
    """
    return STOCK[item]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("agents") / "tiny")
    srv, lm = start_server(model_dir, max_batch=4)
    yield srv, lm
    srv.stop()


def test_agent_against_lmforge_serve(served, tmp_path):
    srv, lm = served
    budget = Budget(max_steps=2, max_new_tokens=80)
    r = run_agent(f"{srv.url}#tiny", "How many apples are in stock?", tools=[stock], budget=budget,
                  require_tool=True, trace=tmp_path / "t.jsonl")
    assert r.stop_reason in ("answer", "max_steps")
    first = r.messages[2]
    assert first["role"] == "assistant" and len(first["tool_calls"]) == 1  # constrained: a call, always parseable
    fn = first["tool_calls"][0]["function"]
    args = json.loads(fn["arguments"])
    assert fn["name"] == "stock" and args["item"] in STOCK  # the schema's enum, enforced while decoding
    assert r.calls[0].content == str(STOCK[args["item"]]) and r.calls[0].ok
    check_openai_conversation(r.messages)
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["type"] == "end"

    # the official client sends the same history back without complaint, and the server answers it
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    tools = [function_tool(stock).schema()]
    out = client.chat.completions.create(model="tiny", messages=r.messages, tools=tools, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant"

    # in process, through the server's own app: the same greedy first call as over HTTP
    with ChatClient.in_process(lm, model_name="tiny") as local:
        r_local = Agent(local, [function_tool(stock)], budget, first_tool_choice="required").run("How many apples?")
    r_http = Agent(ChatClient(srv.url, model="tiny"), [function_tool(stock)], budget,
                   first_tool_choice="required").run("How many apples?")
    assert _calls(r_local) == _calls(r_http) and r_local.calls[0].content == r_http.calls[0].content


def _calls(r):  # call ids are random per reply; names and arguments are what the model decided
    return [(c["function"]["name"], c["function"]["arguments"]) for c in r.messages[2]["tool_calls"]]


def test_unconstrained_random_model_never_crashes_the_loop(served):
    srv, _ = served
    for q in ("How many pears?", "What is 2+2?", "Tell me a story."):
        r = run_agent(f"{srv.url}/v1", q, tools=[stock], budget=Budget(max_steps=3, max_new_tokens=20), system=None)
        assert r.stop_reason in ("answer", "max_steps") and r.error is None
        check_openai_conversation(r.messages)


def test_endpoint_errors_are_one_line(served):
    srv, _ = served
    r = run_agent(f"{srv.url}#no-such-model", "hi", tools="calc")
    assert r.stop_reason == "error" and "HTTP 404" in r.error and "\n" not in r.error
    with pytest.raises(EndpointError, match="cannot connect"):
        ChatClient("http://127.0.0.1:9", model="x", timeout=2).complete([{"role": "user", "content": "hi"}])
