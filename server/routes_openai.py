"""OpenAI-compatible image routes: ``POST /v1/images/generations`` and ``POST /v1/images/edits``.

Request and response shapes are OpenAI's (``{created, data: [{b64_json}]}``), so the official ``openai``
client works unchanged with ``base_url=http://host:port/v1``. Differences, each refused with a clear 400:
``response_format=url`` (images come inline only), ``stream`` (use /v1/generate with stream=true), and a
``model`` other than the served one. Extensions: ``seed``, ``guidance_scale``, ``steps`` (and the other
knobs of /v1/generate) through the client's ``extra_body``. Edits follow OpenAI's mask convention:
fully transparent pixels are regenerated, and without a mask the image's own transparency is the mask.
"""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, Request

from dcar.server.errors import ApiError, invalid
from dcar.server.jobs import Job
from dcar.server.routes import (
    Authorized,
    RuntimeDep,
    decode_edit,
    encode_all,
    read_form,
    request_id,
    take_file,
    validate,
    wait_for,
)
from dcar.server.runtime import Runtime
from dcar.server.schemas import (
    OpenAIImageRequest,
    OpenAIImagesResponse,
    check_range,
    check_size,
    check_timeout,
    to_params,
)

router = APIRouter(prefix="/v1/images", tags=["openai"])


def check_openai(body: OpenAIImageRequest, runtime: Runtime) -> tuple[str, int | None]:
    """OpenAI-only fields -> (output format, quality)."""
    served = runtime.pipeline.name
    if body.model is not None and body.model not in (served, "dcar"):
        raise invalid("model", f"model {body.model!r} is not served here; use {served!r} (or 'dcar')")
    if body.response_format not in (None, "b64_json"):
        raise invalid("response_format", f"response_format {body.response_format!r} is not supported; this server "
                                          "returns images inline: use b64_json")
    if body.stream:
        raise invalid("stream", "stream is not supported on the OpenAI routes; use POST /v1/generate with "
                                "stream=true for per-step progress events")
    quality = None
    if body.output_compression is not None:
        check_range("output_compression", body.output_compression, 0, 100)
        quality = max(1, body.output_compression)
    return body.output_format or "png", quality


async def run_openai(request: Request, runtime: Runtime, job: Job, fmt: str, quality: int | None) -> dict:
    engine = runtime.engine
    engine.submit(job)
    results = await wait_for(request, engine, job)
    encoded = await encode_all(runtime, results, fmt, quality)
    p = job.params[0]
    return OpenAIImagesResponse(
        created=int(time.time()), output_format=fmt, size=f"{p.width}x{p.height}",
        data=[{"b64_json": base64.b64encode(data).decode("ascii")} for data, _ in encoded],
    ).model_dump(exclude_none=True)


@router.post("/generations", response_model=OpenAIImagesResponse)
async def images_generations(body: OpenAIImageRequest, request: Request, runtime: RuntimeDep,
                             _: Authorized) -> dict:
    """OpenAI ``images.generate``."""
    engine, limits = runtime.serving()
    fmt, quality = check_openai(body, runtime)
    size = check_size(body.size, limits)
    params = to_params(body, limits, size)
    job = Job(request_id(request), "generate", params, check_timeout(body.timeout, limits))
    return await run_openai(request, runtime, job, fmt, quality)


@router.post("/edits", response_model=OpenAIImagesResponse, openapi_extra={"requestBody": {
    "content": {"multipart/form-data": {"schema": OpenAIImageRequest.model_json_schema()}}}})
async def images_edits(request: Request, runtime: RuntimeDep, _: Authorized) -> dict:
    """OpenAI ``images.edit``: multipart ``image`` (or ``image[]``), optional ``mask``, prompt and knobs."""
    engine, limits = runtime.serving()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "images/edits takes multipart/form-data (file image, "
                       f"optional file mask), got Content-Type {ctype or 'none'!r}", "Content-Type", reason="invalid")
    fields, files = await read_form(request, runtime.settings.max_image_bytes)
    image_bytes = take_file(fields, files, "image")
    mask_bytes = take_file(fields, files, "mask", required=False)
    body = validate(OpenAIImageRequest, fields)
    fmt, quality = check_openai(body, runtime)
    edit_input, size = await asyncio.to_thread(decode_edit, image_bytes, mask_bytes, runtime, limits, True)
    if body.size not in (None, "auto") and check_size(body.size, limits) != size:
        raise invalid("size", f"size {body.size} differs from the image's {size[0]}x{size[1]}; "
                              "an edit keeps the input size")
    params = to_params(body, limits, size)
    job = Job(request_id(request), "edit", params, check_timeout(body.timeout, limits),
              edit=edit_input)
    return await run_openai(request, runtime, job, fmt, quality)
