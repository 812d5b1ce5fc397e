"""The page never hangs on backpressure: a full queue (429) shows the API's message and Retry-After and lets the
user try again; a draining server (503) says so and lets the user retry; a request waiting in the queue shows its
place in line until its first step. The engine is held by a step hook on the pipeline (the same fault injection
the server tests use), never by mocking the server."""

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


BODY = {"prompt": "runs", "steps": 2}


def one_running_one_waiting(url: str, pool: ThreadPoolExecutor):
    """Two API requests, "runs" (in the one batch slot, held there by the test's hook) and "waits" (queued
    behind it); their futures, once the server reports them running and waiting."""
    running = pool.submit(httpx.post, f"{url}/v1/generate", json=BODY, timeout=60)
    wait_until(lambda: status(url)["rows_running"] == 1)
    waiting = pool.submit(httpx.post, f"{url}/v1/generate", json={**BODY, "prompt": "waits"}, timeout=60)
    wait_until(lambda: status(url)["queue_size"] == 1)
    return running, waiting


def test_a_full_queue_shows_retry_after_and_the_user_can_try_again(browser, ui_pipe, step_hook, tmp_path):
    gate = threading.Event()

    def hold(state):  # the running row holds the engine until released; the warm-up passes
        if state.rows[0].params.prompt != "warm-up":
            gate.wait(30)

    with (
        # max_queue_delay_s: the forecast would otherwise refuse "waits" itself on a slow CPU (the warm-up
        # measures seconds per image), and this test is about the max_queue bound
        live_server(
            ui_pipe, max_batch_size=1, max_queue=1, max_n=1, max_wait_ms=0, max_queue_delay_s=600
        ) as (url, app),
        ThreadPoolExecutor(2) as pool,
    ):
        page, watch = open_page(browser, url)
        try:
            step_hook.fail = hold
            running, queued = one_running_one_waiting(url, pool)

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


CAPTIONS = """() => {
    const caption = document.querySelector('#gen-viewer .v-caption');
    window.captions = [];
    new MutationObserver(() => window.captions.push(caption.textContent))
        .observe(caption, { childList: true, characterData: true, subtree: true });
}"""


def test_a_queued_generation_shows_its_place_until_its_first_step(browser, ui_pipe, step_hook, tmp_path):
    """The stream's ``queued`` events on the page: the place in line while the batch slot is taken, changed
    only when the place changes (the caption is a polite live region), then the steps and the image."""
    gates = {"runs": threading.Event(), "waits": threading.Event()}

    def hold(state):  # each held request keeps the one batch slot until its gate opens; the rest pass
        gate = gates.get(state.rows[0].params.prompt)
        if gate is not None:
            gate.wait(30)

    with (
        # No warm-up (a full generation per size, most of this test's time on a busy CPU); max_queue_delay_s:
        # the held rows would otherwise make the forecast refuse the queued ones.
        live_server(
            ui_pipe,
            max_batch_size=1,
            max_wait_ms=0,
            max_queue_delay_s=600,
            sse_keepalive_s=0.05,
            warmup=False,
        ) as (url, _app),
        ThreadPoolExecutor(3) as pool,
    ):
        page, watch = open_page(browser, url)
        try:
            step_hook.fail = hold
            running, ahead = one_running_one_waiting(url, pool)

            page.evaluate(CAPTIONS)
            page.fill("#prompt", "a patient square")
            page.fill("#steps", "2")
            page.click("#run")
            caption = page.locator("#gen-viewer .v-caption")
            page.wait_for_function(
                "() => document.querySelector('#gen-viewer .v-caption').textContent.startsWith('Queued')"
            )
            assert caption.inner_text() == "Queued: 2nd in line (2 images waiting)"
            assert caption.get_attribute("aria-live") == "polite"
            page.screenshot(path=tmp_path / "1-queued.png", full_page=True)

            # Someone joins behind it: the server sends the new count, the place (and the caption) stay.
            behind = pool.submit(
                httpx.post, f"{url}/v1/generate", json={**BODY, "prompt": "behind"}, timeout=60
            )
            page.wait_for_function(
                "() => Number(document.getElementById('gen-viewer').dataset.queuedEvents) >= 2"
            )
            assert caption.inner_text() == "Queued: 2nd in line (2 images waiting)"

            gates["runs"].set()  # the running request ends, the one ahead takes the slot: next in line
            page.wait_for_function(
                "() => document.querySelector('#gen-viewer .v-caption').textContent.includes('next')"
            )
            assert caption.inner_text() == "Queued: next in line (2 images waiting)"
            page.screenshot(path=tmp_path / "2-next.png", full_page=True)

            gates["waits"].set()
            page.wait_for_selector("#gen-viewer[data-state=done]")
            assert page.locator("#gen-result").get_attribute("src").startswith("data:image/png;base64,")
            captions = page.evaluate("() => window.captions")
            wordings = page.evaluate("""async () => {
                const { queuedText } = await import('/ui/progress.js');
                return [[1, 1], [2, 2], [3, 5], [4, 4], [11, 11], [12, 12], [13, 13], [21, 21], [22, 30],
                        [23, 23], [101, 101], [111, 111], [112, 112]].map(([p, n]) => queuedText(p, n));
            }""")
            assert captions[:3] == [
                "Waiting for the server…",
                "Queued: 2nd in line (2 images waiting)",
                "Queued: next in line (2 images waiting)",
            ]
            assert wordings == [
                "Queued: next in line (1 image waiting)",
                "Queued: 2nd in line (2 images waiting)",
                "Queued: 3rd in line (5 images waiting)",
                "Queued: 4th in line (4 images waiting)",
                "Queued: 11th in line (11 images waiting)",
                "Queued: 12th in line (12 images waiting)",
                "Queued: 13th in line (13 images waiting)",
                "Queued: 21st in line (21 images waiting)",
                "Queued: 22nd in line (30 images waiting)",
                "Queued: 23rd in line (23 images waiting)",
                "Queued: 101st in line (101 images waiting)",
                "Queued: 111th in line (111 images waiting)",
                "Queued: 112th in line (112 images waiting)",
            ]
            assert captions[3].startswith("Step 1 of 2 · ") and "Queued" not in " ".join(captions[3:])
            for f in (running, ahead, behind):
                assert f.result().status_code == 200
            assert watch.errors == []
        finally:
            for gate in gates.values():
                gate.set()
            page.context.close()
