"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

What "OpenAI-compatible" buys: the official `openai` client, `curl`, lm-evaluation-harness and the many tools that
speak this API work against a local model unchanged — point `base_url` at `http://127.0.0.1:8000/v1`.

    POST /v1/completions         prompt (string, list of strings, token ids) -> text; echo + logprobs score prompts
    POST /v1/chat/completions    messages -> chat template -> text; tools (function calling), JSON mode
    POST /v1/embeddings          mean-pooled last hidden states, L2-normalized
    GET  /v1/models              the one served model
    GET  /health, GET /metrics   liveness; Prometheus counters, gauges and histograms
    POST /tokenize, /detokenize, GET /tokenizer_info   vLLM-style tokenizer endpoints (lm-eval's "remote" tokenizer)
    GET  /                       the chat page (static/index.html)

Streaming uses Server-Sent Events: the response is `text/event-stream`, each chunk a line `data: {json}` and a
blank line, the last one `data: [DONE]`. Tokens reach the client as soon as they are safe to show (whole UTF-8
characters, nothing that might be the start of a stop string: `lmforge.generation.stops.StopChecker`).

Where text meets ids. The engine (`engine.py`) speaks token ids; this module tokenizes prompts (chat template via
`lmforge.generation.api.chat_prompt`), detokenizes incrementally, matches stop strings and then cancels the sequence in
the engine so its KV-cache slot is freed at once. A client that disconnects (stream closed, or a non-streaming
request abandoned) cancels its sequences the same way.

Function calling. The tool schemas are shown to the model through the chat template (templates that know `tools`
get them as the `tools` variable; for others a system message lists them and asks for a JSON reply
`{"name": ..., "arguments": {...}}`). With `tool_choice="required"` or a named function the output is
*constrained* to that shape, the arguments following the tool's parameter schema (`constrain.py`), so even a
small model produces a parseable call; with `"auto"` the model's text is parsed and, if it is such a JSON object
naming a known tool, returned as `tool_calls` (finish_reason `tool_calls`). `response_format={"type":
"json_object"}` constrains the output to JSON syntax, `{"type": "json_schema", ...}` also to the schema's
structure (the subset described in `constrain.schema_machine`).

Errors are OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}` with a fitting status (400 bad
request, 401 bad API key, 404 unknown model or route, 413 body too large, 422 schema violation, 429 queue full,
503 engine down); unexpected exceptions are logged and answered with a generic 500, never a stack trace.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import json
import logging
import re
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import ConfigError, LmforgeError
from lmforge.generation.api import chat_prompt, encode_chat, end_of_turn_stops, eos_token_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.generation.stops import StopChecker
from lmforge.generation.constrain import json_constraint, tool_call_constraint
from lmforge.serve.engine import Engine, EngineBusyError, EngineStoppedError, Event

log = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).parent / "static"


# ================================================================================================================
# Settings and errors
# ================================================================================================================
@dataclass
class ServerSettings:
    """What `lmforge serve` configures (see cli/serve.py for the flags)."""

    model_name: str = "model"
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_len: int | None = None  # KV-cache slots per sequence (default: min(context window, 2048))
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON per request
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    max_n: int = 8  # the most choices per prompt
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers (browsers block other origins)
    rag: Any = None  # a lmforge.serve.rag.RagChat (--rag-index): chat answers grounded in an index, with sources


class APIError(Exception):
    """An error answered to the client as OpenAI-shaped JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


def _from_lmforge(e: LmforgeError) -> APIError:
    if isinstance(e, EngineBusyError):
        return APIError(429, str(e), "rate_limit_error", code="queue_full")
    if isinstance(e, EngineStoppedError):
        return APIError(503, str(e), "server_error", code="engine_unavailable")
    return APIError(400, str(e))


# ================================================================================================================
# Request bodies (pydantic: a wrong type is a 422 naming the field)
# ================================================================================================================
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (logit_bias, ...) are accepted and ignored

    model: str
    max_tokens: StrictInt | None = Field(None, ge=0)  # strict: `true` is not 1 token
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extensions (vLLM names)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    ignore_eos: bool = False


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


# ================================================================================================================
# Prometheus metrics (text exposition format 0.0.4, written by hand: a few counters and histograms)
# ================================================================================================================
class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def render(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(self.LATENCY_BUCKETS)
        self.latency = Histogram(self.LATENCY_BUCKETS)

    def render(self, engine: Engine) -> str:
        out = ["# HELP lmforge_requests_total HTTP requests by endpoint and status code.",
               "# TYPE lmforge_requests_total counter"]
        for (path, status), n in sorted(self.requests.items()):
            out.append(f'lmforge_requests_total{{endpoint="{path}",status="{status}"}} {n}')
        out += ["# HELP lmforge_prompt_tokens_total Prompt tokens processed.",
                "# TYPE lmforge_prompt_tokens_total counter", f"lmforge_prompt_tokens_total {self.prompt_tokens}",
                "# HELP lmforge_generation_tokens_total Tokens generated.",
                "# TYPE lmforge_generation_tokens_total counter",
                f"lmforge_generation_tokens_total {self.completion_tokens}",
                "# HELP lmforge_queue_depth Requests waiting for a batch slot.", "# TYPE lmforge_queue_depth gauge",
                f"lmforge_queue_depth {engine.queue_depth()}",
                "# HELP lmforge_running_requests Sequences in the running batch.",
                "# TYPE lmforge_running_requests gauge", f"lmforge_running_requests {engine.num_active()}",
                "# HELP lmforge_decode_steps_total Batched decode forwards run by the engine.",
                "# TYPE lmforge_decode_steps_total counter", f"lmforge_decode_steps_total {engine.steps}",
                "# HELP lmforge_time_to_first_token_seconds Time from request arrival to its first token.",
                "# TYPE lmforge_time_to_first_token_seconds histogram",
                *self.ttft.render("lmforge_time_to_first_token_seconds"),
                "# HELP lmforge_request_latency_seconds Time from request arrival to its last token.",
                "# TYPE lmforge_request_latency_seconds histogram",
                *self.latency.render("lmforge_request_latency_seconds")]
        return "\n".join(out) + "\n"


# ================================================================================================================
# ASGI middleware: request-size limit, API key, request counting (pure ASGI, so streaming and disconnects work)
# ================================================================================================================
_OPEN_PATHS = ("/", "/health", "/static")


def _error_body(status: int, message: str, type: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


class GuardMiddleware:
    def __init__(self, app, settings: ServerSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def _reply(self, send, status: int, message: str, type: str, code: str | None) -> None:
        body = _error_body(status, message, type, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status_box = [0]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            key = self.settings.api_key
            if key and scope["method"] != "OPTIONS" and not (path == "/" or path.startswith(_OPEN_PATHS[1:])):
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(given.encode(), key.encode()):
                    return await self._reply(send_wrapper, 401, "Incorrect or missing API key: send the header "
                                             "'Authorization: Bearer <key>'", "invalid_request_error",
                                             "invalid_api_key")
            limit = self.settings.max_body_bytes
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await self._reply(send_wrapper, 413, f"request body of {int(length)} bytes exceeds the limit "
                                         f"of {limit} bytes", "invalid_request_error", "request_too_large")
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                # chunked upload (no content-length): read it here, up to the limit, then replay it to the app
                chunks, total, more = [], 0, True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away while uploading
                    chunks.append(message.get("body", b""))
                    total += len(chunks[-1])
                    if total > limit:
                        return await self._reply(send_wrapper, 413, f"request body exceeds the limit of {limit} "
                                                 "bytes", "invalid_request_error", "request_too_large")
                    more = message.get("more_body", False)
                replayed = False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                    return await receive()

                return await self.app(scope, replay, send_wrapper)
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = path if path.startswith(("/v1/", "/health", "/metrics", "/tokeniz", "/detokenize")) \
                else "other"
            k = (endpoint, status_box[0])
            self.metrics.requests[k] = self.metrics.requests.get(k, 0) + 1


# ================================================================================================================
# The server state and helpers
# ================================================================================================================
class ServerState:
    """Everything a request handler needs: the model, tokenizer, engine, settings and metrics."""

    def __init__(self, lm, settings: ServerSettings):
        self.lm, self.tok, self.settings = lm, lm.tokenizer, settings
        self.metrics = Metrics()
        self.eos_ids = eos_token_ids(lm)
        self.engine = Engine(lm.model, max_batch=settings.max_batch, max_len=settings.max_len,
                             max_queue=settings.max_queue, eos_token_ids=self.eos_ids)
        self.context = self.engine.max_len
        self.created = int(time.time())
        self._token_bytes: list[bytes] | None = None
        self._token_str: dict[int, str] = {}
        self._pump: EventPump | None = None

    def pump(self, loop: asyncio.AbstractEventLoop) -> "EventPump":
        """The event pump into `loop` (one per server; a new one if the app now runs on another loop)."""
        if self._pump is None or self._pump.loop is not loop:
            self._pump = EventPump(loop)
        return self._pump

    # ---- tokenizer helpers ---------------------------------------------------------------------------------
    def encode_text(self, text: str, add_bos: bool) -> list[int]:
        ids = list(self.tok.encode(text, allowed_special="all"))
        bos = getattr(self.tok, "bos_token_id", None)
        if add_bos and getattr(self.tok, "add_bos_token", False) and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def token_str(self, token_id: int) -> str:
        s = self._token_str.get(token_id)
        if s is None:
            s = self._token_str[token_id] = self.tok.decode([token_id])
        return s

    def token_bytes(self) -> list[bytes]:
        """bytes of every id (b"" for special tokens: a constraint never lets them through)."""
        if self._token_bytes is None:  # what each id adds after other text (SentencePiece keeps its space)
            from lmforge.generation.constrain import vocabulary_bytes

            self._token_bytes = vocabulary_bytes(self.tok, self.lm.model.config.vocab_size)
        return self._token_bytes

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", param="model", code="model_not_found")

    def sampling(self, body: _Common, max_tokens: int, seed: int | None, logprobs: bool, top_logprobs: int,
                 stop_token_ids: list[int] = ()) -> SamplingParams:
        gc = self.lm.generation_config
        temperature = body.temperature if body.temperature is not None else (gc.temperature if gc else 1.0)
        try:
            return SamplingParams(
                max_new_tokens=max_tokens, temperature=temperature,
                top_k=body.top_k if body.top_k is not None else gc.top_k,
                top_p=body.top_p if body.top_p is not None else gc.top_p,
                min_p=body.min_p if body.min_p is not None else gc.min_p,
                repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None
                else gc.repetition_penalty,
                frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                stop_token_ids=list(stop_token_ids), seed=seed, logprobs=logprobs, top_logprobs=top_logprobs,
                ignore_eos=body.ignore_eos)
        except LmforgeError as e:
            raise APIError(400, str(e)) from None

    def max_tokens(self, requested: int | None, prompt_len: int, default: int | None) -> int:
        room = self.context - prompt_len
        if room <= 0:
            raise APIError(400, f"prompt is {prompt_len} tokens but the context window is {self.context} tokens",
                           param="prompt", code="context_length_exceeded")
        if requested is None:
            return min(room, self.settings.max_tokens_limit) if default is None else min(default, room)
        if requested > self.settings.max_tokens_limit:
            raise APIError(400, f"max_tokens={requested} exceeds this server's limit of "
                                f"{self.settings.max_tokens_limit}", param="max_tokens")
        if requested > room:
            raise APIError(400, f"prompt of {prompt_len} tokens + max_tokens={requested} exceeds the context "
                                f"window of {self.context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return requested


class EventPump:
    """Carries engine events from the engine thread into the event loop, one wake-up per burst.

    `loop.call_soon_threadsafe` costs a write to the loop's self-pipe and one trip round the loop per call; at 16
    streams that was 16 wake-ups per decode step, each taking the GIL from the engine thread in the middle of its
    next forward. The engine hands over a step's events back to back (`Engine._flush_events`): the first one
    schedules a drain, the others join the queue, and the loop then handles them all in one go.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: collections.deque = collections.deque()  # (callback, item); append/popleft are atomic
        self.scheduled = False
        self.lock = threading.Lock()

    def post(self, callback, item) -> None:
        """Engine thread: run `callback(item)` on the loop soon. Raises RuntimeError if the loop is closed."""
        self.pending.append((callback, item))
        with self.lock:
            if self.scheduled:  # a drain is on its way and will find this item
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self.lock:
                self.scheduled = False
            raise

    def _drain(self) -> None:
        with self.lock:  # first: an item posted from now on schedules another drain (at worst an empty one)
            self.scheduled = False
        while self.pending:
            callback, item = self.pending.popleft()
            try:
                callback(item)
            except Exception:  # one broken consumer must not strand the others' events
                log.exception("event consumer failed")


@dataclass
class Job:
    """One sequence to generate: the ids, its controls, and how its text is built."""

    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    constraint: Any = None
    prompt_logprobs: int | None = None


class ChoiceState:
    """The text of one choice, built incrementally from the engine's token events."""

    def __init__(self, state: ServerState, job: Job):
        self.state, self.job = state, job
        self.checker = StopChecker(state.tok, job.stop, (), context_ids=job.prompt_ids)
        self.seq = None
        self.finish_reason: str | None = None
        self.n_generated = 0
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.prompt_logprobs: list | None = None
        self.first_token_at: float | None = None

    def on_event(self, ev: Event) -> str:
        """Apply one engine event; return the text delta it makes safe to show."""
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
            return ""
        if self.finish_reason is not None:
            return ""
        if ev.token_id is not None:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.n_generated += 1
            delta = self.checker.push(ev.token_id)
            self.tokens.append(ev.token_id)
            if ev.logprob is not None:
                self.logprobs.append(ev.logprob)
                self.top.append(ev.top_logprobs or [])
            if self.checker.finished:  # a stop string: done, and the engine should drop the sequence now
                self.finish_reason = "stop"
                self._trim_tokens()
                if self.seq is not None:
                    self.state.engine.cancel(self.seq)
            return delta
        if ev.finish_reason is not None:
            if ev.finish_reason == "error":
                raise APIError(503, ev.error or "the engine failed", "server_error", code="engine_error")
            reason = "stop" if ev.finish_reason == "stop" else "length"
            if self.seq is not None:  # every token the engine produced, the EOS that ended it included
                self.n_generated = len(self.seq.output_ids)
            delta = self.checker.flush(reason)
            self.finish_reason = self.checker.finish_reason or reason
            if self.finish_reason == "stop":
                self._trim_tokens()
            return delta
        return ""

    def _trim_tokens(self) -> None:
        """A stop string can end inside the last tokens: keep the tokens that start before the text ends."""
        n, pos, text_len = 0, 0, len(self.checker.text)
        for t in self.tokens:
            if pos >= text_len and n:
                break
            pos += len(self.state.token_str(t))
            n += 1
        if text_len == 0:
            n = 0
        self.tokens, self.logprobs, self.top = self.tokens[:n], self.logprobs[:n], self.top[:n]

    @property
    def text(self) -> str:
        return self.checker.text


class Generation:
    """Runs a set of jobs on the engine and yields (choice index, text delta) as tokens arrive."""

    def __init__(self, state: ServerState, jobs: list[Job], request: Request | None):
        self.state, self.jobs, self.request = state, jobs, request
        self.choices = [ChoiceState(state, j) for j in jobs]
        self.events_in: collections.deque[tuple[int, Event]] = collections.deque()  # filled on the loop thread
        self.waiter: asyncio.Future | None = None  # set while `events` sleeps on an empty queue
        self.started = time.perf_counter()

    def _push(self, item: tuple[int, Event]) -> None:
        """Loop thread (from the pump): queue one engine event and wake `events` if it sleeps."""
        self.events_in.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def submit(self) -> None:
        pump = self.state.pump(asyncio.get_running_loop())
        engine = self.state.engine
        try:
            for i, (job, choice) in enumerate(zip(self.jobs, self.choices)):
                def on_event(ev: Event, i=i) -> None:  # engine thread
                    pump.post(self._push, (i, ev))

                choice.seq = engine.submit(job.prompt_ids, job.params, on_event, job.constraint,
                                           job.prompt_logprobs)
        except LmforgeError as e:
            self.cancel()
            raise _from_lmforge(e) from None

    def cancel(self) -> None:
        for c in self.choices:
            if c.seq is not None and not c.seq.finished:
                self.state.engine.cancel(c.seq)

    async def events(self) -> AsyncIterator[tuple[int, str, bool]]:
        """(choice, delta, finished) until every choice is finished; cancels whatever is left on exit."""
        left = len(self.choices)
        next_check = time.perf_counter() + 0.5
        loop = asyncio.get_running_loop()
        try:
            while left:
                if self.request is not None and time.perf_counter() >= next_check:
                    next_check = time.perf_counter() + 0.5  # a non-streaming client may have gone away
                    if await self.request.is_disconnected():
                        return
                if not self.events_in:  # sleep until the pump brings events (or half a second passes)
                    self.waiter = loop.create_future()
                    try:
                        await asyncio.wait_for(self.waiter, timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    finally:
                        self.waiter = None
                i, ev = self.events_in.popleft()
                c = self.choices[i]
                was_done = c.finish_reason is not None
                delta = c.on_event(ev)
                if c.finish_reason is not None and not was_done:
                    yield i, delta, True
                elif delta:
                    yield i, delta, False
                if ev.finish_reason is not None:
                    left -= 1
        finally:
            self.cancel()
            self._record()

    def _record(self) -> None:
        m = self.state.metrics
        now = time.perf_counter()
        for c in self.choices:
            if c.first_token_at is not None:
                m.ttft.observe(c.first_token_at - self.started)
        m.latency.observe(now - self.started)
        m.prompt_tokens += self.prompt_tokens()
        m.completion_tokens += self.completion_tokens()

    def prompt_tokens(self) -> int:
        seen, n = set(), 0
        for j in self.jobs:  # n choices of one prompt count its tokens once
            key = id(j.prompt_ids)
            if key not in seen:
                seen.add(key)
                n += len(j.prompt_ids)
        return n

    def completion_tokens(self) -> int:
        return sum(c.n_generated for c in self.choices)

    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens(), self.completion_tokens()
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


# ================================================================================================================
# Completions
# ================================================================================================================
def _completion_prompts(state: ServerState, prompt) -> list[tuple[list[int], bool]]:
    """Normalize OpenAI's four prompt forms to token lists; the flag says whether BOS was added by us."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    out = []
    tok = state.tok
    bos = getattr(tok, "bos_token_id", None)
    for p in prompt:
        if isinstance(p, str):
            try:
                ids = list(tok.encode(p, allowed_special="all"))
            except LmforgeError as e:
                raise APIError(400, str(e), param="prompt") from None
            added = bool(getattr(tok, "add_bos_token", False)) and bos is not None and ids[:1] != [bos]
            if added:
                ids = [bos] + ids
            if not ids:
                raise APIError(400, "prompt is empty: give at least one token", param="prompt")
            out.append((ids, added))
        else:
            if not p:
                raise APIError(400, "prompt is empty: give at least one token", param="prompt")
            out.append((list(p), False))
    return out


def _completion_logprobs(state: ServerState, c: ChoiceState, echo_ids: list[int] | None) -> dict[str, list]:
    """The completions API's logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, top_logprobs = [], [], []
    if echo_ids is not None:
        plp = c.prompt_logprobs or []
        skip = len(c.job.prompt_ids) - len(echo_ids)  # a BOS we added is conditioned on but not echoed
        for j, t in enumerate(echo_ids):
            tokens.append(state.token_str(t))
            entry = plp[j + skip] if j + skip < len(plp) else None
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                token_logprobs.append(entry[0])
                top_logprobs.append({state.token_str(i): lp for i, lp in entry[1]})
    for t, lp, top in zip(c.tokens, c.logprobs, c.top):
        tokens.append(state.token_str(t))
        token_logprobs.append(lp)
        top_logprobs.append({state.token_str(i): v for i, v in top})
    offsets, pos = [], 0
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


async def create_completion(state: ServerState, body: CompletionRequest, request: Request):
    state.check_model(body.model)
    if body.n > state.settings.max_n:
        raise APIError(400, f"n={body.n} exceeds this server's limit of {state.settings.max_n}", param="n")
    prompts = _completion_prompts(state, body.prompt)
    gc = state.lm.generation_config  # the model's defaults (generation_config.json) apply unless the request says
    stop = _stop_list(body.stop) if body.stop is not None else list(gc.stop or [])
    want_lp = body.logprobs is not None
    jobs, echo_info = [], []
    for ids, added_bos in prompts:
        max_tokens = state.max_tokens(body.max_tokens, len(ids), default=16)
        for k in range(body.n):
            seed = body.seed + k if body.seed is not None else None
            params = state.sampling(body, max_tokens, seed, want_lp, body.logprobs or 0,
                                    stop_token_ids=list(gc.stop_token_ids or []))
            jobs.append(Job(ids, params, stop, prompt_logprobs=(body.logprobs or 0) if (body.echo and want_lp)
                            else None))
            echo_info.append(ids[1:] if added_bos else ids)
    gen = Generation(state, jobs, request)
    gen.submit()
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def echo_prefix(i: int) -> str:
        return state.tok.decode(echo_info[i]) if body.echo else ""

    def choice_logprobs(i: int):
        if not want_lp:
            return None
        c = gen.choices[i]
        return _completion_logprobs(state, c, echo_info[i] if body.echo else None)

    if body.stream:
        async def stream():
            sent_echo = set()
            async for i, delta, finished in gen.events():
                c = gen.choices[i]
                text = delta
                if body.echo and i not in sent_echo:
                    sent_echo.add(i)
                    text = echo_prefix(i) + text
                chunk = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                         "choices": [{"index": i, "text": text, "logprobs": None,
                                      "finish_reason": c.finish_reason if finished else None}]}
                if finished and want_lp:
                    chunk["choices"][0]["logprobs"] = choice_logprobs(i)
                if include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
            if include_usage:
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                            "choices": [], "usage": gen.usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async for _ in gen.events():
        pass
    if any(c.finish_reason is None for c in gen.choices):  # the client went away
        raise APIError(499, "client closed the request", code="client_closed")
    choices = [{"index": i, "text": echo_prefix(i) + c.text, "logprobs": choice_logprobs(i),
                "finish_reason": c.finish_reason} for i, c in enumerate(gen.choices)]
    return {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
            "usage": gen.usage()}


# ================================================================================================================
# Chat completions, tools, JSON mode
# ================================================================================================================
TOOL_SYSTEM_PROMPT = (
    "You can call these functions:\n{tools}\n"
    'To call a function, reply with only a JSON object: {{"name": "<function name>", "arguments": {{...}}}}.')


def _normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI message shapes -> what chat templates expect: content parts joined, tool calls as JSON text."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param="messages")
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                parts.append(str(part.get("text", "")))
            m["content"] = "".join(parts)
        if m.get("role") == "assistant" and m.get("tool_calls") and not m.get("content"):
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function", {}) if isinstance(c, dict) else {}
                args = fn.get("arguments", "{}")
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError:
                    pass
                calls.append({"name": fn.get("name"), "arguments": args})
            m["content"] = json.dumps(calls[0] if len(calls) == 1 else calls)
        out.append(m)
    return out


def tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                chat_template: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, template_tools): how tool schemas reach the model. A template that reads `tools` gets them as
    that variable; otherwise a system message lists them (TOOL_SYSTEM_PROMPT). Shared with the agents' tool-use
    fine-tuning data (lmforge.recipes.tool_sft), so a model is trained on exactly the prompt it is served."""
    if chat_template and "tools" in chat_template:
        return messages, tools
    messages = list(messages)
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    note = TOOL_SYSTEM_PROMPT.format(tools=listing)
    if messages and messages[0].get("role") == "system":
        messages[0] = {**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{note}"}
    else:
        messages.insert(0, {"role": "system", "content": note})
    return messages, None


def _tool_names(tools: list[dict[str, Any]]) -> list[str]:
    """The function names of an OpenAI `tools` list (checked)."""
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", fn["name"]):
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                "'parameters': {...}}}} with a name of letters, digits, _ . -", param="tools")
        names.append(fn["name"])
    return names


def parse_tool_call(text: str, names: list[str]) -> dict[str, Any] | None:
    """The tool call in a model's reply, or None: a JSON object {"name": <known tool>, "arguments": {...}},
    alone or inside <tool_call> tags or a ```json fence.

    >>> parse_tool_call('{"name": "add", "arguments": {"a": 1}}', ["add"])
    {'name': 'add', 'arguments': {'a': 1}}
    """
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"], "arguments": args}


def _chat_logprobs(state: ServerState, c: ChoiceState):
    content = []
    for t, lp, top in zip(c.tokens, c.logprobs, c.top):
        s = state.token_str(t)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
                        "top_logprobs": [{"token": state.token_str(i), "logprob": v,
                                          "bytes": list(state.token_str(i).encode("utf-8"))} for i, v in top]})
    return {"content": content}


async def create_chat_completion(state: ServerState, body: ChatRequest, request: Request):
    state.check_model(body.model)
    if body.n > state.settings.max_n:
        raise APIError(400, f"n={body.n} exceeds this server's limit of {state.settings.max_n}", param="n")
    lm = state.lm
    messages = _normalize_messages(body.messages)
    tools = body.tools or None
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    names = _tool_names(tools) if tools else []
    forced: list[str] | None = None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        forced = [name]
    elif choice == "required":
        if not names:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        forced = names
    elif choice not in ("auto", "none"):
        raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or a function, got {choice!r}",
                       param="tool_choice")
    use_tools = bool(names) and choice != "none"
    template_tools = None
    if use_tools:
        messages, template_tools = tool_prompt(messages, tools, lm.chat_template)
    try:
        text = chat_prompt(lm, messages, tools=template_tools)
        gc = lm.generation_config
        stop, stop_ids = end_of_turn_stops(lm, _stop_list(body.stop) or gc.stop or [], gc.stop_token_ids or [])
        prompt_ids = encode_chat(lm, text)
    except LmforgeError as e:
        raise APIError(400, str(e), param="messages") from None
    if not prompt_ids:
        raise APIError(400, "the rendered chat prompt is empty", param="messages")

    rf = body.response_format or {}
    rf_type = rf.get("type", "text") if isinstance(rf, dict) else None
    if rf_type not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"response_format type must be text, json_object or json_schema, got {rf_type!r}",
                       param="response_format")

    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in tools} if tools else {}
    rf_schema = None
    if rf_type == "json_schema":
        js = rf.get("json_schema")
        rf_schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(rf_schema, dict):
            raise APIError(400, "response_format json_schema needs json_schema.schema (an object)",
                           param="response_format")

    def constraint():
        if forced:
            return tool_call_constraint(state.token_bytes(), {n: schemas[n] for n in forced})
        if rf_type in ("json_object", "json_schema"):
            return json_constraint(state.token_bytes(), rf_schema)
        return None

    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = state.max_tokens(requested, len(prompt_ids), default=None)
    jobs = []
    for k in range(body.n):
        seed = body.seed + k if body.seed is not None else None
        params = state.sampling(body, max_tokens, seed, body.logprobs, body.top_logprobs or 0,
                                stop_token_ids=stop_ids)
        jobs.append(Job(prompt_ids, params, stop, constraint=constraint()))
    gen = Generation(state, jobs, request)
    gen.submit()
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    buffer_text = use_tools  # a tool call is only known once the whole reply is there

    def final_message(c: ChoiceState) -> tuple[dict[str, Any], str]:
        call = parse_tool_call(c.text, names) if use_tools else None
        if call is not None:
            tc = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                  "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
            return {"role": "assistant", "content": None, "tool_calls": [tc]}, "tool_calls"
        return {"role": "assistant", "content": c.text}, c.finish_reason or "length"

    def chunk(i: int, delta: dict, finish: str | None, logprobs=None) -> dict:
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
               "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        return out

    if body.stream:
        async def stream():
            for i in range(len(jobs)):
                yield _sse(chunk(i, {"role": "assistant", "content": ""}, None))
            async for i, delta, finished in gen.events():
                c = gen.choices[i]
                if delta and not buffer_text:
                    yield _sse(chunk(i, {"content": delta}, None))
                if finished:
                    msg, reason = final_message(c)
                    if buffer_text:
                        if msg.get("tool_calls"):
                            tcs = [{"index": 0, **tc} for tc in msg["tool_calls"]]
                            yield _sse(chunk(i, {"tool_calls": tcs}, None))
                        elif msg["content"]:
                            yield _sse(chunk(i, {"content": msg["content"]}, None))
                    yield _sse(chunk(i, {}, reason, _chat_logprobs(state, c) if body.logprobs else None))
            if include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                            "choices": [], "usage": gen.usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async for _ in gen.events():
        pass
    if any(c.finish_reason is None for c in gen.choices):
        raise APIError(499, "client closed the request", code="client_closed")
    choices = []
    for i, c in enumerate(gen.choices):
        msg, reason = final_message(c)
        choices.append({"index": i, "message": msg, "logprobs": _chat_logprobs(state, c) if body.logprobs else None,
                        "finish_reason": reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": body.model, "choices": choices,
            "usage": gen.usage()}


# ================================================================================================================
# Embeddings
# ================================================================================================================
def embed(model: torch.nn.Module, ids_list: list[list[int]]) -> list[list[float]]:
    """Mean of the last hidden state (after the final norm) over each input's tokens, L2-normalized."""
    out = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for ids in ids_list:
            x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
            h = model(x, output_hidden_states=True).hidden_states[-1][0].float()  # (T, C)
            v = torch.nn.functional.normalize(h.mean(dim=0), dim=0)  # (C,)
            out.append(v.tolist())
    return out


