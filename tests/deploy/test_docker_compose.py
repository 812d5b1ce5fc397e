"""docker-compose.yml, checked without a Docker engine.

The compose file validates with the compose client (which is shown to reject a broken file), the dcar service
builds from the Dockerfile, reserves a GPU and sets valid dcar settings, and Prometheus and Grafana are wired
to the shipped configuration and provisioning files, with health checks and a start order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from docker_files import COMPOSE, DOCKER, DOCKERFILE, REPO, args_of, compose

from dcar.server.settings import Settings


def compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def compose_config(path: Path) -> subprocess.CompletedProcess:
    client = compose_client()
    if client is None:
        pytest.skip(
            "no compose client (docker compose or docker-compose; `make test` installs docker-compose)"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCAR_", "GRAFANA_", "COMPOSE_"))}
    return subprocess.run(
        [*client, "-f", str(path), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


def test_compose_file_is_valid_for_the_compose_client():
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_client_rejects_a_broken_gpu_reservation(tmp_path):
    broken = compose()
    broken["services"]["dcar"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    broken["services"]["dcar"]["build"]["context"] = str(REPO)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert compose_config(path).returncode != 0, (
        "the compose client validates nothing: this test proves nothing"
    )


def resolve(value: str) -> str:
    """``${NAME:-default}`` as compose resolves it with NAME unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def test_dcar_service_reserves_a_gpu_and_builds_from_the_dockerfile():
    dcar = compose()["services"]["dcar"]
    assert Path(dcar["build"]["context"]) == Path(".") and REPO / dcar["build"]["dockerfile"] == DOCKERFILE
    [device] = dcar["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia" and device["count"] == 1
    assert [v.split(":")[1] for v in dcar["volumes"]] == [
        v for w, r in DOCKER if w == "VOLUME" for v in args_of(r)
    ]
    assert dcar["ports"] == ["${DCAR_PUBLISH_PORT:-8000}:8000"]
    assert "/readyz" in " ".join(dcar["healthcheck"]["test"])


def test_dcar_environment_is_valid_settings():
    env = {k: resolve(v) for k, v in compose()["services"]["dcar"]["environment"].items() if v is not None}
    fields = {f"DCAR_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"not settings: {set(env) - fields}"
    settings = Settings(**{k.removeprefix("DCAR_").lower(): v for k, v in env.items()})
    assert settings.device == "auto" and settings.api_keys == [] and settings.allowed_sizes == []
    grace = compose()["services"]["dcar"]["stop_grace_period"]
    # the drain, then uvicorn's own graceful shutdown (server/serve.py: timeout_graceful_shutdown=5)
    assert float(grace.removesuffix("s")) > settings.drain_timeout_s + 5, "docker would kill dcar mid-drain"


def test_prometheus_and_grafana_are_wired_to_the_shipped_files():
    services = compose()["services"]
    prom, grafana = services["prometheus"], services["grafana"]
    mounts = {v.split(":")[1]: REPO / v.split(":")[0] for v in prom["volumes"] if v.startswith("./")}
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    assert (
        mounts[str(config_path.parent)] / config_path.name
        == REPO / "docker" / "prometheus" / "prometheus.yml"
    )
    scrape = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    dcar_job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "dcar")
    assert dcar_job["static_configs"][0]["targets"] == ["dcar:8000"]  # the compose service and DCAR_PORT

    gmounts = {v.split(":")[1]: REPO / v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    provisioning = gmounts["/etc/grafana/provisioning"]
    assert provisioning == REPO / "docker" / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "dcar.yml").read_text())["providers"]
    dashboards = gmounts[provider["options"]["path"]]
    assert (dashboards / "dcar.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert gmounts[str(Path(home).parent)] / Path(home).name == dashboards / "dcar.json"
    dash = json.loads((dashboards / "dcar.json").read_text())
    [ds_var] = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["current"]["value"] == source["uid"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert not dash.get("editable", True)


def test_health_checks_and_start_order():
    services = compose()["services"]
    assert all("healthcheck" in s for s in services.values()), [
        n for n, s in services.items() if "healthcheck" not in s
    ]
    assert services["prometheus"]["depends_on"] == {"dcar": {"condition": "service_started"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
