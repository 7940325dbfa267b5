"""A client for OpenAI-compatible chat endpoints: `lmforge serve`, llama.cpp's server, vLLM, OpenAI itself.

One request and one reply, in OpenAI's chat-completions format (https://platform.openai.com/docs/api-reference/chat):

    POST {base_url}/chat/completions
    {"model": ..., "messages": [...], "tools": [{"type": "function", "function": {...}}], "tool_choice": "auto",
     "max_tokens": 256, "temperature": 0}
    -> {"choices": [{"message": {"role": "assistant", "content": null,
                                 "tool_calls": [{"id": "call_1", "type": "function",
                                                 "function": {"name": "calculator",
                                                              "arguments": "{\\"expression\\": \\"2+2\\"}"}}]},
                     "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 41, "completion_tokens": 12, "total_tokens": 53}}

Note that `arguments` is a JSON *string*, written by the model: it may not parse, and the loop must cope. A reply
may hold several tool calls at once (parallel calls); each result goes back as its own message
`{"role": "tool", "tool_call_id": "call_1", "content": "4"}`, after the assistant message that made the calls.

`ChatClient.in_process(lm)` runs the same request against an lmforge model in this process, with no socket and no
port: the request goes through `lmforge serve`'s own FastAPI app (`lmforge.serve.app.create_app`) over an
in-memory ASGI transport. So the chat template, the tool prompt, the tool-call parsing and the constrained
decoding (`tool_choice="required"`) are exactly the server's, not a second copy of them.

Errors of the endpoint (unreachable, non-2xx, a body that is not a chat completion) raise `EndpointError`, one line
naming the URL and the server's own message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import httpx

from lmforge.errors import LmforgeError
from lmforge.serve.app import create_app, ServerSettings


class EndpointError(LmforgeError):
    """The chat endpoint could not be reached or answered with an error."""


@dataclass
class ChatReply:
    """The first choice of a chat completion: the assistant message (OpenAI shape), why it ended, token usage."""

    message: dict[str, Any]
    finish_reason: str | None
    usage: dict[str, int] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tool_calls(self) -> list[Any]:
        calls = self.message.get("tool_calls")
        return calls if isinstance(calls, list) else ([] if calls is None else [calls])

    @property
    def total_tokens(self) -> int:
        u = self.usage or {}
        if isinstance(u.get("total_tokens"), int):
            return u["total_tokens"]
        return int(u.get("prompt_tokens") or 0) + int(u.get("completion_tokens") or 0)


def normalize_base_url(url: str) -> str:
    """'http://host:8000' -> 'http://host:8000/v1' (the usual prefix); a URL with a path is kept as given.

    >>> normalize_base_url("http://127.0.0.1:8000"), normalize_base_url("https://api.openai.com/v1/")
    ('http://127.0.0.1:8000/v1', 'https://api.openai.com/v1')
    """
    url = url.rstrip("/")
    scheme, _, rest = url.partition("://")
    return url + "/v1" if "/" not in rest else url


class ChatClient:
    """Chat completions over HTTP (httpx). `model=None` asks the server (`GET /models`) and takes the first."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, http: httpx.Client | None = None, extra_body: dict | None = None):
        self.base_url = normalize_base_url(base_url)
        self.api_key = api_key
        self.timeout = timeout
        self._own_http = http is None
        self.http = http if http is not None else httpx.Client(timeout=timeout, trust_env=False)
        self.extra_body = dict(extra_body or {})
        self._model = model
        self._context = None  # the in-process app's lifespan, when there is one
        self._in_process = False

    # ---- constructors --------------------------------------------------------------------------------------
    @classmethod
    def in_process(cls, lm, model_name: str = "model", **settings: Any) -> "ChatClient":
        """A client for `lm` in this process, through lmforge serve's app on an in-memory transport (no socket).
        Close it (or use `with`) to stop the app's engine thread."""
        from starlette.testclient import TestClient  # starlette ships it: an httpx.Client over an ASGI portal

        app = create_app(lm, ServerSettings(model_name=model_name, **settings))
        http = TestClient(app, base_url="http://lmforge.in-process", raise_server_exceptions=False)
        client = cls("http://lmforge.in-process/v1", model=model_name, http=http)
        client._own_http, client._in_process = True, True
        client._context = http.__enter__()  # runs the app's lifespan: the engine starts
        return client

    # ---- requests ------------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        url = f"{self.base_url}{path}"
        # in process there is no network to time out (max_tokens bounds the work); starlette refuses `timeout`
        limit = {} if self._in_process else {"timeout": timeout if timeout is not None else self.timeout}
        try:
            r = self.http.request(method, url, json=body, headers=self._headers(), **limit)
        except httpx.TimeoutException:
            raise EndpointError(f"{url}: no answer within {timeout or self.timeout:g} s") from None
        except httpx.HTTPError as e:
            raise EndpointError(f"{url}: cannot connect ({type(e).__name__}: {e})") from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400:
            msg = data.get("error", {}).get("message") if isinstance(data, dict) and isinstance(
                data.get("error"), dict) else (r.text[:200] if r.text else "")
            raise EndpointError(f"{url}: HTTP {r.status_code}: {msg}")
        if not isinstance(data, dict):
            raise EndpointError(f"{url}: the answer is not a JSON object")
        return data

    @property
    def model(self) -> str:
        if self._model is None:
            data = self._request("GET", "/models")
            ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
            if not ids or not isinstance(ids[0], str):
                raise EndpointError(f"{self.base_url}/models lists no model; pass model=...")
            self._model = ids[0]
        return self._model

    def complete(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, tool_choice: Any = None,
                 max_tokens: int | None = None, temperature: float | None = 0.0, timeout: float | None = None,
                 **extra: Any) -> ChatReply:
        """One chat completion (not streamed); returns its first choice."""
        body: dict[str, Any] = {"model": self.model, "messages": list(messages), **self.extra_body, **extra}
        if tools:
            body["tools"] = list(tools)
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        if max_tokens is not None:
            body["max_tokens"] = int(max_tokens)
        if temperature is not None:
            body["temperature"] = temperature
        data = self._request("POST", "/chat/completions", body, timeout=timeout)
        return parse_reply(data, f"{self.base_url}/chat/completions")

    # ---- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._context is not None:
            ctx, self._context = self._context, None
            ctx.__exit__(None, None, None)
        elif self._own_http:
            self.http.close()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_reply(data: dict[str, Any], where: str = "endpoint") -> ChatReply:
    """The first choice of a chat-completion body. A body without a message is an `EndpointError`; odd tool
    calls inside a message are kept as they are (the loop turns them into observations)."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise EndpointError(f"{where}: the answer has no choices")
    msg = choices[0].get("message")
    if not isinstance(msg, dict):
        raise EndpointError(f"{where}: the first choice has no message")
    msg = {k: v for k, v in msg.items() if v is not None or k == "content"}
    msg["role"] = "assistant"
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return ChatReply(msg, choices[0].get("finish_reason"), usage, data)


def decode_arguments(arguments: Any) -> tuple[dict | None, str | None]:
    """(arguments as a dict, None) or (None, why not) for a call's `arguments` (a JSON string in OpenAI's format;
    some servers send the object itself).

    >>> decode_arguments('{"a": 1}'), decode_arguments('[1]')
    (({'a': 1}, None), (None, 'arguments must be a JSON object, got list'))
    """
    if arguments is None or arguments == "":
        return {}, None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            return None, f"arguments are not valid JSON: {e.msg} (char {e.pos})"
    if not isinstance(arguments, dict):
        return None, f"arguments must be a JSON object, got {type(arguments).__name__}"
    return arguments, None
