"""The sampling knobs, defined once: type, official default, bounds and meaning of each.

``SamplingKnobs`` is the definition. Everything else derives from it: ``SamplingParams`` (one image's
request, model/params.py) and ``SamplingDefaults`` (a model's own defaults, model/config.py) inherit its
fields; the HTTP request schema (server/schemas.py) and the ``dcar generate``/``dcar edit`` flags
(cli/common.py) are generated from ``KNOBS``; ``check_knobs`` is the one validation, and its ``KnobError``
carries the field name, so no caller parses error text.

Defaults are the official recipe (12 steps, CFG 4.5 constant, Gumbel temperature 1.5 annealed to 0,
softmax-temperature annealing, 32 head steps at temperature 1). A knob's ``cap`` names the server setting
that may lower its upper bound (``max_steps`` ...); the model itself knows no such limit.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

# How guidance changes over the steps (model/maskgit.py implements them). Here, not there: this module is
# read by the server's settings and the CLI's flags, which must not wait for torch to refuse a bad value.
GUIDANCE_DECAYS = ("constant", "linear", "power-cosine")

T = TypeVar("T")
KNOB = "knob"  # the dataclass-field metadata key


@dataclass(frozen=True)
class Knob:
    """What one knob is: the metadata of a ``SamplingKnobs`` field."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    cap: str | None = None  # the server setting that may lower ``high``

    def describe(self) -> str:
        """One line for API docs and ``--help``: meaning, allowed values, official default."""
        if self.choices:
            allowed = "one of " + ", ".join(self.choices)
        elif self.low is not None and self.high is not None:
            allowed = f"{self.low:g}..{self.high:g}"
        elif self.low is not None:
            allowed = f">= {self.low:g}" + (f", at most the server's {self.cap}" if self.cap else "")
        else:
            allowed = "true or false" if self.type is bool else ""
        default = str(self.default).lower() if self.type is bool else self.default
        return f"{self.help} ({allowed}; official default {default})" if allowed else self.help


def knob(
    default: T,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] = (),
    cap: str | None = None,
) -> T:
    """A ``SamplingKnobs`` field: its default plus the metadata ``Knob`` is built from."""
    meta = {"help": help, "low": low, "high": high, "choices": choices, "cap": cap}
    return dataclasses.field(default=default, metadata={KNOB: meta})


