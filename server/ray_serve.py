"""``dcar serve --ray``: the same app on Ray Serve, N replicas (one per GPU), each with its own engine.

Scale-out beyond one process: Ray hosts ``create_app`` unchanged in
every replica (server/ray_replica.py), its proxy routes each request to a replica with room (at most
``max_ongoing_requests`` in flight per replica) and, with ``--max-replicas`` above ``--replicas``, its
autoscaler adds or removes replicas to keep about ``target_ongoing_requests`` requests per replica. Each
replica batches its own requests; a replica with a GPU reserves one (``num_gpus``), so Ray places one replica
per GPU across the cluster.

Two ways in:

- ``dcar serve --ray [--replicas N] [--max-replicas M] [--ray-address ADDR]``: joins the cluster at
  ``ADDR`` (or ``RAY_ADDRESS``; else starts a local Ray head), deploys, serves on ``--host``/``--port``, and
  on SIGTERM deletes the application, letting each replica drain, before it exits.
- ``serve run deploy/ray-serve.yaml`` (or ``serve deploy`` to a running cluster): the config's
  ``import_path`` is ``dcar.server.ray_serve:app_builder``; its ``args`` are the fields of ``RayOptions`` plus
  ``settings``, and its ``deployments`` section may override any deployment option.

Ray is an optional dependency (the ``ray`` extra: ``pip install -e '.[ray]'``): this module imports it only when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass

from pydantic import ValidationError

from dcar.server.settings import Settings

log = logging.getLogger("dcar.ray")

APP_NAME = "dcar"


@dataclass(frozen=True)
class RayOptions:
    """How the deployment is spread; ``None`` means the default named beside each field."""

    replicas: int | None = None  # replicas at start and at least; default one per GPU in the cluster, else 1
    max_replicas: int | None = None  # above ``replicas``: autoscale on ongoing requests; default = replicas
    gpus_per_replica: float | None = None  # default 1 when the cluster has GPUs and the device is not cpu
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int | None = None  # per replica; default 2 x max_batch_size
    target_ongoing_requests: float | None = None  # autoscaling target per replica; default max_batch_size
    metrics_port: int = 0  # >0: each replica also serves /metrics on metrics_port + its rank

    def __post_init__(self):
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < (self.replicas or 1):
            raise ValueError(
                f"max_replicas={self.max_replicas} is below replicas={self.replicas or 1}; "
                "raise max_replicas or lower replicas"
            )
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ValueError(f"gpus_per_replica must be 0 or more, got {self.gpus_per_replica}")
        if self.cpus_per_replica < 0:
            raise ValueError(f"cpus_per_replica must be 0 or more, got {self.cpus_per_replica}")
        # Checked here rather than replaced by the default (0) or passed on to Ray (negative), which would
        # refuse it only after a Ray head had been started.
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be at least 1, got {self.max_ongoing_requests}")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be above 0, got {self.target_ongoing_requests}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be between 0 and 65535, got {self.metrics_port}")


def proxy_queue_limit(settings: Settings) -> int:
    """Ray's ``max_queued_requests`` for these settings: a count of requests, derived from ``max_queue`` rows.

    Ray's proxy queues whole requests (each of 1 to ``max_n`` images) while every replica has
    ``max_ongoing_requests`` in flight; dcar's ``max_queue`` counts rows (images). Feeding the row limit to
    Ray would let its queue hold up to ``max_n`` times as many images. ``max_queue // max_n`` requests hold
    at most ``max_queue`` rows whatever their sizes (Settings guarantees ``max_queue >= max_n``).
    """
    return max(1, settings.max_queue // settings.max_n)


def deployment_options(settings: Settings, opts: RayOptions, cluster_gpus: float) -> dict:
    """``DcarReplica.options(...)`` for these settings on a cluster with ``cluster_gpus`` GPUs."""
    gpus = opts.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster_gpus > 0 and settings.device != "cpu" else 0.0
    replicas = opts.replicas or (max(1, int(cluster_gpus // gpus)) if gpus > 0 else 1)
    if opts.replicas is None and opts.max_replicas is not None:
        replicas = min(replicas, opts.max_replicas)  # one per GPU, but never above the stated maximum
    max_replicas = opts.max_replicas or replicas
    max_ongoing = opts.max_ongoing_requests or 2 * settings.max_batch_size
    options: dict = {
        "ray_actor_options": {"num_cpus": opts.cpus_per_replica, "num_gpus": gpus},
        "max_ongoing_requests": max_ongoing,
        # Requests waiting in Ray's proxy for a free replica; beyond it Ray answers 503 (each replica's own
        # queue answers 429 past max_queue rows).
        "max_queued_requests": proxy_queue_limit(settings),
        # Serve stops routing to a stopping replica, waits for its requests, then runs the app's lifespan
        # shutdown, which drains the engine for up to drain_timeout_s.
        "graceful_shutdown_timeout_s": settings.drain_timeout_s + 10.0,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }
    if max_replicas > replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "initial_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": opts.target_ongoing_requests or float(settings.max_batch_size),
        }
    else:
        options["num_replicas"] = replicas
    return options


# The proxy listens on --host/--port; a replica has no listener of its own for them, nor for the ops port,
# which only a plain ``dcar serve`` opens. Passing them on would only let them fail a replica's checks (an
# ops_port equal to the replica's default port 8000 is refused there).
NOT_FOR_REPLICAS = {"host", "port", "ops_port"}


def replica_settings(settings: Settings) -> dict:
    """The settings every replica is built with: those set by flags or ``DCAR_*``, less the listeners'."""
    return settings.model_dump(exclude_unset=True, exclude=NOT_FOR_REPLICAS)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def build_app(settings: dict, opts: RayOptions, cluster_gpus: float | None = None):
    """The Serve application: ``DcarReplica`` with the options for this cluster, bound to ``settings``."""
    from dcar.server.ray_replica import DcarReplica

    validated = Settings(**settings)  # fail here, not in every replica
    gpus = _cluster_gpus() if cluster_gpus is None else cluster_gpus
    options = deployment_options(validated, opts, gpus)
    return DcarReplica.options(**options).bind(settings, opts.metrics_port)  # type: ignore[attr-defined]  # @serve.deployment


