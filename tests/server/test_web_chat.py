"""The web chat page in a real headless Chromium: a question gets a streamed answer; Stop aborts the request on
the server (its KV blocks come back)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.server.launch import start_server
from tests.server.test_openai_api import kv_usage

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page_url(smollm2_path):
    proc, base = start_server(smollm2_path)
    yield base
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def browser_page(page_url):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(page_url)
        yield page
        browser.close()


def test_streamed_answer_and_history(browser_page, page_url):
    page = browser_page
    page.fill("#temperature", "0")
    page.fill("#input", "What is the capital of France?")
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    # The text grows while streaming: seen partial before done.
    page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 0", timeout=60000)
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120000)
    assert len(answer.text_content().strip()) > 0
    page.fill("#input", "And of Italy?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant >> nth=1", timeout=60000)
    page.wait_for_selector(".msg.assistant[data-state=done] >> nth=1", timeout=120000)
    assert page.locator(".msg.user").count() == 2


def test_stop_aborts_on_the_server(browser_page, page_url):
    page = browser_page
    page.click("#reset")
    page.fill("#temperature", "0.8")
    page.fill("#input", "Write a very long story about a dragon who learns to cook.")
    page.click("#send")
    page.wait_for_function("(document.querySelector('.msg.assistant')?.textContent || '').length > 20",
                           timeout=60000)
    assert kv_usage(page_url) > 0
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]", timeout=30000)
    deadline = time.monotonic() + 10
    while kv_usage(page_url) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kv_usage(page_url) == 0


def test_model_output_is_rendered_as_text_never_html(browser_page, page_url):
    """A model that writes markup must not run script in the page: the answer is shown as text."""
    page = browser_page
    page.click("#reset")
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    chunk = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": hostile},
                                     "finish_reason": "stop"}]})

    def fake_model(route):
        route.fulfill(status=200, headers={"content-type": "text/event-stream"},
                      body=f"data: {chunk}\n\ndata: [DONE]\n\n")

    page.route("**/v1/chat/completions", fake_model)
    try:
        page.fill("#input", "Say something hostile.")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60000)
        page.wait_for_timeout(300)
        assert page.evaluate("window.pwned") is None
        assert page.locator(".msg.assistant img").count() == 0
        assert hostile in page.locator(".msg.assistant").last.text_content()
    finally:
        page.unroute("**/v1/chat/completions")
