"""OpenAI-compatible image routes: ``POST /v1/images/generations`` and ``POST /v1/images/edits``.

Request, response and stream shapes are OpenAI's (server/schemas_openai.py), so the official ``openai``
client works unchanged with ``base_url=http://host:port/v1``. ``quality`` low / medium / high selects a
step preset (``QUALITY_PRESETS``); ``stream: true`` answers with Server-Sent Events: ``partial_images``
(0-3) decodes of the token map taken at evenly spaced unmasking steps, then one ``completed`` event per
image. Values OpenAI defines but this model cannot honour are refused with a 400 that says why. dcar's
sampling knobs (``seed``, ``steps``, ...) are extensions through the SDK's ``extra_body``. Edits follow
OpenAI's mask convention: fully transparent pixels are regenerated, and without a mask the image's own
transparency is the mask.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image

from dcar.model.params import SamplingParams
from dcar.model.pipeline import Pipeline
from dcar.server.bodies import decode_edit, read_form, take_file, validate
from dcar.server.engine import Engine
from dcar.server.errors import ApiError, check_unicode, error_body, invalid
from dcar.server.imaging import encode_image
from dcar.server.jobs import Job
from dcar.server.logs import note, set_outcome
from dcar.server.provenance import parameters
from dcar.server.routes import Authorized, RuntimeDep, encode_all, request_id, wait_for
from dcar.server.runtime import Runtime
from dcar.server.schemas import Limits, check_priority, check_range, check_size, check_timeout, to_params
from dcar.server.schemas_openai import (
    QUALITY_PRESETS,
    CompletedEvent,
    OpenAIEditFields,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    PartialImageEvent,
    TokenDetails,
    Usage,
)
from dcar.server.sse import KEEPALIVE, ending_in_an_error_event, job_events, sse

router = APIRouter(prefix="/v1/images", tags=["openai"])
UNSUPPORTED = {  # OpenAI fields this model cannot honour, and why
    "style": "style is a DALL-E 3 option; describe the style in the prompt",
    "complexity": "complexity (planning effort) has no counterpart in this model",
    "frame_count": "frame_count applies to GIF output, which this server does not produce",
    "frame_duration_ms": "frame_duration_ms applies to GIF output, which this server does not produce",
    "svg": "svg applies to SVG output, which this server does not produce",
}


def served(runtime: Runtime) -> Pipeline:
    assert runtime.pipeline is not None, "only after runtime.serving()"
    return runtime.pipeline


def engine_of(runtime: Runtime) -> Engine:
    assert runtime.engine is not None, "only after runtime.serving()"
    return runtime.engine


@dataclass(frozen=True)
class Plan:
    """What an OpenAI request asks beyond the sampling parameters."""

    kind: str  # event prefix: image_generation or image_edit
    fmt: str  # png, jpeg or webp
    compression: int | None  # JPEG/WebP quality
    quality: str  # low, medium or high (auto -> high), echoed
    stream: bool
    partials: int
    user: str | None

    def defaults(self, runtime: Runtime) -> dict:
        """The quality preset's step counts, never above the model's own defaults."""
        preset = QUALITY_PRESETS[self.quality]
        if preset is None:
            return {}
        d = served(runtime).config.sampling
        return {"steps": min(preset[0], d.steps), "residual_steps": min(preset[1], d.residual_steps)}


def check_openai(body: OpenAIImageRequest, runtime: Runtime, kind: str) -> Plan:
    """OpenAI-only fields -> a Plan; 400 naming the field for what this server cannot do."""
    names = (served(runtime).name, "dcar", *runtime.settings.model_aliases)
    if body.model is not None and body.model not in names:
        raise invalid("model", f"model {body.model!r} is not served here; use one of {list(names)}")
    for name in ("user", "safety_identifier"):  # echoed in the response, which must be UTF-8
        value = getattr(body, name)
        if value is not None:
            check_unicode(name, value)
    if body.response_format == "url":
        raise invalid(
            "response_format",
            "response_format 'url' is not supported; this server returns images inline: use b64_json",
        )
    if body.background == "transparent":
        raise invalid(
            "background",
            "background 'transparent' is not supported: the model draws opaque RGB "
            "images; use opaque or auto",
        )
    if body.output_format in ("gif", "svg"):
        raise invalid(
            "output_format", f"output_format {body.output_format!r} is not supported; use png, jpeg or webp"
        )
    for name, why in UNSUPPORTED.items():
        if getattr(body, name) is not None:
            raise invalid(name, f"{name} is not supported: {why}")
    if body.quality in ("xhigh", "max", "standard", "hd"):
        raise invalid("quality", f"quality {body.quality!r} is not supported; use low, medium, high or auto")
    partials = body.partial_images or 0
    check_range("partial_images", partials, 0, 3)
    if partials and not body.stream:
        raise invalid("partial_images", "partial_images needs stream=true (partial images are stream events)")
    compression = None
    if body.output_compression is not None:
        check_range("output_compression", body.output_compression, 0, 100)
        compression = max(1, body.output_compression)
    quality = "high" if body.quality in (None, "auto") else body.quality
    return Plan(
        kind,
        body.output_format or "png",
        compression,
        quality,
        bool(body.stream),
        partials,
        body.safety_identifier or body.user or None,
    )


def partial_steps(steps: int, k: int) -> frozenset[int]:
    """k unmasking steps spread evenly over the run (12 steps, k=2: 4 and 8); fewer when steps are few."""
    return frozenset(s for j in range(1, k + 1) if 1 <= (s := int(j * steps / (k + 1) + 0.5)) < steps)


def usage(limits: Limits, runtime: Runtime, p: SamplingParams, images: int, edit: bool) -> Usage:
    """OpenAI's token usage: input = prompt tokens (+ the edited image's tokens), output = image tokens."""
    f = served(runtime).tokenizer.compression
    per_image = (p.width // f) * (p.height // f)
    text = limits.count_tokens(p.prompt)
    image_in = per_image if edit else 0
    return Usage(
        input_tokens=text + image_in,
        input_tokens_details=TokenDetails(image_tokens=image_in, text_tokens=text),
        output_tokens=per_image * images,
        output_tokens_details=TokenDetails(image_tokens=per_image * images, text_tokens=0),
        total_tokens=text + image_in + per_image * images,
    )


def make_job(
    request: Request,
    runtime: Runtime,
    limits: Limits,
    body: OpenAIImageRequest,
    plan: Plan,
    size: tuple[int, int],
    edit=None,
) -> Job:
    params = to_params(body, limits, size, plan.defaults(runtime))
    steps = partial_steps(params[0].steps, plan.partials) if plan.stream else frozenset()
    return Job(
        request_id(request),
        "edit" if edit is not None else "generate",
        params,
        check_timeout(body.timeout, limits),
        edit=edit,
        stream=plan.stream,
        preview=bool(steps),
        preview_steps=steps,
        preview_size=max(size),
        priority=check_priority(body.priority, limits),
    )


async def respond(request: Request, runtime: Runtime, limits: Limits, job: Job, plan: Plan) -> Response:
    # before submit: a refused request's access record still says what it asked, and for whom
    note(request, job=job, **({"user": plan.user} if plan.user else {}))
    engine_of(runtime).submit(job)
    p = job.params[0]
    use = usage(limits, runtime, p, len(job.params), job.edit is not None)
    if plan.stream:
        return StreamingResponse(
            ending_in_an_error_event(
                stream(request, runtime, job, plan, use), request, job, openai_error_event
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    results = await wait_for(request, engine_of(runtime), job)
    runtime.tracing.job_spans(job, time.monotonic())
    encoded = await encode_all(runtime, job, results, plan.fmt, plan.compression)
    body = OpenAIImagesResponse(
        created=int(time.time()),
        output_format=plan.fmt,
        quality=plan.quality,
        size=f"{p.width}x{p.height}",
        data=[
            {"b64_json": base64.b64encode(data).decode("ascii"), "seed": r.seed}
            for (data, _), r in zip(encoded, results)
        ],
        usage=use,
        safety_identifier=plan.user,
        model=served(runtime).name,
        parameters=parameters(p),
        weights_digest=runtime.weights_digest,
    )
    return JSONResponse(body.model_dump(exclude_none=True))


def _reencode(png_b64: str, plan: Plan) -> str:
    """A partial image (the worker's PNG) in the requested format."""
    if plan.fmt == "png":
        return png_b64
    image = Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB")
    return base64.b64encode(encode_image(image, plan.fmt, plan.compression)).decode("ascii")


def openai_error_event(e: ApiError, request_id: str) -> str:
    return sse("error", {"type": "error", **error_body(e.status, e.code, e.message, e.param, request_id)})


async def stream(request: Request, runtime: Runtime, job: Job, plan: Plan, use: Usage):
    """``<kind>.partial_image`` events, then one ``<kind>.completed`` per image (or an ``error`` event, whose
    status the metrics and the access record count).

    Partial image k of every image goes out once all n images reached it, in image order, so a client can
    tell them apart by position; ``partial_image_index`` counts per image.
    """
    n, p = len(job.params), job.params[0]
    size = f"{p.width}x{p.height}"
    order = sorted(job.preview_steps or ())
    pending: dict[int, dict[int, str | None]] = {}
    sent = 0
    keepalive_s = runtime.settings.sse_keepalive_s
    wrote = time.monotonic()  # when something last went out: most steps send nothing
    try:
        async for ev in job_events(job, keepalive_s):
            # a keep-alive after keepalive_s without events, and after as long without a partial image
            if ev is None or time.monotonic() - wrote >= keepalive_s:
                wrote = time.monotonic()
                yield KEEPALIVE
            if ev is None or ev.step not in order:
                continue
            pending.setdefault(order.index(ev.step), {})[ev.index] = ev.preview  # None if the preview failed
            while len(pending.get(sent, {})) == n:
                for i in range(n):
                    preview = pending[sent][i]
                    if preview is None:
                        continue
                    partial = PartialImageEvent(
                        type=f"{plan.kind}.partial_image",
                        created_at=int(time.time()),
                        b64_json=await asyncio.to_thread(_reencode, preview, plan),
                        output_format=plan.fmt,
                        partial_image_index=sent,
                        quality=plan.quality,
                        size=size,
                    )
                    wrote = time.monotonic()
                    yield sse(partial.type, partial.model_dump())
                del pending[sent]
                sent += 1
        assert job.future is not None  # set by Engine.submit
        try:
            results = job.future.result()
        except ApiError as e:
            set_outcome(request, e.status)
            yield openai_error_event(e, job.id)
            return
        runtime.tracing.job_spans(job, time.monotonic())
        encoded = await encode_all(runtime, job, results, plan.fmt, plan.compression)
        one = usage_of_one(use, n)
        for (data, _), r in zip(encoded, results):
            event = CompletedEvent(
                type=f"{plan.kind}.completed",
                created_at=int(time.time()),
                b64_json=base64.b64encode(data).decode("ascii"),
                output_format=plan.fmt,
                quality=plan.quality,
                size=size,
                usage=one,
                safety_identifier=plan.user,
                seed=r.seed,
                model=served(runtime).name,
                parameters=parameters(p),
                weights_digest=runtime.weights_digest,
            )
            yield sse(event.type, event.model_dump(exclude_none=True))
    finally:
        engine_of(runtime).cancel(job, "disconnected")  # no-op once the job is done


def usage_of_one(use: Usage, n: int) -> Usage:
    """A completed event's usage: the prompt, and that one image's tokens."""
    out = use.output_tokens // n
    return use.model_copy(
        update={
            "output_tokens": out,
            "total_tokens": use.input_tokens + out,
            "output_tokens_details": TokenDetails(image_tokens=out, text_tokens=0),
        }
    )


STREAM_DOC: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


@router.post("/generations", response_model=OpenAIImagesResponse, responses=STREAM_DOC)
async def images_generations(
    body: OpenAIImageRequest, request: Request, runtime: RuntimeDep, _: Authorized
) -> Response:
    """OpenAI ``images.generate``."""
    engine, limits = runtime.serving()
    plan = check_openai(body, runtime, "image_generation")
    size = check_size(body.size, limits)
    return await respond(request, runtime, limits, make_job(request, runtime, limits, body, plan, size), plan)


@router.post(
    "/edits",
    response_model=OpenAIImagesResponse,
    responses=STREAM_DOC,
    openapi_extra={
        "requestBody": {"content": {"multipart/form-data": {"schema": OpenAIEditFields.model_json_schema()}}}
    },
)
async def images_edits(request: Request, runtime: RuntimeDep, _: Authorized) -> Response:
    """OpenAI ``images.edit``: multipart ``image`` (or ``image[]``), optional ``mask``, prompt and knobs."""
    engine, limits = runtime.serving()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            "images/edits takes multipart/form-data (file image, "
            f"optional file mask), got Content-Type {ctype or 'none'!r}",
            "Content-Type",
            reason="invalid",
        )
    fields, files = await read_form(request, runtime.settings.max_image_bytes)
    if "markup" in files:
        raise invalid("markup", "markup is not supported: send a mask (transparent pixels are regenerated)")
    image_bytes = take_file(fields, files, "image")
    mask_bytes = take_file(fields, files, "mask", required=False)
    unknown = sorted(files.keys() - {"image", "mask"})
    if unknown:
        raise ApiError(
            422, "invalid_request", f"{unknown[0]} is not a known field", unknown[0], reason="invalid"
        )
    body = validate(OpenAIEditFields, fields)
    plan = check_openai(body, runtime, "image_edit")
    edit_input, size = await asyncio.to_thread(
        decode_edit, image_bytes, mask_bytes, runtime, limits, True, size=body.size
    )
    job = make_job(request, runtime, limits, body, plan, size, edit=edit_input)
    return await respond(request, runtime, limits, job, plan)