async def create_embeddings(state: ServerState, body: EmbeddingRequest):
    state.check_model(body.model)
    inputs = body.input
    if isinstance(inputs, str):
        inputs = [inputs]
    elif inputs and all(isinstance(t, int) for t in inputs):
        inputs = [inputs]
    if not inputs:
        raise APIError(400, "input is empty", param="input")
    ids_list = []
    for x in inputs:
        try:
            ids = state.encode_text(x, add_bos=True) if isinstance(x, str) else list(x)
        except LmforgeError as e:
            raise APIError(400, str(e), param="input") from None
        if not ids:
            raise APIError(400, "input is empty: give at least one token", param="input")
        if len(ids) > state.context:
            raise APIError(400, f"input of {len(ids)} tokens exceeds the context window of {state.context}",
                           param="input", code="context_length_exceeded")
        if any(not 0 <= t < state.lm.model.config.vocab_size for t in ids):
            raise APIError(400, "input holds a token id outside the vocabulary", param="input")
        ids_list.append(ids)
    try:
        vectors = await asyncio.wrap_future(state.engine.call(lambda: embed(state.lm.model, ids_list)))
    except LmforgeError as e:
        raise _from_lmforge(e) from None
    data = []
    for i, v in enumerate(vectors):
        emb: Any = v
        if body.encoding_format == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(i) for i in ids_list)
    state.metrics.prompt_tokens += n
    return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n, "total_tokens": n}}


