"""The page never hangs on backpressure: a full queue (429) shows the API's message and Retry-After and lets the
user try again; a draining server (503) says so and lets the user retry. The engine is held by a step hook
on the pipeline (the same fault injection the server tests use), never by mocking the server."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from ui_harness import open_page

from tests.server.server_harness import live_server


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def status(url: str) -> dict:
    return httpx.get(f"{url}/v1/status").json()


def test_a_full_queue_shows_retry_after_and_the_user_can_try_again(browser, ui_pipe, step_hook, tmp_path):
    gate = threading.Event()

    def hold(state):  # the running row holds the engine until released; the warm-up passes
        if state.rows[0].params.prompt != "warm-up":
            gate.wait(30)

    with (
        live_server(ui_pipe, max_batch_size=1, max_queue=1, max_n=1, max_wait_ms=0) as (url, app),
        ThreadPoolExecutor(2) as pool,
    ):
        page, watch = open_page(browser, url)
        try:
            step_hook.fail = hold
            body = {"prompt": "runs", "steps": 2}
            running = pool.submit(httpx.post, f"{url}/v1/generate", json=body, timeout=60)
            wait_until(lambda: status(url)["rows_running"] == 1)
            queued = pool.submit(
                httpx.post, f"{url}/v1/generate", json={**body, "prompt": "waits"}, timeout=60
            )
            wait_until(lambda: status(url)["queue_size"] == 1)

            page.fill("#prompt", "one too many")
            page.fill("#steps", "2")
            page.click("#run")
            page.wait_for_selector("#error:not([hidden])")
            message = page.locator("#error-message").inner_text()
            # the API's own words, shown verbatim
            assert message.startswith(
                "1 rows wait for a slot and the running batch has 0 free; n=1 more would exceed"
            )
            assert "max_queue=1" in message
            assert page.locator("#error-detail").inner_text().startswith("HTTP 429 · queue_full")
            note = page.locator("#error-retry").inner_text()
            assert note.startswith("Retry-After: ") and int(note.split()[1]) >= 1
            assert page.locator("#run").is_enabled()  # not stuck in a busy state
            assert page.locator("#retry").is_visible()
            page.wait_for_function(
                "() => document.getElementById('st-queue').textContent.startsWith('1 waiting')"
            )
            page.screenshot(path=tmp_path / "1-queue-full.png", full_page=True)

            gate.set()
            assert running.result().status_code == 200 and queued.result().status_code == 200
            page.click("#retry")
            page.wait_for_selector("#gen-viewer[data-state=done]")
            assert page.locator("#error").is_hidden()
            page.screenshot(path=tmp_path / "2-retried.png", full_page=True)

            # Draining: new work gets 503 shutting_down; the page says so and keeps its retry button.
            app.state.boot.get_loop().call_soon_threadsafe(app.state.runtime.begin_drain)
            page.click("#run")
            page.wait_for_selector("#error:not([hidden])")
            assert page.locator("#error-message").inner_text() == (
                "the server is shutting down and accepts no new requests"
            )
            assert page.locator("#error-detail").inner_text().startswith("HTTP 503 · shutting_down")
            assert page.locator("#retry").is_visible() and page.locator("#run").is_enabled()
            assert page.locator("#gen-viewer").get_attribute("data-state") == "done"  # the last image stays
            page.wait_for_function("() => document.getElementById('st-state').dataset.state === 'draining'")
            page.screenshot(path=tmp_path / "3-draining.png", full_page=True)
            assert watch.errors == []
        finally:
            gate.set()
            page.context.close()
