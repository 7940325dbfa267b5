"""`lmforge serve --rag-index`: chat answers grounded in an index, through the official `openai` client and the chat
page. A tiny random decoder (tests/test_serve_helpers.py) and a HashingEmbedder index (no model download).

The grounded prompt must be `rag ask`'s (lmforge.rag.answer.build_messages), the citations checked as `rag ask`
checks them, the sources returned in the response and shown on the page (as text, never as HTML)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import openai
import pytest

import lmforge.serve.rag as serve_rag
from lmforge.cli import main as cli_main
from lmforge.errors import LmforgeError
from lmforge.rag import Chunker, Document, EmbeddedStore, HashingEmbedder, IndexManifest, Indexer, open_index
from lmforge.rag.answer import NOT_FOUND, build_messages, check_citations
from lmforge.serve.rag import RagChat
from test_serve_browser import ARGS, CHROMIUM
from test_serve_helpers import build_tiny_model, start_server

PLANTED = '<img src=x onerror="window.pwned=1"> Normans raided the coast <b>hard</b>.'
DOCS = [
    ("normans.txt", "The Normans were the people who gave their name to Normandy, a region in France. Rollo, a "
                    "Viking leader, founded the Norman dynasty after the treaty of 911."),
    ("hastings.txt", "In 1066 William, Duke of Normandy, defeated Harold at the battle of Hastings."),
    ("planted.html.txt", PLANTED),
    ("fox.txt", "The quick brown fox jumps over the lazy dog."),
    ("bread.txt", "Bread is made from flour, water, salt and yeast, then baked in an oven."),
    ("stocks.txt", "Stocks fell sharply after the announcement on Tuesday."),
]
QUESTION = "Who founded the Norman dynasty in Normandy?"
K = 3


def _build_index(path: Path) -> Path:
    emb = HashingEmbedder()
    chunker = Chunker.for_embedder(emb, max_tokens=64, overlap_tokens=8)
    store = EmbeddedStore.create(path, IndexManifest.new(emb, chunker))
    Indexer(store, emb, chunker).index([Document(id=name, text=text, source=name) for name, text in DOCS])
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-rag")
    idx = _build_index(root / "idx")
    model_dir = build_tiny_model(root / "tiny-rag")
    srv, lm = start_server(model_dir, max_batch=4, rag=RagChat.open(str(idx), k=K))
    yield srv, lm, idx, model_dir
    srv.stop()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)


def _hits(idx, question=QUESTION, k=K):
    return open_index(str(idx)).retriever("hybrid").retrieve(question, k=k)


def _cited(text: str) -> set[int]:
    return {int(n) for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", text) for n in group.split(",")}


def test_sources_come_back_and_the_answer_is_rag_asks(env):
    srv, lm, idx, _ = env
    r = _client(srv).chat.completions.create(model="tiny-rag", messages=[{"role": "user", "content": QUESTION}],
                                             max_tokens=24, temperature=0)
    hits = _hits(idx)
    sources = r.model_extra["sources"]
    assert [s["n"] for s in sources] == list(range(1, K + 1))
    assert [(s["source"], s["start"], s["end"], s["text"]) for s in sources] == \
        [(h.chunk.source, h.chunk.start, h.chunk.end, h.chunk.text) for h in hits]
    assert [s["score"] for s in sources] == pytest.approx([h.score for h in hits])
    assert sources[0]["source"] == "normans.txt"
    # the reply is the model's greedy answer to rag ask's grounded prompt, with its citations checked
    raw = str(lm.chat(build_messages(QUESTION, hits), max_new_tokens=24, temperature=0)).strip()
    text, citations, dropped = check_citations(raw, hits)
    assert r.choices[0].message.content == (text or NOT_FOUND)
    assert r.model_extra["rag"]["citations"] == sorted(citations) and r.model_extra["rag"]["dropped"] == dropped
    assert _cited(r.choices[0].message.content) <= {s["n"] for s in sources}  # every citation maps to a source
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0


def test_citations_are_checked_and_the_prompt_is_rag_asks(env, monkeypatch):
    srv, _, idx, _ = env
    seen = []

    async def scripted(state, body, request):  # the model's reply, fixed: one good citation, two that map to none
        seen.append(body.messages)
        return {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Rollo founded it [1][9]. "
                             "See also [2, 7]."}, "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}

    monkeypatch.setattr(serve_rag, "create_chat_completion", scripted)
    c = _client(srv)
    r = c.chat.completions.create(model="tiny-rag", messages=[{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": QUESTION}])
    hits = _hits(idx)
    assert seen[0] == build_messages(QUESTION, hits)  # exactly rag ask's prompt (the client's system is replaced)
    assert r.choices[0].message.content == "Rollo founded it [1]. See also [2]."
    assert r.model_extra["rag"] == {"refused": False, "citations": [1, 2], "dropped": [9, 7]}
    sources = r.model_extra["sources"]
    assert _cited(r.choices[0].message.content) <= {s["n"] for s in sources}
    assert r.usage.total_tokens == 12

    # a follow-up: retrieval for the last user message; earlier turns between the grounding prompt and the question
    follow = "When did William win at Hastings?"
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Rollo [1]."}]
    r = c.chat.completions.create(model="tiny-rag", messages=history + [{"role": "user", "content": follow}])
    grounded = build_messages(follow, _hits(idx, follow))
    assert seen[1] == grounded[:1] + history + grounded[1:]
    assert r.model_extra["sources"][0]["source"] == "hastings.txt"

    # streaming: the checked reply, then a last chunk with the sources
    chunks = list(c.chat.completions.create(model="tiny-rag", messages=[{"role": "user", "content": QUESTION}],
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        "Rollo founded it [1]. See also [2]."
    last = [ch for ch in chunks if ch.choices][-1]
    assert last.choices[0].finish_reason == "stop" and len(last.model_extra["sources"]) == K
    assert last.model_extra["rag"]["dropped"] == [9, 7] and chunks[-1].usage.total_tokens == 12


def test_refuses_below_the_threshold_without_generating(env):
    srv, _, idx, _ = env
    settings = srv.server.config.app.state.lmforge.settings
    engine = srv.server.config.app.state.lmforge.engine
    before, kept = engine.generated_tokens, settings.rag
    settings.rag = RagChat.open(str(idx), k=K, min_score=1.0)  # hybrid scores are sums of w/(k_rrf+rank): all < 1
    try:
        r = _client(srv).chat.completions.create(model="tiny-rag", messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=16, temperature=0)
    finally:
        settings.rag = kept
    assert r.choices[0].message.content == NOT_FOUND and r.model_extra["rag"]["refused"] is True
    assert r.model_extra["rag"]["citations"] == [] and r.usage.completion_tokens == 0
    assert engine.generated_tokens == before


def test_unsupported_requests_are_400(env):
    srv, _, _, _ = env
    c = _client(srv)
    with pytest.raises(openai.BadRequestError, match="one choice"):
        c.chat.completions.create(model="tiny-rag", messages=[{"role": "user", "content": QUESTION}], n=2)
    with pytest.raises(openai.BadRequestError, match="user message"):
        c.chat.completions.create(model="tiny-rag", messages=[{"role": "system", "content": "hi"}])


def test_bad_index_or_other_embedder_is_a_one_line_error_at_startup(env, tmp_path, capsys):
    _, _, idx, model_dir = env
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not an index")
    cases = [([str(tmp_path / "notes")], "not an lmforge RAG index"),
             ([str(tmp_path / "missing")], "no such index directory"),
             ([str(idx), "--rag-embedder", "hashing:512"], "was built with embedder"),
             ([str(idx), "--rag-k", "0"], "rag_k must be >= 1")]
    for extra, message in cases:
        assert cli_main(["serve", str(model_dir), "--rag-index", *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    with pytest.raises(LmforgeError, match="was built with embedder"):
        RagChat.open(str(idx), embedder="hashing:512")


def test_chat_page_shows_the_sources(env, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian package 'chromium')")
    sync_api = pytest.importorskip("playwright.sync_api")
    srv, _, idx, _ = env
    question = "Who raided the coast? Normans founded Normandy."
    hits = _hits(idx, question)
    assert PLANTED in [h.chunk.text for h in hits]  # the page must show this as text
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny-rag')")
            page.fill("#max_tokens", "12")
            page.dispatch_event("#max_tokens", "input")
            page.fill("#input", question)
            page.click("#send")
            page.wait_for_selector(".msg.assistant details.sources", state="attached", timeout=30_000)
            box = page.query_selector(".msg.assistant details.sources")
            assert box.get_attribute("open") is None  # collapsed until clicked
            assert box.query_selector("summary").inner_text().startswith(f"Sources ({K})")
            box.query_selector("summary").click()
            items = box.query_selector_all("li")
            assert [i.query_selector(".snippet").inner_text() for i in items] == [h.chunk.text for h in hits]
            assert items[0].query_selector(".where").inner_text().startswith(hits[0].chunk.source)
            assert box.query_selector_all("img, b") == []  # the planted markup is text, not elements
            assert page.evaluate("window.pwned") is None and not errors
            page.screenshot(path=str(tmp_path / "rag-chat.png"), full_page=True)
            if os.environ.get("LMFORGE_SCREENSHOT"):
                shutil.copy(tmp_path / "rag-chat.png", os.environ["LMFORGE_SCREENSHOT"])
        finally:
            browser.close()
