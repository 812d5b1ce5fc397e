"""``dcar serve``: run the app under uvicorn, with a drain on SIGTERM.

uvicorn's own SIGTERM handling closes the listening socket at once, so a load balancer would see refused
connections rather than a failing readiness probe. Here the first SIGTERM (or Ctrl-C) only starts a drain:
``/readyz`` turns 503, new work gets 503, accepted rows finish (up to ``drain_timeout_s``); then uvicorn
shuts down as usual and the process exits 0. A second signal exits at once. Exit status 1 means the model
failed to load (the reason is logged); 2 means bad settings, a device this machine lacks included (refused
before the port opens).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError

from dcar.server import logs
from dcar.server.guard import ConnectionGuard
from dcar.server.ops_port import OpsListener
from dcar.server.settings import Settings

if TYPE_CHECKING:  # the app and the runtime import the model (torch, transformers: seconds); bad flags
    from dcar.server.runtime import Runtime  # are refused before that (``dcar serve --log-level foo``)

log = logging.getLogger("dcar.server")

# CLI flag -> settings field; every flag defaults to None so that DCAR_* variables and defaults stay in force.
FLAGS = {
    "weights": ("--weights", str, "weights directory, or preset:tiny for a random tiny model"),
    "device": ("--device", str, "auto, cpu, cuda, cuda:N, mps"),
    "dtype": ("--dtype", str, "float32, float16 or bfloat16"),
    "host": ("--host", str, "address to bind (default 127.0.0.1)"),
    "port": ("--port", int, "port to bind (default 8000)"),
    "ops_port": ("--ops-port", int, "a second port for /healthz, /readyz and /metrics only (default: none)"),
    "max_batch_size": ("--max-batch-size", int, "rows (images) in flight at once"),
    "max_wait_ms": ("--max-wait-ms", float, "how long an idle engine collects rows before starting"),
    "max_queue": ("--max-queue", int, "rows waiting before 429"),
    "request_timeout_s": ("--request-timeout", float, "default request deadline in seconds"),
    "drain_timeout_s": ("--drain-timeout", float, "seconds in-flight rows may take after SIGTERM"),
    "allowed_sizes": ("--allowed-sizes", str, "comma-separated WIDTHxHEIGHT sizes (default: native only)"),
    "log_level": ("--log-level", str, "debug, info, warning, error, critical"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``dcar serve``; each overrides the matching ``DCAR_*`` setting."""
    for field, (flag, kind, help_text) in FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
    parser.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=None,
        help="accepted bearer key (repeatable); default: DCAR_API_KEYS, or no auth",
    )
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_const",
        const=False,
        default=None,
        help="report ready without the warm-up generations",
    )
    from dcar.server import ray_serve  # Ray itself is imported only by --ray

    ray_serve.add_arguments(parser)


def device_refusal(settings: Settings, args: argparse.Namespace) -> str | None:
    """``--device: why`` (or ``DCAR_DEVICE: why``) when this machine lacks the device, else None.

    Checked before the port opens: a pod scheduled on a node without the GPU it asks for should say so and
    stop, not start listening and then fail its model load with a traceback.
    """
    from dcar.model.devices import device_problem, resolve_device  # torch: after the flags were read

    problem = device_problem(resolve_device(settings.device))
    if not problem:
        return None
    return f"{'--device' if getattr(args, 'device', None) is not None else 'DCAR_DEVICE'}: {problem}"


def settings_from_args(args: argparse.Namespace) -> Settings:
    fields = [*FLAGS, "api_keys", "warmup"]
    return Settings(**{f: getattr(args, f) for f in fields if getattr(args, f, None) is not None})


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the engine before shutting down."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime):
        super().__init__(config)
        self.runtime = runtime
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._tasks: set[asyncio.Task] = set()
        self._ops: OpsListener | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        settings = self.runtime.settings
        if settings.ops_port is not None:  # bound first: a taken port stops us before the model loads
            self._ops = OpsListener(
                self.config.app, settings.host, settings.ops_port, settings.keepalive_timeout_s
            )
            self._ops.bind()
        await super().startup(sockets)
        if self._ops is not None and not self.should_exit:
            await self._ops.start()
        self._spawn(self._watch_boot())

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self._ops is not None:  # last: the probes see "draining", not a refused connection, until the end
            await self._ops.stop()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_boot(self) -> None:
        while self.runtime.booting:
            await asyncio.sleep(0.05)
        if self.runtime.error is not None:
            log.error("exiting with status 1 (the model did not load)")
            self.exit_code = 1
            self.should_exit = True
            return
        if not self.runtime.settings.exit_on_engine_failure:
            return
        # Kubernetes restarts a process whose /healthz fails, but docker compose's restart policy (and
        # systemd's) only acts on an exit: a failed engine would otherwise answer 503 until someone came.
        while self.runtime.status != "failed" and not self.should_exit:
            await asyncio.sleep(0.1)
        if self.runtime.status == "failed":
            engine = self.runtime.engine
            log.error("exiting with status 1: the engine failed for good (%s)", engine and engine.failure)
            await asyncio.sleep(0.5)  # the 503s and 500s already decided go out first
            self.exit_code = 1
            self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or self._loop is None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        log.info("received %s: draining (readiness 503, no new work)", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._spawn, self._drain())

    async def _drain(self) -> None:
        self.runtime.begin_drain()
        if self.runtime.engine is not None:
            await self.runtime.engine.drain(self.runtime.settings.drain_timeout_s)
        self.should_exit = True


def uvicorn_config(app, settings: Settings, **options) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: the connection guard (server/guard.py) as its HTTP protocol, the
    keep-alive timeout from the settings, and a short graceful shutdown (the drain happened before it)."""
    guard = ConnectionGuard(settings, app.state.runtime.metrics.registry)
    # (uvicorn annotates timeout_keep_alive as int; it is a delay for loop.call_later, and floats work)
    return uvicorn.Config(
        app,
        http=guard.protocol(),
        timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=5,
        lifespan="on",
        **options,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM; 0 after a clean drain, 1 if the model failed to load, 2 for bad settings."""
    if getattr(args, "ray", False):
        from dcar.server import ray_serve

        return ray_serve.run(args)
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        print(f"dcar serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    problem = device_refusal(settings, args)
    if problem:
        print(f"dcar serve: error: {problem}", file=sys.stderr)
        return 2
    log_config = logs.configure(settings.log_format, settings.log_level)
    from dcar.server.app import create_app

    app = create_app(settings)
    # uvicorn's loggers through dcar's formatter; dcar.access replaces uvicorn's access lines (it knows more)
    config = uvicorn_config(
        app,
        settings,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config,
        access_log=False,
    )
    server = DrainingServer(config, app.state.runtime)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits this way when it cannot start (port in use, ...)
        return int(e.code or 1)
    return server.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcar serve", description="Serve DC-AR over HTTP.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
