"""Errors as the API shows them: ``{"error": {"code", "message", "param"}}``.

Everything a route or the engine refuses is an ``ApiError`` with an HTTP status, a stable machine code, a
message that names the field, the limit and the value, and the offending parameter. The handlers here turn
ApiError, FastAPI's schema errors and any unexpected exception into that shape; a 500 carries the
request id so an operator can find the log line.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dcar.server")


class ApiError(Exception):
    """A refusal with its HTTP status. ``reason`` is the label used in ``dcar_rejections_total``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, reason: str | None = None):
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


def error_body(code: str, message: str, param: str | None = None, request_id: str | None = None) -> dict:
    err = {"code": code, "message": message, "param": param}
    if request_id:
        err["request_id"] = request_id
    return {"error": err}


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def error_response(err: ApiError, request_id: str | None = None) -> JSONResponse:
    rid = request_id if err.status >= 500 else None
    return JSONResponse(error_body(err.code, err.message, err.param, rid), status_code=err.status,
                        headers=err.headers)


def _loc_to_param(loc) -> str | None:
    # FastAPI locations look like ("body", "steps") or ("body", "size", 0); drop the "body"/"query" root.
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def describe_validation(errors: list[dict]) -> tuple[str, str | None]:
    """The first pydantic error as (message naming the field, param)."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    param = _loc_to_param(e.get("loc", ()))
    kind = e.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    if kind == "missing":
        return f"{param} is required", param
    if kind == "extra_forbidden":
        return f"{param} is not a known field", param
    if kind == "model_attributes_type" or (kind == "dict_type" and param is None):
        return "the body must be a JSON object", None
    got = e.get("input")
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    if isinstance(got, str) and len(shown) > 60:
        shown = shown[:57] + "...'"
    return f"{param}: {e.get('msg', 'invalid value')}, got {shown}", param


def install_handlers(app: FastAPI, metrics) -> None:
    """Register the handlers that give every error the same JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        if err.reason:
            metrics.rejected(err.reason)
        if err.status >= 500:
            log.error("request %s failed: %s", request_id_of(request), err.message)
        return error_response(err, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def _schema_error(request: Request, exc: RequestValidationError):
        message, param = describe_validation(list(exc.errors()))
        metrics.rejected("invalid")
        code = "invalid_json" if "not valid JSON" in message else "invalid_request"
        status = 400 if code == "invalid_json" else 422
        return JSONResponse(error_body(code, message, param), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 413:
            metrics.rejected("too_large")
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        return JSONResponse(error_body(codes.get(exc.status_code, "http_error"), str(exc.detail)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        rid = request_id_of(request)
        log.exception("request %s: unexpected error", rid)
        return JSONResponse(error_body("internal_error", f"internal error ({type(exc).__name__}); "
                                       f"quote request id {rid} when reporting it", None, rid), status_code=500)
