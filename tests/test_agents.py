"""The agent loop and its tools against a scripted endpoint: message format (checked with the `openai` package's
types), parallel calls, errors as observations, the JSONL trace, schemas from typed functions, the calculator
against Python's own arithmetic, the file tools, RAG search (the real lmforge.rag store and a retriever of our
own), allow-listed fetch against a server on 127.0.0.1, and the CLI."""

from __future__ import annotations

import json
import math
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, Optional

import pytest

from lmforge.agents import (Agent, Budget, Toolbox, calculate, calculator_tool, fetch_tool, file_tools, format_event,
                            function_tool, run_agent, search_tool, time_tool, tool, tools_from_spec, ToolError)
from lmforge.errors import ConfigError
from test_agents_helpers import ScriptedModel, call, check_openai_conversation


# ---- schemas from typed functions -----------------------------------------------------------------------------
def test_schema_from_signature_and_docstring():
    @tool
    def book(city: str, nights: int, kind: Literal["hotel", "hostel"] = "hotel", tags: list[str] | None = None,
             budget: float = 100.0, pets: bool = False) -> str:
        """Book a room.

        More text that is not the description.

        Args:
            city: where to stay
            nights (int): how many
                nights, at least one
            kind: the kind of place
        """
        return f"{city}:{nights}:{kind}"

    s = book.schema()
    assert s["type"] == "function" and s["function"]["name"] == "book"
    assert s["function"]["description"] == "Book a room."
    p = s["function"]["parameters"]
    assert p == {"type": "object", "additionalProperties": False, "required": ["city", "nights"], "properties": {
        "city": {"type": "string", "description": "where to stay"},
        "nights": {"type": "integer", "description": "how many nights, at least one"},
        "kind": {"type": "string", "enum": ["hotel", "hostel"], "description": "the kind of place", "default": "hotel"},
        "tags": {"type": ["array", "null"], "items": {"type": "string"}},
        "budget": {"type": "number", "default": 100.0},
        "pets": {"type": "boolean", "default": False}}}
    from test_agents_helpers import TOOLS
    TOOLS.validate_python([s])  # the openai package accepts it as a tool definition
    assert book("Paris", 2) == "Paris:2:hotel"  # still a Python function
    assert book.run({"city": "Oslo", "nights": 3}).content == "Oslo:3:hotel"
    assert book.run({"city": "Oslo", "nights": "3"}).content == "error: book: argument 'nights' must be integer, got string"
    assert "must be one of" in book.run({"city": "Oslo", "nights": 1, "kind": "tent"}).content
    assert "unknown argument 'colour'" in book.run({"city": "Oslo", "nights": 1, "colour": "red"}).content
    assert book.run({"city": "Oslo", "nights": 1, "budget": 3}).ok  # an integer is a JSON number


def test_bad_tool_definitions_are_config_errors():
    def untyped(x):
        """Doc."""
    def nodoc(x: int):
        pass
    def star(*args: int):
        """Doc."""
    for fn, msg in ((untyped, "type annotation"), (nodoc, "docstring"), (star, r"\*args")):
        with pytest.raises(ConfigError, match=msg):
            function_tool(fn)
    with pytest.raises(ConfigError, match="two tools"):
        Toolbox([calculator_tool(), calculator_tool()])
    with pytest.raises(ConfigError, match="unknown tool 'shell'"):
        tools_from_spec("calc,shell")


def test_tool_errors_and_timeouts_are_observations():
    def boom(x: int) -> int:
        """Fails."""
        raise KeyError(x)

    def slow(x: int) -> int:
        """Sleeps."""
        time.sleep(5)
        return x

    box = Toolbox([function_tool(boom), function_tool(slow, timeout=0.2)])
    obs = box.run("boom", {"x": 1})
    assert not obs.ok and obs.content == "error: boom: KeyError: 1"
    t0 = time.perf_counter()
    obs = box.run("slow", {"x": 1})
    assert not obs.ok and obs.content == "error: slow timed out after 0.2 s" and time.perf_counter() - t0 < 1.5
    assert box.run("rm", {}).content == "error: there is no tool 'rm'; the tools are: boom, slow"


