"""Optional OpenTelemetry traces: one span per HTTP request, with child spans ``queue``, ``steps`` and ``encode``.

Off unless ``DCAR_OTEL_ENDPOINT`` is set (then the ``otel`` extra must be installed). The request span
continues the caller's trace when the request carries a W3C ``traceparent`` header. Spans go to the
process's tracer provider when the host already configured one (``opentelemetry-instrument``, or a test
with an in-memory exporter), else to an OTLP/HTTP exporter at the endpoint (batched, off the request path).
``queue`` (enqueued until admitted into a batch) and ``steps`` (admitted until the last row's image was
decoded) are recorded afterwards from the engine's timestamps; ``encode`` is timed live.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from dcar.server.settings import Settings

SERVICE_NAME = "dcar"


def _wall_ns(monotonic: float) -> int:
    """A ``time.monotonic()`` instant as epoch nanoseconds (what span timestamps take)."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class Tracing:
    """The app's tracer, or nothing: every method is a no-op when tracing is off."""

    def __init__(self, settings: Settings):
        self.tracer = None
        if settings.otel_endpoint is None:
            return
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
        except ImportError as e:
            raise ValueError("DCAR_OTEL_ENDPOINT is set but OpenTelemetry is not installed: "
                             "pip install 'dcar[otel]'") from e
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):  # nobody configured one: export to the endpoint
            provider = self._otlp_provider(settings.otel_endpoint)
        self.tracer = provider.get_tracer("dcar.server")

    @staticmethod
    def _otlp_provider(endpoint: str):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        url = endpoint.rstrip("/")
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=url if url.endswith("/v1/traces") else f"{url}/v1/traces")))
        return provider

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @contextlib.contextmanager
    def span(self, name: str, **attributes) -> Iterator[None]:
        """A live child span of the current one (the request's)."""
        if self.tracer is None:
            yield
            return
        with self.tracer.start_as_current_span(name, attributes=attributes):
            yield

    def job_spans(self, job, finished: float) -> None:
        """``queue`` and ``steps`` spans of a finished job, from its rows' timestamps (monotonic seconds)."""
        if self.tracer is None:
            return
        admitted = [a for a in job.admitted if a is not None]
        if job.enqueued is None or not admitted:
            return
        rows = {"dcar.rows": len(job.params)}
        queue = self.tracer.start_span("queue", start_time=_wall_ns(job.enqueued), attributes=rows)
        queue.end(end_time=_wall_ns(max(admitted)))
        steps = self.tracer.start_span("steps", start_time=_wall_ns(min(admitted)),
                                       attributes={**rows, "dcar.steps": job.params[0].steps})
        steps.end(end_time=_wall_ns(finished))


class TracingMiddleware:
    """ASGI middleware: the request span around everything inside it, continuing an incoming ``traceparent``."""

    def __init__(self, app, tracing: Tracing):
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.tracing.enabled:
            return await self.app(scope, receive, send)
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
        parent = TraceContextTextMapPropagator().extract(headers)
        method = scope.get("method", "")
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        with self.tracing.tracer.start_as_current_span(
                method, context=parent, kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": scope.get("path", "")}) as span:
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status["code"])
                rid = scope.get("state", {}).get("request_id")
                if rid:
                    span.set_attribute("dcar.request_id", rid)
                if status["code"] >= 500:
                    span.set_status(Status(StatusCode.ERROR))
