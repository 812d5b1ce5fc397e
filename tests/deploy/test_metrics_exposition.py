"""What /metrics carries besides the dcar_* instruments: the process collector, the build info, no _created.

Read from a live server after a generation, and checked with ``promtool check metrics`` (Debian's prometheus
package), which reports any naming or format problem.
"""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest
import torch
from server_harness import live_server, metric, samples

import dcar


def test_process_collector_build_info_and_no_created_series(deploy_pipe):
    with live_server(deploy_pipe) as (url, _app):
        r = httpx.post(
            f"{url}/v1/generate", json={"prompt": "a red circle", "seed": 1, "steps": 2}, timeout=60
        )
        assert r.status_code == 200, r.text
        text = httpx.get(f"{url}/metrics", timeout=10).text

    names = {name for name, _labels in samples(text)}
    # The standard process collector of prometheus_client, on the app's own registry.
    assert metric(text, "process_resident_memory_bytes") > 10 * 2**20  # torch alone holds more than 10 MiB
    assert metric(text, "process_cpu_seconds_total") > 0
    assert {"process_open_fds", "process_start_time_seconds", "process_virtual_memory_bytes"} <= names
    # One build series naming this very build.
    [(_name, build_labels)] = [key for key in samples(text) if key[0] == "dcar_build_info"]
    assert dict(build_labels) == {
        "version": dcar.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
    }
    assert metric(text, "dcar_build_info", **dict(build_labels)) == 1
    # No _created twin of any counter or histogram (prometheus_client adds them unless switched off).
    assert not [n for n in names if n.endswith("_created")]
    assert "dcar_requests_total" in names and "dcar_request_duration_seconds_count" in names

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus package (`make test` does)")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", (
        check.stdout + check.stderr
    )
