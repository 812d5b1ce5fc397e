"""A table of bad inputs, each answered with the right status and an error that names the field (and the
limit where there is one); a good request sent right after each still succeeds, over the same kept-alive
connection of a live server (only refusals that leave a body unread close it)."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import httpx
import numpy as np
from PIL import Image
from reliability_harness import live_dcar
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
NOISE = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)))
CLEAR = png_bytes(Image.new("RGBA", (128, 128), (10, 120, 200, 0)))  # OpenAI edits: transparent = regenerate
B64_IMAGE = base64.b64encode(IMAGE).decode()
B64_MASK = base64.b64encode(MASK).decode()
JSON = {"Content-Type": "application/json"}
DEEP = b"[" * 100_000  # RecursionError in a recursive JSON parser
SURROGATE = b'"a lone \\ud800 surrogate"'  # valid JSON, not valid Unicode


def files(image=IMAGE, mask=MASK):
    return {"image": ("image.png", image, "image/png"), "mask": ("mask.png", mask, "image/png")}


def chunked(data: bytes):
    """A body sent without Content-Length (Transfer-Encoding: chunked), 64 kB at a time."""
    for i in range(0, len(data), 65536):
        yield data[i : i + 65536]


def multipart(fields: dict[str, bytes], image: bytes | None = IMAGE, mask: bytes | None = MASK) -> dict:
    """A hand-built multipart body, so that field values can be any bytes (httpx encodes str as UTF-8)."""
    parts = [
        b'--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k.encode(), v)
        for k, v in fields.items()
    ]
    for name, data in (("image", image), ("mask", mask)):
        if data is not None:
            parts.append(
                b'--b\r\nContent-Disposition: form-data; name="%s"; filename="%s.png"\r\n'
                b"Content-Type: image/png\r\n\r\n%s\r\n" % (name.encode(), name.encode(), data)
            )
    return {
        "content": b"".join(parts) + b"--b--\r\n",
        "headers": {"Content-Type": "multipart/form-data; boundary=b"},
    }


def json_body(raw: bytes) -> dict:
    return {"content": raw, "headers": JSON}


def edit_json(prompt: bytes = b'"p"', **fields) -> bytes:
    extra = b"".join(b', "%s": %s' % (k.encode(), json.dumps(v).encode()) for k, v in fields.items())
    return b'{"prompt": %s, "image": "%s", "mask": "%s"%s}' % (
        prompt,
        B64_IMAGE.encode(),
        B64_MASK.encode(),
        extra,
    )


def gen(**fields):
    return {"json": {**GOOD, **fields}}


# (id, method kwargs for the request, path, expected status, param the error must name, text the message must hold)
CASES = [
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
    ("seed beyond int64", gen(seed=2**64), "/v1/generate", 400, "seed", "between 0 and"),
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
    (
        "body over max_body_bytes",
        {
            "content": b'{"prompt": "' + b"z" * MAX_BODY_BYTES + b'"}',
            "headers": {"Content-Type": "application/json"},
        },
        "/v1/generate",
        413,
        None,
        "max_body_bytes",
    ),
    (
        "chunked body over max_body_bytes",
        {
            "content": chunked(b'{"prompt": "' + b"z" * MAX_BODY_BYTES + b'"}'),
            "headers": {"Content-Type": "application/json"},
        },
        "/v1/generate",
        413,
        None,
        "max_body_bytes",
    ),
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
        "openai edit: no mask, no transparency",
        {"data": {"prompt": "p"}, "files": {"image": ("i.png", IMAGE, "image/png")}},
        "/v1/images/edits",
        400,
        "mask",
        "alpha",
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
    # Malformed bodies on all four image routes: a specific 4xx code, never a 500, and the connection survives.
    *[
        (f"{route}: deeply nested JSON", json_body(DEEP), route, 400, None, "nested too deeply")
        for route in ("/v1/generate", "/v1/images/generations", "/v1/edit")
    ],
    *[
        (
            f"{route}: lone surrogate in the prompt",
            json_body(b'{"prompt": ' + SURROGATE + b"}"),
            route,
            400,
            "prompt",
            "lone surrogate U+D800",
        )
        for route in ("/v1/generate", "/v1/images/generations")
    ],
    (
        "/v1/edit: lone surrogate in the prompt",
        json_body(edit_json(SURROGATE)),
        "/v1/edit",
        400,
        "prompt",
        "lone surrogate U+D800",
    ),
    *[
        (f"{route}: body not UTF-8", json_body(b'{"prompt": "caf\xe9"}'), route, 400, None, "not UTF-8")
        for route in ("/v1/generate", "/v1/images/generations", "/v1/edit")
    ],
    *[
        (
            f"{route}: timeout 1e-300",
            {"json": {"prompt": "p", "timeout": 1e-300}},
            route,
            400,
            "timeout",
            "timeout=1e-300",
        )
        for route in ("/v1/generate", "/v1/images/generations")
    ],
    (
        "/v1/edit: timeout 1e-300",
        json_body(edit_json(timeout=1e-300)),
        "/v1/edit",
        400,
        "timeout",
        "timeout=1e-300",
    ),
    *[
        (f"{route}: empty body", json_body(b""), route, 400, None, "body is empty")
        for route in ("/v1/generate", "/v1/images/generations", "/v1/edit")
    ],
    *[
        (
            f"{route}: multipart field not UTF-8",
            multipart({"prompt": b"caf\xe9"}, mask=mask),
            route,
            400,
            "prompt",
            "not UTF-8",
        )
        for route, mask in (("/v1/edit", MASK), ("/v1/images/edits", None))
    ],
    *[
        (
            f"{route}: multipart lone surrogate",
            multipart({"prompt": "\ud800".encode("utf-8", "surrogatepass")}, mask=mask),
            route,
            400,
            "prompt",
            "not UTF-8",
        )
        for route, mask in (("/v1/edit", MASK), ("/v1/images/edits", None))
    ],
    *[
        (
            f"{route}: multipart timeout 1e-300",
            multipart({"prompt": b"p", "timeout": b"1e-300"}, image=image, mask=mask),
            route,
            400,
            "timeout",
            "timeout=1e-300",
        )
        for route, image, mask in (("/v1/edit", IMAGE, MASK), ("/v1/images/edits", CLEAR, None))
    ],
    *[
        (
            f"{route}: multipart with no parts",
            multipart({}, image=None, mask=None),
            route,
            422,
            "image",
            "required",
        )
        for route in ("/v1/edit", "/v1/images/edits")
    ],
    ("/v1/images/edits: empty body", {"content": b""}, "/v1/images/edits", 415, "Content-Type", "multipart"),
    (
        "/v1/images/edits: too many parts",
        multipart({f"f{i}": b"x" for i in range(70)}),
        "/v1/images/edits",
        400,
        None,
        "too many fields",
    ),
    (
        "no API key",
        {"json": GOOD, "headers": {"Authorization": ""}},
        "/v1/generate",
        401,
        "Authorization",
        "Bearer",
    ),
    (
        "wrong API key",
        {"json": GOOD, "headers": {"Authorization": "Bearer not-the-key-at-all"}},
        "/v1/generate",
        401,
        "Authorization",
        "not valid",
    ),
    (
        "wrong auth scheme",
        {"json": GOOD, "headers": {"Authorization": f"Basic {KEY}"}},
        "/v1/generate",
        401,
        "Authorization",
        "Bearer",
    ),
]


def closes(status: int, param: str | None, kwargs: dict) -> bool:
    """Refusals that leave a body unread (bad key, over max_body_bytes) close the connection, not drain it."""
    return (status == 413 and param is None) or (
        status == 401 and any(k in kwargs for k in ("json", "content"))
    )


def test_bad_inputs_are_refused_by_name_and_do_not_hurt_the_next_request(pipe):
    assert len(CASES) >= 60
    problems = []
    with (
        live_dcar(
            pipe,
            api_keys=KEY,
            max_image_bytes=MAX_IMAGE_BYTES,
            max_body_bytes=MAX_BODY_BYTES,
            allowed_sizes="128x128",
        ) as (url, app),
        httpx.Client(
            base_url=url, headers=AUTH, timeout=60, limits=httpx.Limits(max_connections=1)
        ) as client,
    ):
        for name, kwargs, path, status, param, text in CASES:
            r = client.post(path, **kwargs)
            try:
                err = r.json()["error"]
            except (json.JSONDecodeError, KeyError, TypeError):
                problems.append(f"{name}: {r.status_code} without an error body: {r.text[:200]}")
                continue
            if r.status_code != status:
                problems.append(f"{name}: status {r.status_code} != {status}: {err}")
            if err.get("param") != param:
                problems.append(f"{name}: param {err.get('param')!r} != {param!r}: {err}")
            if text.lower() not in err["message"].lower():
                problems.append(f"{name}: message {err['message']!r} lacks {text!r}")
            if param and param not in err["message"] and param != "Authorization":
                problems.append(f"{name}: message {err['message']!r} does not name {param!r}")
            good = client.post("/v1/generate", json=GOOD)
            if good.status_code != 200:
                problems.append(
                    f"{name}: the good request after it failed: {good.status_code} {good.text[:200]}"
                )
            kept = good.extensions["network_stream"] is r.extensions["network_stream"]
            if kept == closes(status, param, kwargs) or (r.headers.get("connection") == "close") != closes(
                status, param, kwargs
            ):
                problems.append(f"{name}: the connection was {'kept' if kept else 'closed'}")
        text = client.get("/metrics").text
    assert not problems, "\n".join(problems)
    assert 'dcar_rejections_total{reason="invalid"}' in text
    assert 'dcar_requests_total{endpoint="/v1/generate",status="500"}' not in text
