"""DCAR_OPS_PORT: the probes and the scrape answer on a port of their own while clients hold every connection
of the main port (max_connections), and that port serves nothing else."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
from server_harness import REPO, draining_server, free_port, metric

from dcar.server.settings import Settings


def test_probes_and_metrics_answer_on_the_ops_port_while_clients_hold_every_connection(pipe):
    ops = free_port()
    with draining_server(pipe, max_connections=2, ops_port=ops) as (url, _server, _thread):
        host, port = url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port))) for _ in range(2)]  # idle: the cap is reached
        try:
            time.sleep(0.2)
            with pytest.raises(httpx.HTTPError):  # the main port refuses the probe: 503 and close
                r = httpx.get(f"{url}/healthz", timeout=5)
                r.raise_for_status()
            base = f"http://127.0.0.1:{ops}"
            assert httpx.get(f"{base}/healthz", timeout=5).json()["status"] == "alive"
            assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
            assert httpx.head(f"{base}/readyz", timeout=5).status_code == 200
            text = httpx.get(f"{base}/metrics", timeout=5).text
            assert metric(text, "dcar_connections_open") == 2
            assert metric(text, "dcar_connections_refused_total") >= 1
        finally:
            for s in held:
                s.close()
        # only the probes: no way around the main port's limits
        r = httpx.post(f"{base}/v1/generate", json={"prompt": "x", "steps": 2}, timeout=5)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 404
        assert (
            httpx.post(f"{url}/v1/generate", json={"prompt": "x", "steps": 2}, timeout=30).status_code == 200
        )
    with pytest.raises(httpx.ConnectError):  # stopped with the server
        httpx.get(f"{base}/healthz", timeout=5)


def test_the_ops_port_must_differ_from_the_main_port():
    with pytest.raises(ValueError, match="ops_port=8000 is the main port"):
        Settings(ops_port=8000)


def test_a_taken_ops_port_stops_dcar_serve_before_the_main_port_opens_or_the_model_loads(tmp_path):
    """A configuration error: it must stop the process at once, not after the main port listened and the
    model loaded (the exit then waits for the load), with the lifespan cancelled and its traceback logged."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ops = taken.getsockname()[1]
        port = free_port()
        proc = subprocess.run(
            [sys.executable, "-m", "dcar.server.serve", "--weights", "preset:tiny", "--port", str(port)]
            + ["--ops-port", str(ops)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log
    assert "address already in use" in log.lower(), log
    assert "Application startup" not in log and f":{port}" not in log, log
    assert "Traceback" not in log, log
