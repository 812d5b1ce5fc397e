"""The dashboard and the alert rules against a running dcar and a real Prometheus.

1. Every series a dashboard query or an alert rule selects is in ``/metrics`` of a live server after traffic,
   with the labels and label values the selectors name (PromQL parsed by promql.py, no hand-kept list).
2. ``promtool`` accepts the shipped Prometheus config and rules, and the rules' unit tests pass.
3. Debian's Prometheus, started on 127.0.0.1 with a 1 s scrape interval, scrapes the live server; after a few
   generations the dashboard's own throughput and p95 expressions (from dcar.json) return values, every
   dashboard and alert expression evaluates, and the shipped rules load and evaluate.
"""

from __future__ import annotations

import math
import re
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from prometheus_client import generate_latest
from promql import (
    ALERTS,
    PROMETHEUS_CONFIG,
    alert_queries,
    dashboard,
    dashboard_queries,
    dashboard_variables,
    panel_target,
    panels,
    selectors,
    substitute,
)
from server_harness import live_server, png_bytes, samples

from dcar.server.metrics import IDEMPOTENCY_OUTCOMES, Metrics

HERE = Path(__file__).resolve().parent
EXPORTED_PREFIXES = ("dcar_", "process_")  # what dcar's /metrics serves (process_*: the process collector)
TARGET_LABELS = {"instance", "job"}  # attached by Prometheus to every scraped series, never in /metrics
SCRAPE_INTERVAL_S = 1


# --- the live stack: dcar (tiny model) + Prometheus scraping it ------------------------------------------


@dataclass
class Stack:
    dcar: str
    prometheus: str
    metrics_text: str

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's prometheus package (`make test` does)")
    return path


def traffic(url: str, round_: int) -> None:
    """Generations, edits (native and OpenAI routes) and one invalid request; every answer checked."""
    image = np.zeros((128, 128, 3), np.uint8)
    image[:, ::8] = (250, 200, 20)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    alpha_mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    alpha_mask.paste((0, 0, 0, 0), (32, 32, 96, 96))
    files = {
        "image": ("in.png", png_bytes(Image.fromarray(image)), "image/png"),
        "mask": ("mask.png", png_bytes(mask), "image/png"),
    }
    openai_files = {"image": files["image"], "mask": ("mask.png", png_bytes(alpha_mask), "image/png")}

    def call(i: int) -> int:
        if i < 6:
            r = httpx.post(
                f"{url}/v1/generate",
                json={"prompt": "a red circle", "seed": 100 * round_ + i, "n": 1 + i % 2, "steps": 4},
                timeout=60,
            )
        elif i == 6:
            r = httpx.post(
                f"{url}/v1/images/generations", json={"prompt": "two blue squares", "seed": i}, timeout=60
            )
        elif i == 7:
            r = httpx.post(
                f"{url}/v1/edit",
                data={"prompt": "a yellow star", "seed": "3", "steps": "4"},
                files=files,
                timeout=60,
            )
        else:
            r = httpx.post(
                f"{url}/v1/images/edits",
                data={"prompt": "a yellow star", "seed": "3", "steps": "4"},
                files=openai_files,
                timeout=60,
            )
        assert r.status_code == 200, r.text
        return r.status_code

    with ThreadPoolExecutor(9) as pool:
        assert list(pool.map(call, range(9))) == [200] * 9
    bad = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "steps": 0}, timeout=10)
    assert bad.status_code == 400, bad.text
    # A client's retry with an Idempotency-Key: answered with the kept response, no second image.
    key = {"Idempotency-Key": f"deploy-retry-{round_}"}
    body = {"prompt": "a green circle", "seed": 7 + round_, "steps": 4}
    first = httpx.post(f"{url}/v1/generate", json=body, headers=key, timeout=60)
    again = httpx.post(f"{url}/v1/generate", json=body, headers=key, timeout=60)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.headers["idempotent-replayed"] == "true" and again.content == first.content


def wait_for_scrapes(stack_query, count: int, timeout: float = 30.0) -> None:
    """Wait until Prometheus has taken ``count`` more scrapes of dcar."""
    expr = 'count_over_time(up{job="dcar"}[1h])'

    def scrapes() -> float:
        result = stack_query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    start, deadline = scrapes(), time.monotonic() + timeout
    while scrapes() < start + count:
        assert time.monotonic() < deadline, f"Prometheus took fewer than {count} scrapes in {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(deploy_pipe, tmp_path_factory):
    prometheus = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    with live_server(deploy_pipe, max_batch_size=8) as (url, _app):
        port = free_port()
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
            },
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "dcar", "static_configs": [{"targets": [url.removeprefix("http://")]}]}
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = open(tmp / "prometheus.log", "w")
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            prom = f"http://127.0.0.1:{port}"
            s = Stack(url, prom, "")
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, (tmp / "prometheus.log").read_text()
                try:
                    if httpx.get(f"{prom}/-/ready", timeout=2).status_code == 200 and s.query(
                        'up{job="dcar"} == 1'
                    ):
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "Prometheus did not scrape dcar within 60 s"
                time.sleep(0.2)
            # Two rounds of traffic with scrapes between them, so that every rate() sees an increase.
            for round_ in range(2):
                traffic(url, round_)
                wait_for_scrapes(s.query, 2)
            s.metrics_text = httpx.get(f"{url}/metrics", timeout=10).text
            yield s
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


