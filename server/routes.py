"""The native API (/v1/generate, /v1/edit), the operational endpoints, and the helpers the OpenAI routes share.

Routes only parse (bodies through server/bodies.py), validate, submit and translate: the engine on
``app.state.runtime`` does the work. A request becomes a ``Job`` of n rows; the route waits for it while
watching the client, so a client that disconnects has its rows dropped from the running batch at the next
step.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dcar.model.params import RowResult, SamplingParams
from dcar.server.auth import check_api_key
from dcar.server.bodies import decode_edit, read_form, read_json, take_file, validate
from dcar.server.engine import Engine
from dcar.server.errors import ApiError, error_body
from dcar.server.imaging import decode_base64, encode_image, media_type
from dcar.server.jobs import Job
from dcar.server.logs import note, set_outcome
from dcar.server.provenance import Mark, parameters
from dcar.server.runtime import Runtime
from dcar.server.schemas import (
    EditFields,
    EditJSONRequest,
    GenerateRequest,
    GenerateResponse,
    ImageOut,
    check_knobs,
    check_priority,
    check_size,
    check_timeout,
    to_params,
)
from dcar.server.sse import KEEPALIVE, ending_in_an_error_event, job_events, sse

router = APIRouter()
DEADLINE_GRACE_S = 1.0  # the engine ends late jobs at a step boundary; the route is only the backstop


# --- dependencies --------------------------------------------------------------------------------------


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def require_api_key(request: Request, runtime: RuntimeDep) -> None:
    """The key check of server/auth.py (the edge middleware has already run it, before the body)."""
    check_api_key(request.headers.get("authorization", ""), runtime.settings.api_keys)


Authorized = Annotated[None, Depends(require_api_key)]


# --- shared helpers ------------------------------------------------------------------------------------


def request_id(request: Request) -> str:
    return request.scope["state"]["request_id"]


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_for(request: Request, engine: Engine, job: Job) -> list[RowResult]:
    """The job's results; drops its rows if the client leaves, 504 once its deadline passes."""
    future = job.future
    assert future is not None  # set by Engine.submit
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        remaining = job.deadline - time.monotonic() + DEADLINE_GRACE_S
        await asyncio.wait({future, watcher}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if future.done():
            return future.result()
        if watcher.done():
            engine.cancel(job, "disconnected")
            raise ApiError(499, "client_closed_request", "the client disconnected")
        error = engine.deadline_error(job)
        engine.cancel(job, "deadline", error)
        raise error
    finally:
        watcher.cancel()


def image_mark(runtime: Runtime, params: SamplingParams) -> Mark | None:
    """What goes into the image file's metadata (None with ``mark_output`` off)."""
    if not runtime.settings.mark_output:
        return None
    return Mark(runtime.pipe.name, runtime.weights_digest, parameters(params, seed=True))


async def encode_all(
    runtime: Runtime, job: Job, results: list[RowResult], fmt: str, quality: int | None
) -> list[tuple[bytes, float]]:
    """Encode every image off the event loop; each with its encoding time (the image_encode stage)."""

    def work() -> list[tuple[bytes, float]]:
        out = []
        for r, params in zip(results, job.params):
            t0 = time.perf_counter()
            data = encode_image(
                r.image, fmt, quality, runtime.settings.png_compress_level, image_mark(runtime, params)
            )
            out.append((data, time.perf_counter() - t0))
        return out

    with runtime.tracing.span("encode", **{"dcar.images": len(results), "dcar.format": fmt}):
        encoded = await asyncio.to_thread(work)
    for _, seconds in encoded:
        runtime.metrics.image_encoded(seconds)
    return encoded


def raw_format(request: Request) -> str | None:
    """The image format named by ``Accept`` when the client wants raw bytes instead of JSON."""
    accept = request.headers.get("accept", "").lower()
    if "application/json" in accept or "text/event-stream" in accept:
        return None
    for fmt, mime in (("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")):
        if mime in accept:
            return fmt
    return None


def native_body(
    runtime: Runtime, job: Job, results: list[RowResult], encoded: list[tuple[bytes, float]], fmt: str
) -> dict:
    images = []
    for i, (r, (data, enc_s)) in enumerate(zip(results, encoded)):
        timings = {k: round(v, 6) for k, v in r.timings.items()}
        timings["image_encode"] = round(enc_s, 6)
        timings["queue_wait"] = round(job.queue_wait(i), 6)
        images.append(
            ImageOut(index=i, seed=r.seed, b64_json=base64.b64encode(data).decode("ascii"), timings=timings)
        )
    p = job.params[0]
    body = GenerateResponse(
        id=job.id,
        created=int(time.time()),
        model=runtime.pipe.name,
        size=f"{p.width}x{p.height}",
        output_format=fmt,
        images=images,
        timings={
            "queue_wait": max(im.timings["queue_wait"] for im in images),
            "total": round(time.monotonic() - job.submitted, 6),
        },
        parameters=parameters(p),
        weights_digest=runtime.weights_digest,
    )
    return body.model_dump()


def queued_event(engine: Engine, job: Job, first: bool = False) -> str | None:
    """``queued`` with the job's place in the queue (1: next), or None once none of its rows waits.

    ``first``: only when rows wait ahead of it; an idle engine admits a new job within a moment anyway.
    """
    ahead = engine.rows_ahead(job)
    if ahead is None or (first and ahead == 0):
        return None
    return sse("queued", {"position": ahead + 1, "queued_rows": engine.queued_rows})


def native_error_event(e: ApiError, request_id: str) -> str:
    return sse("error", error_body(e.status, e.code, e.message, e.param, request_id))


async def stream_events(request: Request, runtime: Runtime, job: Job, fmt: str, quality: int | None):
    """SSE: ``queued`` while waiting (again when the place changes; keep-alive comments in between), then
    ``progress`` per row and step (with a preview if asked), then ``images`` (or ``error``, whose status the
    metrics and the access record count). The place is checked at the start and at every keep-alive tick."""
    engine = runtime.engine
    assert engine is not None  # the job was submitted to it
    try:
        last = queued_event(engine, job, first=True)
        if last is not None:
            yield last
        async for ev in job_events(job, runtime.settings.sse_keepalive_s):
            if (
                ev is None
            ):  # silence: a new place in the queue, or a comment that keeps proxies from timing out
                queued = queued_event(engine, job)
                changed = queued is not None and queued != last
                last = queued if changed else last
                yield queued if changed else KEEPALIVE
                continue
            data: dict[str, object] = {
                "index": ev.index,
                "step": ev.step,
                "steps": ev.steps,
                "revealed": ev.revealed,
                "tokens": ev.tokens,
            }
            if ev.preview is not None:
                data["preview"] = ev.preview
            yield sse("progress", data)
        assert job.future is not None  # set by Engine.submit
        try:
            results = job.future.result()
        except ApiError as e:
            set_outcome(request, e.status)
            yield native_error_event(e, job.id)
            return
        runtime.tracing.job_spans(job, time.monotonic())
        encoded = await encode_all(runtime, job, results, fmt, quality)
        yield sse("images", native_body(runtime, job, results, encoded, fmt))
    finally:
        engine.cancel(job, "disconnected")  # no-op once the job is done


async def run_native(request: Request, runtime: Runtime, job: Job, fmt: str, quality: int | None) -> Response:
    engine, _ = runtime.serving()
    raw = None if job.stream else raw_format(request)
    if raw is not None and len(job.params) != 1:
        raise ApiError(
            406,
            "not_acceptable",
            f"Accept: {media_type(raw)} returns one raw image, but n="
            f"{len(job.params)}; ask for application/json or n=1",
            "n",
            reason="invalid",
        )
    note(request, job=job)  # before submit: a refused request's access record still says what it asked
    engine.submit(job)
    if job.stream:
        return StreamingResponse(
            ending_in_an_error_event(
                stream_events(request, runtime, job, fmt, quality), request, job, native_error_event
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    results = await wait_for(request, engine, job)
    runtime.tracing.job_spans(job, time.monotonic())
    if raw is not None:
        ((data, seconds),) = await encode_all(runtime, job, results, raw, quality)
        return Response(data, media_type=media_type(raw), headers={"X-Seed": str(results[0].seed)})
    encoded = await encode_all(runtime, job, results, fmt, quality)
    return JSONResponse(native_body(runtime, job, results, encoded, fmt))


# --- native API ----------------------------------------------------------------------------------------


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    tags=["images"],
    responses={200: {"content": {"image/png": {}, "text/event-stream": {}}}},
)
async def generate(body: GenerateRequest, request: Request, runtime: RuntimeDep, _: Authorized) -> Response:
    """Text to image. JSON in; JSON out, the raw image with ``Accept: image/png`` and n=1, or SSE with stream."""
    engine, limits = runtime.serving()
    check_knobs(body)
    size = check_size(body.size, limits)
    params = to_params(body, limits, size)
    job = Job(
        request_id(request),
        "generate",
        params,
        check_timeout(body.timeout, limits),
        stream=body.stream,
        preview=body.preview,
        priority=check_priority(body.priority, limits),
    )
    return await run_native(request, runtime, job, body.output_format, body.quality)


@router.post(
    "/v1/edit",
    response_model=GenerateResponse,
    tags=["images"],
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {"schema": EditFields.model_json_schema()},
                "application/json": {"schema": EditJSONRequest.model_json_schema()},
            }
        }
    },
)
async def edit(request: Request, runtime: RuntimeDep, _: Authorized) -> Response:
    """Inpainting. Multipart (files ``image`` and ``mask``, knobs as fields) or JSON with base64 images.

    Mask: white (and opaque) = regenerate; a token is regenerated when any pixel of its patch is marked.
    """
    engine, limits = runtime.serving()
    s = runtime.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        fields, files = await read_form(request, s.max_image_bytes)
        image_bytes = take_file(fields, files, "image")
        mask_bytes = take_file(fields, files, "mask")
        body = validate(EditFields, fields)
    elif ctype == "application/json":
        body = validate(EditJSONRequest, await read_json(request))
        image_bytes = decode_base64(body.image, "image", s.max_image_bytes)
        mask_bytes = decode_base64(body.mask, "mask", s.max_image_bytes)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data (files image and mask) or "
            f"application/json (base64 image and mask), got Content-Type {ctype or 'none'!r}",
            "Content-Type",
            reason="invalid",
        )
    check_knobs(body)
    edit_input, size = await asyncio.to_thread(
        decode_edit, image_bytes, mask_bytes, runtime, limits, False, body.blend, body.size
    )
    params = to_params(body, limits, size)
    job = Job(
        request_id(request),
        "edit",
        params,
        check_timeout(body.timeout, limits),
        edit=edit_input,
        stream=body.stream,
        preview=body.preview,
        priority=check_priority(body.priority, limits),
    )
    return await run_native(request, runtime, job, body.output_format, body.quality)


