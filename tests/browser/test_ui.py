"""The web UI in a real headless Chromium (Debian's ``chromium``, driven by Playwright):
send a message, see its sentiment label and the streamed reply. Saves ``docs/ui.png``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fixtures.fakes import FakeBackend
from fixtures.server import fake_app, live_server

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "ui.png"
REPLY = "Congratulations on the promotion! 🎉 Enjoy the moment — you earned it."
MESSAGE = "I just got promoted and I can't stop smiling!"


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
    backend = FakeBackend(REPLY, label_logps={"positive": -0.05, "negative": -3.0}, step_delay=0.01)
    app, _, ai = fake_app(tmp_path, backend, ui=True)
    with live_server(app) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(f"{url}/ui/", wait_until="domcontentloaded")
        box = page.locator("#message textarea")
        box.wait_for(timeout=30_000)
        box.fill(MESSAGE)
        page.locator("#send").click()
        chat = page.locator("#chat")
        chat.get_by_text("😊 positive").wait_for(timeout=30_000)  # the badge under the user's message
        chat.get_by_text("you earned it.").wait_for(timeout=30_000)  # the whole reply has streamed in
        assert MESSAGE in chat.inner_text()
        assert "positive" in page.locator("#sentiment").inner_text()  # the probabilities panel
        assert "generate" in backend.calls
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        page.close()
    ai.close()
    assert SCREENSHOT.stat().st_size > 10_000