# --- 1. every selected series exists ------------------------------------------------------------------------


def exposition(text: str) -> dict[str, list[dict]]:
    """{sample name: [label sets]} of a /metrics text."""
    out: dict[str, list[dict]] = {}
    for (name, labels), _value in samples(text).items():
        out.setdefault(name, []).append(dict(labels))
    return out


def cuda_only_series() -> dict[str, list[dict]]:
    """Series that server/metrics.py registers only on CUDA (``watch_gpu_memory``), read from the registry."""
    cpu, cuda = Metrics(), Metrics()
    cuda.watch_gpu_memory(lambda: 0.0, lambda: 0.0)
    plain = exposition(generate_latest(cpu.registry).decode())
    return {k: v for k, v in exposition(generate_latest(cuda.registry).decode()).items() if k not in plain}


def literal_alternatives(regex: str) -> list[str] | None:
    """``a|b|c`` -> [a, b, c] when every alternative is a plain literal; None for a real regex."""
    parts = regex.split("|")
    return parts if all(re.escape(p) == p for p in parts) else None


def check_selectors(queries: list[tuple[str, str]], exposed: dict[str, list[dict]]) -> list[str]:
    """Problems: unknown series, labels a series does not have, literal label values it never takes."""
    problems = []
    for where, expr in queries:
        for sel in selectors(expr):
            if not sel.name.startswith(EXPORTED_PREFIXES):
                continue  # Prometheus's own series (up, ...): checked against the live Prometheus below
            if sel.name not in exposed:
                problems.append(f"{where}: {sel.name} is not exported")
                continue
            for label, op, value in sel.matchers:
                if label in TARGET_LABELS or label == "__name__":
                    continue
                values = {labels[label] for labels in exposed[sel.name] if label in labels}
                if not values:
                    problems.append(f"{where}: {sel.name} has no label {label!r}")
                elif op == "=" and value not in values:
                    problems.append(
                        f"{where}: {sel.name}{{{label}={value!r}}} never exported (have {values})"
                    )
                elif op == "=~" and (alts := literal_alternatives(value)):
                    missing = [a for a in alts if a not in values]
                    if missing:
                        problems.append(
                            f"{where}: {sel.name}{{{label}=~...}} names {missing}, exported {values}"
                        )
    return problems


def test_every_dashboard_and_alert_series_is_exported_after_traffic(stack):
    exposed = exposition(stack.metrics_text)
    gpu = cuda_only_series()
    assert set(gpu) == {"dcar_gpu_memory_allocated_bytes", "dcar_gpu_memory_reserved_bytes"}
    assert not set(gpu) & set(exposed), "a CPU server exported CUDA-only gauges"
    queries = dashboard_queries(dashboard()) + alert_queries()
    used = {sel.name for _, expr in queries for sel in selectors(expr)}
    assert len(queries) >= 25 and len(used) >= 20, (len(queries), sorted(used))
    # On a CPU server the GPU gauges come from the same Metrics code path, registered as on CUDA.
    assert check_selectors(queries, {**exposed, **gpu}) == []


def test_selector_check_catches_mistakes(stack):
    exposed = exposition(stack.metrics_text)
    bad = [
        ("typo", "rate(dcar_images_generated[1m])"),
        ("label", 'dcar_queue_size{stage="unmask"}'),
        ("value", 'dcar_rejections_total{reason="queue-full"}'),
        ("regex", 'dcar_requests_total{endpoint=~"/v1/generate|/v1/generations"}'),
        ("suffix", "histogram_quantile(0.5, rate(dcar_request_duration_seconds[1m]))"),
    ]
    problems = check_selectors(bad, exposed)
    assert [p.split(":")[0] for p in problems] == ["typo", "label", "value", "regex", "suffix"], problems


