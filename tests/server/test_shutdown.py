"""SIGTERM drains a real ``dcar serve`` process: readiness 503, no new work, in-flight rows finish, exit 0.

Also the ``dcar serve`` argument wiring (server/serve.py) that the CLI mounts."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_harness import StepHook, draining_server, metric, metrics_text, serve, start_dcar_serve

from dcar.server.serve import add_arguments, settings_from_args


def test_serve_flags_override_settings():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--weights",
            "preset:tiny",
            "--port",
            "9001",
            "--max-batch-size",
            "3",
            "--allowed-sizes",
            "128x128,64x64",
            "--api-key",
            "key-a-12345",
            "--api-key",
            "key-b-12345",
            "--no-warmup",
            "--request-timeout",
            "9",
        ]
    )
    s = settings_from_args(args)
    assert (s.weights, s.port, s.max_batch_size, s.warmup, s.request_timeout_s) == (
        "preset:tiny",
        9001,
        3,
        False,
        9,
    )
    assert s.allowed_sizes == ["128x128", "64x64"] and s.api_keys == ["key-a-12345", "key-b-12345"]
    assert settings_from_args(parser.parse_args([])).port == 8000


def test_sigterm_drains_in_flight_rows_then_exits(tmp_path):
    # a long queue delay: all three requests are accepted however slow this machine is
    url, proc, log = start_dcar_serve(
        tmp_path / "serve.log",
        *("--allowed-sizes", "128x128,256x256", "--max-batch-size", "4", "--max-wait-ms", "0"),
        *("--log-level", "info"),
        env={"DCAR_DRAIN_TIMEOUT_S": "60", "DCAR_MAX_QUEUE_DELAY_S": "600"},
    )
    try:
        deadline = time.monotonic() + 120
        work = {"prompt": "drain me", "n": 4, "size": "256x256", "steps": 20}
        with ThreadPoolExecutor(3) as pool:
            inflight = [
                pool.submit(httpx.post, f"{url}/v1/generate", json={**work, "seed": 10 * i}, timeout=120)
                for i in range(3)
            ]
            while True:  # all three accepted (12 rows queued, running or done): they are in flight
                text = httpx.get(f"{url}/metrics").text
                accepted = sum(metric(text, name) for name in ("dcar_queue_size", "dcar_rows_running"))
                if accepted + metric(text, "dcar_images_generated_total", task="generate") == 12:
                    break
                assert time.monotonic() < deadline, "the requests were never accepted"
                time.sleep(0.005)
            assert accepted > 0, "the work finished before SIGTERM could be sent; make it longer"
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            ready = httpx.get(f"{url}/readyz", timeout=5)
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            refused = httpx.post(f"{url}/v1/generate", json={"prompt": "too late"}, timeout=5)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert int(refused.headers["retry-after"]) >= 1  # the predicted rest of the drain
            responses = [f.result() for f in inflight]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert all(len(r.json()["images"]) == 4 for r in responses)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        print(log.read())
        log.close()


@pytest.mark.anyio
async def test_the_drain_timeout_is_waited_once_and_client_outcomes_log_below_error(
    pipe, monkeypatch, caplog
):
    gate = threading.Event()

    def hold(state):
        if state.rows[0].params.prompt != "warm-up":
            gate.wait(30)

    StepHook(pipe, monkeypatch, fail=hold)
    caplog.set_level(logging.INFO)
    try:
        async with serve(pipe, drain_timeout_s=1.0, max_wait_ms=0) as client:
            held = asyncio.create_task(client.post("/v1/generate", json={"prompt": "held", "steps": 2}))
            while metric(await metrics_text(client), "dcar_rows_running") < 1:
                await asyncio.sleep(0.01)
            engine = client.app.state.runtime.engine
            assert not await engine.drain(1.0)  # the held row does not finish in time: 503
            r = await held
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            t0 = time.monotonic()
            assert not await engine.drain(1.0)  # the lifespan drains again: the same deadline, no new wait
            assert time.monotonic() - t0 < 0.5
            refused = await client.post("/v1/generate", json={"prompt": "too late"})
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            gate.set()  # before the lifespan's shutdown, which waits for the held step to return
    finally:
        gate.set()
    shutdown = [rec for rec in caplog.records if "shut" in rec.getMessage() and rec.name.startswith("dcar")]
    assert shutdown and all(rec.levelno < logging.ERROR for rec in shutdown), [
        (rec.levelname, rec.getMessage()) for rec in shutdown
    ]


def broken_after_warm_up(state):
    if state.rows[0].params.prompt != "warm-up":  # every batch fails, and so does the health probe
        raise RuntimeError("the device is gone")


@pytest.mark.parametrize("exits", [True, False])
def test_an_engine_that_failed_for_good_ends_the_process_with_status_1(pipe, monkeypatch, exits):
    """A batch error whose health probe also fails leaves the engine failed: every request 503. Kubernetes
    restarts such a pod through /healthz, but docker compose's restart policy only acts on an exit, so the
    process ends with status 1 (DCAR_EXIT_ON_ENGINE_FAILURE=false keeps it up, answering 503)."""
    StepHook(pipe, monkeypatch, fail=broken_after_warm_up)
    with draining_server(pipe, exit_on_engine_failure=exits) as (url, server, thread):
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "steps": 2}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        if exits:
            thread.join(timeout=10)
            assert not thread.is_alive() and server.exit_code == 1
        else:
            thread.join(timeout=2)  # the exit would come 0.5 s after the failure
            assert thread.is_alive()
            assert httpx.get(f"{url}/healthz", timeout=5).json()["status"] == "failed"
            r = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "steps": 2}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
