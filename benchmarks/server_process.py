"""A real ``dcar serve`` in a child process for the HTTP benchmarks (load.py, soak.py, memory.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def benchmark_env(omp_wait_policy: str | None = "PASSIVE", **settings: str) -> dict[str, str]:
    """The child's environment: ``DCAR_<NAME>`` for each setting, and OpenMP's wait policy.

    OpenMP's default active spin-wait makes a 2-thread CPU run up to ~100x slower while another process keeps
    a core busy (seen on shared 2-core hosts); PASSIVE avoids it and costs nothing measurable alone.
    """
    env = dict(os.environ)
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    env.update({f"DCAR_{name.upper()}": value for name, value in settings.items()})
    return env


def start_server(
    port: int, serve_args: list[str], env: dict[str, str], timeout: float = 900.0
) -> subprocess.Popen:
    """``python -m dcar.server.serve --port PORT *serve_args``, returned once /readyz answers 200."""
    cmd = [sys.executable, "-m", "dcar.server.serve", "--port", str(port), *serve_args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} during startup")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not become ready in {timeout:.0f} s")
