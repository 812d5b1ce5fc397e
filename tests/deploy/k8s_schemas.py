"""Strict validation of the Kubernetes manifests in deploy/k8s, offline.

Core kinds (Deployment, Service, PersistentVolumeClaim, Job) are checked by ``kubernetes-validate`` against
the Kubernetes OpenAPI schemas it ships, in their strict form (an unknown field is an error, not silently
dropped as the API server would). The custom resources are checked against JSON schemas written here from
their CRDs, closed the same way: KEDA ``ScaledObject`` (keda.sh/v1alpha1, KEDA 2.17's ScaledObject
specification and the Prometheus scaler's documented metadata), Prometheus Operator ``PodMonitor``
(monitoring.coreos.com/v1, its ``PodMonitorSpec`` / ``PodMetricsEndpoint`` types) and ``PrometheusRule`` (its
CRD's ``RuleGroup`` / ``Rule``, operator 0.82), and KubeRay ``RayService``
(ray.io/v1, KubeRay 1.7's API reference). Every embedded Kubernetes type in them (pod templates, label
selectors, HPA behaviour, resource requirements) is the core schema itself, so a pod template inside a
RayService is held to the same rules as one inside a Deployment.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files

import jsonschema
import kubernetes_validate
from referencing import Registry, Resource

K8S_VERSIONS = (
    "1.30",
    kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version()),
)  # oldest we document, newest the package knows
CORE = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s."


def core(name: str) -> dict:
    """A reference to a core Kubernetes type, e.g. ``core("api.core.v1.PodTemplateSpec")``."""
    return {"$ref": CORE + name}


STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
UINT = {"type": "integer", "minimum": 0}
STR_MAP = {"type": "object", "additionalProperties": STR}
STR_LIST = {"type": "array", "items": STR}
ANY_OBJECT = {"type": "object"}  # parts we never set: checked for shape only


def closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": list(required),
    }


def resource(api_version: str, kind: str, spec: dict) -> dict:
    return closed(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": core("apimachinery.pkg.apis.meta.v1.ObjectMeta"),
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


# --- KEDA ScaledObject --------------------------------------------------------------------------------------

PROMETHEUS_TRIGGER_METADATA = closed(
    {
        key: STR
        for key in (
            "serverAddress",
            "query",
            "threshold",
            "activationThreshold",
            "namespace",
            "customHeaders",
            "ignoreNullValues",
            "queryParameters",
            "unsafeSsl",
            "authModes",
        )
    },
    ("serverAddress", "query", "threshold"),
)
PROMETHEUS_TRIGGER_METADATA["properties"]["threshold"] = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
PROMETHEUS_TRIGGER_METADATA["properties"]["ignoreNullValues"] = {"enum": ["true", "false"]}

SCALED_OBJECT = resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    closed(
        {
            "scaleTargetRef": closed(
                {"apiVersion": STR, "kind": STR, "name": STR, "envSourceContainerName": STR}, ("name",)
            ),
            "pollingInterval": INT32,
            "cooldownPeriod": INT32,
            "initialCooldownPeriod": INT32,
            "idleReplicaCount": INT32,
            "minReplicaCount": INT32,
            "maxReplicaCount": INT32,
            "fallback": closed(
                {
                    "failureThreshold": INT32,
                    "replicas": INT32,
                    "behavior": {
                        "enum": [
                            "static",
                            "currentReplicas",
                            "currentReplicasIfHigher",
                            "currentReplicasIfLower",
                        ]
                    },
                },
                ("failureThreshold", "replicas"),
            ),
            "advanced": closed(
                {
                    "restoreToOriginalReplicaCount": BOOL,
                    "horizontalPodAutoscalerConfig": closed(
                        {"name": STR, "behavior": core("api.autoscaling.v2.HorizontalPodAutoscalerBehavior")}
                    ),
                    "scalingModifiers": closed(
                        {"formula": STR, "target": STR, "activationTarget": STR, "metricType": STR}
                    ),
                }
            ),
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    **closed(
                        {
                            "type": STR,
                            "name": STR,
                            "useCachedMetrics": BOOL,
                            "metadata": STR_MAP,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "authenticationRef": closed({"name": STR, "kind": STR}, ("name",)),
                        },
                        ("type", "metadata"),
                    ),
                    "if": {"properties": {"type": {"const": "prometheus"}}},
                    "then": {"properties": {"metadata": PROMETHEUS_TRIGGER_METADATA}},
                },
            },
        },
        ("scaleTargetRef", "triggers"),
    ),
)


# --- Prometheus Operator PodMonitor ---------------------------------------------------------------------------

DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
RELABEL_ACTIONS = (
    "replace",
    "keep",
    "drop",
    "hashmod",
    "labelmap",
    "labeldrop",
    "labelkeep",
    "lowercase",
    "uppercase",
    "keepequal",
    "dropequal",
)
RELABEL = closed(
    {
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
        },
        "separator": STR,
        "targetLabel": STR,
        "regex": STR,
        "modulus": UINT,
        "replacement": STR,
        "action": {
            "enum": [
                *RELABEL_ACTIONS,
                *(a[0].upper() + a[1:] for a in RELABEL_ACTIONS),
                "HashMod",
                "LabelMap",
                "LabelDrop",
                "LabelKeep",
                "KeepEqual",
                "DropEqual",
            ]
        },
    }
)
POD_METRICS_ENDPOINT = closed(
    {
        "port": STR,
        "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
        "targetPort": {"type": ["integer", "string"]},
        "path": STR,
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
        "params": {"type": "object", "additionalProperties": STR_LIST},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": BOOL,
        "honorTimestamps": BOOL,
        "trackTimestampsStaleness": BOOL,
        "filterRunning": BOOL,
        "metricRelabelings": {"type": "array", "items": RELABEL},
        "relabelings": {"type": "array", "items": RELABEL},
        # HTTPConfig, inline
        "authorization": ANY_OBJECT,
        "basicAuth": ANY_OBJECT,
        "bearerTokenSecret": ANY_OBJECT,
        "oauth2": ANY_OBJECT,
        "tlsConfig": ANY_OBJECT,
        "proxyUrl": STR,
        "noProxy": STR,
        "proxyFromEnvironment": BOOL,
        "proxyConnectHeader": ANY_OBJECT,
        "followRedirects": BOOL,
        "enableHttp2": BOOL,
    }
)
POD_MONITOR = resource(
    "monitoring.coreos.com/v1",
    "PodMonitor",
    closed(
        {
            "jobLabel": STR,
            "podTargetLabels": STR_LIST,
            "podMetricsEndpoints": {"type": "array", "items": POD_METRICS_ENDPOINT},
            "selector": core("apimachinery.pkg.apis.meta.v1.LabelSelector"),
            "selectorMechanism": {"enum": ["RelabelConfig", "RoleSelector"]},
            "namespaceSelector": closed({"any": BOOL, "matchNames": STR_LIST}),
            "sampleLimit": UINT,
            "targetLimit": UINT,
            "labelLimit": UINT,
            "labelNameLengthLimit": UINT,
            "labelValueLengthLimit": UINT,
            "keepDroppedTargets": UINT,
            "scrapeClass": {"type": "string", "minLength": 1},
            "scrapeProtocols": STR_LIST,
            "fallbackScrapeProtocol": STR,
            "attachMetadata": closed({"node": BOOL}),
            "bodySizeLimit": STR,
            "scrapeClassicHistograms": BOOL,
            "nativeHistogramBucketLimit": UINT,
            "nativeHistogramMinBucketFactor": {"type": ["integer", "string"]},
            "convertClassicHistogramsToNHCB": BOOL,
        },
        ("selector",),
    ),
)


# --- Prometheus Operator PrometheusRule -----------------------------------------------------------------------

RULE = closed(
    {
        "alert": STR,
        "record": STR,
        "expr": {"type": ["integer", "string"]},
        "for": DURATION,
        "keep_firing_for": {**DURATION, "minLength": 1},
        "labels": STR_MAP,
        "annotations": STR_MAP,
    },
    ("expr",),
)
RULE_GROUP = closed(
    {
        "name": {"type": "string", "minLength": 1},
        "interval": DURATION,
        "labels": STR_MAP,
        "limit": {"type": "integer"},
        "partial_response_strategy": {"type": "string", "pattern": r"^((?i:abort|warn))?$"},
        "query_offset": DURATION,
        "rules": {"type": "array", "items": RULE},
    },
    ("name",),
)
PROMETHEUS_RULE = resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    closed({"groups": {"type": "array", "items": RULE_GROUP}}),
)


# --- KubeRay RayService -------------------------------------------------------------------------------------

POD_TEMPLATE = core("api.core.v1.PodTemplateSpec")
AUTOSCALER_OPTIONS = closed(
    {
        "resources": core("api.core.v1.ResourceRequirements"),
        "image": STR,
        "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
        "securityContext": core("api.core.v1.SecurityContext"),
        "idleTimeoutSeconds": INT32,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]},
        "env": {"type": "array", "items": core("api.core.v1.EnvVar")},
        "envFrom": {"type": "array", "items": core("api.core.v1.EnvFromSource")},
        "volumeMounts": {"type": "array", "items": core("api.core.v1.VolumeMount")},
        "command": STR_LIST,
        "args": STR_LIST,
    }
)
HEAD_GROUP = closed(
    {
        "template": POD_TEMPLATE,
        "headService": core("api.core.v1.Service"),
        "enableIngress": BOOL,
        "ingressOptions": ANY_OBJECT,
        "resources": STR_MAP,
        "labels": STR_MAP,
        "rayStartParams": STR_MAP,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
    },
    ("template",),
)
WORKER_GROUP = closed(
    {
        "suspend": BOOL,
        "groupName": STR,
        "replicas": INT32,
        "minReplicas": INT32,
        "maxReplicas": INT32,
        "idleTimeoutSeconds": INT32,
        "priority": INT32,
        "resources": STR_MAP,
        "labels": STR_MAP,
        "rayStartParams": STR_MAP,
        "template": POD_TEMPLATE,
        "scaleStrategy": closed({"workersToDelete": STR_LIST}),
        "numOfHosts": INT32,
    },
    ("groupName", "template"),
)
RAY_CLUSTER_SPEC = closed(
    {
        "upgradeStrategy": closed({"type": {"enum": ["Recreate", "None"]}}),
        "authOptions": closed(
            {"enableK8sTokenAuth": BOOL, "secretName": STR, "mode": {"enum": ["disabled", "token"]}}
        ),
        "suspend": BOOL,
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "autoscalerOptions": AUTOSCALER_OPTIONS,
        "headServiceAnnotations": STR_MAP,
        "enableInTreeAutoscaling": BOOL,
        "gcsFaultToleranceOptions": ANY_OBJECT,
        "historyServerOptions": ANY_OBJECT,
        "networkPolicy": ANY_OBJECT,
        "tlsOptions": closed({"enabled": BOOL}),
        "headGroupSpec": HEAD_GROUP,
        "rayVersion": STR,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    },
    ("headGroupSpec",),
)
RAY_SERVICE = resource(
    "ray.io/v1",
    "RayService",
    closed(
        {
            "rayClusterDeletionDelaySeconds": {"type": "integer", "minimum": 0},
            "serviceUnhealthySecondThreshold": INT32,
            "deploymentUnhealthySecondThreshold": INT32,
            "serveService": core("api.core.v1.Service"),
            "upgradeStrategy": closed(
                {
                    "type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
                    "clusterUpgradeOptions": closed(
                        {
                            "maxSurgePercent": INT32,
                            "stepSizePercent": INT32,
                            "intervalSeconds": INT32,
                            "gatewayClassName": STR,
                        }
                    ),
                }
            ),
            "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
            "serveConfigV2": STR,
            "rayClusterConfig": RAY_CLUSTER_SPEC,
            "excludeHeadPodFromServeSvc": BOOL,
            "suspend": BOOL,
        },
        ("rayClusterConfig",),
    ),
)

CUSTOM = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("ray.io/v1", "RayService"): RAY_SERVICE,
}


@cache
def _core_registry(version: str) -> Registry:
    schema_dir = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    definitions = json.loads((schema_dir / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


def validate(doc: dict, version: str = K8S_VERSIONS[0]) -> None:
    """Raise ``jsonschema.ValidationError`` (or kubernetes-validate's) unless ``doc`` is valid, strictly."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM:
        validator = jsonschema.Draft202012Validator(CUSTOM[key], registry=_core_registry(version))
        validator.validate(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def problems(doc: dict, version: str = K8S_VERSIONS[0]) -> list[str]:
    """Every validation problem of ``doc`` as ``path: message`` (empty when valid)."""
    try:
        validate(doc, version)
    except jsonschema.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"]
    return []