class KnobError(ValueError):
    """A knob value out of its bounds; ``field`` names the knob (the message names field, limit and value)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, kw_only=True)
class SamplingKnobs:
    """The sampling knobs with the official defaults; validated on construction."""

    steps: int = knob(12, "unmasking steps", low=1, cap="max_steps")
    guidance_scale: float = knob(4.5, "classifier-free guidance scale", low=0, cap="max_guidance_scale")
    guidance_decay: str = knob("constant", "how guidance changes over the steps", choices=GUIDANCE_DECAYS)
    randomize_temperature: float = knob(
        1.5, "Gumbel temperature of token sampling, annealed to 0", low=0, high=10
    )
    softmax_temperature_annealing: bool = knob(True, "anneal the softmax temperature over the steps")
    residual_steps: int = knob(32, "diffusion-head sampling steps", low=1, cap="max_residual_steps")
    residual_temperature: float = knob(1.0, "noise scale of the diffusion head's sampler", low=0, high=10)
    use_residuals: bool = knob(True, "add the head's residuals; false decodes the tokens alone (an ablation)")

    def __post_init__(self) -> None:
        check_knobs(knob_values(self))
        # Stored as the knob's own Python type: steps=12.0 stayed a float in the params (and in everything
        # derived from them), a NumPy number would reach torch.tensor and json.dumps as it came.
        for k in KNOBS:
            if k.type in (int, float):
                object.__setattr__(self, k.name, k.type(getattr(self, k.name)))


KNOBS: tuple[Knob, ...] = tuple(
    Knob(f.name, type(f.default), f.default, **f.metadata[KNOB]) for f in dataclasses.fields(SamplingKnobs)
)
KNOB_NAMES: tuple[str, ...] = tuple(k.name for k in KNOBS)
_BY_NAME = {k.name: k for k in KNOBS}


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_knob(name: str, text: str) -> Any:
    """A knob's value from text (a CLI flag, a ``--sweep`` value), converted by the knob's type and checked.

    ``KnobError`` names the knob and what it must be; ``name`` must be one of ``KNOB_NAMES``.
    """
    k = _BY_NAME[name]
    word = text.strip().lower()
    value: Any
    if k.type is bool:
        if word not in _TRUE + _FALSE:
            raise KnobError(name, f"{name} must be true or false, got {text!r}")
        value = word in _TRUE
    elif k.choices:
        value = text.strip()
    else:
        try:
            value = k.type(text)
        except ValueError:
            kind = "an integer" if k.type is int else "a number"
            raise KnobError(name, f"{name} must be {kind}, got {text!r}") from None
    check_knob(name, value)
    return value


def knob_values(obj: object) -> dict[str, Any]:
    """The knob fields of any object that has them (SamplingParams, SamplingDefaults, a request, args)."""
    return {name: getattr(obj, name) for name in KNOB_NAMES}


def check_knob(name: str, value: Any, cap: float | None = None) -> None:
    """Raise ``KnobError`` unless ``value`` is allowed for knob ``name`` (``cap``: a server's lower bound)."""
    k = _BY_NAME[name]
    if k.choices:
        if value not in k.choices:
            raise KnobError(name, f"{name} must be one of {', '.join(k.choices)}; got {value!r}")
        return
    if k.type is bool:
        if not isinstance(value, bool):
            raise KnobError(name, f"{name} must be true or false, got {value!r}")
        return
    # numbers.Real, not (int, float): NumPy's integers and float32 are numbers too, and "steps must be an
    # integer, got np.int64(2)" was wrong; bools are refused although they are ints.
    kind = "an integer" if k.type is int else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise KnobError(name, f"{name} must be {kind}, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float (10**400)
        number = math.inf
    # Before the integer test: int(inf) raised OverflowError and int(nan) a ValueError naming no knob.
    if not math.isfinite(number):  # inf passed "at least 0" and reached the logits
        raise KnobError(name, f"{name} must be a finite number, got {value!r}")
    if k.type is int and not number.is_integer():
        raise KnobError(name, f"{name} must be {kind}, got {value!r}")
    high = k.high if cap is None else cap if k.high is None else min(k.high, cap)
    low = -math.inf if k.low is None else k.low
    if high is None:
        if not number >= low:  # also refuses NaN
            raise KnobError(name, f"{name} must be at least {low:g}, got {value!r}")
    elif not low <= number <= high:
        raise KnobError(name, f"{name} must be between {low:g} and {high:g}, got {value!r}")


def check_knobs(values: Mapping[str, Any], caps: Mapping[str, float] | None = None) -> None:
    """Validate the given knobs (a subset is fine); ``caps`` maps knob names to a server's upper limits."""
    for name, value in values.items():
        check_knob(name, value, (caps or {}).get(name))


# --- sizes -----------------------------------------------------------------------------------------------

SIZE_RE = re.compile(r"^(\d{1,5})(?:x(\d{1,5}))?$")


def parse_size(text: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` or one side (``"512"`` = 512x512) -> (width, height); ValueError otherwise.

    The one size grammar of the server settings, the HTTP ``size`` field and the CLI's ``--size``.
    """
    m = SIZE_RE.match(str(text).strip().lower())
    if not m or int(m.group(1)) == 0 or (m.group(2) is not None and int(m.group(2)) == 0):
        raise ValueError(f"size must look like WIDTHxHEIGHT (e.g. 512x512) or one side (512), got {text!r}")
    width = int(m.group(1))
    return width, int(m.group(2) or width)
