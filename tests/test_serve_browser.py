"""The chat page in a real browser: headless Debian Chromium driven by Playwright (never `playwright install`).

Type a message, send it, watch the reply stream in token by token, stop a long reply with the Stop button, and
save a screenshot (tests write it to tmp_path; set LMFORGE_SCREENSHOT=path to keep a copy)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from test_serve_helpers import build_tiny_model, start_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def test_chat_page_streams_a_reply_and_stops(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian package 'chromium'; .ci/run installs it when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api")
    srv, lm = start_server(build_tiny_model(tmp_path / "tiny-chat"), max_batch=4)
    engine = srv.server.config.app.state.lmforge.engine
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny-chat')")
            page.fill("#system", "You are a tiny test model.")
            page.fill("#temperature", "0")  # greedy, so the reply can be checked against the library
            page.dispatch_event("#temperature", "input")
            page.fill("#max_tokens", "24")
            page.dispatch_event("#max_tokens", "input")
            page.fill("#input", "Hello, who are you?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant .meta", timeout=30_000)  # the reply finished
            reply = page.inner_text(".msg.assistant .text")
            expected = lm.chat([{"role": "system", "content": "You are a tiny test model."},
                                {"role": "user", "content": "Hello, who are you?"}],
                               max_new_tokens=24, temperature=0)
            assert reply.strip() == str(expected).strip() and reply.strip()
            assert page.inner_text(".msg.user .text") == "Hello, who are you?"

            # streamed: a long reply shows partial text while running, then Stop aborts it. To see it mid-way
            # deterministically, a helper thread pauses the engine once a dozen tokens have been generated.
            gate, base = threading.Event(), engine.generated_tokens

            def pause_midway():
                while engine.generated_tokens < base + 12 and not gate.is_set():
                    time.sleep(0.001)
                engine.call(gate.wait)

            threading.Thread(target=pause_midway, daemon=True).start()
            page.fill("#max_tokens", "700")
            page.dispatch_event("#max_tokens", "input")
            page.fill("#input", "Tell me a long story.")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelector('.msg.assistant.streaming .text')?.textContent.length > 0",
                                   polling=50,
                                   timeout=30_000)
            partial = page.evaluate("document.querySelector('.msg.assistant.streaming .text').textContent")
            assert page.is_enabled("#stop") and not page.is_enabled("#send")
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot), full_page=True)
            page.click("#stop")
            gate.set()
            page.wait_for_selector(".msg.assistant:nth-of-type(4) .meta", timeout=30_000)
            final = page.inner_text(".msg.assistant:nth-of-type(4) .text")
            assert final.startswith(partial) and "stopped" in page.inner_text(".msg.assistant:nth-of-type(4) .meta")
            deadline = time.time() + 10
            while engine.num_active() and time.time() < deadline:  # the aborted fetch freed its KV-cache slot
                time.sleep(0.05)
            assert engine.num_active() == 0
            assert not errors, errors
            browser.close()
        assert shot.stat().st_size > 10_000
        if os.environ.get("LMFORGE_SCREENSHOT"):
            shutil.copy(shot, os.environ["LMFORGE_SCREENSHOT"])
    finally:
        srv.stop()