# ---- calculator -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr", ["1+2*3", "(1+2)*3", "2**10", "-3**2", "7//2", "-7//2", "7%3", "-7 % 3",
                                  "10/4", "2**-2", "1e3+0.5", "3.5*2", "(((((1)))))", "+-+5", "2**0.5",
                                  "10**300 * 10**300 // 10**590", "123456789*987654321"])
def test_calculator_equals_python_arithmetic(expr):
    expected = eval(expr, {"__builtins__": {}})  # the oracle: Python itself, on expressions we wrote
    got = calculate(expr)
    assert got == expected or math.isclose(got, expected, rel_tol=1e-15)


def test_calculator_functions_and_refusals():
    assert calculate("sqrt(16) + abs(-2) + max(1, 5, 3)") == 11
    assert calculate("round(pi, 3)") == 3.142 and calculate("2^3") == 8
    for expr, msg in [("9**9**9", "exponent"), ("2**100000", "exponent"), ("(10**1000)**5", "bits"),
                      ("10**1000 * 10**1000 * 10**1000 * 10**1000 * 10**1000", "bits"),
                      ("__import__('os')", "not allowed"), ("().__class__", "not allowed"), ("x + 1", "unknown name"),
                      ("'a' * 3", "only numbers"), ("1/0", "division by zero"), ("10.0**400", "too large"),
                      ("sqrt(-1)", "math domain"), ("1 +", "cannot parse"), ("-" * 200 + "1", "deeper"), ("(" * 100 + "1" + ")" * 100, ""),
                      ("1+" * 300 + "1", "longer than"), ("True + 1", "only numbers"), ("[1, 2]", "not allowed"),
                      ("lambda: 1", "not allowed"), ("f'{1}'", "not allowed")]:
        t0 = time.perf_counter()
        if msg:
            with pytest.raises(ToolError, match=msg):
                calculate(expr)
        else:
            assert calculate(expr) == 1  # parentheses add no AST depth
        assert time.perf_counter() - t0 < 0.5, expr


def test_calculator_never_calls_eval(monkeypatch):
    import builtins

    def no_eval(*a, **k):
        raise AssertionError("eval called")
    monkeypatch.setattr(builtins, "eval", no_eval)
    monkeypatch.setattr(builtins, "exec", no_eval)
    assert calculate("6*7") == 42


# ---- the loop against a scripted endpoint ---------------------------------------------------------------------
def test_loop_parallel_calls_trace_and_openai_format(tmp_path):
    (tmp_path / "notes.txt").write_text("budget: 1200 euros\n")
    plan = [
        [call("calculator", {"expression": "17*23"}), call("read_file", {"path": "notes.txt"}, id="c-read")],
        lambda body: f"391; {body['messages'][-1]['content'].strip()}",
    ]
    model = ScriptedModel(plan)
    events = []
    agent = Agent(model.client(), [calculator_tool(), *file_tools(tmp_path)], Budget(max_steps=4))
    r = agent.run("What is 17*23, and what does notes.txt say?", on_event=events.append, trace=tmp_path / "t.jsonl")
    assert r.stop_reason == "answer" and r.answer == "391; budget: 1200 euros" and r.steps == 2
    assert [(c.name, c.content, c.ok) for c in r.calls] == [("calculator", "391", True),
                                                             ("read_file", "budget: 1200 euros\n", True)]
    # the second request carried both results as tool messages, answering the calls in order, by id
    sent = model.requests[1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "tool"]
    assert sent[2]["tool_calls"][1]["id"] == "c-read" and sent[4] == {"role": "tool", "tool_call_id": "c-read",
                                                                      "content": "budget: 1200 euros\n"}
    assert model.requests[0]["tool_choice"] == "auto" and len(model.requests[0]["tools"]) == 4
    check_openai_conversation(r.messages)
    # the trace: one JSON event per line, in order, the last with the full message list
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [e["type"] for e in lines] == ["start", "model", "call", "result", "call", "result", "model", "end"]
    assert lines == events
    assert lines[-1]["messages"] == r.messages and lines[-1]["stop_reason"] == "answer"
    assert all(e["t"] >= 0 for e in lines) and lines[3]["seconds"] >= 0 and lines[1]["tokens"] == 10
    printed = [format_event(e) for e in lines]
    assert "call   calculator" in printed[2] and printed[3].endswith("391") and "stop: answer" in printed[-1]


