"""Bad-input cases for test_bad_inputs.py, part one: a parameter of the request is wrong, route by route.

/v1/generate (each field out of range, of the wrong type, or unknown; a body that is not a JSON object),
/v1/edit (wrong content type, images that are not images, bombs, too large, the wrong size, a mask missing
or of another size, a form or JSON field that is wrong) and the OpenAI-compatible routes. Also here: the
limits the live server of the test runs with and the sample images and request builders the cases (and
bad_inputs_bodies.py) are built from.
"""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np
from PIL import Image
from server_harness import png_bytes

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"prompt": "a small green triangle", "steps": 2, "seed": 5}
MAX_IMAGE_BYTES = 40_000  # the noise image below is ~49 kB
MAX_BODY_BYTES = 512 * 1024


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` in its header, with a tiny IDAT: a decompression bomb shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


IMAGE = png_bytes(Image.new("RGB", (128, 128), (10, 120, 200)))
MASK = png_bytes(Image.new("L", (128, 128), 255))
SMALL = png_bytes(Image.new("RGB", (64, 64), (10, 120, 200)))
SMALL_MASK = png_bytes(Image.new("L", (64, 64), 255))
PALETTE_MASK = png_bytes(Image.new("L", (128, 128), 255).convert("P"))  # mode P, no tRNS: nothing transparent
NOISE = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)))
B64_IMAGE = base64.b64encode(IMAGE).decode()
B64_MASK = base64.b64encode(MASK).decode()


def files(image=IMAGE, mask=MASK):
    return {"image": ("image.png", image, "image/png"), "mask": ("mask.png", mask, "image/png")}


def gen(**fields):
    return {"json": {**GOOD, **fields}}


# (id, method kwargs for the request, path, expected status, param the error must name, text the message must hold)
GENERATE_CASES = [
    ("prompt missing", {"json": {"steps": 2}}, "/v1/generate", 422, "prompt", "required"),
    ("prompt not a string", gen(prompt=123), "/v1/generate", 422, "prompt", "string"),
    ("prompt empty", gen(prompt=""), "/v1/generate", 400, "prompt", "empty"),
    ("prompt blank", gen(prompt="   \n"), "/v1/generate", 400, "prompt", "empty"),
    ("prompt over the token limit", gen(prompt="x" * 40), "/v1/generate", 400, "prompt", "at most 32"),
    ("prompt huge", gen(prompt="y" * 5000), "/v1/generate", 400, "prompt", "max_prompt_chars=4000"),
    ("n zero", gen(n=0), "/v1/generate", 400, "n", "between 1 and 8, got 0"),
    ("n too many", gen(n=9), "/v1/generate", 400, "n", "between 1 and 8, got 9"),
    ("n not a number", gen(n="two"), "/v1/generate", 422, "n", "integer"),
    ("steps zero", gen(steps=0), "/v1/generate", 400, "steps", "between 1 and 50, got 0"),
    ("steps too many", gen(steps=80), "/v1/generate", 400, "steps", "steps must be between 1 and 50, got 80"),
    ("steps fractional", gen(steps=2.5), "/v1/generate", 422, "steps", "integer"),
    # JSON true/false is no number: pydantic's lax mode read them as 1 and 0 ("n": true drew one image)
    (
        "n true",
        gen(n=True),
        "/v1/generate",
        422,
        "n",
        "n: Input should be a valid integer, not true or false",
    ),
    ("steps true", gen(steps=True), "/v1/generate", 422, "steps", "not true or false, got true"),
    ("residual steps false", gen(residual_steps=False), "/v1/generate", 422, "residual_steps", "got false"),
    ("guidance true", gen(guidance_scale=True), "/v1/generate", 422, "guidance_scale", "valid number"),
    (
        "temperature false",
        gen(residual_temperature=False),
        "/v1/generate",
        422,
        "residual_temperature",
        "false",
    ),
    ("seed true", gen(seed=True), "/v1/generate", 422, "seed", "not true or false"),
    ("timeout true", gen(timeout=True), "/v1/generate", 422, "timeout", "valid number, not true or false"),
    ("quality true", gen(output_format="jpeg", quality=True), "/v1/generate", 422, "quality", "true"),
    ("guidance negative", gen(guidance_scale=-1), "/v1/generate", 400, "guidance_scale", "between 0 and 20"),
    (
        "guidance NaN",
        {
            "content": b'{"prompt": "x", "guidance_scale": NaN}',
            "headers": {"Content-Type": "application/json"},
        },
        "/v1/generate",
        400,
        "guidance_scale",
        "nan",
    ),
    (
        "guidance decay unknown",
        gen(guidance_decay="cosine"),
        "/v1/generate",
        400,
        "guidance_decay",
        "power-cosine",
    ),
    ("seed negative", gen(seed=-1), "/v1/generate", 400, "seed", "between 0 and"),
    ("seed beyond int64", gen(seed=2**64), "/v1/generate", 400, "seed", "between 0 and 9223372036854775807,"),
    (
        "seed + n beyond int64",
        gen(seed=2**63 - 1, n=2),
        "/v1/generate",
        400,
        "seed",
        "and 9223372036854775806,",
    ),
    (
        "residual steps zero",
        gen(residual_steps=0),
        "/v1/generate",
        400,
        "residual_steps",
        "between 1 and 100",
    ),
    (
        "temperature negative",
        gen(randomize_temperature=-0.5),
        "/v1/generate",
        400,
        "randomize_temperature",
        "between",
    ),
    ("size malformed", gen(size="big"), "/v1/generate", 400, "size", "WIDTHxHEIGHT"),
    ("size not served", gen(size="256x256"), "/v1/generate", 400, "size", "allowed sizes: 128x128"),
    ("size not a multiple of 32", gen(size="100x100"), "/v1/generate", 400, "size", "allowed sizes"),
    ("output format unknown", gen(output_format="gif"), "/v1/generate", 422, "output_format", "png"),
    (
        "quality out of range",
        gen(output_format="jpeg", quality=0),
        "/v1/generate",
        400,
        "quality",
        "between 1 and 100",
    ),
    ("unknown field", gen(step=12), "/v1/generate", 422, "step", "not a known field"),
    ("timeout zero", gen(timeout=0), "/v1/generate", 400, "timeout", "request_timeout_s"),
    (
        "timeout above the server's",
        gen(timeout=10**6),
        "/v1/generate",
        400,
        "timeout",
        "request_timeout_s=120",
    ),
    ("preview without stream", gen(preview=True), "/v1/generate", 400, "preview", "stream"),
    (
        "body not JSON",
        {"content": b"{prompt: nope", "headers": {"Content-Type": "application/json"}},
        "/v1/generate",
        400,
        None,
        "not valid JSON",
    ),
    ("body a JSON list", {"json": [GOOD]}, "/v1/generate", 422, None, "JSON object"),
    (
        "raw image for n=2",
        {"json": {**GOOD, "n": 2}, "headers": {"Accept": "image/png"}},
        "/v1/generate",
        406,
        "n",
        "n=2",
    ),
]

EDIT_CASES = [
    (
        "edit: wrong content type",
        {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
        "/v1/edit",
        415,
        "Content-Type",
        "multipart/form-data",
    ),
    (
        "edit: not an image",
        {"data": {"prompt": "p"}, "files": files(image=b"GIF89a not really")},
        "/v1/edit",
        400,
        "image",
        "not a PNG, JPEG or WebP",
    ),
    (
        "edit: truncated image",
        {"data": {"prompt": "p"}, "files": files(image=IMAGE[:60])},
        "/v1/edit",
        400,
        "image",
        "truncated",
    ),
    (
        "edit: bomb over Pillow's limit",
        {"data": {"prompt": "p"}, "files": files(image=png_header_only(30000, 30000))},
        "/v1/edit",
        413,
        "image",
        "bomb",
    ),
    (
        "edit: bomb over max_image_pixels",
        {"data": {"prompt": "p"}, "files": files(image=png_header_only(5000, 5000))},
        "/v1/edit",
        413,
        "image",
        "max_image_pixels",
    ),
    (
        "edit: image file too large",
        {"data": {"prompt": "p"}, "files": files(image=NOISE)},
        "/v1/edit",
        413,
        "image",
        "max_image_bytes",
    ),
    (
        "edit: image size not served",
        {"data": {"prompt": "p"}, "files": files(image=SMALL, mask=SMALL_MASK)},
        "/v1/edit",
        400,
        "image",
        "allowed sizes: 128x128",
    ),
    (
        "edit: mask of another size",
        {"data": {"prompt": "p"}, "files": files(mask=SMALL_MASK)},
        "/v1/edit",
        400,
        "mask",
        "64x64 but image is 128x128",
    ),
    (
        "edit: mask missing",
        {"data": {"prompt": "p"}, "files": {"image": ("i.png", IMAGE, "image/png")}},
        "/v1/edit",
        422,
        "mask",
        "required",
    ),
    (
        "edit: image sent as text",
        {"data": {"prompt": "p", "image": "abc"}, "files": {"mask": ("m.png", MASK, "image/png")}},
        "/v1/edit",
        400,
        "image",
        "file upload",
    ),
    (
        "edit: steps out of range in a form",
        {"data": {"prompt": "p", "steps": "99"}, "files": files()},
        "/v1/edit",
        400,
        "steps",
        "between 1 and 50, got 99",
    ),
    (
        "edit: JSON n true",
        {"json": {"prompt": "p", "image": B64_IMAGE, "mask": B64_MASK, "n": True}},
        "/v1/edit",
        422,
        "n",
        "not true or false",
    ),
    (
        "edit: steps 'true' in a form",
        {"data": {"prompt": "p", "steps": "true"}, "files": files()},
        "/v1/edit",
        422,
        "steps",
        "integer",
    ),
    (
        "edit: broken base64",
        {"json": {"prompt": "p", "image": "%%%not base64", "mask": B64_MASK}},
        "/v1/edit",
        400,
        "image",
        "base64",
    ),
    (
        "edit: JSON without mask",
        {"json": {"prompt": "p", "image": B64_IMAGE}},
        "/v1/edit",
        422,
        "mask",
        "required",
    ),
]

OPENAI_CASES = [
    (
        "openai: url response",
        {"json": {"prompt": "p", "response_format": "url"}},
        "/v1/images/generations",
        400,
        "response_format",
        "b64_json",
    ),
    (
        "openai: unknown model",
        {"json": {"prompt": "p", "model": "dall-e-3"}},
        "/v1/images/generations",
        400,
        "model",
        "tiny-random",
    ),
    (
        "openai: n too many",
        {"json": {"prompt": "p", "n": 10}},
        "/v1/images/generations",
        400,
        "n",
        "between 1 and 8",
    ),
    (
        "openai: n true",
        {"json": {"prompt": "p", "n": True}},
        "/v1/images/generations",
        422,
        "n",
        "valid integer, not true or false, got true",
    ),
    (
        "openai: output_compression true",
        {"json": {"prompt": "p", "output_format": "jpeg", "output_compression": True}},
        "/v1/images/generations",
        422,
        "output_compression",
        "not true or false",
    ),
    (
        "openai: partial_images false",
        {"json": {"prompt": "p", "stream": True, "partial_images": False}},
        "/v1/images/generations",
        422,
        "partial_images",
        "not true or false",
    ),
    (
        "openai: extension steps true",
        {"json": {"prompt": "p", "steps": True}},
        "/v1/images/generations",
        422,
        "steps",
        "not true or false",
    ),
    (
        "openai: extension seed false",
        {"json": {"prompt": "p", "seed": False}},
        "/v1/images/generations",
        422,
        "seed",
        "not true or false",
    ),
    (
        "openai: extension timeout true",
        {"json": {"prompt": "p", "timeout": True}},
        "/v1/images/generations",
        422,
        "timeout",
        "valid number",
    ),
    (
        "openai edit: no mask, no transparency",
        {"data": {"prompt": "p"}, "files": {"image": ("i.png", IMAGE, "image/png")}},
        "/v1/images/edits",
        400,
        "mask",
        "alpha",
    ),
    (
        "openai edit: palette mask without transparency",
        {"data": {"prompt": "p"}, "files": files(mask=PALETTE_MASK)},
        "/v1/images/edits",
        400,
        "mask",
        "no alpha channel",
    ),
    (
        "openai edit: extension of the wrong type",
        {"data": {"prompt": "p", "residual_steps": "many"}, "files": files()},
        "/v1/images/edits",
        422,
        "residual_steps",
        "integer",
    ),
    (
        "openai edit: JSON body",
        {"json": {"prompt": "p"}},
        "/v1/images/edits",
        415,
        "Content-Type",
        "multipart",
    ),
]
