"""Image bytes in and out: PNG/JPEG/WebP encoding of results, and safe decoding of uploads.

Uploads are untrusted. Decoding checks, in order: the byte size (413), the container format from its
header (PNG, JPEG or WebP only; Pillow's other decoders are never reached), the pixel count read from the
header before any decompression (413: the decompression-bomb guard), then the full decode (400 when it is
truncated or corrupt). Every error names the form field.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import torch
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from dcar.model.images import tensor_to_pil
from dcar.server.errors import ApiError
from dcar.server.provenance import Mark

OUTPUT_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def media_type(fmt: str) -> str:
    return OUTPUT_FORMATS[fmt][1]


def encode_image(
    image: torch.Tensor | Image.Image,
    fmt: str,
    quality: int | None = None,
    png_compress_level: int = 1,
    mark: Mark | None = None,
) -> bytes:
    """(3, H, W) float in [0, 1] (or a PIL image) -> file bytes in ``fmt`` (png, jpeg or webp).

    PNG is lossless at every zlib level; level 1 (not Pillow's 6) encodes several times faster for somewhat
    larger files, which matters when the model itself takes tens of milliseconds. ``mark`` goes into the
    file's metadata: tEXt chunks and XMP in a PNG, XMP in JPEG and WebP (server/provenance.py).
    """
    pil_format = OUTPUT_FORMATS[fmt][0]
    buf = io.BytesIO()
    options: dict = {}
    if pil_format in ("JPEG", "WEBP"):
        options["quality"] = quality if quality is not None else 95
        if mark is not None:
            options["xmp"] = mark.xmp()
    else:
        options["compress_level"] = png_compress_level
        if mark is not None:
            info = PngInfo()
            for key, value in mark.text().items():
                info.add_text(key, value)
            info.add_itxt("XML:com.adobe.xmp", mark.xmp().decode("utf-8"))
            options["pnginfo"] = info
    pil = image if isinstance(image, Image.Image) else tensor_to_pil(image)
    pil.save(buf, format=pil_format, **options)
    return buf.getvalue()


def encode_preview(image: torch.Tensor, size: int) -> str:
    """A progress preview: (3, H, W) in [0, 1] -> base64 PNG whose longest side is at most ``size``."""
    pil = tensor_to_pil(image)
    pil.thumbnail((size, size))
    return base64.b64encode(encode_image(pil, "png")).decode("ascii")


def decode_base64(text: str, field: str, max_bytes: int) -> bytes:
    """Base64 (optionally a ``data:image/...;base64,`` URL) -> bytes; 413 above ``max_bytes``, 400 if broken."""
    if not isinstance(text, str) or not text.strip():
        raise ApiError(
            400, "invalid_image", f"{field} must be a non-empty base64 string", field, reason="invalid"
        )
    text = DATA_URL.sub("", text.strip(), count=1)
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise too_large(field, len(text) * 3 // 4, max_bytes)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(
            400, "invalid_base64", f"{field} is not valid base64 ({e})", field, reason="invalid"
        ) from e


def too_large(field: str, size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        "image_too_large",
        f"{field} is {size} bytes; the limit is max_image_bytes={limit}",
        field,
        reason="too_large",
    )


def decode_image(data: bytes, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Untrusted bytes -> a fully loaded PIL image (mode kept: the mask's alpha matters)."""
    if len(data) > max_bytes:
        raise too_large(field, len(data), max_bytes)
    if not data:
        raise ApiError(400, "invalid_image", f"{field} is empty", field, reason="invalid")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(
                    413,
                    "image_too_large",
                    f"{field} is {width}x{height} = {width * height} pixels; the "
                    f"limit is max_image_pixels={max_pixels}",
                    field,
                    reason="too_large",
                )
            image.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(
            413, "image_too_large", f"{field} is a decompression bomb: {e}", field, reason="too_large"
        ) from e
    except UnidentifiedImageError as e:
        raise ApiError(
            400, "invalid_image", f"{field} is not a PNG, JPEG or WebP image", field, reason="invalid"
        ) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ApiError(
            400,
            "invalid_image",
            f"{field} could not be decoded (truncated or corrupt): {e}",
            field,
            reason="invalid",
        ) from e
    return image
