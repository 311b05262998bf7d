"""The web UI in a real headless Chromium (Debian's ``chromium``, driven by Playwright):
send a message, see its sentiment label and the streamed reply (a screenshot ``ui.png``); in the
Tasks tab, pick intent and NER, run them, and see what the HTTP API gives for the same text
(``ui-tasks.png``)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from fixtures.fakes import FakeBackend
from fixtures.server import fake_app, live_server

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
# Screenshots go to a temporary folder; `make screenshots` sets SCREENSHOT_DIR=docs to refresh
# the pictures in the documentation.
SHOTS = os.environ.get("SCREENSHOT_DIR")
REPLY = "Congratulations on the promotion! 🎉 Enjoy the moment — you earned it."
MESSAGE = "I just got promoted and I can't stop smiling!"

# generous: on a busy 2-core machine the first answer also computes the task prompts
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make browser)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def test_chat_shows_sentiment_and_streamed_reply(browser, tmp_path):
    backend = FakeBackend(REPLY, label_logps={"positive": -0.05, "negative": -3.0}, step_delay=0.05)
    app, _, ai = fake_app(tmp_path, backend, ui=True)
    with live_server(app) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(f"{url}/ui/", wait_until="domcontentloaded")
        box = page.locator("#message textarea")
        box.wait_for(timeout=WAIT_MS)
        box.fill(MESSAGE)
        page.locator("#send").click()
        chat = page.locator("#chat")
        chat.get_by_text("😊 positive").wait_for(timeout=WAIT_MS)  # the badge under the user's message
        box.fill("a next message, typed while the reply streams")
        chat.get_by_text("you earned it.").wait_for(timeout=WAIT_MS)  # the whole reply has streamed in
        page.wait_for_timeout(300)
        assert box.input_value() == "a next message, typed while the reply streams"  # was wiped by each update
        assert MESSAGE in chat.inner_text()
        assert "positive" in page.locator("#sentiment").inner_text()  # the probabilities panel
        assert "generate" in backend.calls
        page.screenshot(path=str(Path(SHOTS or tmp_path) / "ui.png"), full_page=True)
        page.close()
    ai.close()
    assert (Path(SHOTS or tmp_path) / "ui.png").stat().st_size > 10_000


NER_TEXT = "Angela Merkel met Emmanuel Macron in Paris."
NER_REPLY = ('{"entities": [{"text": "Angela Merkel", "type": "PER"}, {"text": "Emmanuel Macron", "type": "PER"}, '
             '{"text": "Paris", "type": "LOC"}, {"text": "Berlin", "type": "LOC"}]}')


def pick_task(page, name: str) -> list[str]:
    """Choose ``name`` in the task dropdown and wait until its description shows; returns the
    names the dropdown offered."""
    page.locator("#task input").click()
    options = page.get_by_role("option")
    options.first.wait_for(timeout=WAIT_MS)
    offered = [o.split(" — ")[0].lstrip("✓").strip() for o in options.all_inner_texts()]
    options.filter(has_text=re.compile(rf"^\W*{name} — ")).click()
    page.locator("#task-info").get_by_text(name, exact=True).wait_for(timeout=WAIT_MS)
    return offered


def test_tasks_tab_runs_a_chosen_task_like_the_api(browser, tmp_path):
    backend = FakeBackend(NER_REPLY, label_logps={"BookFlight": -0.1, "PlayMusic": -2.5})
    app, _, ai = fake_app(tmp_path, backend, ui=True)
    with live_server(app) as url:
        api = httpx.Client(base_url=url, timeout=WAIT_MS / 1000)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(f"{url}/ui/", wait_until="domcontentloaded")
        page.locator("#message textarea").wait_for(timeout=WAIT_MS)
        page.get_by_role("tab", name="Tasks").click()
        page.locator("#task-info").get_by_text("sentiment", exact=True).wait_for(timeout=WAIT_MS)  # the default

        # intent: a label set given per request, shown as probability bars
        assert pick_task(page, "intent") == ai.tasks.names()  # every task is offered
        page.locator("#task-labels textarea").fill("BookFlight, PlayMusic")
        page.locator("#task-text textarea").fill("")
        page.locator("#task-run").click()
        toast = page.locator(".toast-body").filter(has_text="Type or paste a text first.")
        toast.wait_for(timeout=WAIT_MS)
        toast.locator(".toast-close").click()
        toast.wait_for(state="detached", timeout=WAIT_MS)
        page.locator("#task-text textarea").fill("fly me to Rome")
        page.locator("#task-run").click()
        page.locator("#task-label").get_by_text("PlayMusic").wait_for(timeout=WAIT_MS)
        body = {"text": "fly me to Rome", "labels": ["BookFlight", "PlayMusic"]}
        expected = api.post("/v1/tasks/intent", json=body).json()
        shown = page.locator("#task-label").inner_text()
        assert expected["label"] == "BookFlight"
        assert shown.split("\n")[1] == "BookFlight"  # the top label heads the panel
        for label, p in expected["scores"].items():
            assert f"{label}\n{round(p * 100)}%" in shown

        # NER: highlighted spans, a table with offsets, and the JSON the HTTP API returns
        pick_task(page, "ner")
        page.locator("#task-text textarea").fill(NER_TEXT)
        page.locator("#task-run").click()
        page.locator("#task-table").get_by_test_id("cell-0-0").wait_for(timeout=WAIT_MS)
        expected = api.post("/v1/tasks/ner", json={"text": NER_TEXT}).json()
        entities = expected["data"]["entities"]
        assert [e["text"] for e in entities] == ["Angela Merkel", "Emmanuel Macron", "Paris"]  # Berlin: not in the text
        cells = page.locator("#task-table [data-testid^=cell-]").all_inner_texts()
        assert cells == [str(e[k]) for e in entities for k in ("text", "type", "start", "end")]
        highlighted = page.locator("#task-spans .token.highlighted")
        assert highlighted.locator(".text").all_inner_texts() == [e["text"] for e in entities]
        assert highlighted.locator(".label").all_inner_texts() == [e["type"] for e in entities]
        assert "1 span(s) not found in the text were removed" in page.locator("#task-notes").inner_text()
        page.screenshot(path=str(Path(SHOTS or tmp_path) / "ui-tasks.png"), full_page=True)
        page.get_by_text("JSON (as the HTTP API returns it)").click()
        tree = page.locator("#task-json")
        tree.get_by_text('"finish_reason"').wait_for(timeout=WAIT_MS)
        result = {k: v for k, v in expected.items() if k not in ("object", "task", "model")}
        assert "".join(tree.inner_text().split("\n")) == json.dumps(result, ensure_ascii=False, separators=(",", ":"))
        page.close()
        api.close()
    ai.close()
    assert (Path(SHOTS or tmp_path) / "ui-tasks.png").stat().st_size > 10_000
