"""Optional OpenTelemetry traces: one span per HTTP request, with child spans ``queue``, ``steps`` and ``encode``.

Off unless ``DCAR_OTEL_ENDPOINT`` is set (then the ``otel`` extra must be installed). The request span is
FastAPI's own (its native OpenTelemetry support: server span, ``traceparent`` continued, ``http.route`` and
status); dcar adds the request id to it and the child spans. Spans go to the process's tracer provider when
the host already configured one (``opentelemetry-instrument``, or a test with an in-memory exporter), else to
an OTLP/HTTP exporter at the endpoint (batched, off the request path, flushed at exit). ``queue``
(submission until the last row was admitted) and ``steps`` (the first admission until the last image was
decoded) are recorded afterwards from the engine's timestamps; ``encode`` is timed live.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from fastapi.telemetry import TelemetryConfig

from dcar.server.settings import Settings

SERVICE_NAME = "dcar"
# FastAPI's telemetry with dcar's tracing off: no spans, even where the process has a tracer provider
TELEMETRY_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def _wall_ns(monotonic: float) -> int:
    """A ``time.monotonic()`` instant as epoch nanoseconds (what span timestamps take)."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class Tracing:
    """The app's tracer, or nothing: every method is a no-op when tracing is off."""

    def __init__(self, settings: Settings):
        self.tracer = None
        self.telemetry: TelemetryConfig = {**TELEMETRY_OFF}  # FastAPI(telemetry=...)
        if settings.otel_endpoint is None:
            return
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
        except ImportError as e:
            raise ValueError(
                "DCAR_OTEL_ENDPOINT is set but OpenTelemetry is not installed: pip install 'dcar[otel]'"
            ) from e
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):  # nobody configured one: export to the endpoint
            provider = self._otlp_provider(settings.otel_endpoint)
        self.tracer = provider.get_tracer("dcar.server")
        # request spans only: Prometheus has the metrics, and operation spans would sit between them and ours
        self.telemetry = {
            "tracer_provider": provider,
            "tracing": True,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
        }

    @staticmethod
    def _otlp_provider(endpoint: str):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        url = endpoint.rstrip("/")
        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=url if url.endswith("/v1/traces") else f"{url}/v1/traces")
            )
        )
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
        from opentelemetry import trace

        trace.get_current_span().set_attribute("dcar.request_id", job.id)  # FastAPI's request span
        admitted = [a for a in job.admitted if a is not None]
        if job.enqueued is None or not admitted:
            return
        rows = {"dcar.rows": len(job.params)}
        queue = self.tracer.start_span("queue", start_time=_wall_ns(job.enqueued), attributes=rows)
        queue.end(end_time=_wall_ns(max(admitted)))
        steps = self.tracer.start_span(
            "steps",
            start_time=_wall_ns(min(admitted)),
            attributes={**rows, "dcar.steps": job.params[0].steps},
        )
        steps.end(end_time=_wall_ns(finished))
