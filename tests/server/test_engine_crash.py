"""A crash of the engine loop itself (a bug, here injected into delivering an outcome) after a client left:
the rows it leaves running are counted under the reason their job ended with."""

from __future__ import annotations

import time

import httpx
import pytest
from server_harness import StepHook, live_server, metric

import dcar.server.engine as engine_module


def test_a_crash_counts_the_running_rows_of_a_job_that_had_ended_under_its_own_reason(pipe, monkeypatch):
    """The client left (its rows are dropped at the next step boundary, as disconnected); the loop crashed
    before that boundary. Its two rows were counted as failed with the crash's own jobs."""
    hook = StepHook(pipe, monkeypatch)
    real_deliver = engine_module.deliver

    def deliver_that_breaks_after_a_disconnect(out, running, *args):
        if any(t.job.closed == "disconnected" for t in running.values()):
            raise RuntimeError("a bug in deliver")
        return real_deliver(out, running, *args)

    with live_server(pipe, max_wait_ms=0) as (url, app):
        monkeypatch.setattr(engine_module, "deliver", deliver_that_breaks_after_a_disconnect)
        hook.delay = 0.1
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/generate", json={"prompt": "leaving", "n": 2, "steps": 12}, timeout=0.35)
        deadline = time.monotonic() + 5
        while app.state.runtime.engine.status != "failed":
            assert time.monotonic() < deadline, "the loop never crashed"
            time.sleep(0.05)
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "dcar_dropped_rows_total", reason="failed") == 0
        assert metric(text, "dcar_dropped_rows_total", reason="disconnected") == 2
        assert metric(text, "dcar_rows_running") == 0