# ================================================================================================================
# The app
# ================================================================================================================
def create_app(lm, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `lm`. The engine starts with the app (lifespan) and stops with it."""
    from contextlib import asynccontextmanager

    settings = settings or ServerSettings()
    if getattr(lm, "is_encoder", False):
        raise ConfigError("an encoder has no decode engine; serve it with lmforge.serve.server.build_app "
                          "(/v1/embeddings)")
    state = ServerState(lm, settings)

    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        try:
            yield
        finally:
            state.engine.shutdown()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "request body is not valid JSON", code="invalid_json").response()
        msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return APIError(422, msg, param=".".join(loc) or None, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return APIError(e.status_code, msg, code=code).response()

    @app.exception_handler(LmforgeError)
    async def _lmforge(request, e: LmforgeError):
        return _from_lmforge(e).response()

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error (logged on the server)", "server_error").response()

    @app.get("/health")
    async def health():
        if not state.engine.running:
            raise APIError(503, state.engine.error or "the engine is not running", "server_error",
                           code="engine_unavailable")
        return {"status": "ok", "model": settings.model_name, "running": state.engine.num_active(),
                "waiting": state.engine.queue_depth()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": state.created,
                                            "owned_by": "lmforge", "max_model_len": state.context}]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        state.check_model(name)
        return {"id": name, "object": "model", "created": state.created, "owned_by": "lmforge"}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if settings.rag is not None:
            return await settings.rag.chat(state, body, request)
        return await create_chat_completion(state, body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return await create_embeddings(state, body)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = state.tok
        return {"eos_token": getattr(tok, "eos_token", None), "bos_token": getattr(tok, "bos_token", None),
                "pad_token": getattr(tok, "pad_token", None), "chat_template": lm.chat_template,
                "model_max_length": state.context, "add_bos_token": bool(getattr(tok, "add_bos_token", False))}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        try:
            ids = state.encode_text(body.prompt, add_bos=body.add_special_tokens)
        except LmforgeError as e:
            raise APIError(400, str(e), param="prompt") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": state.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        try:
            return {"prompt": state.tok.decode(body.tokens)}
        except LmforgeError as e:
            raise APIError(400, str(e), param="tokens") from None

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str):
        path = STATIC / name
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith(".") or not path.is_file():
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(path)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(GuardMiddleware, settings=settings, metrics=state.metrics)
    return app
