"""The playground's server side without a browser: the page and its files (fixed list, strict Content-Security-
Policy), ``GET /v1/status`` for the status strip and the one-minute images/s behind it, and the rule that no
script puts server text into markup."""

from __future__ import annotations

import re

import httpx
import pytest
from ui_harness import REPO_ROOT

from dcar.model.knobs import KNOB_NAMES, knob_values
from dcar.server.metrics import RecentRate
from dcar.server.routes_ui import STATIC, STATIC_DIR
from tests.server.server_harness import live_server

# Plain (sync) tests on live servers: while a module's browser is open, Playwright's sync API holds the main
# thread's event loop, so this directory keeps to sync tests.


def test_the_page_and_its_files_are_served_with_a_strict_policy(server):
    with httpx.Client(base_url=server) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        for src in re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text):
            assert client.get(src).status_code == 200, src
        for name, media in STATIC.items():
            r = client.get(f"/ui/{name}")
            assert r.status_code == 200 and r.headers["content-type"] == media, name
        for bad in ("/ui/nothing.js", "/ui/..%2Froutes.py", "/ui/%2E%2E%2Fapp.py"):
            r = client.get(bad)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", bad


def test_every_static_file_is_listed_and_packaged():
    on_disk = {p.name for p in STATIC_DIR.iterdir()}
    assert on_disk == set(STATIC), "server/routes_ui.py STATIC must list exactly the files in server/static/"
    assert all(p.is_file() for p in STATIC_DIR.iterdir())  # package-data "*" covers no subfolders
    # tests/test_wheel.py checks that the built wheel holds exactly these files
    assert '"dcar.server.static" = ["*"]' in (REPO_ROOT / "pyproject.toml").read_text()


def test_no_script_turns_text_into_markup():
    for path in STATIC_DIR.glob("*.js"):
        code = path.read_text()
        for sink in (
            r"\.innerHTML\b",
            r"\.outerHTML\b",
            r"insertAdjacentHTML\(",
            r"document\.write",
            r"\beval\(",
            r"new Function\(",
        ):
            assert not re.search(sink, code), f"{path.name} uses {sink}"


def test_status_reports_model_queue_and_images_per_second(ui_pipe, hook):
    with live_server(ui_pipe, max_wait_ms=0) as (url, _app), httpx.Client(base_url=url, timeout=60) as client:
        before = client.get("/v1/status").json()
        assert before["status"] == "ready" and before["model"] == ui_pipe.name
        assert before["device"] == "cpu" and before["dtype"] == "float32"
        assert before["queue_size"] == 0 and before["rows_running"] == 0 and before["window_s"] == 60
        assert before["images_per_second"] == 0  # the warm-up is not a delivered image
        native = ui_pipe.config.sampling.size
        # every sampling knob's default, the same names as the request fields
        assert before["defaults"] == {**knob_values(ui_pipe.config.sampling), "size": f"{native}x{native}"}
        assert set(before["defaults"]) == {*KNOB_NAMES, "size"}
        assert before["limits"]["max_steps"] == 50 and before["limits"]["sizes"] == [f"{native}x{native}"]
        assert before["limits"]["max_residual_steps"] > 0 and before["limits"]["request_timeout_s"] == 120
        limits = before["limits"]
        assert (limits["scheduling_policy"], limits["min_priority"], limits["max_priority"]) == (
            "fcfs",
            -100,
            100,
        )
        assert before["admission"] == {
            "max_queue": 256,
            "max_queue_delay_s": 2.0,
            "quantile": 0.99,
            "margin_s": 0.0,  # no request has finished yet
            "backlog_s": 0.0,  # idle
        }
        r = client.post("/v1/generate", json={"prompt": "two", "n": 2, "steps": 2})
        assert r.status_code == 200
        after = client.get("/v1/status").json()
        assert after["images_per_second"] > 0


def test_status_needs_the_api_key_and_reports_defaults_within_the_caps(ui_pipe, hook):
    """The key is needed for /v1/status, not for the page. Its defaults are what a request without the knob
    gets: the model's lowered to the caps (they once were the model's own, and the page, which fills its
    inputs from them, sent steps the server then refused)."""
    # max_batch_size=1: a warm-up of one batch size only, this test sends one request at a time
    caps = {"max_steps": 3, "max_guidance_scale": 1.0, "max_residual_steps": 2, "max_batch_size": 1}
    model = knob_values(ui_pipe.config.sampling)
    assert model["steps"] > 3 and model["guidance_scale"] > 1.0 and model["residual_steps"] > 2
    with (
        live_server(ui_pipe, api_keys=["secret-key-1"], **caps) as (url, _app),
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        r = client.get("/v1/status")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        auth = {"Authorization": "Bearer secret-key-1"}
        ok = client.get("/v1/status", headers=auth)
        assert ok.status_code == 200
        assert client.get("/").status_code == 200
        defaults = ok.json()["defaults"]
        assert (defaults["steps"], defaults["guidance_scale"], defaults["residual_steps"]) == (3, 1.0, 2)
        # sent back as the page sends them, they are accepted and are what the server resolves by itself
        page = {"prompt": "a red circle", "seed": 1, "steps": 3, "guidance_scale": 1.0}
        sent = client.post("/v1/generate", json=page, headers=auth)
        assert sent.status_code == 200, sent.text
        alone = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 1}, headers=auth)
        for name in ("steps", "guidance_scale", "residual_steps"):
            assert sent.json()["parameters"][name] == alone.json()["parameters"][name] == defaults[name]


def test_recent_rate_counts_the_last_minute_only():
    now = [1000.0]
    rate = RecentRate(60.0, clock=lambda: now[0])
    assert rate.rate() == 0
    now[0] = 1010.0
    rate.add(5)
    assert rate.rate() == pytest.approx(5 / 10)  # younger than the window: over the time elapsed so far
    now[0] = 1065.5
    rate.add(1)
    assert rate.rate() == pytest.approx(6 / 60)
    now[0] = 1070.2  # the 5 images of second 1010 have left the window
    assert rate.rate() == pytest.approx(1 / 60)
    now[0] = 2000.0
    assert rate.rate() == 0
