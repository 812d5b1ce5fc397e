"""Request and response types of the HTTP API, and their one-time validation into ``SamplingParams``.

pydantic checks types (422 naming the field); ``to_params`` checks values against the served model and the
settings (400 naming the field, the limit and the value, e.g. ``steps must be between 1 and 50, got 80``)
and returns the plain frozen dataclasses of model/ (the model layer never sees pydantic). A prompt longer than
the text encoder takes is refused, never truncated.

The sampling knobs are not listed here: ``SamplingFields`` is generated from their one definition
(model/knobs.py), and so are their bounds (``check_knobs``, with the settings' caps).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic_core import PydanticCustomError

from dcar.model import knobs as model_knobs
from dcar.model.knobs import KNOB_NAMES, KNOBS, KnobError
from dcar.model.params import MAX_SEED, SamplingParams
from dcar.server.errors import ApiError, check_unicode, invalid
from dcar.server.settings import parse_size

if TYPE_CHECKING:
    from dcar.server.schemas_openai import OpenAIImageRequest

OutputFormat = Literal["png", "jpeg", "webp"]
PRIORITY_MIN, PRIORITY_MAX = -100, 100


# --- requests ------------------------------------------------------------------------------------------


def _refuse_bool(kind: str):
    """A before-validator: JSON true/false is not a number. pydantic's lax mode reads them as 1 and 0
    (``"n": true`` drew one image, ``"steps": true`` took one step); a numeric string stays accepted, as a
    multipart form, where every value is text, needs (``-F steps=12``)."""

    def check(value: object) -> object:
        if isinstance(value, bool):
            raise PydanticCustomError(f"{kind}_type", f"Input should be a valid {kind}, not true or false")
        return value

    return check


# The number types of every request field (native and OpenAI): int / float without the bool coercion.
Integer = Annotated[int, BeforeValidator(_refuse_bool("integer"))]
Number = Annotated[float, BeforeValidator(_refuse_bool("number"))]
_NUMBER_TYPES: dict[type, Any] = {int: Integer, float: Number}

# Every sampling knob as an optional field (unset: the served model's default), typed so that multipart
# strings are parsed like JSON values; bounds are checked by ``to_params``, not by pydantic, so that a value
# out of range is a 400 naming the limit. The native and the OpenAI requests both inherit these fields.
_KNOB_FIELDS: dict[str, Any] = {
    k.name: (
        _NUMBER_TYPES.get(k.type, k.type) | None,
        Field(None, description=f"{k.describe()}; default: the model's"),
    )
    for k in KNOBS
}
SamplingFields: Any = create_model("SamplingFields", **_KNOB_FIELDS)


class Knobs(SamplingFields):
    """The body of /v1/generate and the fields of /v1/edit. Unset knobs take the model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="what to draw; at most the text encoder's token limit")
    n: Integer = Field(1, description="images to generate (rows), seeds seed, seed+1, ...")
    size: str | None = Field(None, description="WIDTHxHEIGHT, one of the allowed sizes; default: native size")
    seed: Integer | None = Field(
        None, description="seed of the first image; random when omitted (echoed back)"
    )
    output_format: OutputFormat = "png"
    quality: Integer | None = Field(None, description="JPEG/WebP quality 1..100 (default 95)")
    timeout: Number | None = Field(
        None, description="seconds; may only shorten the server's request_timeout_s"
    )
    priority: Integer | None = Field(
        None,
        description=f"{PRIORITY_MIN}..{PRIORITY_MAX}, lower first (default 0); only with the setting "
        "scheduling_policy=priority",
    )
    stream: bool = Field(False, description="answer with Server-Sent Events: progress per step, then images")
    preview: bool = Field(False, description="with stream: a small PNG preview in every progress event")


class GenerateRequest(Knobs):
    """POST /v1/generate."""


class EditFields(Knobs):
    """POST /v1/edit without its two images (multipart form fields)."""

    blend: bool = Field(True, description="keep the input's pixels outside the mask")


class EditJSONRequest(EditFields):
    """POST /v1/edit as JSON: the images as base64 strings (a data: URL prefix is accepted)."""

    image: str
    mask: str


# --- responses -----------------------------------------------------------------------------------------


class ImageOut(BaseModel):
    index: int
    seed: int
    b64_json: str
    timings: dict[str, float] = Field(description="seconds per stage for this image, plus queue_wait")


class GenerateResponse(BaseModel):
    id: str
    created: int
    model: str
    size: str
    output_format: OutputFormat
    images: list[ImageOut]
    timings: dict[str, float] = Field(description="request-level seconds: queue_wait (longest row), total")
    parameters: dict = Field(description="every resolved sampling parameter but the per-image seed")
    weights_digest: str = Field(description="sha256 of the weights served (server/provenance.py)")


