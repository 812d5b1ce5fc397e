"""Helpers of the server tests: apps driven through their lifespan, a live uvicorn, image and metric readers,
and the step hook that slows or breaks ``pipe.sampler.step`` (faults are injected at the pipeline level,
never by mocking the engine). Imported by the tests as ``server_harness`` (this directory is on sys.path).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from dcar.model.pipeline import Pipeline
from dcar.server.app import create_app
from dcar.server.settings import Settings


def settings(**overrides) -> Settings:
    base = dict(weights="preset:tiny", max_wait_ms=5.0, drain_timeout_s=10.0)
    base.update(overrides)
    return Settings(**base)


async def wait_ready(client: httpx.AsyncClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.get("/readyz")
        if r.status_code == 200:
            return
        assert r.json()["status"] in ("loading", "warming"), r.json()
        await asyncio.sleep(0.02)
    raise AssertionError("the app did not become ready")


@asynccontextmanager
async def serve(pipe: Pipeline, ready: bool = True, headers: dict | None = None, **overrides):
    """An app on ``pipe`` with its lifespan running, and an httpx client on it (ASGITransport)."""
    app = create_app(settings(**overrides), pipeline=pipe)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://dcar.test", timeout=60, headers=headers
        ) as client:
            if ready:
                await wait_ready(client)
            client.app = app
            yield client


@contextmanager
def live_server(pipe: Pipeline, **overrides):
    """A real uvicorn on 127.0.0.1 (own thread and loop) serving an app on ``pipe``; yields its base URL."""
    app = create_app(settings(**overrides), pipeline=pipe)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, timeout=60)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def draining_server(pipe: Pipeline, **overrides):
    """What ``dcar serve`` runs (``DrainingServer``: the connection guard, the exit rules, the ops port) on
    ``pipe``, in a thread; yields (base URL, server, thread) once ready, and stops it at the end."""
    from dcar.server.serve import DrainingServer, uvicorn_config

    s = settings(**overrides)
    app = create_app(s, pipeline=pipe)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = DrainingServer(uvicorn_config(app, s, log_level="warning"), app.state.runtime)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_until_ready(url, timeout=60)
        yield url, server, thread
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


# --- helpers -------------------------------------------------------------------------------------------


def decode(b64: str) -> np.ndarray:
    """A base64 image -> uint8 array (H, W, C)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to 8-bit rounding: batched and alone agree to ~1e-6 in float, which can flip a rounding."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus exposition -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(text: str, metric_name: str, **labels) -> float:
    return samples(text).get((metric_name, tuple(sorted(labels.items()))), 0.0)


async def metrics_text(client: httpx.AsyncClient) -> str:
    r = await client.get("/metrics")
    assert r.status_code == 200
    return r.text


class StepHook:
    """Wraps ``pipe.sampler.step`` (installed with monkeypatch): records every batch, can slow it down or fail.

    ``calls`` holds, per forward, the (prompt, step index) of each row before the step.
    """

    def __init__(self, pipe: Pipeline, monkeypatch, delay: float = 0.0, fail=None):
        self.original = pipe.sampler.step
        self.delay = delay
        self.fail = fail
        self.calls: list[list[tuple[str, int]]] = []
        monkeypatch.setattr(pipe.sampler, "step", self)

    def __call__(self, state):
        self.calls.append([(r.params.prompt, r.step) for r in state.rows])
        if self.fail is not None:
            self.fail(state)
        if self.delay:
            time.sleep(self.delay)
        return self.original(state)


REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url``/readyz until 200; fails early if ``proc`` (the server process) exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc is None or proc.poll() is None, "the server exited during startup"
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become ready within {timeout:.0f} s")


def start_dcar_serve(
    log_path: Path, *args: str, env: dict | None = None
) -> tuple[str, subprocess.Popen, object]:
    """A real ``dcar serve`` process (``preset:tiny`` unless ``--weights`` is given) on a free port, ready.

    Returns (base URL, process, log file open for reading and writing); the caller stops the process.
    """
    port = free_port()
    weights = [] if "--weights" in args else ["--weights", "preset:tiny"]
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcar.server.serve", *weights, "--port", str(port), *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc=proc)
    except BaseException:
        proc.kill()
        proc.wait()
        log.seek(0)
        print(log.read())
        raise
    return url, proc, log