def test_dashboard_has_the_panels_and_alerts_the_deployment_promises():
    dash = dashboard()
    titles = {p["title"]: p for p in panels(dash)}
    for title in (
        "Images/s",
        "Requests/s by endpoint and status",
        "Request latency",
        "Queue wait",
        "Queue size and running rows",
        "Batch size distribution",
        "Time per image by stage",
        "Rejections by reason",
        "Wasted seconds on dropped rows",
        "GPU memory",
        "Process memory",
        "Builds",
        "Retries with an Idempotency-Key",
    ):
        assert title in titles, title
    # Every panel filters on the job and server variables, so one dashboard serves several deployments.
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == ["datasource", "job", "instance"], names
    for p in panels(dash):
        for t in p.get("targets", []):
            assert 'job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], (
                p["title"],
                t["expr"],
            )
    assert "process_resident_memory_bytes" in titles["Process memory"]["targets"][0]["expr"]
    assert [t["legendFormat"] for t in titles["Request latency"]["targets"]] == ["p50", "p95", "p99"]
    wait = titles["Queue wait"]["targets"]
    assert [t["legendFormat"] for t in wait] == ["p50", "p95", "p99", "admission margin (max)"]
    assert "dcar_admission_margin_seconds" in wait[3]["expr"]  # what admission adds to the wait it forecasts
    assert len(titles) == len(panels(dash)), "two panels share a title"
    assert {p["datasource"]["uid"] for p in panels(dash)} == {"${datasource}"}
    assert {name.removeprefix("rule ") for name, _ in alert_queries()} >= {
        "DcarTargetDown",
        "DcarHighLatencyP95",
        "DcarQueueSaturated",
        "DcarHighErrorRatio",
    }


# --- 2. promtool ----------------------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_accepts_the_shipped_config_and_rules():
    config = promtool("check", "config", str(PROMETHEUS_CONFIG))  # also checks the rule files it names
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout + config.stderr
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alert_rules_fire_on_their_unit_test_histories():
    result = promtool("test", "rules", "alerts_test.yml", cwd=HERE)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (HERE / "alerts_test.yml").read_text()))
    shipped = {name.removeprefix("rule ") for name, _ in alert_queries()}
    assert tested == shipped, f"alerts without a unit test: {shipped - tested}"


# --- 3. a real Prometheus ---------------------------------------------------------------------------------


def positive_values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def test_prometheus_answers_the_dashboard_throughput_and_p95_queries(stack):
    dash = dashboard()
    values = dashboard_variables(dash, rate_interval="30s")
    throughput = substitute(panel_target(dash, "Images/s"), values)
    p95 = substitute(panel_target(dash, "Request latency", legend="p95"), values)
    images = positive_values(stack.query(throughput))
    assert images and all(math.isfinite(v) for v in images) and sum(images) > 0, (throughput, images)
    latency = positive_values(stack.query(p95))
    assert len(latency) == 1 and math.isfinite(latency[0]) and 0 < latency[0] < 120, (p95, latency)


def test_prometheus_shows_replayed_retries_on_the_dashboard(stack):
    """Replays are 200s in Requests/s and nearly free in the latency histogram, without an image: the
    dashboard shows them by outcome, so a retry storm is not read as fast, cheap traffic."""
    dash = dashboard()
    values = dashboard_variables(dash, rate_interval="10m")  # the whole module's traffic, however slow
    expr = substitute(panel_target(dash, "Retries with an Idempotency-Key"), values)
    assert "sum by (outcome)" in expr
    rates = {r["metric"]["outcome"]: float(r["value"][1]) for r in stack.query(expr)}
    assert set(rates) == set(IDEMPOTENCY_OUTCOMES), rates
    assert rates["first"] > 0 and rates["replayed"] > 0 and rates["conflict"] == 0, rates


def test_every_dashboard_and_alert_query_evaluates(stack):
    dash = dashboard()
    values = dashboard_variables(dash, rate_interval="30s")
    queries = [(w, substitute(e, values)) for w, e in dashboard_queries(dash)] + alert_queries()
    empty = [
        where
        for where, expr in queries
        if not stack.query(expr) and "gpu_memory" not in expr and not where.startswith("rule ")
    ]
    # Alert expressions are conditions (empty when healthy); every panel but the CUDA-only one shows data.
    assert empty == [], empty
    names = httpx.get(f"{stack.prometheus}/api/v1/label/__name__/values", timeout=10).json()["data"]
    own = {sel.name for _, expr in queries for sel in selectors(expr) if not sel.name.startswith("dcar_")}
    assert own and own <= set(names), own - set(names)


def test_shipped_alert_rules_load_and_evaluate(stack):
    deadline = time.monotonic() + 15
    while True:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r["health"] == "ok" for r in rules):
            break
        assert time.monotonic() < deadline, [(r["name"], r["health"], r.get("lastError")) for r in rules]
        time.sleep(0.3)
    assert {r["name"] for r in rules} == {name.removeprefix("rule ") for name, _ in alert_queries()}
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert firing == [], firing
