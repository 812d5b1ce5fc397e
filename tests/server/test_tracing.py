"""OpenTelemetry: with an endpoint configured, each request is a server span that continues the caller's
``traceparent``, with child spans queue, steps and encode (read with the SDK's in-memory exporter); a real
``dcar serve`` exports them over OTLP/HTTP to the endpoint; without an endpoint nothing is traced."""

from __future__ import annotations

import signal
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from server_harness import serve, start_dcar_serve

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def exporter():
    """The process's tracer provider, as a host application (or opentelemetry-instrument) would set it."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    return memory


def children(spans, parent) -> dict[str, object]:
    return {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}


@pytest.mark.anyio
async def test_request_span_continues_traceparent_with_queue_steps_encode(pipe, exporter):
    async with serve(pipe, otel_endpoint="http://127.0.0.1:9") as client:  # the host's provider wins
        exporter.clear()
        r = await client.post(
            "/v1/generate",
            json={"prompt": "traced", "n": 2, "steps": 3},
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        )
        assert r.status_code == 200
        spans = exporter.get_finished_spans()
        [request] = [s for s in spans if s.name == "POST /v1/generate"]
        assert request.kind == trace.SpanKind.SERVER
        assert format(request.context.trace_id, "032x") == TRACE_ID
        assert format(request.parent.span_id, "016x") == PARENT_ID and request.parent.is_remote
        assert request.attributes["http.response.status_code"] == 200
        assert request.attributes["dcar.request_id"] == r.headers["x-request-id"]
        kids = children(spans, request)
        assert set(kids) == {"queue", "steps", "encode"}
        assert all(k.context.trace_id == request.context.trace_id for k in kids.values())
        queue, steps, encode = kids["queue"], kids["steps"], kids["encode"]
        assert request.start_time <= queue.start_time <= queue.end_time <= steps.end_time <= encode.start_time
        assert encode.end_time <= request.end_time
        assert steps.attributes["dcar.steps"] == 3 and steps.attributes["dcar.rows"] == 2

        exporter.clear()  # an OpenAI stream: the same spans under its request span; no traceparent: a new trace
        r = await client.post("/v1/images/generations", json={"prompt": "traced", "stream": True, "steps": 2})
        assert r.status_code == 200 and "image_generation.completed" in r.text
        spans = exporter.get_finished_spans()
        [request] = [s for s in spans if s.name == "POST /v1/images/generations"]
        assert request.parent is None and set(children(spans, request)) == {"queue", "steps", "encode"}

        exporter.clear()
        assert (await client.post("/v1/generate", json={"prompt": "x", "steps": 99})).status_code == 400
        [request] = exporter.get_finished_spans()
        assert request.attributes["http.response.status_code"] == 400

    async with serve(pipe) as client:  # no endpoint: no spans, even with a provider in the process
        exporter.clear()
        assert (await client.post("/v1/generate", json={"prompt": "untraced", "steps": 2})).status_code == 200
        assert exporter.get_finished_spans() == ()


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps every exported span name with its trace id."""

    spans: list[tuple[str, str]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                Collector.spans += [(s.name, s.trace_id.hex()) for s in scope.spans]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_dcar_serve_exports_spans_over_otlp_http(tmp_path):
    collector = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    url, proc, log = start_dcar_serve(
        tmp_path / "serve.log",
        "--no-warmup",
        env={"DCAR_OTEL_ENDPOINT": f"http://127.0.0.1:{collector.server_port}"},
    )
    try:
        r = httpx.post(
            f"{url}/v1/generate",
            json={"prompt": "exported", "steps": 2},
            timeout=60,
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        )
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)  # the batch processor flushes at shutdown
        assert proc.wait(timeout=60) == 0
        collector.shutdown()
    names = {name for name, trace_id in Collector.spans if trace_id == TRACE_ID}
    assert {"POST /v1/generate", "queue", "steps", "encode"} <= names
