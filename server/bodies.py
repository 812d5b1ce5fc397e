"""Reading request bodies: JSON, multipart forms and the edit uploads, with our error shapes.

Every malformed body becomes a 4xx ``ApiError`` with a specific code (``invalid_json``, ``invalid_encoding``,
``invalid_multipart``, ...) and never a 500: deep nesting, non-UTF-8 bytes and text where a file belongs
included. Shared by the native routes (server/routes.py) and the OpenAI routes (server/routes_openai.py).
"""

from __future__ import annotations

import json
from typing import Literal, TypeVar, overload

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from dcar.model.images import mask_to_tensor, pil_to_tensor
from dcar.server.errors import ApiError, bad_json, describe_validation, invalid
from dcar.server.imaging import decode_image, too_large
from dcar.server.jobs import EditInput
from dcar.server.runtime import Runtime
from dcar.server.schemas import Limits, check_size

M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data) -> M:
    """pydantic validation outside FastAPI's body parsing (forms, manual JSON), with our error shape."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = describe_validation(list(e.errors()))
        raise ApiError(422, "invalid_request", message, param, reason="invalid") from e


async def read_json(request: Request) -> object:
    body = await request.body()
    if not body.strip():
        raise bad_json(None)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad_json(e) from None


class NotUtf8(MultiPartException):
    def __init__(self, field: str):
        super().__init__(f"field {field} is not UTF-8")
        self.field = field


class StrictMultiPartParser(MultiPartParser):
    """Starlette's parser, but a text field that is not UTF-8 is refused instead of read as Latin-1."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError:
                raise NotUtf8(part.field_name) from None
        super().on_part_end()


async def read_form(request: Request, max_image_bytes: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """A multipart body -> (text fields, file fields). Files above ``max_image_bytes`` give 413."""
    parser = StrictMultiPartParser(request.headers, request.stream(), max_files=4, max_fields=64)
    try:
        form = await parser.parse()  # a BodyTooLarge (413) from the body limit passes through
    except NotUtf8 as e:
        raise ApiError(
            400, "invalid_encoding", f"multipart field {e.field} is not UTF-8 text", e.field, reason="invalid"
        ) from None
    except MultiPartException as e:
        raise ApiError(
            400, "invalid_multipart", f"the multipart body is malformed: {e.message}", reason="invalid"
        ) from None
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    try:
        for key, value in form.multi_items():
            name = key[:-2] if key.endswith("[]") else key  # OpenAI clients may send image[]
            if isinstance(value, UploadFile):
                if name in files:
                    raise invalid(name, f"{name}: send one file, got several")
                if value.size is not None and value.size > max_image_bytes:
                    raise too_large(name, value.size, max_image_bytes)
                files[name] = await value.read()
            else:
                fields[name] = value
    finally:
        await form.close()  # the uploads' temporary files
    return fields, files


@overload
def take_file(
    fields: dict[str, str], files: dict[str, bytes], name: str, required: Literal[True] = True
) -> bytes: ...
@overload
def take_file(fields: dict[str, str], files: dict[str, bytes], name: str, required: bool) -> bytes | None: ...
def take_file(
    fields: dict[str, str], files: dict[str, bytes], name: str, required: bool = True
) -> bytes | None:
    if name in files:
        return files[name]
    if name in fields:
        raise invalid(name, f"{name} must be a file upload (multipart file part), got a text field")
    if required:
        raise ApiError(
            422, "invalid_request", f"{name} is required (a multipart file)", name, reason="invalid"
        )
    return None


def decode_edit(
    image_bytes: bytes,
    mask_bytes: bytes | None,
    runtime: Runtime,
    limits: Limits,
    transparent_means_edit: bool,
    blend: bool = True,
    size: str | None = None,
) -> tuple[EditInput, tuple[int, int]]:
    """Uploaded image and mask -> model tensors; the image must be an allowed size and the mask match it.

    The edit checks of both APIs: without a mask (OpenAI only) the image's own transparency is the mask, as in
    OpenAI's API; a requested ``size`` other than auto must be the image's (an edit keeps the input size).
    """
    s = runtime.settings
    image = decode_image(image_bytes, "image", s.max_image_bytes, s.max_image_pixels)
    if image.size not in limits.sizes:
        raise invalid(
            "image",
            f"image is {image.width}x{image.height}; an edit keeps the input size, which must "
            f"be one of the allowed sizes: {limits.size_list()}",
        )
    if mask_bytes is None:
        mask_image = image
    else:
        mask_image = decode_image(mask_bytes, "mask", s.max_image_bytes, s.max_image_pixels)
        if mask_image.size != image.size:
            raise invalid(
                "mask",
                f"mask is {mask_image.width}x{mask_image.height} but image is "
                f"{image.width}x{image.height}; they must be the same size",
            )
    try:
        mask = mask_to_tensor(mask_image, transparent_means_edit=transparent_means_edit)
    except ValueError as e:
        raise invalid("mask", f"mask: {e}") from e
    if size not in (None, "auto") and check_size(size, limits) != image.size:
        raise invalid(
            "size",
            f"size {size} differs from the image's {image.width}x{image.height}; "
            "an edit keeps the input size",
        )
    return EditInput(pil_to_tensor(image), mask, blend), image.size
