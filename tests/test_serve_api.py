"""The HTTP server against real clients: the official `openai` package (sync and async, streaming and not) and
raw HTTP for every error class. A tiny random model with a tokenizer trained here; outputs are checked against
the library (`lm.generate`, `lm.score`), which is itself checked against transformers in test_generate.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from test_serve_helpers import build_tiny_model, start_server

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("serve") / "tiny")
    srv, lm = start_server(model_dir, api_key=KEY, max_batch=8, max_queue=64, max_body_bytes=20_000,
                           max_tokens_limit=400)
    yield srv, lm
    srv.stop()


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)


def aclient(srv) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)


def engine_of(srv):
    return srv.server.config.app.state.lmforge.engine


# ---- the openai client ----------------------------------------------------------------------------------------
def test_models_and_completion_equal_the_library(server):
    srv, lm = server
    c = client(srv)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0)
    ref = lm.generate("The quick brown", max_new_tokens=12, temperature=0)
    assert r.choices[0].text == str(ref)
    assert r.choices[0].finish_reason == ref.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(lm.tokenizer.encode("The quick brown"))
    # seeded sampling: the same tokens as the library with the same seed; a list prompt gives one choice each
    r = c.completions.create(model="tiny", prompt=["Once upon", "A language"], max_tokens=10, temperature=0.9,
                             top_p=0.95, seed=123, presence_penalty=0.5, frequency_penalty=0.3, user="me")
    for choice, p in zip(r.choices, ["Once upon", "A language"]):
        assert choice.text == str(lm.generate(p, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=123,
                                              presence_penalty=0.5, frequency_penalty=0.3))
    # n choices: seeds seed, seed+1, ...
    r = c.completions.create(model="tiny", prompt="Once", max_tokens=6, temperature=1.0, n=3, seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == [str(lm.generate("Once", max_new_tokens=6, temperature=1.0, seed=s))
                                             for s in (7, 8, 9)]
    # token-id prompts are taken as they are
    ids = lm.tokenizer.encode("The quick")
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].text == str(lm.generate(ids, max_new_tokens=5, temperature=0))


def test_stop_strings_and_streaming(server):
    srv, lm = server
    c = client(srv)
    full = str(lm.generate("The quick", max_new_tokens=30, temperature=0))
    stop = full[8:11]  # a stop string somewhere in the middle of the greedy text
    r = c.completions.create(model="tiny", prompt="The quick", max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="tiny", prompt="The quick", max_tokens=30, temperature=0, stop=stop,
                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full[:full.index(stop)]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens > 0 and chunks[-1].choices == []


def test_echo_logprobs_equal_library_scores(server):
    srv, lm = server
    c = client(srv)
    r = c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=1, temperature=0, echo=True,
                             logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("The quick brown fox")
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    n_prompt = len(lm.tokenizer.encode("The quick brown fox"))
    assert len(lp.tokens) == n_prompt + 1 and "".join(lp.tokens[:n_prompt]) == "The quick brown fox"
    score = lm.score("The quick", " brown fox")
    k = len(score.token_logprobs)
    assert lp.token_logprobs[n_prompt - k:n_prompt] == pytest.approx(score.token_logprobs, abs=1e-4)
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    # greedy: the generated token is its step's most likely one
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))


def test_chat_sync_and_streaming(server):
    srv, lm = server
    c = client(srv)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == str(lm.chat(msgs, max_new_tokens=10, temperature=0))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        r.choices[0].message.content
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
    content = finals[0].choices[0].logprobs.content
    # usage counts the end-of-turn token that stopped generation; the content (and its logprobs) does not hold it
    n_stop = 1 if r.choices[0].finish_reason == "stop" else 0
    assert len(content) == r.usage.completion_tokens - n_stop and all(len(t.top_logprobs) == 2 for t in content)
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_async_client_streaming_and_not(server):
    srv, lm = server

    async def main():
        c = aclient(srv)
        r = await c.completions.create(model="tiny", prompt="Servers batch", max_tokens=8, temperature=0)
        s = await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, temperature=0, stream=True)
        parts = [ch.choices[0].delta.content or "" async for ch in s]
        await c.close()
        return r, "".join(parts)

    r, streamed = asyncio.run(main())
    assert r.choices[0].text == str(lm.generate("Servers batch", max_new_tokens=8, temperature=0))
    assert streamed == str(lm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8, temperature=0))


def test_tool_calls_and_json_mode(server):
    srv, lm = server
    c = client(srv)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                        "unit": {"enum": ["c", "f"]}}}}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                 "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}}}}]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, tools=tools, tool_choice="required",
                                  max_tokens=200, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather",
                                                                                             "get_time")
    args = json.loads(call.function.arguments)
    assert set(args) == ({"city", "unit"} if call.function.name == "get_weather" else {"tz"})
    # a named function, streamed, then the result sent back as a tool message
    stream = c.chat.completions.create(model="tiny", messages=msgs, tools=tools, max_tokens=200, temperature=0.7,
                                       seed=1, stream=True,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    chunks = list(stream)
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_time" and json.loads(calls[0].function.arguments)["tz"] in ("UTC", "CET")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
    r = c.chat.completions.create(model="tiny", messages=follow, tools=tools, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    # JSON mode and a JSON schema
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=200, temperature=0.8, seed=3,
                                  response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {
                                      "type": "object", "properties": {"ok": {"type": "boolean"},
                                                                       "unit": {"enum": ["c", "f"]}}}}})
    assert r.choices[0].finish_reason == "stop"
    assert set(json.loads(r.choices[0].message.content)) == {"ok", "unit"}
    for seed in range(3):
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=60, temperature=1.0, seed=seed,
                                      response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_embeddings(server):
    srv, lm = server
    c = client(srv)
    r = c.embeddings.create(model="tiny", input=["hello world", "the quick brown fox"])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == lm.config.n_embd
    assert sum(x * x for x in r.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    import torch

    ids = lm.tokenizer.encode("hello world")
    with torch.no_grad():
        h = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].mean(0)
    assert r.data[0].embedding == pytest.approx(torch.nn.functional.normalize(h, dim=0).tolist(), abs=1e-5)
    assert r.usage.prompt_tokens == len(ids) + len(lm.tokenizer.encode("the quick brown fox"))
    b64 = c.embeddings.create(model="tiny", input="hello world", encoding_format="base64").data[0].embedding
    import base64
    import struct

    raw = base64.b64decode(b64)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(r.data[0].embedding, abs=1e-6)


# ---- concurrency: 32 streams, some cancelled midway --------------------------------------------------------------
def test_32_parallel_streams_equal_solo_and_cancellation_frees_slots(server):
    srv, lm = server
    prompts = ["The quick", "Once upon a time", "A language model", "Servers batch requests", "It learned"]
    jobs = []
    for i in range(32):
        kw = dict(max_tokens=12 + i % 5, temperature=0) if i % 2 else dict(max_tokens=14, temperature=0.9,
                                                                              top_p=0.9, seed=i)
        jobs.append(dict(model="tiny", prompt=prompts[i % len(prompts)], **kw))
    cancel = {i for i in range(32) if i % 4 == 3}
    for i in cancel:
        jobs[i].update(max_tokens=380, temperature=0, seed=None, top_p=None)
        jobs[i]["extra_body"] = {"ignore_eos": True}
    c = client(srv)
    solo = {i: c.completions.create(**jobs[i]).choices[0].text for i in range(32) if i not in cancel}
    engine = engine_of(srv)
    steps0, tokens0, batch0 = engine.steps, engine.generated_tokens, engine.batch_size_sum

    async def one(ac, i):
        s = await ac.completions.create(stream=True, **jobs[i])
        text, n = "", 0
        async for chunk in s:
            text += chunk.choices[0].text
            n += 1
            if i in cancel and n == 3:
                await s.close()  # the client goes away mid-stream
                return None
        return text

    async def main():
        ac = aclient(srv)
        out = await asyncio.gather(*(one(ac, i) for i in range(32)))
        await ac.close()
        return out

    # Hold the engine thread until all 32 requests are queued, so the batching figure below does not depend on
    # how fast a loaded CI box delivers the HTTP requests.
    gate = threading.Event()
    held = threading.Event()
    engine.call(lambda: (held.set(), gate.wait(60)))
    assert held.wait(60)  # the engine thread is parked: nothing is admitted until the gate opens

    def release():
        deadline = time.time() + 60
        while engine.queue_depth() < 32 and time.time() < deadline:
            time.sleep(0.01)
        gate.set()

    releaser = threading.Thread(target=release)
    releaser.start()
    out = asyncio.run(main())
    releaser.join()
    assert {i: t for i, t in enumerate(out) if i not in cancel} == solo
    deadline = time.time() + 10
    while (engine.num_active() or engine.queue_depth()) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.num_active() == 0 and engine.queue_depth() == 0
    generated = engine.generated_tokens - tokens0
    finished_tokens = sum(jobs[i]["max_tokens"] for i in range(32) if i not in cancel)
    assert generated < finished_tokens + len(cancel) * 380 // 2  # the cancelled streams stopped early
    assert (engine.batch_size_sum - batch0) / (engine.steps - steps0) > 2  # requests really shared steps


def test_non_streaming_client_that_goes_away_frees_its_slot(server):
    srv, lm = server
    engine = engine_of(srv)
    tokens0 = engine.generated_tokens
    gate = threading.Event()
    engine.call(gate.wait)  # hold the engine: the request waits in the queue while its client gives up
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5,
                       json={"model": "tiny", "prompt": "The", "max_tokens": 400, "ignore_eos": True})
        deadline = time.time() + 20
        while engine.queue_depth() and time.time() < deadline:
            time.sleep(0.05)
        assert engine.queue_depth() == 0  # the server noticed the client had left and withdrew the request
    finally:
        gate.set()
    time.sleep(0.2)
    assert engine.num_active() == 0 and engine.generated_tokens == tokens0


# ---- raw HTTP: every error class -----------------------------------------------------------------------------
def post(srv, path, body=None, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=30, **kw)


def check_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if code:
        assert err["code"] == code
    return err


def test_error_statuses(server):
    srv, lm = server
    ok = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    check_error(post(srv, "/v1/completions", ok, key=None), 401, "invalid_api_key")
    check_error(post(srv, "/v1/completions", ok, key="wrong"), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
    check_error(post(srv, "/v1/completions", {**ok, "model": "gpt-9"}), 404, "model_not_found")
    check_error(httpx.get(srv.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    check_error(post(srv, "/v1/completions", {**ok, "prompt": "x" * 30_000}), 413, "request_too_large")
    r = httpx.post(srv.url + "/v1/completions", content=(b"x" * 30_000 for _ in range(1)),
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    check_error(r, 413)  # chunked upload, no content-length
    err = check_error(post(srv, "/v1/completions", {**ok, "temperature": "hot"}), 422)
    assert err["param"] == "temperature"
    check_error(post(srv, "/v1/completions", {**ok, "n": 0}), 422)
    check_error(post(srv, "/v1/completions", {"model": "tiny"}), 422)
    check_error(post(srv, "/v1/chat/completions", {"model": "tiny", "messages": []}), 422)
    check_error(httpx.post(srv.url + "/v1/completions", content=b"{oops", headers={
        "Authorization": f"Bearer {KEY}", "content-type": "application/json"}), 400, "invalid_json")
    check_error(post(srv, "/v1/completions", {**ok, "max_tokens": 401}), 400)
    check_error(post(srv, "/v1/completions", {**ok, "prompt": "word " * 1200, "max_tokens": 1}), 400,
                "context_length_exceeded")
    check_error(post(srv, "/v1/completions", {**ok, "prompt": [1, 10 ** 6]}), 400)
    check_error(post(srv, "/v1/completions", {**ok, "prompt": ""}), 400)
    check_error(post(srv, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
                400)
    check_error(post(srv, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                   "tool_choice": "required"}), 400)
    with pytest.raises(openai.BadRequestError):
        client(srv).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                            response_format={"type": "yaml"})
    # the server is still up and serving after all of that
    assert client(srv).completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_health_metrics_and_tokenizer_endpoints(server):
    srv, lm = server
    h = httpx.get(srv.url + "/health").json()  # open, no key needed
    assert h["status"] == "ok" and h["model"] == "tiny"
    check_error(httpx.get(srv.url + "/metrics"), 401)
    m = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("lmforge_requests_total", "lmforge_prompt_tokens_total", "lmforge_generation_tokens_total",
                 "lmforge_queue_depth", "lmforge_time_to_first_token_seconds_bucket",
                 "lmforge_request_latency_seconds_count"):
        assert name in m
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="200"}' in m
    tokens = post(srv, "/tokenize", {"prompt": "The quick<|endoftext|>", "add_special_tokens": False}).json()
    assert tokens["tokens"] == lm.tokenizer.encode("The quick<|endoftext|>", allowed_special="all")
    assert post(srv, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"] == "The quick<|endoftext|>"
    info = httpx.get(srv.url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == "<|endoftext|>"
    page = httpx.get(srv.url + "/")
    assert page.status_code == 200 and "<title>lmforge chat</title>" in page.text


def test_queue_full_429_and_engine_down_503(tmp_path):
    model_dir = build_tiny_model(tmp_path / "small")
    srv, lm = start_server(model_dir, max_batch=1, max_queue=1)
    try:
        engine = engine_of(srv)
        gate = threading.Event()
        engine.call(gate.wait)  # hold the engine so requests pile up in the queue
        body = {"model": "small", "prompt": "hi", "max_tokens": 3}
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", httpx.post(srv.url + "/v1/completions",
                                                                              json=body, timeout=30)))
        t.start()
        deadline = time.time() + 10
        while engine.queue_depth() < 1 and time.time() < deadline:
            time.sleep(0.02)
        check_error(httpx.post(srv.url + "/v1/completions", json=body, timeout=30), 429, "queue_full")
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).completions.create(**body)
        gate.set()
        t.join(30)
        assert first["r"].status_code == 200
        engine.shutdown()
        check_error(httpx.post(srv.url + "/v1/completions", json=body, timeout=30), 503, "engine_unavailable")
        check_error(httpx.get(srv.url + "/health"), 503)
    finally:
        srv.stop()


# ---- the command line -------------------------------------------------------------------------------------------
def test_cli_serve_binds_localhost_and_names_the_model_after_its_directory(tmp_path, capsys):
    import subprocess
    import sys

    from lmforge.cli import main

    model_dir = build_tiny_model(tmp_path / "my-model")
    assert main(["serve", str(model_dir), "--port", "70000"]) == 1
    assert "error: port must be in 1..65535, got 70000" in capsys.readouterr().err
    with socket_port() as port:
        pass
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(model_dir), "--port", str(port),
                             "--max-batch", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, models = time.time() + 60, None
        while time.time() < deadline and proc.poll() is None:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert models is not None, proc.stdout.read().decode() if proc.poll() is not None else "no answer"
        assert models["data"][0]["id"] == "my-model"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"model": "my-model", "prompt": "The quick", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(20)
    out = proc.stdout.read().decode()
    assert "http://127.0.0.1:" in out  # bound to localhost by default


def socket_port():
    """A context manager yielding a free TCP port on 127.0.0.1."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def cm():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            yield s.getsockname()[1]

    return cm()
