"""The playground in a real browser (headless Chromium) against a live server: generate with live progress,
edit with a painted mask, API errors on the page, and the phone-sized layout. Each state is saved as a
screenshot under the test's tmp_path."""

from __future__ import annotations

import base64
import io
import re
import time

import httpx
import numpy as np
from PIL import Image
from ui_harness import DESKTOP, PHONE, open_page

from tests.server.server_harness import live_server, metric


def image_of_data_url(url: str) -> Image.Image:
    head, b64 = url.split(",", 1)
    assert head.startswith("data:image/png;base64"), head
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def unlabelled_controls(page) -> list[str]:
    """Controls without an accessible name (label, aria-label, aria-labelledby or text)."""
    return page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button, a[href]')]
        .filter(el => !((el.labels && el.labels.length) || el.getAttribute('aria-label')
                        || el.getAttribute('aria-labelledby') || el.textContent.trim()))
        .map(el => el.outerHTML.slice(0, 80))""")


def test_generate_streams_progress_then_the_final_image(desktop, server, ui_pipe, step_hook, tmp_path):
    page, watch = desktop
    native = ui_pipe.config.sampling.size
    assert page.locator("#st-model").inner_text() == ui_pipe.name
    assert page.locator("#st-device").inner_text().startswith("cpu")
    assert "waiting" in page.locator("#st-queue").inner_text()
    assert page.locator("#size").input_value() == f"{native}x{native}"
    assert page.locator("#steps").input_value() == str(ui_pipe.config.sampling.steps)
    assert unlabelled_controls(page) == []
    page.screenshot(path=tmp_path / "1-start.png", full_page=True)

    step_hook.delay = 0.15  # slow enough to photograph the token map filling in
    page.fill("#prompt", "a red circle")
    page.click("#dice")
    seed = int(page.locator("#seed").input_value())
    page.locator("#prompt").press("Control+Enter")
    page.wait_for_function("() => Number(document.getElementById('gen-viewer').dataset.progressEvents) >= 3")
    assert page.locator("#gen-viewer").get_attribute("data-state") == "running"
    assert re.match(
        r"Step \d+ of 12 · \d+ of \d+ tokens revealed", page.locator("#gen-viewer .v-caption").inner_text()
    )
    assert page.locator("#gen-viewer .v-preview").get_attribute("src").startswith("data:image/png;base64,")
    page.screenshot(path=tmp_path / "2-progress.png", full_page=True)
    step_hook.delay = 0.0

    page.wait_for_selector("#gen-viewer[data-state=done]")
    events = int(page.locator("#gen-viewer").get_attribute("data-progress-events"))
    assert events == 12  # one per unmasking step
    result = page.locator("#gen-result")
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [native, native]
    image = image_of_data_url(result.get_attribute("src"))
    assert image.size == (native, native)
    timings = page.locator("#gen-viewer .v-timings dt").all_inner_texts()
    for stage in ("text encode", "unmasking", "residual head", "decode", "image encode", "round trip"):
        assert stage in timings
    assert f"seed {seed}" in page.locator("#gen-viewer .v-caption").inner_text()
    page.screenshot(path=tmp_path / "3-done.png", full_page=True)

    # The gallery keeps it across a reload, with its parameters, a download link and "use as edit input".
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#size option').length > 0")
    card = page.locator("#gallery .card")
    assert card.count() == 1
    assert f"seed {seed}" in card.locator(".card-params").inner_text()
    assert card.locator(".card-prompt").inner_text() == "a red circle"
    download = card.get_by_role("link", name=re.compile("^Download"))
    assert download.get_attribute("download") == f"dcar-generate-{seed}.png"
    assert image_of_data_url(download.get_attribute("href")).size == (native, native)
    page.wait_for_function(
        "() => Number(document.getElementById('st-rate').textContent) > 0"
    )  # images/s, last minute
    card.get_by_role("button", name=re.compile("^Use as edit input")).click()
    page.wait_for_selector("#paint[data-loaded]")
    assert page.locator("#tab-edit").get_attribute("aria-selected") == "true"
    assert "gallery image" in page.locator("#edit-note").inner_text()
    page.screenshot(path=tmp_path / "4-gallery-to-edit.png", full_page=True)

    # Everything came from this server: no CDN, no font service (data: URLs are the images themselves).
    assert all(u.startswith(server) or u.startswith("data:") for u in watch.requests), watch.requests


def paint_vertical(page, x: float, width: int, height: int) -> None:
    """One brush stroke from top to bottom at image column x (image pixels -> screen pixels)."""
    box = page.locator("#edit-mask").bounding_box()
    sx = box["x"] + x * box["width"] / width
    page.mouse.move(sx, box["y"] + 1)
    page.mouse.down()
    page.mouse.move(sx, box["y"] + box["height"] - 1, steps=8)
    page.mouse.up()


def set_brush(page, size: int) -> None:
    slider = page.locator("#brush-size")
    slider.focus()
    slider.press("Home")  # the slider's minimum, 4
    for _ in range((size - 4) // 2):  # step 2
        slider.press("ArrowRight")
    assert page.locator("#brush-size-value").inner_text() == str(size)


def coverage(page) -> str:
    return page.locator("#mask-coverage").inner_text()


def test_edit_keeps_the_unmasked_half(desktop, ui_pipe, tmp_path):
    page, _ = desktop
    w = h = ui_pipe.config.sampling.size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)  # exact equality is meaningful on noise
    source = tmp_path / "input.png"
    Image.fromarray(pixels).save(source)
    odd = tmp_path / "odd-size.png"
    Image.new("RGB", (100, 60), (200, 30, 30)).save(odd)

    page.click("#tab-edit")
    assert page.locator("#run").inner_text() == "Edit"
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    page.set_input_files("#edit-file", not_an_image)
    page.wait_for_selector("#error:not([hidden])")
    assert page.locator("#error-message").inner_text() == "notes.png could not be read as an image"
    assert page.locator("#edit-file").get_attribute("aria-invalid") == "true"
    page.set_input_files("#edit-file", odd)  # not a served size: resized, with a note
    page.wait_for_function("() => document.getElementById('edit-note').textContent.includes('resized')")
    assert page.locator("#error").is_hidden()  # the readable file answers the unreadable one's error
    assert page.locator("#edit-file").get_attribute("aria-invalid") is None
    assert f"resized and cropped to {w}x{h}" in page.locator("#edit-note").inner_text()
    page.set_input_files("#edit-file", source)
    page.wait_for_function("() => document.getElementById('edit-note').textContent.startsWith('input.png')")

    # The tools: invert an empty mask (all marked), clear, a dab and the eraser over it.
    page.click("#mask-invert")
    assert coverage(page).startswith("100%")
    page.click("#mask-clear")
    assert coverage(page) == "Nothing painted yet."
    box = page.locator("#edit-mask").bounding_box()
    page.mouse.click(box["x"] + box["width"] / 4, box["y"] + box["height"] / 4)
    assert coverage(page).endswith("marked for regeneration.")
    page.check("#tool-eraser")
    set_brush(page, 160)
    page.mouse.click(box["x"] + box["width"] / 4, box["y"] + box["height"] / 4)
    assert coverage(page) == "Nothing painted yet."
    page.check("#tool-brush")

    # Paint the right half: two strokes of a w/4 brush cover columns w/2+2 .. w, and no pixel left of w/2.
    d = w // 4
    set_brush(page, d)
    paint_vertical(page, w / 2 + 2 + d / 2, w, h)
    paint_vertical(page, w - d / 2, w, h)
    percent = int(coverage(page).split("%")[0])
    assert 45 <= percent <= 50, coverage(page)
    page.screenshot(path=tmp_path / "1-mask.png", full_page=True)

    page.fill("#prompt", "a blue square")
    page.fill("#seed", "7")
    page.click("#run")
    page.wait_for_selector("#edit-viewer[data-state=done]")
    assert int(page.locator("#edit-viewer").get_attribute("data-progress-events")) >= 1
    page.screenshot(path=tmp_path / "2-edited.png", full_page=True)

    result = np.asarray(image_of_data_url(page.locator("#edit-result").get_attribute("src")).convert("RGB"))
    assert result.shape == pixels.shape
    assert np.array_equal(result[:, : w // 2], pixels[:, : w // 2])  # unmasked half: the input's own pixels
    assert not np.array_equal(result[:, w // 2 :], pixels[:, w // 2 :])  # masked half: regenerated
    # The result sits beside the input.
    paint, shown = page.locator("#paint").bounding_box(), page.locator("#edit-result").bounding_box()
    assert (
        shown["x"] >= paint["x"] + paint["width"] - 1 and abs(shown["y"] - paint["y"]) < paint["height"] / 2
    )
    assert page.locator("#gallery .card").first.locator(".card-params").inner_text().startswith("edit")

    # Edit with an empty mask: the page refuses it and the result stays; painting answers the refusal.
    page.click("#mask-clear")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])")
    assert (
        page.locator("#error-message").inner_text() == "paint over the part of the image to regenerate first"
    )
    assert page.locator("#edit-viewer").get_attribute("data-state") == "done"
    assert page.locator("#edit-result").is_visible()
    page.click("#mask-invert")
    assert page.locator("#error").is_hidden()


def test_api_errors_are_shown_in_the_apis_words(desktop, server, tmp_path):
    page, _ = desktop
    page.fill("#prompt", "a green triangle")
    page.fill("#steps", "80")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])")
    api = httpx.post(f"{server}/v1/generate", json={"prompt": "a green triangle", "steps": 80}).json()[
        "error"
    ]
    assert (
        page.locator("#error-message").inner_text()
        == api["message"]
        == "steps must be between 1 and 50, got 80"
    )
    assert "HTTP 400 · invalid_value · field: steps" in page.locator("#error-detail").inner_text()
    assert page.locator("#steps").get_attribute("aria-invalid") == "true"
    assert page.locator("#retry").is_hidden()  # nothing to retry: the input must change
    assert page.locator("#gen-viewer").get_attribute("data-state") == "empty"
    page.screenshot(path=tmp_path / "1-steps-error.png", full_page=True)

    long_prompt = "a red circle above a blue square " * 80
    page.fill("#steps", "2")
    page.fill("#prompt", long_prompt)
    page.click("#run")
    page.wait_for_function(
        "() => document.getElementById('error-message').textContent.startsWith('prompt is')"
    )
    api = httpx.post(f"{server}/v1/generate", json={"prompt": long_prompt, "steps": 2}).json()["error"]
    assert page.locator("#error-message").inner_text() == api["message"]
    assert "prompts are never truncated" in api["message"]
    assert page.locator("#prompt").get_attribute("aria-invalid") == "true"
    page.screenshot(path=tmp_path / "2-prompt-error.png", full_page=True)

    page.fill("#prompt", "<img src=x onerror=alert(1)>")  # shown as text, never parsed as markup
    page.click("#run")
    page.wait_for_selector("#gen-viewer[data-state=done]")
    assert page.locator("#error").is_hidden()
    assert page.locator("#steps").get_attribute("aria-invalid") is None
    assert page.locator("#gallery .card-prompt").first.inner_text() == "<img src=x onerror=alert(1)>"
    assert page.locator("#gallery img[src=x]").count() == 0

    # A fractional seed is the server's to name (the page once blamed it on the 2^53 limit), and neither it
    # nor a seed the page refuses itself takes the finished image off the screen.
    shown = page.locator("#gen-result").get_attribute("src")
    page.fill("#seed", "1.5")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])")
    api = httpx.post(f"{server}/v1/generate", json={"prompt": "x", "seed": 1.5}).json()["error"]
    assert page.locator("#error-message").inner_text() == api["message"]
    assert "HTTP 422 · invalid_request · field: seed" in page.locator("#error-detail").inner_text()
    page.fill("#seed", str(2**60))
    page.click("#run")
    page.wait_for_function("() => document.getElementById('error-message').textContent.includes('2^53')")
    assert page.locator("#seed").get_attribute("aria-invalid") == "true"
    assert page.locator("#gen-viewer").get_attribute("data-state") == "done"
    assert page.locator("#gen-result").is_visible()
    assert page.locator("#gen-result").get_attribute("src") == shown


def test_phone_sized_screen(browser, server, ui_pipe, tmp_path):
    page, watch = open_page(browser, server, viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        no_overflow = "document.documentElement.scrollWidth <= window.innerWidth"
        assert page.evaluate(no_overflow)
        run = page.locator("#run").bounding_box()
        assert run["width"] <= PHONE["width"] and run["height"] >= 44  # a thumb-sized target
        page.screenshot(path=tmp_path / "1-phone-generate.png", full_page=True)
        page.locator("#tab-edit").tap()
        native = ui_pipe.config.sampling.size
        source = tmp_path / "input.png"
        Image.new("RGB", (native, native), (40, 90, 200)).save(source)
        page.set_input_files("#edit-file", source)
        page.wait_for_selector("#paint[data-loaded]")
        w = h = native
        paint_vertical(page, w / 2, w, h)
        assert coverage(page).endswith("marked for regeneration.")
        assert page.evaluate(no_overflow)
        paint = page.locator("#paint").bounding_box()
        assert paint["width"] <= PHONE["width"] - 20
        page.screenshot(path=tmp_path / "2-phone-edit.png", full_page=True)
        assert watch.errors == []
    finally:
        page.context.close()


def test_stop_abandons_a_running_request(desktop, server, step_hook, tmp_path):
    page, _ = desktop

    def dropped() -> float:
        return metric(httpx.get(f"{server}/metrics").text, "dcar_dropped_rows_total", reason="disconnected")

    before = dropped()
    step_hook.delay = 0.2
    page.fill("#prompt", "a slow star")
    page.click("#run")
    page.wait_for_function("() => Number(document.getElementById('gen-viewer').dataset.progressEvents) >= 1")
    page.click("#stop")
    page.wait_for_selector("#gen-viewer[data-state=failed]")
    assert page.locator("#run").is_enabled() and page.locator("#stop").is_hidden()
    assert page.locator("#error").is_hidden()  # stopping is not an error
    # so the caption points at no message "above"
    assert page.locator("#gen-viewer .v-caption").inner_text() == "Stopped: no image."
    # The server noticed the client leave and dropped the row (visible on /metrics).
    deadline = time.monotonic() + 10
    while dropped() == before:
        assert time.monotonic() < deadline, "the server did not drop the abandoned row"
        time.sleep(0.05)


def test_a_server_with_api_keys_asks_for_the_key(browser, ui_pipe, hook, tmp_path):
    with live_server(ui_pipe, api_keys=["secret-key-1"]) as (url, _app):
        context = browser.new_context(viewport=DESKTOP)
        try:
            page = context.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#error:not([hidden])")
            assert page.locator("#error-message").inner_text() == "Authorization: Bearer <key> is required"
            page.wait_for_function(
                "() => document.getElementById('st-state').textContent === 'API key needed'"
            )
            page.screenshot(path=tmp_path / "1-key-needed.png", full_page=True)
            assert page.locator("details.connection").get_attribute("open") is not None  # opened for the key
            assert page.locator("#api-key").get_attribute("aria-invalid") == "true"
            page.fill("#api-key", "secret-key-1")
            page.locator("#api-key").press("Tab")  # change event: stored for the tab, sizes and status reload
            page.wait_for_function("() => document.querySelectorAll('#size option').length > 0")
            page.wait_for_function("() => document.getElementById('st-state').dataset.state === 'ready'")
            assert page.locator("#error").is_hidden()
            page.fill("#prompt", "a key")
            page.fill("#steps", "2")
            page.click("#run")
            page.wait_for_selector("#gen-viewer[data-state=done]")
            assert page.locator("#error").is_hidden()
        finally:
            context.close()