def test_failing_tool_is_an_observation_and_the_loop_goes_on():
    def lookup(key: str) -> str:
        """Look up a key."""
        raise RuntimeError(f"database down while reading {key}")

    model = ScriptedModel([[call("lookup", {"key": "a"})], [call("calculator", {"expression": "1+1"})], "done"])
    r = Agent(model.client(), [function_tool(lookup), calculator_tool()]).run("q")
    assert r.stop_reason == "answer" and r.answer == "done"
    assert model.requests[1]["messages"][-1]["content"] == "error: lookup: RuntimeError: database down while reading a"
    assert model.requests[2]["messages"][-1]["content"] == "2"


def test_run_agent_with_a_user_function_and_require_tool():
    def stock(item: str) -> int:
        """How many of an item are in stock.

        Args:
            item: the item's name
        """
        return {"apples": 3}.get(item, 0)

    model = ScriptedModel([[call("stock", {"item": "apples"})], [call("calculator", {"expression": "3*7"})], "21"])
    r = run_agent(model.client(), "apples times 7?", tools=["calc", stock], require_tool=True)
    assert r.answer == "21" and [c.content for c in r.calls] == ["3", "21"]
    assert model.requests[0]["tool_choice"] == "required" and model.requests[1]["tool_choice"] == "auto"
    assert model.requests[0]["tools"][1]["function"]["parameters"]["properties"]["item"]["description"] == "the item's name"


def test_endpoint_error_stops_cleanly():
    model = ScriptedModel([], raw=lambda body: {"no": "choices"})
    r = Agent(model.client(), [calculator_tool()]).run("q")
    assert r.stop_reason == "error" and "has no choices" in r.error and r.answer is None


# ---- time, search, files, fetch -------------------------------------------------------------------------------
def test_time_tool():
    fixed = datetime(2026, 12, 4, 15, 30, tzinfo=timezone.utc)
    assert time_tool(lambda: fixed).run({}).content == "2026-12-04T15:30:00+00:00 (Friday)"
    now = datetime.fromisoformat(time_tool().run({}).content.split(" ")[0])
    assert abs((now - datetime.now(timezone.utc)).total_seconds()) < 5


class TinyRetriever:
    """A real in-memory retriever of our own: TF-IDF cosine over a few documents (for the `.search(query, k)`
    protocol, independent of lmforge.rag)."""

    def __init__(self, docs: dict[str, str]):
        import collections

        self.docs = docs
        self.tf = {k: collections.Counter(self.words(v)) for k, v in docs.items()}
        df = collections.Counter(w for c in self.tf.values() for w in c)
        self.idf = {w: math.log((1 + len(docs)) / (1 + n)) + 1 for w, n in df.items()}

    @staticmethod
    def words(text: str) -> list[str]:
        import re
        return re.findall(r"[a-z0-9]+", text.lower())

    def vec(self, counts) -> dict[str, float]:
        v = {w: c * self.idf.get(w, 0.0) for w, c in counts.items()}
        n = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / n for w, x in v.items()}

    def search(self, query: str, k: int):
        import collections
        q = self.vec(collections.Counter(self.words(query)))
        scores = {d: sum(q.get(w, 0) * x for w, x in self.vec(c).items()) for d, c in self.tf.items()}
        best = sorted(scores, key=lambda d: -scores[d])[:k]
        return [{"source": d, "text": self.docs[d], "score": scores[d]} for d in best if scores[d] > 0]


DOCS = {"paris.txt": "Paris is the capital of France. The Eiffel Tower was finished in 1889.",
        "oslo.txt": "Oslo is the capital of Norway, at the head of the Oslofjord.",
        "bordeaux.txt": "Bordeaux lies on the Garonne and is known for its wine."}


def test_search_tool_over_our_own_retriever():
    t = search_tool(TinyRetriever(DOCS))
    out = t.run({"query": "When was the Eiffel Tower finished?", "k": 2}).content
    assert out.splitlines()[0].startswith("[1] paris.txt: Paris is the capital of France.")
    assert t.run({"query": "garonne wine"}).content.startswith("[1] bordeaux.txt:")
    assert t.run({"query": "zzz"}).content == "no passage found"
    with pytest.raises(ConfigError, match="search"):
        search_tool(object())