# --- validation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this server: the served sizes and the settings' bounds."""

    sizes: tuple[tuple[int, int], ...]  # (width, height)
    max_n: int
    max_steps: int
    max_residual_steps: int
    max_guidance_scale: float
    max_prompt_chars: int
    max_prompt_tokens: int
    request_timeout_s: float
    count_tokens: Callable[[str], int]
    defaults: Callable[..., SamplingParams]  # Pipeline.params
    scheduling_policy: str = "fcfs"

    @property
    def native(self) -> tuple[int, int]:
        return self.sizes[0]

    def size_list(self) -> str:
        return ", ".join(f"{w}x{h}" for w, h in self.sizes)

    @property
    def caps(self) -> dict[str, float]:
        """Each knob's upper bound from the settings (``Knob.cap`` names the setting, e.g. max_steps)."""
        return {k.name: getattr(self, k.cap) for k in KNOBS if k.cap}

    def capped(self, values: dict[str, Any]) -> dict[str, Any]:
        """Those of ``values`` above their setting's cap, lowered to it (each keeps its type: 8, not 8.0)."""
        return {
            name: type(values[name])(cap)
            for name, cap in self.caps.items()
            if name in values and values[name] > cap
        }


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # also refuses NaN
        raise invalid(name, f"{name} must be between {_number(low)} and {_number(high)}, got {value!r}")


def _number(x: float) -> str:
    # integers in full: the seed's bound 2**63 - n shown as 9.22337e+18 hid what the client may send
    return str(x) if isinstance(x, int) else f"{x:g}"


def check_prompt(prompt: str, limits: Limits) -> None:
    check_unicode("prompt", prompt)  # before the tokenizer, which cannot encode a lone surrogate
    if not prompt.strip():
        raise invalid("prompt", "prompt must not be empty")
    if len(prompt) > limits.max_prompt_chars:
        raise invalid(
            "prompt",
            f"prompt is {len(prompt)} characters; the limit is max_prompt_chars={limits.max_prompt_chars}",
        )
    tokens = limits.count_tokens(prompt)
    if tokens > limits.max_prompt_tokens:
        raise invalid(
            "prompt",
            f"prompt is {tokens} tokens; the text encoder takes at most "
            f"{limits.max_prompt_tokens} (prompts are never truncated)",
        )


def check_size(size: str | None, limits: Limits, param: str = "size") -> tuple[int, int]:
    """ "WxH" (or None / "auto": the native size) -> (width, height), one of the allowed sizes."""
    if size is None or size.strip().lower() == "auto":
        return limits.native
    try:
        wh = parse_size(size)
    except ValueError as e:
        raise invalid(param, str(e)) from e
    if wh not in limits.sizes:
        raise invalid(param, f"{param} {wh[0]}x{wh[1]} is not served; allowed sizes: {limits.size_list()}")
    return wh


def check_timeout(timeout: float | None, limits: Limits) -> float:
    if timeout is None:
        return limits.request_timeout_s
    if not math.isfinite(timeout) or not 0 < timeout <= limits.request_timeout_s:
        raise invalid(
            "timeout",
            f"timeout must be above 0 and at most request_timeout_s="
            f"{limits.request_timeout_s:g} seconds, got {timeout!r}",
        )
    return timeout


def check_priority(priority: int | None, limits: Limits) -> int:
    """The request's place in the queue (lower first); refused unless the server schedules by priority, so
    that a client never believes it was honoured."""
    if priority is None:
        return 0
    if limits.scheduling_policy != "priority" and priority != 0:
        raise invalid(
            "priority",
            f"priority needs the setting scheduling_policy=priority (DCAR_SCHEDULING_POLICY); this server "
            f"serves in arrival order (fcfs), got priority={priority!r}",
        )
    check_range("priority", priority, PRIORITY_MIN, PRIORITY_MAX)
    return priority


def to_params(
    k: Knobs | OpenAIImageRequest, limits: Limits, size: tuple[int, int], defaults: dict | None = None
) -> list[SamplingParams]:
    """Validated knobs -> one ``SamplingParams`` per image (seeds seed, seed+1, ...).

    ``defaults`` replace the model's defaults where the request sets nothing (OpenAI quality presets).
    """
    check_prompt(k.prompt, limits)
    check_range("n", k.n, 1, limits.max_n)
    seed = k.seed if k.seed is not None else secrets.randbelow(2**32)
    check_range("seed", seed, 0, MAX_SEED - (k.n - 1))
    requested = {name: getattr(k, name) for name in KNOB_NAMES if getattr(k, name) is not None}
    try:
        model_knobs.check_knobs(
            requested, limits.caps
        )  # the knobs' bounds (model/knobs.py), capped by the settings
    except KnobError as e:
        raise invalid(e.field, str(e)) from e
    width, height = size
    overrides: dict = {**(defaults or {}), **requested}
    # A default the request did not set (the model's, or a quality preset's) is lowered to the settings' cap:
    # a cap bounds every request, and the client cannot be refused for a value it never sent.
    resolved = limits.defaults(k.prompt, seed=seed, height=height, width=width, **overrides)
    overrides.update(limits.capped({n: getattr(resolved, n) for n in limits.caps if n not in requested}))
    return [
        limits.defaults(k.prompt, seed=seed + i, height=height, width=width, **overrides) for i in range(k.n)
    ]


def check_knobs(k: Knobs) -> None:
    """Cross-field rules of the native API."""
    if k.preview and not k.stream:
        raise invalid("preview", "preview needs stream=true (previews travel in the progress events)")
    if k.quality is not None:
        check_range("quality", k.quality, 1, 100)


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, "unsupported", message, param, reason="invalid")
