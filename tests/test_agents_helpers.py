"""Helpers for the agent tests (no tests here): a scripted, deterministic OpenAI-compatible endpoint, and checks of
the OpenAI message format against the official `openai` package's own types (the reference for the wire format)."""

from __future__ import annotations

import json
from typing import Any, Callable

import httpx
from openai.types.chat import ChatCompletion, ChatCompletionToolParam
from openai.types.chat import ChatCompletionMessageFunctionToolCallParam as ToolCallParam
from openai.types.chat import ChatCompletionMessageParam
from pydantic import TypeAdapter

from lmforge.agents import ChatClient

MESSAGES = TypeAdapter(list[ChatCompletionMessageParam])
TOOL_CALLS = TypeAdapter(list[ToolCallParam])
TOOLS = TypeAdapter(list[ChatCompletionToolParam])


def check_openai_conversation(messages: list[dict]) -> None:
    """Raise AssertionError unless `messages` is a valid OpenAI chat history: each message validates against the
    openai package's types, and every tool call is answered by exactly one `tool` message, in order, before
    the next assistant message."""
    MESSAGES.validate_python(messages)
    pending: list[str] = []
    for m in messages:
        if m["role"] == "assistant":
            assert not pending, f"tool calls {pending} not answered before the next assistant message"
            calls = m.get("tool_calls") or []
            TOOL_CALLS.validate_python(calls)  # tool_calls is a lazy Iterable in the TypedDict: check it here
            pending = [c["id"] for c in calls]
            assert len(set(pending)) == len(pending), f"duplicate tool call ids {pending}"
        elif m["role"] == "tool":
            assert pending and m["tool_call_id"] == pending[0], f"tool message {m['tool_call_id']} out of order"
            assert isinstance(m["content"], str)
            pending.pop(0)


def call(name: str, arguments: Any, id: str | None = None) -> dict:
    """One planned tool call (`arguments` a dict -> JSON string; a string is sent as it is, even if broken)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": id, "type": "function", "function": {"name": name, "arguments": args}}


class ScriptedModel:
    """A deterministic fake chat endpoint. `plan` is a list of replies, one per request: a string (a text
    answer), a list of calls (see `call`), or a function of the request body returning either. Every request is
    recorded and checked against the OpenAI format; every response is checked with openai's `ChatCompletion`."""

    def __init__(self, plan: list[Any], tokens_per_reply: int = 10, raw: Callable[[dict], Any] | None = None):
        self.plan = list(plan)
        self.requests: list[dict] = []
        self.tokens_per_reply = tokens_per_reply
        self.raw = raw  # returns a whole response body (for malformed-answer tests)

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        check_openai_conversation(body["messages"])
        if body.get("tools"):
            TOOLS.validate_python(body["tools"])
        if self.raw is not None:
            return httpx.Response(200, json=self.raw(body))
        step = self.plan.pop(0) if self.plan else "(plan exhausted)"
        if callable(step):
            step = step(body)
        if isinstance(step, str):
            message, finish = {"role": "assistant", "content": step}, "stop"
        else:
            calls = [{**c, "id": c["id"] or f"call_{len(self.requests)}_{i}"} for i, c in enumerate(step)]
            message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        out = {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
               "model": body["model"], "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                                    "logprobs": None}],
               "usage": {"prompt_tokens": self.tokens_per_reply // 2, "completion_tokens": self.tokens_per_reply // 2,
                         "total_tokens": self.tokens_per_reply}}
        ChatCompletion.model_validate(out)
        return httpx.Response(200, json=out)

    def client(self) -> ChatClient:
        http = httpx.Client(transport=httpx.MockTransport(self.handler))
        return ChatClient("http://scripted.test/v1", model="scripted", http=http)