def test_search_tool_over_an_lmforge_rag_index(tmp_path):
    rag = pytest.importorskip("lmforge.rag")
    for name, text in DOCS.items():
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / name).write_text(text)
    emb = rag.HashingEmbedder()
    chunker = rag.Chunker.for_embedder(emb, max_tokens=64)
    store = rag.EmbeddedStore.create(tmp_path / "idx", rag.IndexManifest.new(emb, chunker))
    rag.Indexer(store, emb, chunker).index(rag.Loader().load([str(tmp_path / "docs")]).documents)
    store.close() if hasattr(store, "close") else None
    t = tools_from_spec(f"rag:{tmp_path / 'idx'}")[0]
    out = t.run({"query": "capital of Norway Oslofjord", "k": 1}).content
    assert out.startswith("[1] ") and "oslo.txt: Oslo is the capital of Norway" in out


def test_file_tools_list_read_grep(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("alpha\nBudget line\n")
    (tmp_path / "two.md").write_text("budget two\n")
    (tmp_path / "bin").write_bytes(b"\x00\x01budget")
    ls, read, grep = (t.run for t in file_tools(tmp_path))
    assert ls({}).content == "a/\nbin\ntwo.md" and ls({"path": "a"}).content == "one.txt"
    assert read({"path": "a/one.txt"}).content == "alpha\nBudget line\n"
    assert read({"path": "bin"}).content == "error: read_file: 'bin' is a binary file"
    assert grep({"text": "budget"}).content == "a/one.txt:2: Budget line\ntwo.md:1: budget two"
    assert grep({"text": "nothing"}).content == "no line contains 'nothing'"
    assert "is not a file" in read({"path": "a"}).content and "is not a folder" in ls({"path": "two.md"}).content
    (tmp_path / "big.txt").write_text("x" * 20_000)
    assert read({"path": "big.txt"}).content.endswith("[... cut at 6000 bytes]")
    with pytest.raises(ConfigError, match="not a directory"):
        file_tools(tmp_path / "missing")


class _Pages(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", self.headers["X-Target"] or "/page")
            self.end_headers()
            return
        body = b"hello from the test server" if self.path == "/page" else b"x" * 300_000
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def page_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_fetch_only_allow_listed_hosts(page_server):
    url = f"http://{page_server}/page"
    assert fetch_tool().run({"url": url}).content.endswith("is not on the allow-list (empty)")
    ok = fetch_tool([page_server])
    assert ok.run({"url": url}).content == "HTTP 200\nhello from the test server"
    assert ok.run({"url": f"http://{page_server}/hop"}).content == "HTTP 200\nhello from the test server"
    assert ok.run({"url": f"http://{page_server}/big"}).content.endswith("[... cut]")
    assert "not on the allow-list" in fetch_tool(["127.0.0.1:1"]).run({"url": url}).content  # port matters
    for bad, msg in [("file:///etc/passwd", "only http"), (f"http://user:pw@{page_server}/page", "credentials"),
                     ("http://localhost:1/page", "not on the allow-list"), ("http://[::1/", "not a valid URL")]:
        assert msg in ok.run({"url": bad}).content, bad


def test_cli_runs_against_a_scripted_model(tmp_path, monkeypatch, capsys):
    from lmforge.agents import api
    from lmforge.cli import main

    model = ScriptedModel([[call("calculator", {"expression": "6*7"})], "42"])
    monkeypatch.setattr(api, "open_client", lambda m, **k: model.client())
    rc = main(["agent", "--model", "http://unused", "--tools", "calc,time", "--trace", str(tmp_path / "t.jsonl"),
               "What is 6*7?"])
    out = capsys.readouterr()
    assert rc == 0 and out.out == "42\n"
    assert "call   calculator" in out.err and "ok     42" in out.err and "stop: answer" in out.err
    assert [t["function"]["name"] for t in model.requests[0]["tools"]] == ["calculator", "current_time"]
    assert main(["agent", "--model", "http://unused", "--tools", "files:" + str(tmp_path / "nope"), "q"]) == 1
    assert "error: file tools root" in capsys.readouterr().err
    assert main(["agent", "--model", "http://unused", "--max-steps", "0", "q"]) == 1
    assert "error: budget max_steps must be an integer >= 1, got 0" in capsys.readouterr().err
