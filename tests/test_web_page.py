"""The chat page at ``GET /`` in a real headless Chromium (the distribution's ``chromium``, driven by
Playwright's bundled driver; Playwright's own browser download is never used), against the real
server and model. A screenshot lands in ``build/test-artifacts/web-chat.png``.

Locally the test skips when there is no chromium; under CI (``CI`` set) a missing browser is a
failure, since ``.ci/run`` installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
httpx = pytest.importorskip("httpx")

from conftest import SERVE_KEY  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("no chromium on PATH: .ci/run installs it with apt-get install -y chromium")
    pytest.skip("no chromium on PATH (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def page(served):  # noqa: ANN001, ANN201
    url, _ = served
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        pg = browser.new_page(viewport={"width": 1000, "height": 800})
        offline = []
        # Nothing but this server may be fetched: the page must work offline.
        pg.on("request", lambda r: None if r.url.startswith(url) else offline.append(r.url))
        pg.goto(url + "/")
        pg.offline_requests = offline
        yield pg
        browser.close()


def _idle(url: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/health").json()["slots_processing"] == 0:
            return True
        time.sleep(0.1)
    return False


def test_chat_page_streams_stops_and_starts_over(page, served) -> None:  # noqa: ANN001
    url, _ = served
    assert page.title() == "qwenlite chat"
    # The server has an API key: the page asks for it, then sends it with every call.
    page.wait_for_selector("#apikey:not([hidden])")
    page.fill("#apikey", SERVE_KEY)
    page.fill("#system", "You are a Python expert.")
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.post_data or "") if r.url.endswith("/v1/chat/completions") else None)

    # 1. A reply streams in: text appears while the message is still marked as streaming.
    page.fill("#input", "Write a Python function that adds two numbers, in a code block.")
    page.press("#input", "Enter")
    page.wait_for_function(
        "() => { const m = document.querySelector('.msg.assistant');"
        " return m && m.dataset.state === 'streaming' && m.querySelector('.body').textContent.length > 0; }",
        timeout=60_000)
    page.wait_for_function("() => document.querySelector('.msg.assistant').dataset.state !== 'streaming'",
                           timeout=120_000)
    reply = page.locator(".msg.assistant").first
    assert reply.get_attribute("data-state") in ("stop", "length")
    assert page.locator(".msg.assistant pre code").count() >= 1  # the code block is shown as code
    assert "tok/s" in reply.locator(".stats").inner_text()
    assert json.loads(sent[0])["messages"][0] == {"role": "system", "content": "You are a Python expert."}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

    # 2. Multi-turn: the second request carries the first exchange.
    page.fill("#input", "Write a long essay about the history of computing, at least 2000 words.")
    page.press("#input", "Enter")
    page.wait_for_function(
        "() => { const m = document.querySelectorAll('.msg.assistant')[1];"
        " return m && m.querySelector('.body').textContent.length > 20; }", timeout=60_000)
    assert [m["role"] for m in json.loads(sent[1])["messages"]] == ["system", "user", "assistant", "user"]
    # 3. Stop a long reply: the partial text stays, marked stopped, and the server frees the slot.
    page.click("#stop")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant')[1].dataset.state === 'stopped'",
                           timeout=10_000)
    assert _idle(url)
    assert page.is_enabled("#send") and not page.is_enabled("#stop")

    # 4. New chat: the log empties and the next request has no history.
    page.click("#new")
    assert page.locator(".msg").count() == 0
    page.fill("#input", "Say hi.")
    page.press("#input", "Enter")
    page.wait_for_function("() => { const m = document.querySelector('.msg.assistant');"
                           " return m && m.dataset.state !== 'streaming'; }", timeout=120_000)
    assert [m["role"] for m in json.loads(sent[-1])["messages"]] == ["system", "user"]
    assert page.offline_requests == []
