"""Server settings: typed, validated, read from the environment with the ``DCAR_`` prefix.

Built once in ``dcar serve`` (or a test) and passed to ``create_app(settings)``; nothing reads the
environment after that. Knob names follow the common servers:
``max_batch_size`` and ``max_wait_ms`` as in Triton / Ray Serve, ``max_queue`` as Triton's
``max_queue_size``, ``request_timeout_s`` as Ray's ``request_timeout_s``.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dcar.model.config import weights_preset
from dcar.model.knobs import parse_size
from dcar.weights import embedded_weights

DEFAULT_WEIGHTS = embedded_weights()
# The names model/loading.py's parse_dtype reads; not imported from there, which would import torch before
# the flags are checked (tests/server/test_server_settings.py keeps the two lists equal).
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
__all__ = ["DEFAULT_WEIGHTS", "Settings", "parse_size"]


def _split_list(value):
    # Env values arrive as one string: accept "a,b" as well as a JSON list.
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            return json.loads(value)
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the server. Environment: ``DCAR_<NAME>`` (e.g. ``DCAR_MAX_BATCH_SIZE=16``)."""

    model_config = SettingsConfigDict(env_prefix="DCAR_", extra="forbid", validate_default=True)

    # --- model -------------------------------------------------------------------------------------
    weights: str = Field(
        str(DEFAULT_WEIGHTS), description="weights directory, or 'preset:tiny' for a random tiny model"
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
        description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...",
    )
    dtype: str | None = Field(
        None, description="float32 / float16 / bfloat16; default fp16 on CUDA, fp32 on CPU"
    )
    warmup: bool = Field(True, description="run one real generation per allowed size before reporting ready")
    # How the sampler computes (never what: outputs are the same). Unset = the per-device default.
    compile: bool = Field(
        False, description="torch.compile the transformer step and the head step (fullgraph)"
    )
    cuda_graphs: bool = Field(
        False,
        description="capture one CUDA graph per padded shape (compile "
        "mode reduce-overhead; implies pad_buckets)",
    )
    pad_buckets: bool | None = Field(
        None,
        description="pad batches to 1/2/4/../64 rows and captions to "
        "32/64/128/300 tokens; default: on for CUDA, off for CPU",
    )
    channels_last: bool | None = Field(
        None,
        description="channels-last DC-HT decoder; default: on for CUDA "
        "and float16/bfloat16, off for float32 on CPU",
    )

    # --- network -----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    ops_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="a second port serving only /healthz, /readyz and /metrics, outside max_connections "
        "(server/ops_port.py); unset = those routes on the main port only",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted bearer keys (comma-separated); empty = no auth"
    )

    # --- batching and backpressure -----------------------------------------------------------------
    max_batch_size: int = Field(16, ge=1, le=1024, description="rows (images) in flight at once")
    # 0: an idle engine starts at once. Rows that arrive a moment later join the running batch at its next
    # step (iteration-level batching), so waiting buys little batching and costs every idle request latency.
    max_wait_ms: float = Field(
        0.0, ge=0, le=60_000, description="how long an idle engine collects rows before starting"
    )
    max_queue: int = Field(256, ge=1, description="rows waiting for admission before 429")
    request_timeout_s: float = Field(
        120.0, gt=0, description="default deadline; a request may only shorten it"
    )
    drain_timeout_s: float = Field(
        60.0, ge=0, description="on SIGTERM, how long in-flight rows may take to finish"
    )
    exit_on_engine_failure: bool = Field(
        True,
        description="end dcar serve with status 1 once the engine failed for good (a batch error, then a "
        "failed health probe), so that a restart policy replaces it; false keeps it up, answering 503",
    )
    # Bounds the backlog in seconds of predicted work (docs/reliability.md): an accepted request waits at most
    # this long for a slot, then takes one image's time in the batch; after an overload the server is back to
    # normal latency within about this much. 2 s is a few steps of a full batch, enough to keep the batch full
    # between arrivals, and short enough that a client refused with 429 loses little by retrying.
    max_queue_delay_s: float = Field(
        2.0, ge=0, description="429 when a request's rows would wait longer for a slot"
    )
    # vLLM's --scheduling-policy: fcfs keeps the arrival order; priority lets a request's `priority` (lower
    # first, vLLM's and Triton's sense) move it ahead of waiting rows of a higher value. Off by default: in a
    # shared service any client could otherwise jump the queue.
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs",
        description="order of the waiting rows: fcfs (arrival) or priority (a request's priority, lower "
        "first, then arrival); rows already running are never preempted",
    )
    # The forecast behind admission is a median: about half of the requests finish after it. Admission adds
    # the margin that covered this share of the recent requests (server/forecast.py Lateness), so the
    # latency bound above holds at about this percentile.
    admission_quantile: float = Field(
        0.99,
        gt=0,
        lt=1,
        description="share of recent requests the forecast's margin covers (max_queue_delay_s, timeouts)",
    )
    trim_heap: bool = Field(
        True,
        description="on CPU, return freed heap memory to the OS after new batch shapes "
        "(glibc malloc_trim; server/memory.py)",
    )

    # --- connections (server/guard.py) -------------------------------------------------------------
    header_timeout_s: float = Field(
        10.0, gt=0, description="408 and close when request line + headers take longer"
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="408 and close when a request body takes longer to arrive"
    )
    keepalive_timeout_s: float = Field(
        5.0, gt=0, description="close a connection idle this long (before or between requests)"
    )
    # Below the usual open-files limit (1024) with room for the model's files, threads and sockets of its own.
    max_connections: int = Field(
        512, ge=1, description="open connections at most; more get 503 and are closed"
    )

    # --- retries (server/idempotency.py) -----------------------------------------------------------
    idempotency_ttl_s: float = Field(
        3600.0,
        ge=0,
        description="how long a response to a request with an Idempotency-Key is replayed to its retries "
        "(0 = the header is ignored)",
    )
    idempotency_max_bytes: int = Field(
        64 * 2**20, ge=0, description="memory for those responses at most; the oldest go first"
    )

    # --- request limits ----------------------------------------------------------------------------
    allowed_sizes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="servable WIDTHxHEIGHT sizes; empty = the model's native size only"
    )
    max_n: int = Field(8, ge=1, le=64)
    max_steps: int = Field(50, ge=1, le=1000)
    max_residual_steps: int = Field(100, ge=1, le=10_000)
    max_guidance_scale: float = Field(20.0, gt=0)
    max_prompt_chars: int = Field(4000, ge=1)
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="413 above this (whole request body)")
    max_image_bytes: int = Field(16 * 2**20, ge=1024, description="413 above this (one uploaded image)")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="413 above this (decompression-bomb guard)")
    preview_size: int = Field(64, ge=8, le=1024, description="longest side of SSE preview images")
    png_compress_level: int = Field(
        1, ge=0, le=9, description="zlib level of PNG outputs (1: fast, 9: small)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="level of dcar's and uvicorn's loggers (any case)"
    )

    # --- ecosystem: OpenAI names, logs, traces, streams, provenance --------------------------------
    model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="other model names the OpenAI routes answer to (e.g. gpt-image-1)"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text lines, or one JSON object per record"
    )
    log_prompts: bool = Field(False, description="put prompts into the per-request log records")
    otel_endpoint: str | None = Field(
        None, description="OTLP/HTTP endpoint for OpenTelemetry traces; unset: off"
    )
    sse_keepalive_s: float = Field(
        15.0, gt=0, le=300, description="SSE comment interval while nothing else is sent"
    )
    mark_output: bool = Field(
        True,
        description="write parameters, weights digest and IPTC DigitalSourceType into every image's metadata",
    )

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        # checked with the other settings, before the port opens (it failed the model load after it)
        if value is not None and value not in DTYPES:
            raise ValueError(f"dtype {value!r} is not supported; expected one of {', '.join(DTYPES)}")
        return value

    @field_validator("api_keys", "allowed_sizes", "model_aliases", mode="before")
    @classmethod
    def _lists(cls, value):
        return _split_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("allowed_sizes")
    @classmethod
    def _sizes(cls, value: list[str]) -> list[str]:
        out = []
        for s in value:
            w, h = parse_size(s)
            out.append(f"{w}x{h}")
        return out

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        for k in value:
            if len(k) < 8:
                raise ValueError("api keys must be at least 8 characters long")
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        weights_preset(value)  # "preset:" needs a known name; anything else is a path, checked at load
        return value

    @model_validator(mode="after")
    def _cross(self) -> Settings:
        if self.ops_port is not None and self.ops_port == self.port:
            raise ValueError(
                f"ops_port={self.ops_port} is the main port; give the probes a port of their own"
            )
        if self.max_queue < self.max_n:
            raise ValueError(
                f"max_queue={self.max_queue} is below max_n={self.max_n}: "
                "a request of max_n images could never be queued; raise max_queue"
            )
        return self

    def size_list(self) -> list[tuple[int, int]]:
        return [parse_size(s) for s in self.allowed_sizes]
