"""Helpers of the browser tests: which weights they serve, how Chromium is launched, and opening the
playground in a fresh browser context. Imported by the tests as ``ui_harness`` (this directory is on sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path

from playwright.sync_api import Browser, Page

from dcar.model.pipeline import INDEX

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WEIGHTS = REPO_ROOT / "weights" / "dcar-tiny-shapes"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def ui_weights() -> Path | None:
    """The weights directory the browser tests serve, or None for the random tiny preset."""
    if os.environ.get("DCAR_UI_WEIGHTS"):
        return Path(os.environ["DCAR_UI_WEIGHTS"])
    if (DEFAULT_WEIGHTS / INDEX).is_file():
        return DEFAULT_WEIGHTS  # exported: loaded strictly, and a load error fails the suite
    # The embedded default is still being trained (no model_index.json yet): stand in with preset:tiny.
    return None


class PageWatch:
    """What a page did: uncaught script errors and every URL it asked for."""

    def __init__(self, page: Page):
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: self.requests.append(r.url))


def open_page(
    browser: Browser, url: str, viewport: dict = DESKTOP, **context_options
) -> tuple[Page, PageWatch]:
    """The playground in a fresh context (own localStorage), once the status strip says ready and the sizes
    arrived from /v1/models."""
    context = browser.new_context(viewport=viewport, **context_options)
    context.set_default_timeout(30_000)
    page = context.new_page()
    watch = PageWatch(page)
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('st-state').dataset.state === 'ready'")
    page.wait_for_function("() => document.querySelectorAll('#size option').length > 0")
    return page, watch