def app_builder(args: dict):
    """Entry point of ``serve run`` / ``serve deploy`` configs (``import_path: dcar.server.ray_serve:app_builder``).

    ``args``: ``settings`` (a dict of Settings fields) and any ``RayOptions`` field.
    """
    args = dict(args)
    settings = args.pop("settings", None) or {}
    fields = {f.name for f in dataclasses.fields(RayOptions)}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(
            f"unknown app_builder args {unknown}; allowed: settings, {', '.join(sorted(fields))}"
        )
    return build_app(settings, RayOptions(**args))


# --- dcar serve --ray ----------------------------------------------------------------------------------

FLAGS = {
    "ray_address": (
        "--ray-address",
        str,
        "Ray cluster to join (auto, HOST:PORT, ray://...); default: $RAY_ADDRESS, else a new local Ray head",
    ),
    "replicas": (
        "--replicas",
        int,
        "replicas at start and at least (default: one per GPU in the cluster, 1 without GPUs)",
    ),
    "max_replicas": (
        "--max-replicas",
        int,
        "autoscale up to this many replicas on ongoing requests (default: --replicas, no autoscaling)",
    ),
    "gpus_per_replica": (
        "--gpus-per-replica",
        float,
        "GPUs each replica reserves (default: 1 when the cluster has GPUs, else 0)",
    ),
    "cpus_per_replica": ("--cpus-per-replica", float, "CPUs each replica reserves (default 1)"),
    "max_ongoing_requests": (
        "--max-ongoing-requests",
        int,
        "requests in flight per replica (default 2 x max batch size)",
    ),
    "target_ongoing_requests": (
        "--target-ongoing-requests",
        float,
        "autoscaling target per replica (default max batch size)",
    ),
    "metrics_port": (
        "--replica-metrics-port",
        int,
        "each replica also serves /metrics on this port + its rank (default: off)",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--ray`` flag of ``dcar serve`` and the options that go with it."""
    group = parser.add_argument_group(
        "Ray Serve", "serve through Ray Serve: replicas across GPUs and machines"
    )
    group.add_argument("--ray", action="store_true", help="serve through Ray Serve (needs the ray extra)")
    for field, (flag, kind, help_text) in FLAGS.items():
        group.add_argument(flag, dest=field, type=kind, default=None, help=help_text)


def options_from_args(args: argparse.Namespace) -> RayOptions:
    fields = {f.name for f in dataclasses.fields(RayOptions)}
    return RayOptions(**{f: getattr(args, f) for f in fields if getattr(args, f, None) is not None})


def start(address: str | None, host: str, port: int) -> bool:
    """Join (or start) a Ray cluster and start Serve's HTTP proxy on ``host:port``; True if a new head began."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # see run()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    return not address


def run(args: argparse.Namespace) -> int:
    """``dcar serve --ray``: deploy, serve until SIGTERM/SIGINT, then delete the app (replicas drain).

    Exit status as ``dcar serve``: 0 after a clean stop, 1 if the replicas failed to start, 2 for bad settings.
    """
    from dcar.server.serve import settings_from_args

    try:
        settings = settings_from_args(args)
        opts = options_from_args(args)
    except (ValidationError, ValueError) as e:
        print(f"dcar serve --ray: invalid settings:\n{e}", file=sys.stderr)
        return 2
    # A Ray head started here sends no usage report unless the operator asks for one (set before Ray loads).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        from ray import serve
    except ImportError:
        print("dcar serve --ray needs Ray Serve: pip install -e '.[ray]' (the ray extra)", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.ops_port is not None:
        log.warning(
            "ops_port=%d is not opened under Ray: probe the replicas through the proxy", settings.ops_port
        )
    overrides = replica_settings(settings)
    started = start(getattr(args, "ray_address", None), settings.host, settings.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            serve.run(build_app(overrides, opts), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # the replicas kept failing to start (Ray retried them): as a failed load
            log.error("the deployment failed: %s", e)
            return 1
        log.info("serving %s on http://%s:%d through Ray Serve", APP_NAME, settings.host, settings.port)
        while not stop.wait(1.0):
            pass
        log.info("stopping: deleting the application (each replica drains)")
        serve.delete(APP_NAME)
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
    return 0
