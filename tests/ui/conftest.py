"""Fixtures of the browser tests: the model, a live server on 127.0.0.1, and headless Debian Chromium driven by
Playwright for Python (never Playwright's own browser download: ``make test`` installs /usr/bin/chromium).

The model is the embedded default ``weights/dcar-tiny-shapes`` once it has been exported there, or the weights
directory named by ``DCAR_UI_WEIGHTS``. Until the default lands, the random tiny preset (128x128) stands in, so the
suite runs everywhere: what it checks (progress events, sizes, pixels kept outside the mask, error texts) holds
for any weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright
from ui_harness import CHROMIUM, CHROMIUM_FLAGS, open_page, ui_weights

from dcar.model.config import pipeline_preset
from dcar.model.pipeline import Pipeline
from tests.server.server_harness import StepHook, live_server


@pytest.fixture(scope="session")
def ui_pipe() -> Pipeline:
    path = ui_weights()
    if path is not None:
        pipe = Pipeline.from_pretrained(path, device="cpu")
    else:
        pipe = Pipeline.from_config(pipeline_preset("tiny"), device="cpu", seed=0, name="tiny-random")
    print(f"\nui tests serve {path or 'preset:tiny'} ({pipe.name}, native {pipe.config.sampling.size}px)")
    return pipe


@pytest.fixture(scope="session")
def hook(ui_pipe):
    """Wraps the pipeline's unmasking step for the whole session: tests slow it (``delay``) or hold it
    (``fail``); reset after every test by ``step_hook``."""
    with pytest.MonkeyPatch.context() as mp:
        yield StepHook(ui_pipe, mp)


@pytest.fixture
def step_hook(hook):
    hook.delay, hook.fail = 0.0, None
    yield hook
    hook.delay, hook.fail = 0.0, None


@pytest.fixture(scope="session")
def server(ui_pipe, hook) -> str:
    """A live server for the tests that need no special settings; yields its base URL."""
    with live_server(ui_pipe, max_wait_ms=0) as (url, _app):
        yield url


@pytest.fixture(scope="module")
def browser() -> Browser:
    # Module scope: Playwright's sync API holds the main thread's event loop while it runs, which async
    # (anyio) tests elsewhere in the suite could not then use.
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium package"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def desktop(browser, server):
    page, watch = open_page(browser, server)
    yield page, watch
    page.context.close()
    assert watch.errors == [], f"uncaught errors on the page: {watch.errors}"
