"""Errors as the API shows them: ``{"error": {"code", "message", "param"}}``.

Everything a route or the engine refuses is an ``ApiError`` with an HTTP status, a stable machine code, a
message that names the field, the limit and the value, and the offending parameter. The handlers here turn
ApiError, FastAPI's schema errors and any unexpected exception into that shape. Every error body also
carries OpenAI's ``type`` (clients such as the openai SDK read it) and the request id, so an operator can
find the log record; ``x-should-retry: false`` tells clients where repeating the same request cannot help.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("dcar.server")


class ApiError(Exception):
    """A refusal with its HTTP status. ``reason`` is the label used in ``dcar_rejections_total``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.reason = reason


def invalid(param: str, message: str) -> ApiError:
    """400 for a value outside its allowed range or set."""
    return ApiError(400, "invalid_value", message, param, reason="invalid")


# 5xx codes that are the server's own fault: logged at ERROR. Other 5xx (not_ready, shutting_down, 504
# deadline_exceeded) follow from the client's timeout or the server's lifecycle and are logged at INFO.
SERVER_FAULTS = frozenset({"internal_error", "out_of_memory", "non_finite_output", "engine_failed"})


def bad_json(exc: BaseException | None) -> ApiError:
    """400 invalid_json for what a JSON decoder raised on a request body (None: the body was empty)."""
    if exc is None:
        why = "the body is empty; send a JSON object (with at least a prompt)"
    elif isinstance(exc, RecursionError):
        why = "the body is not valid JSON here: it is nested too deeply"
    elif isinstance(exc, UnicodeDecodeError):
        why = f"the body is not valid JSON: it is not UTF-8 ({exc.reason} at byte {exc.start})"
    else:
        why = f"the body is not valid JSON: {exc}"
    return ApiError(400, "invalid_json", why, reason="invalid")


def check_unicode(param: str, text: str) -> None:
    """400 invalid_encoding for a string holding a lone surrogate (JSON allows ``\\ud800``; UTF-8 does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            "invalid_encoding",
            f"{param} is not valid Unicode: a lone surrogate "
            f"U+{ord(text[e.start]):04X} at character {e.start}; send UTF-8 text",
            param,
            reason="invalid",
        ) from None


# Failures that repeat for the same request: the same deadline, the same image too big for memory, the same
# seed giving NaN. The openai SDK retries every 5xx twice unless told otherwise.
NO_RETRY_CODES = frozenset({"deadline_exceeded", "out_of_memory", "non_finite_output"})


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error"
    )


def retry_headers(status: int, code: str) -> dict[str, str]:
    """``x-should-retry: false`` where a retry cannot help: a 4xx other than 408/409/429, or a repeating 5xx."""
    if code in NO_RETRY_CODES or (400 <= status < 500 and status not in (408, 409, 429)):
        return {"x-should-retry": "false"}
    return {}


def error_body(
    status: int, code: str, message: str, param: str | None = None, request_id: str | None = None
) -> dict:
    # A message may quote the client's input; lone surrogates in it would make the response unencodable.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    err = {"code": code, "message": message, "param": param, "type": error_type(status)}
    if request_id:
        err["request_id"] = request_id
    return {"error": err}


def json_error(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, code, message, param, request_id),
        status_code=status,
        headers={**retry_headers(status, code), **(headers or {})},
    )


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def error_response(err: ApiError, request_id: str | None = None) -> JSONResponse:
    return json_error(err.status, err.code, err.message, err.param, request_id, err.headers)


def _loc_to_param(loc) -> str | None:
    # FastAPI locations look like ("body", "steps") or ("body", "size", 0); drop the "body"/"query" root.
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def describe_validation(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """The first pydantic error as (message naming the field, param)."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    param = _loc_to_param(e.get("loc", ()))
    kind = e.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    if kind == "missing" and param is None:
        return bad_json(None).message, None
    if kind == "missing":
        return f"{param} is required", param
    if kind == "extra_forbidden":
        return f"{param} is not a known field", param
    if kind == "model_attributes_type" or (kind in ("dict_type", "model_type") and param is None):
        return "the body must be a JSON object", None
    got = e.get("input")
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    if isinstance(got, bool):  # as the client wrote it: JSON's true/false, not Python's True/False
        shown = str(got).lower()
    if isinstance(got, str) and len(shown) > 60:
        shown = shown[:57] + "...'"
    return f"{param}: {e.get('msg', 'invalid value')}, got {shown}", param


def install_handlers(app: FastAPI, metrics) -> None:
    """Register the handlers that give every error the same JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        if err.reason:
            metrics.rejected(err.reason)
        if err.code in SERVER_FAULTS:
            log.error("request %s failed: %s", request_id_of(request), err.message)
        elif err.status >= 500:
            log.info("request %s: %d %s: %s", request_id_of(request), err.status, err.code, err.message)
        return error_response(err, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def _schema_error(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        metrics.rejected("invalid")
        first = errors[0] if errors else {}
        if first.get("type") == "model_attributes_type" and isinstance(first.get("input"), bytes):
            # FastAPI parses a body as JSON only under a JSON Content-Type (``curl -d`` sends a form's)
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            return json_error(
                415,
                "unsupported_media_type",
                f"send the body as JSON with Content-Type: application/json, got Content-Type {ctype or 'none'!r}",
                "Content-Type",
                request_id_of(request),
            )
        message, param = describe_validation(errors)
        syntax = first.get("type") == "json_invalid" or (first.get("type") == "missing" and param is None)
        code, status = ("invalid_json", 400) if syntax else ("invalid_request", 422)
        return json_error(status, code, message, param, request_id_of(request))

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect):
        # The client closed the connection (or the guard did, for a stalled body) while its body was read:
        # nobody reads this response; it only ends the request (499 in the metrics and the access log).
        log.info("request %s: the client disconnected while sending its body", request_id_of(request))
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        cause = exc.__cause__
        if isinstance(cause, ClientDisconnect):  # FastAPI's JSON body reading wraps it in a 400
            return await _client_left(request, cause)
        if exc.status_code == 400 and isinstance(cause, RecursionError | UnicodeDecodeError | ValueError):
            # FastAPI's own body parsing: its message ("There was an error parsing the body") says nothing
            return await _api_error(request, bad_json(cause))
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 413:  # over max_body_bytes mid-body: close rather than read the rest
            metrics.rejected("too_large")
            headers["Connection"] = "close"
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        return json_error(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            str(exc.detail),
            None,
            request_id_of(request),
            headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Starlette answers this from its outermost middleware, outside the edge that adds X-Request-Id
        rid = request_id_of(request)
        log.exception("request %s: unexpected error", rid)
        return json_error(
            500,
            "internal_error",
            f"internal error ({type(exc).__name__}); quote request id {rid} when reporting it",
            None,
            rid,
            {"X-Request-Id": rid} if rid else None,
        )
