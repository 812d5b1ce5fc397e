"""deploy/k8s: every manifest valid, strictly, for Kubernetes and its operators, and the pieces consistent.

Validation (k8s_schemas.py) refuses unknown fields and wrong types, which the API server would silently drop
or a controller would reject only at run time; the tests below prove it does by feeding it typical mistakes.
Consistency: the Deployment's probes answer on a live server, its grace period outlasts preStop plus the
drain, its settings are valid dcar settings, and the Service, PodMonitor, ScaledObject and PVC point at what
the Deployment has; the ScaledObject queries series dcar exports; the RayService carries deploy/ray-serve.yaml
unchanged, on workers with the GPUs and the Ray version it needs.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import httpx
import pytest
import yaml
from docker_files import stages
from k8s_schemas import K8S_VERSIONS, problems
from prometheus_client import generate_latest
from promql import ALERTS, selectors
from server_harness import draining_server, free_port, samples

from dcar.server.metrics import Metrics
from dcar.server.ray_serve import RayOptions, deployment_options
from dcar.server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
RAY_CONFIG = REPO / "deploy" / "ray-serve.yaml"
DRAIN_MARGIN_S = (
    5  # uvicorn's own graceful shutdown after the drain (server/serve.py timeout_graceful_shutdown)
)


def manifests() -> dict[str, dict]:
    """{kind: document} of every manifest (one document per file)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        [doc] = list(yaml.safe_load_all(path.read_text()))
        assert doc["kind"] not in out, f"two {doc['kind']} manifests"
        out[doc["kind"]] = doc
    return out


M = manifests()


def container(kind: str = "Deployment") -> dict:
    [c] = M[kind]["spec"]["template"]["spec"]["containers"]
    return c


def env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container()["env"] if "value" in e}


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", sorted(M))
def test_every_manifest_is_valid_strictly(kind, version):
    assert problems(M[kind], version) == []


def test_the_expected_kinds_are_there():
    assert set(M) == {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "PodMonitor",
        "PrometheusRule",
        "ScaledObject",
        "Job",
        "RayService",
    }


@pytest.mark.parametrize(
    ("kind", "path", "value", "expected"),
    [
        (
            "Deployment",
            ["spec", "template", "spec", "containers", 0, "livenessprobe"],
            {},
            "'livenessprobe' was unexpected",
        ),
        (
            "Deployment",
            ["spec", "template", "spec", "terminationGracePeriodSeconds"],
            "90s",
            "is not of type",
        ),
        ("Service", ["spec", "ports", 0, "port"], "http", "is not of type"),
        ("PersistentVolumeClaim", ["spec", "accessMode"], ["ReadWriteMany"], "'accessMode' was unexpected"),
        ("PodMonitor", ["spec", "podMetricEndpoints"], [], "'podMetricEndpoints' was unexpected"),
        ("PodMonitor", ["spec", "podMetricsEndpoints", 0, "interval"], "15 s", "does not match"),
        ("ScaledObject", ["spec", "triggers", 0, "metadata", "threshold"], 16, "16 is not of type 'string'"),
        ("ScaledObject", ["spec", "triggers", 0, "metadata", "querry"], "x", "'querry' was unexpected"),
        ("ScaledObject", ["spec", "maxReplicas"], 4, "'maxReplicas' was unexpected"),
        (
            "RayService",
            ["spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"],
            0,
            "is not of type",
        ),
        (
            "RayService",
            [
                "spec",
                "rayClusterConfig",
                "workerGroupSpecs",
                0,
                "template",
                "spec",
                "containers",
                0,
                "resource",
            ],
            {},
            "'resource' was unexpected",
        ),
        ("RayService", ["spec", "rayClusterConfig", "enableInTreeAutoScaling"], True, "was unexpected"),
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "for"], "2 min", "does not match"),
        (
            "PrometheusRule",
            ["spec", "groups", 0, "rules", 0, "annotation"],
            {},
            "'annotation' was unexpected",
        ),
        ("PrometheusRule", ["spec", "rules"], [], "'rules' was unexpected"),
        ("Job", ["spec", "template", "spec", "restartPolicy"], 3, "is not of type"),
    ],
    ids=lambda v: ".".join(map(str, v)) if isinstance(v, list) else None,
)
def test_validation_catches_typical_mistakes(kind, path, value, expected):
    broken = copy.deepcopy(M[kind])
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    found = problems(broken)
    assert found and expected in found[0], found


