"""A live ``dcar serve`` stack in a thread: the app on 127.0.0.1 under the uvicorn configuration that
``dcar serve`` uses (server/serve.py: the connection guard, the keep-alive timeout), plus raw-socket helpers
for clients that misbehave. Imported by the test_reliability_* files as ``reliability_harness``."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager

import uvicorn
from server_harness import settings, wait_until_ready

from dcar.model.pipeline import Pipeline
from dcar.server.app import create_app
from dcar.server.serve import uvicorn_config


@contextmanager
def live_dcar(pipe: Pipeline, **overrides):
    """Yields (base URL, app) of a ready server on ``pipe``; stops it afterwards."""
    app = create_app(settings(**overrides), pipeline=pipe)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, app.state.runtime.settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, timeout=300)  # a loaded machine warms up slowly
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    return s


def read_until_closed(s: socket.socket, timeout: float = 20.0) -> bytes:
    """Everything the server sends until it closes the connection (AssertionError if it never does)."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError as e:
        raise AssertionError(
            f"the server kept the connection open for {timeout} s; got {data[:200]!r}"
        ) from e
    except ConnectionResetError:
        pass
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0
