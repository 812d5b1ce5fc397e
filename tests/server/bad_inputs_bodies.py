"""Bad-input cases for test_bad_inputs.py, part two: the body or the credentials are wrong, whatever
the parameters.

Bodies over max_body_bytes (with and without Content-Length); malformed bodies on all four image routes
(JSON nested too deeply, lone surrogates, bytes that are not UTF-8, an absurd timeout, an empty body,
multipart with bad fields, no parts or too many); and a missing or wrong API key or auth scheme.
"""

from __future__ import annotations

import json

from bad_inputs_params import B64_IMAGE, B64_MASK, GOOD, IMAGE, KEY, MASK, MAX_BODY_BYTES
from PIL import Image
from server_harness import png_bytes

CLEAR = png_bytes(Image.new("RGBA", (128, 128), (10, 120, 200, 0)))  # OpenAI edits: transparent = regenerate
JSON = {"Content-Type": "application/json"}
DEEP = b"[" * 100_000  # RecursionError in a recursive JSON parser
SURROGATE = b'"a lone \\ud800 surrogate"'  # valid JSON, not valid Unicode


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


# (id, method kwargs for the request, path, expected status, param the error must name, text the message must hold)
BODY_LIMIT_CASES = [
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
]

# Malformed bodies on all four image routes: a specific 4xx code, never a 500, and the connection survives.
MALFORMED_BODY_CASES = [
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
    # JSON without Content-Type: application/json, as `curl -d` sends it (application/x-www-form-urlencoded)
    *[
        (
            f"{route}: JSON sent as a form",
            {"content": json.dumps(GOOD).encode(), "headers": {"Content-Type": ctype}},
            route,
            415,
            "Content-Type",
            "application/json",
        )
        for route in ("/v1/generate", "/v1/images/generations")
        for ctype in ("application/x-www-form-urlencoded", "text/plain")
    ],
    ("/v1/edit: body a JSON list", {"json": [GOOD]}, "/v1/edit", 422, None, "must be a JSON object"),
    (
        "/v1/images/edits: too many parts",
        multipart({f"f{i}": b"x" for i in range(70)}),
        "/v1/images/edits",
        400,
        None,
        "too many fields",
    ),
]

AUTH_CASES = [
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
