"""How a row's failure is counted and shown: the ``reason`` label of ``dcar_failed_rows_total`` and the 500
the request gets (with the request id, so an operator can find the log line)."""

from __future__ import annotations

import logging

from dcar.model.params import NonFiniteOutput, SamplingParams
from dcar.server.errors import ApiError
from dcar.server.worker import OutOfMemory

log = logging.getLogger("dcar.engine")


def failure_reason(exc: BaseException) -> str:
    """The bounded ``reason`` label of ``dcar_failed_rows_total`` for a row's failure."""
    if isinstance(exc, OutOfMemory):
        return "out_of_memory"
    if isinstance(exc, NonFiniteOutput):
        return "non_finite_output"
    return "error"


def failure_error(request_id: str, p: SamplingParams, exc: BaseException) -> ApiError:
    """The 500 of a request whose row failed with ``exc``."""
    if isinstance(exc, NonFiniteOutput):
        log.error(
            "request %s: non-finite output (NaN/inf) for seed %d at %dx%d",
            request_id,
            p.seed,
            p.width,
            p.height,
        )
        return ApiError(
            500,
            "non_finite_output",
            f"the generated image held NaN or inf values and was not delivered; request id {request_id}",
        )
    if isinstance(exc, OutOfMemory):
        return ApiError(
            500,
            "out_of_memory",
            f"out of memory even for one {p.width}x{p.height} image; request id {request_id}",
        )
    log.error("request %s: batch failed: %s: %s", request_id, type(exc).__name__, exc)
    return ApiError(
        500,
        "internal_error",
        f"the batch holding this request failed ({type(exc).__name__}: {exc}); request id {request_id}",
    )
