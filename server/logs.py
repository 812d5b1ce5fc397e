"""Logging: text or JSON records (``DCAR_LOG_FORMAT``), one access record per finished request, and uvicorn's
own loggers through the same formatter.

The access record (logger ``dcar.access``) is written when the response has been sent, streams included:
request id, method, route template, path, status, duration, and for image requests n, size, steps and
the queue wait; the fingerprint of the bearer key presented (a sha256 prefix, never the key), the OpenAI
``user`` / ``safety_identifier`` when sent, and the prompt only with ``DCAR_LOG_PROMPTS=1``. Routes add
what they know with ``note(request, ...)``; the middleware reads it back from the ASGI scope.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.config
import time
from datetime import datetime, timezone

access_log = logging.getLogger("dcar.access")
NOTES = "dcar_log"  # key of the notes in scope["state"]
# key in scope["state"] of the status a request ended with where that is not the one its response started with
# (an event stream: 200 on the wire, then an error event or a client that left); read by the metrics too
OUTCOME = "dcar_outcome"
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_extra(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``: the extra fields appended, for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(
            f"{k}={json.dumps(v, default=str)}" for k, v in _extra(record).items() if v is not None
        )
        return f"{text} {extra}" if extra else text


def _extra(record: logging.LogRecord) -> dict:
    return {
        k: v
        for k, v in record.__dict__.items()
        if k not in _STANDARD and not k.startswith("_") and k not in ("color_message",)
    }  # uvicorn's coloured copy of the message


def log_config(log_format: str = "text", level: str = "info") -> dict:
    """A ``logging.config.dictConfig`` dict: root, dcar and uvicorn loggers through one formatter on stderr.

    Passed to uvicorn as ``log_config`` too, so uvicorn's startup and error records come out the same way.
    """
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"dcar": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "dcar", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            name: {"handlers": [], "level": level, "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "dcar")
        },
    }


def configure(log_format: str = "text", level: str = "info") -> dict:
    config = log_config(log_format, level)
    logging.config.dictConfig(config)
    return config


def note(request, **fields) -> None:
    """Add fields to this request's access record (``job=`` adds n, size, steps, queue wait and the prompt)."""
    request.scope.setdefault("state", {}).setdefault(NOTES, {}).update(fields)


def set_outcome(request, status: int) -> None:
    """The status this request ended with, for the metrics and the access record: an event stream that sent
    an ``error`` event records that error's status instead of its 200."""
    request.scope.setdefault("state", {})[OUTCOME] = status


def outcome(scope, started: bool, ended: bool, failed: bool, sent: int) -> int:
    """The status to record for a finished request: ``set_outcome``'s if a route set one; for a response that
    started but never ended (a stream cut off), 500 if the app raised, else 499 (the client left); else the
    status ``sent`` in the response (500 when none was sent: the app raised before answering)."""
    chosen = scope.get("state", {}).get(OUTCOME)
    if chosen is not None:
        return chosen
    if started and not ended:
        return 500 if failed else 499
    return sent


def key_fingerprint(headers: dict[bytes, bytes]) -> str | None:
    """A short sha256 of the bearer token presented: tells keys apart in logs without revealing any."""
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return "sha256:" + hashlib.sha256(token.strip().encode()).hexdigest()[:12]


def job_fields(job, prompts: bool) -> dict:
    p = job.params[0]
    waits = [job.queue_wait(i) for i, a in enumerate(job.admitted) if a is not None]
    out = {
        "task": job.task,
        "n": len(job.params),
        "size": f"{p.width}x{p.height}",
        "steps": p.steps,
        "priority": job.priority,  # explains the wait of a request others overtook
        "queue_wait_s": round(max(waits), 6) if waits else None,
    }
    if prompts:
        out["prompt"] = p.prompt
    return out


class AccessLog:
    """ASGI middleware (outermost): one ``dcar.access`` record per finished HTTP request."""

    def __init__(self, app, log_prompts: bool = False):
        self.app = app
        self.log_prompts = log_prompts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # the edge middleware inside this one has stored the outcome (a stream's, for one)
            code = scope.get("state", {}).get(OUTCOME, status["code"])
            self._record(scope, code, time.perf_counter() - t0)

    def _record(self, scope, status: int, seconds: float) -> None:
        state = scope.get("state", {})
        notes = dict(state.get(NOTES, {}))
        job = notes.pop("job", None)
        route = getattr(scope.get("route"), "path", None)
        fields = {
            "request_id": state.get("request_id"),
            "method": scope.get("method"),
            "route": route,
            "path": scope.get("path"),
            "status": status,
            "duration_s": round(seconds, 6),
            "key_fingerprint": key_fingerprint(dict(scope.get("headers") or [])),
        }
        if job is not None:
            fields.update(job_fields(job, self.log_prompts))
        fields.update(notes)
        access_log.info("%s %s %d %.3fs", fields["method"], fields["path"], status, seconds, extra=fields)
