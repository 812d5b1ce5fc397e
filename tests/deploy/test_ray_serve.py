"""Scale-out on Ray Serve: deployment options, the ``serve run`` config, and ``dcar serve --ray`` for real.

The last test (marked ``ray``) runs ``dcar serve --ray`` with two CPU replicas of the tiny model on a local Ray
head bound to 127.0.0.1: 16 concurrent requests are served by both replicas (told apart by the
``X-Dcar-Replica`` header and by each replica's own /metrics), a replica process killed with SIGKILL is
replaced while every request keeps succeeding, and SIGTERM stops the whole thing with status 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from server_harness import metric

from dcar.cli.main import build_parser
from dcar.server.ray_serve import RayOptions, deployment_options, options_from_args, replica_settings
from dcar.server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
RAY_CONFIG = REPO / "deploy" / "ray-serve.yaml"


# --- options (no cluster) -------------------------------------------------------------------------------


def test_one_replica_per_gpu_by_default():
    options = deployment_options(Settings(weights="preset:tiny"), RayOptions(), cluster_gpus=4)
    assert options["num_replicas"] == 4 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert options["max_ongoing_requests"] == 32  # 2 x max_batch_size
    assert options["max_queued_requests"] == 256 // 8  # requests of up to max_n=8 rows hold <= max_queue rows
    assert options["graceful_shutdown_timeout_s"] > Settings(weights="preset:tiny").drain_timeout_s


def test_proxy_queue_counts_requests_not_rows():
    """Ray's max_queued_requests counts requests; filled with requests of max_n images it holds at most
    max_queue rows, and with single images it still holds a useful number of requests."""
    for max_queue, max_n in ((256, 8), (256, 1), (100, 7), (8, 8), (1000, 64)):
        settings = Settings(weights="preset:tiny", max_queue=max_queue, max_n=max_n)
        limit = deployment_options(settings, RayOptions(), cluster_gpus=0)["max_queued_requests"]
        assert limit * max_n <= max_queue, (
            max_queue,
            max_n,
            limit,
        )  # worst case: every request is max_n rows
        assert (limit + 1) * max_n > max_queue  # and no smaller than that bound needs
        assert limit >= 1
    # The row limit itself would let the proxy hold max_n times max_queue images.
    assert (
        deployment_options(
            Settings(weights="preset:tiny", max_queue=256, max_n=8), RayOptions(), cluster_gpus=0
        )["max_queued_requests"]
        != 256
    )


def test_cpu_replicas_reserve_no_gpu():
    assert deployment_options(Settings(weights="preset:tiny"), RayOptions(), cluster_gpus=0)[
        "ray_actor_options"
    ] == {"num_cpus": 1.0, "num_gpus": 0.0}
    on_cpu = deployment_options(
        Settings(weights="preset:tiny", device="cpu"), RayOptions(replicas=3), cluster_gpus=8
    )
    assert on_cpu["ray_actor_options"]["num_gpus"] == 0.0 and on_cpu["num_replicas"] == 3


def test_autoscaling_on_ongoing_requests():
    options = deployment_options(
        Settings(weights="preset:tiny", max_batch_size=8),
        RayOptions(replicas=1, max_replicas=6),
        cluster_gpus=2,
    )
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 6,
        "target_ongoing_requests": 8.0,
    }
    assert options["max_ongoing_requests"] == 16


def test_max_replicas_caps_the_default_of_one_replica_per_gpu():
    """--max-replicas 2 on a 4-GPU cluster once started 4 replicas: the default (one per GPU) ignored it."""
    settings = Settings(weights="preset:tiny")
    options = deployment_options(settings, RayOptions(max_replicas=2), cluster_gpus=4)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    wider = deployment_options(settings, RayOptions(max_replicas=8), cluster_gpus=4)
    assert (
        wider["autoscaling_config"]["min_replicas"] == 4 and wider["autoscaling_config"]["max_replicas"] == 8
    )


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="max_replicas=2 is below replicas=3"):
        RayOptions(replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="replicas must be at least 1"):
        RayOptions(replicas=0)
    # 0 was silently replaced by the default, a negative number refused by Ray after its head had started
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_ongoing_requests must be at least 1"):
            RayOptions(max_ongoing_requests=bad)
        with pytest.raises(ValueError, match="target_ongoing_requests must be above 0"):
            RayOptions(target_ongoing_requests=bad)


def test_replicas_get_the_set_settings_but_no_listener_settings(monkeypatch):
    """The proxy owns --host/--port and no ops port opens under Ray; an ops port that differs from --port but
    equals a replica's default port (8000) failed every replica's settings check."""
    monkeypatch.setenv("DCAR_MAX_QUEUE", "100")
    settings = Settings(weights="preset:tiny", host="0.0.0.0", port=9000, ops_port=8000, max_n=4)
    overrides = replica_settings(settings)
    assert overrides == {"weights": "preset:tiny", "max_n": 4, "max_queue": 100}  # flags and DCAR_* both
    Settings(**overrides)  # what each replica builds


def test_dcar_serve_ray_flags():
    args = build_parser("serve").parse_args(
        [
            "serve",
            "--ray",
            "--replicas",
            "2",
            "--max-replicas",
            "4",
            "--gpus-per-replica",
            "0.5",
            "--replica-metrics-port",
            "9100",
        ]
    )
    assert args.ray is True
    assert options_from_args(args) == RayOptions(
        replicas=2, max_replicas=4, gpus_per_replica=0.5, metrics_port=9100
    )
    plain = build_parser("serve").parse_args(["serve"])
    assert plain.ray is False and options_from_args(plain) == RayOptions()


def test_serve_run_config_builds_the_app():
    schema = pytest.importorskip("ray.serve.schema")
    from dcar.server.ray_serve import app_builder

    config = yaml.safe_load(RAY_CONFIG.read_text())
    parsed = schema.ServeDeploySchema.model_validate(config)
    [app] = parsed.applications
    assert app.import_path == "dcar.server.ray_serve:app_builder" and app.route_prefix == "/"
    args = dict(app.args)
    app_builder(args)  # what `serve run` calls: validates the settings and binds the deployment
    settings = Settings(**args.pop("settings"))
    options = deployment_options(settings, RayOptions(**args), cluster_gpus=0)
    assert options["ray_actor_options"]["num_gpus"] == 1  # one GPU per replica, even where the builder runs
    assert options["autoscaling_config"]["max_replicas"] > options["autoscaling_config"]["min_replicas"]
    with pytest.raises(ValueError, match="unknown app_builder args"):
        app_builder({"replica": 2})


# --- dcar serve --ray on a local Ray head ------------------------------------------------------------------


def free_ports(count: int) -> int:
    """A port p such that p .. p+count-1 are free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            held = []
            for p in range(base, base + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free port range")


def descendants(root: int) -> list[int]:
    """Pids of every process below ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def generate_all(url: str, seeds: range) -> list[tuple[int, str]]:
    """Concurrent /v1/generate calls -> (status, serving replica) each."""

    def one(seed: int) -> tuple[int, str]:
        r = httpx.post(
            f"{url}/v1/generate", json={"prompt": "a red circle", "seed": seed, "steps": 4}, timeout=60
        )
        return r.status_code, r.headers.get("x-dcar-replica", "")

    with ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(one, seeds))


@pytest.mark.ray
@pytest.mark.slow
def test_dcar_serve_ray_two_replicas_share_load_and_survive_a_killed_replica():
    pytest.importorskip("ray.serve")
    base = free_ports(3)
    port, metrics_port = base, base + 1  # the replicas' own /metrics: metrics_port + rank (0, 1)
    ray_tmp = tempfile.mkdtemp(prefix="dcar-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DCAR_"))}
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray then binds its node to 127.0.0.1, not the host's address
            "RAY_TMPDIR": ray_tmp,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
        }
    )
    log_path = Path(ray_tmp) / "dcar-serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dcar.cli.main",
            "serve",
            "--ray",
            "--replicas",
            "2",
            "--cpus-per-replica",
            "0.5",
            "--weights",
            "preset:tiny",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-wait-ms",
            "5",
            "--drain-timeout",
            "5",
            "--replica-metrics-port",
            str(metrics_port),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # Ready means both replicas answer through the proxy: the proxy routes as soon as the first replica is
        # up, so a burst sent on the first 200 from /readyz could all land on one replica.
        deadline, answered = time.monotonic() + 180, set()
        while len(answered) < 2:
            assert proc.poll() is None, log_path.read_text()[-5000:]
            try:
                r = httpx.get(f"{url}/readyz", timeout=5)
                if r.status_code == 200:
                    answered.add(r.headers.get("x-dcar-replica", ""))
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (
                "dcar serve --ray did not become ready\n" + log_path.read_text()[-5000:]
            )
            time.sleep(0.2)

        # 16 concurrent requests: both replicas serve some.
        first = generate_all(url, range(16))
        assert [s for s, _ in first] == [200] * 16
        replicas = {r for _, r in first}
        assert len(replicas) == 2 and all(
            r.startswith("SERVE_REPLICA::dcar#DcarReplica#") for r in replicas
        ), replicas
        served = [
            metric(
                httpx.get(f"http://127.0.0.1:{metrics_port + rank}/metrics", timeout=10).text,
                "dcar_requests_total",
                endpoint="/v1/generate",
                status="200",
            )
            for rank in (0, 1)
        ]
        assert sum(served) == 16 and min(served) > 0, served

        # Kill one replica's process outright (as the OOM killer would); Ray starts another.
        workers = [p for p in descendants(proc.pid) if "ServeReplica:dcar:DcarReplica" in cmdline(p)]
        assert len(workers) == 2, [cmdline(p) for p in descendants(proc.pid)]
        os.kill(workers[0], signal.SIGKILL)
        deadline, seed, new = time.monotonic() + 120, 100, set()
        while not new:
            batch = generate_all(url, range(seed, seed + 8))
            seed += 8
            assert [s for s, _ in batch] == [200] * 8, batch
            new = {r for _, r in batch} - replicas
            assert time.monotonic() < deadline, "no replacement replica served within 120 s"
            time.sleep(0.5)
        survivors = [p for p in descendants(proc.pid) if "ServeReplica:dcar:DcarReplica" in cmdline(p)]
        assert len(survivors) == 2 and workers[0] not in survivors

        # SIGTERM: the application is deleted (each replica drains) and the command exits 0.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log_path.read_text()[-5000:]
    finally:
        # Whatever this test started and is still running (Ray's own processes included) is stopped by pid.
        started = {pid: cmdline(pid) for pid in descendants(proc.pid)}
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid, command in started.items():
            if command and cmdline(pid) == command:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        log.close()
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