# --- operations ----------------------------------------------------------------------------------------


@router.get("/healthz", tags=["operations"])
async def healthz(runtime: RuntimeDep) -> JSONResponse:
    """Liveness: 200 while the process can still serve (503 only after the engine failed for good)."""
    ok = runtime.status != "failed"
    return JSONResponse({"status": "alive" if ok else "failed"}, status_code=200 if ok else 503)


@router.get("/readyz", tags=["operations"])
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Readiness: 200 once loaded and warmed up; 503 while loading, draining, or after the engine failed."""
    status = runtime.status
    body: dict = {"status": status}
    if runtime.engine is not None:
        body.update(queued_rows=runtime.engine.queued_rows, running_rows=runtime.engine.running_rows)
    error = runtime.error or (runtime.engine.failure if runtime.engine is not None else None)
    if error:
        body["error"] = error
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


@router.get("/metrics", tags=["operations"])
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", tags=["models"])
async def models(runtime: RuntimeDep, _: Authorized) -> dict:
    """The served model, in OpenAI's list shape, with its sizes and device."""
    engine, limits = runtime.serving()
    info = runtime.pipe.info()
    return {
        "object": "list",
        "data": [
            {
                "id": info["name"],
                "object": "model",
                "created": runtime.created,
                "owned_by": "dcar",
                "native_size": f"{limits.native[0]}x{limits.native[1]}",
                "sizes": limits.size_list().split(", "),
                "device": info["device"],
                "dtype": info["dtype"],
                "max_n": limits.max_n,
                "max_prompt_tokens": limits.max_prompt_tokens,
            }
        ],
    }
