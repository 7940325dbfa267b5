"""Retrieval-grounded chat for `lmforge serve MODEL --rag-index DIR`.

Each `POST /v1/chat/completions` is answered the way `lmforge rag ask` answers (`lmforge.rag.answer.Answerer`,
imported, not copied): retrieve the top k chunks for the last user message (hybrid retriever: dense + BM25 fused
by reciprocal rank), refuse without generating when the best score is below `--rag-min-score` (or nothing is
found), otherwise put the chunks in the prompt as numbered sources [1], [2], ... (`answer.build_messages`), generate
with the served model through the ordinary chat path (the engine batches these requests like any other), and check
the citations: a [n] that names no source is removed from the reply.

The response is an ordinary chat completion plus two top-level fields, which OpenAI clients keep as extras
(`response.model_extra` / `response.sources` in the official `openai` package):

    "sources": [{"n", "source", "start", "end", "page", "score", "text", "doc_id", "chunk"}, ...]   # [n] = sources[n-1]
    "rag": {"refused": bool, "citations": [n, ...], "dropped": [n, ...]}

Earlier turns of the conversation are kept between the grounding system prompt and the grounded question; a
client's own system message is replaced by the grounding one. Streaming requests are answered as a stream, but
with the whole checked reply in one content chunk (a citation can only be checked once the reply is complete);
the last chunk carries `sources` and `rag`. `n` > 1 and `tools` are refused with a 400.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from lmforge.errors import ConfigError
from lmforge.rag.answer import Answer, Answerer
from lmforge.rag.index import open_index
from lmforge.rag.store import Hit
from lmforge.serve.app import APIError, ChatRequest, ServerState, create_chat_completion


class _SerialRetriever:
    """One retrieval at a time: the store's database connection and the lazily built BM25 index are shared."""

    def __init__(self, retriever):
        self.retriever, self.lock = retriever, threading.Lock()

    def retrieve(self, query: str, k: int = 5, filter: dict | None = None) -> list[Hit]:
        with self.lock:
            return self.retriever.retrieve(query, k=k, filter=filter)


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of an OpenAI content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


class RagChat:
    """Grounded answers for the chat endpoint over one index (see the module docstring)."""

    def __init__(self, retriever, location: str, k: int = 4, min_score: float | None = None):
        if int(k) < 1:
            raise ConfigError(f"--rag-k must be >= 1, got {k}")
        self.retriever, self.location = _SerialRetriever(retriever), str(location)
        self.k, self.min_score = int(k), min_score
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def open(cls, location: str, k: int = 4, min_score: float | None = None, embedder: str | None = None,
             api_key: str | None = None) -> "RagChat":
        """Open the index (a directory made by `lmforge rag index`, or a postgres:// URL) with its own embedder, or
        with `embedder` when given (a different one than the index was built with is a one-line ConfigError), and
        run one retrieval so that a broken index or embedder fails now rather than on the first request."""
        ix = open_index(location, embedder=embedder, api_key=api_key)
        chat = cls(ix.retriever("hybrid"), location, k=k, min_score=min_score)
        chat.retriever.retrieve("warm up", k=1)  # loads the embedder and builds the BM25 index
        return chat

    def __repr__(self) -> str:
        return f"RagChat({self.location!r}, k={self.k}, min_score={self.min_score})"

    def _executor(self, state: ServerState) -> ThreadPoolExecutor:
        # Answerer.ask blocks while the engine generates: one thread per request that can be in the engine at once
        if self._pool is None:
            self._pool = ThreadPoolExecutor(state.settings.max_batch + state.settings.max_queue,
                                            thread_name_prefix="lmforge-rag")
        return self._pool

    async def chat(self, state: ServerState, body: ChatRequest, request: Request):
        if body.n != 1:
            raise APIError(400, f"n={body.n}: a grounded (--rag-index) server answers with one choice", param="n")
        if body.tools:
            raise APIError(400, "tools are not available on a grounded (--rag-index) server", param="tools")
        turns = [m for m in body.messages if isinstance(m, dict) and m.get("role") != "system"]
        last = max((i for i, m in enumerate(turns) if m.get("role") == "user"), default=None)
        if last is None:
            raise APIError(400, "a grounded chat needs a user message to retrieve for", param="messages")
        question = _text(turns[last].get("content"))
        history = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in turns[:last]]
        loop = asyncio.get_running_loop()
        inner: dict[str, Any] = {}

        class EngineGenerator:  # Answerer's generator: the served model through the ordinary chat path
            def complete(self, messages: list[dict]) -> str:
                msgs = messages[:1] + history + messages[1:]  # grounding system prompt, earlier turns, question
                req = body.model_copy(update={"messages": msgs, "stream": False, "stream_options": None})
                fut = asyncio.run_coroutine_threadsafe(create_chat_completion(state, req, request), loop)
                inner["response"] = fut.result()
                return str(inner["response"]["choices"][0]["message"]["content"] or "").strip()

        answerer = Answerer(self.retriever, EngineGenerator(), k=self.k, min_score=self.min_score)
        answer = await loop.run_in_executor(self._executor(state), answerer.ask, question)
        response = self._response(body, answer, inner.get("response"))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(response, include_usage), media_type="text/event-stream")
        return response

    @staticmethod
    def _response(body: ChatRequest, answer: Answer, generated: dict | None) -> dict:
        """The engine's chat completion (or, for a refusal, an empty one) with the checked text and the sources."""
        resp = generated or {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model, "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "choices": [{"index": 0, "message": {"role": "assistant"}, "logprobs": None, "finish_reason": "stop"}]}
        resp["choices"][0]["message"]["content"] = answer.text
        d = answer.to_dict()
        resp["sources"] = d["sources"]
        resp["rag"] = {"refused": answer.refused, "citations": sorted(answer.citations), "dropped": answer.dropped}
        return resp


async def _stream(resp: dict, include_usage: bool):
    """The finished response as chat.completion.chunk events: role, the whole content, then the finish chunk that
    carries `sources` and `rag`."""
    choice = resp["choices"][0]
    head = {"id": resp["id"], "object": "chat.completion.chunk", "created": resp["created"], "model": resp["model"]}
    if include_usage:
        head["usage"] = None

    def event(delta: dict, finish: str | None = None, logprobs=None, **extra) -> str:
        chunk = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                 **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    if choice["message"]["content"]:
        yield event({"content": choice["message"]["content"]})
    yield event({}, choice["finish_reason"], choice.get("logprobs"), sources=resp["sources"], rag=resp["rag"])
    if include_usage:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': resp['usage']}, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"