def test_kustomization_applies_the_plain_deployment():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert all((K8S / name).is_file() for name in listed), listed
    # The weights Job runs once by hand, and the RayService is the alternative to the Deployment.
    assert set(listed) == {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml",
        "fetch-weights-job.yaml",
        "rayservice.yaml",
    }
    assert (
        [i["name"] for i in kustomization["images"]] == [container()["image"]] == [container("Job")["image"]]
    )


# --- the Deployment and what points at it ------------------------------------------------------------------


def test_deployment_settings_are_valid_dcar_settings():
    values = env()
    assert set(values) | {"DCAR_API_KEYS"} <= {f"DCAR_{f.upper()}" for f in Settings.model_fields}
    settings = Settings(**{k.removeprefix("DCAR_").lower(): v for k, v in values.items()})
    assert settings.device == "cuda" and settings.allowed_sizes == ["512x512"]
    [secret] = [e for e in container()["env"] if "valueFrom" in e]
    assert secret["name"] == "DCAR_API_KEYS" and secret["valueFrom"]["secretKeyRef"]["optional"] is True


def test_deployment_requests_a_gpu_and_runs_as_the_images_user():
    c = container()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = M["Deployment"]["spec"]["template"]["spec"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    uid = int(re.search(r"useradd .*--uid (\d+)", dockerfile).group(1))
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"] is True
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_grace_period_outlasts_prestop_and_the_drain():
    pod = M["Deployment"]["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = Settings(drain_timeout_s=env()["DCAR_DRAIN_TIMEOUT_S"]).drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain + DRAIN_MARGIN_S


def test_probes_answer_on_a_live_server(deploy_pipe):
    c = container()
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    probes = {name: c[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {name: p["path"] for name, p in probes.items()} == {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    # the probes go to the ops port (outside max_connections), the one DCAR_OPS_PORT opens
    assert {p["port"] for p in probes.values()} == {"ops"} and port["http"] == Settings().port == 8000
    assert port["ops"] == Settings(ops_port=env()["DCAR_OPS_PORT"]).ops_port
    # Loading and warm-up may take minutes: the startup probe allows at least 10 of them.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    ops = free_port()
    with draining_server(deploy_pipe, ops_port=ops, max_connections=1) as (url, _server, _thread):
        host, main_port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(main_port))):  # a client holds the one main connection
            for p in probes.values():
                r = httpx.get(f"http://127.0.0.1:{ops}{p['path']}", timeout=10)
                assert r.status_code == 200, (p, r.text)


# Pod Security Standards, `restricted` profile (kubernetes.io/docs/concepts/security/pod-security-standards):
# the volume types it allows, and the capability a container may add back after dropping ALL.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_problems(pod: dict) -> list[str]:
    """What the ``restricted`` profile refuses in a pod spec (a namespace enforcing it creates no such pod)."""
    found = []
    pod_ctx = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append(flag)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {kinds - RESTRICTED_VOLUMES}")
    for c in pod.get("initContainers", []) + pod["containers"]:
        ctx = c.get("securityContext", {})
        name = c["name"]
        if ctx.get("privileged"):
            found.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {caps['add']}")
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot is not true")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
    return found


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_meet_the_restricted_pod_security_standard(kind):
    assert restricted_problems(M[kind]["spec"]["template"]["spec"]) == []


def test_the_ray_pods_meet_the_restricted_pod_security_standard():
    """Both pod templates KubeRay creates (head and GPU workers): the RayService is the other way to deploy,
    into the same namespaces as the Deployment."""
    cluster = M["RayService"]["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    assert [restricted_problems(pod) for pod in pods] == [[], []]


def test_restricted_check_catches_what_it_names():
    pod = copy.deepcopy(M["Deployment"]["spec"]["template"]["spec"])
    del pod["securityContext"]["seccompProfile"]
    c = pod["containers"][0]
    c["securityContext"] = {"capabilities": {"add": ["SYS_ADMIN"], "drop": ["ALL"]}}
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert restricted_problems(pod) == [
        "volume host: {'hostPath'}",
        "dcar: allowPrivilegeEscalation is not false",
        "dcar: adds capabilities ['SYS_ADMIN']",
        "dcar: seccompProfile None",
    ]


def test_the_weights_job_runs_the_deployments_image_the_same_way():
    """Applied with ``-f``, outside the kustomization; without a pull policy an untagged image is always pulled."""
    job, server = container("Job"), container()
    assert job["image"] == server["image"]
    assert job["imagePullPolicy"] == server["imagePullPolicy"] == "IfNotPresent"


def pod_labels() -> dict[str, str]:
    return M["Deployment"]["spec"]["template"]["metadata"]["labels"]


def pod_volumes() -> dict[str, dict]:
    return {v["name"]: v for v in M["Deployment"]["spec"]["template"]["spec"]["volumes"]}


def test_root_filesystem_is_read_only_and_what_the_server_writes_is_on_volumes():
    """The server writes only through tempfile (/tmp: torch's inductor cache directory at start-up, which
    fails the boot on a read-only /tmp; uploads over 1 MiB spooled while parsing) and under $HOME (Triton's and
    CUDA's kernel caches), so a read-only root needs a writable volume at both: the image's user's home is
    its WORKDIR in the Dockerfile."""
    c = container()
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    stage = stages()["common"]
    [home] = [rest for word, rest in stage if word == "WORKDIR"]
    user = next(rest for word, rest in stages()["runtime"] if word == "USER")
    assert home == f"/home/{user}" and any(w == "RUN" and "--create-home" in r for w, r in stage)
    volumes = pod_volumes()
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/tmp", home):
        assert path in mounts, f"nothing writable at {path} under a read-only root"
        assert not mounts[path].get("readOnly") and "emptyDir" in volumes[mounts[path]["name"]], path


def test_service_podmonitor_and_pvc_point_at_the_deployment():
    labels = pod_labels()
    assert M["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = M["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["ports"]] == ["http"]
    monitor = M["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = monitor["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container()["ports"]} and endpoint["path"] == "/metrics"
    assert endpoint["port"] == container()["readinessProbe"]["httpGet"]["port"] == "ops"  # not behind the cap
    # The job label the shipped alert rules select.
    [relabel] = endpoint["relabelings"]
    assert relabel["targetLabel"] == "job"
    jobs = set(re.findall(r'\bjob\s*=\s*"([^"]*)"', ALERTS.read_text()))
    assert jobs == {relabel["replacement"]}
    [volume] = [v for v in pod_volumes().values() if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == M["PersistentVolumeClaim"]["metadata"]["name"]
    [mount] = [m for m in container()["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] and Path(env()["DCAR_WEIGHTS"]).is_relative_to(mount["mountPath"])
    [job_mount] = container("Job")["volumeMounts"]
    assert container("Job")["command"][-1] == env()["DCAR_WEIGHTS"]
    assert Path(env()["DCAR_WEIGHTS"]).is_relative_to(job_mount["mountPath"]) and not job_mount.get(
        "readOnly"
    )


def test_the_autoscaled_deployment_leaves_replicas_to_the_autoscaler():
    """A Deployment that an HPA (here KEDA's) scales must not set ``spec.replicas``: every ``kubectl apply`` of
    the file would otherwise reset the count to it, draining the pods the autoscaler added, under load."""
    assert M["ScaledObject"]["spec"]["scaleTargetRef"]["name"] == M["Deployment"]["metadata"]["name"]
    assert "replicas" not in M["Deployment"]["spec"], "spec.replicas fights the ScaledObject's HPA"


def test_prometheusrule_carries_the_shipped_alert_rules_unchanged():
    """The rules compose's Prometheus evaluates (and promtool tests) are the ones the cluster gets."""
    assert M["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_scaledobject_scales_the_deployment_on_exported_queue_series():
    spec = M["ScaledObject"]["spec"]
    assert spec["scaleTargetRef"]["name"] == M["Deployment"]["metadata"]["name"]
    assert spec["scaleTargetRef"]["kind"] == "Deployment"
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    # One replica per full batch of rows waiting or running.
    assert (
        float(trigger["metadata"]["threshold"])
        == Settings(max_batch_size=env()["DCAR_MAX_BATCH_SIZE"]).max_batch_size
    )
    exported = {name: dict(labels) for name, labels in samples(generate_latest(Metrics().registry).decode())}
    used = selectors(trigger["metadata"]["query"])
    assert {s.name for s in used} == {"dcar_queue_size", "dcar_rows_running"}
    for sel in used:
        assert sel.name in exported
        assert [(label, op) for label, op, _v in sel.matchers] == [("job", "=")]
        assert (
            sel.matchers[0][2]
            == M["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["replacement"]
        )


# --- RayService ---------------------------------------------------------------------------------------------


def ray_lock_version() -> str:
    return re.search(r"^ray==([\w.]+)", (REPO / "docker" / "requirements-ray.lock").read_text(), re.M).group(
        1
    )


def test_rayservice_carries_deploy_ray_serve_yaml_unchanged():
    spec = M["RayService"]["spec"]
    assert yaml.safe_load(spec["serveConfigV2"]) == yaml.safe_load(RAY_CONFIG.read_text())


def test_rayservice_cluster_fits_the_serve_config():
    spec = M["RayService"]["spec"]
    [app] = yaml.safe_load(spec["serveConfigV2"])["applications"]
    args = dict(app["args"])
    settings = Settings(**args.pop("settings"))
    options = deployment_options(settings, RayOptions(**args), cluster_gpus=1)
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray_lock_version(), "the pods' Ray must be the cluster's rayVersion"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica lands on the head
    [workers] = cluster["workerGroupSpecs"]
    [worker] = workers["template"]["spec"]["containers"]
    gpus_per_pod = worker["resources"]["limits"]["nvidia.com/gpu"]
    replicas_per_pod = gpus_per_pod // options["ray_actor_options"]["num_gpus"]
    scaling = options["autoscaling_config"]
    assert workers["minReplicas"] * replicas_per_pod >= scaling["min_replicas"]
    assert workers["maxReplicas"] * replicas_per_pod >= scaling["max_replicas"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    [mount] = worker["volumeMounts"]
    assert Path(settings.weights).is_relative_to(mount["mountPath"])
    [volume] = workers["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == M["PersistentVolumeClaim"]["metadata"]["name"]
    # Serve waits graceful_shutdown_timeout_s for a stopping replica; the pod must live that long.
    assert (
        workers["template"]["spec"]["terminationGracePeriodSeconds"] > options["graceful_shutdown_timeout_s"]
    )
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"serve": 8000, "dashboard": 8265, "gcs-server": 6379}.items() <= {
        p["name"]: p["containerPort"] for p in head["ports"]
    }.items()
    assert yaml.safe_load(spec["serveConfigV2"])["http_options"]["port"] == 8000


# --- the deployment doc ---------------------------------------------------------------------------------------


def test_the_deployment_doc_exists_where_the_files_point():
    doc = (REPO / "docs" / "deployment.md").read_text()
    pointing = [
        REPO / "docker-compose.yml",
        RAY_CONFIG,
        REPO / "docker" / "Dockerfile",
        *sorted(K8S.glob("*.yaml")),
    ]
    for path in [*pointing, *sorted((REPO / "docker").rglob("*")), *sorted((REPO / "deploy").rglob("*"))]:
        if path.is_file() and path.suffix not in (".lock", ".json"):
            assert "README_DEPLOY" not in path.read_text(), f"{path} points at a file that does not exist"
    for path in (REPO / "docker-compose.yml", RAY_CONFIG, REPO / "docker" / "Dockerfile"):
        assert "docs/deployment.md" in path.read_text(), path
    for path in K8S.glob("*.yaml"):
        assert path.name in doc, f"docs/deployment.md does not mention deploy/k8s/{path.name}"
    for target in ("--target ray", "sh docker/lock.sh", "max_queue // max_n"):
        assert target in doc, target
