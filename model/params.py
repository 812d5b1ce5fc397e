"""Plain, frozen request types of the sampler: what one image (one row) is asked to be.

The server validates user input into these (model/ never sees pydantic); the CLI builds them directly.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from dcar.model.knobs import KnobError, SamplingKnobs

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams(SamplingKnobs):
    """Everything that determines one generated image, together with the weights.

    The prompt, seed and size, plus the sampling knobs of ``SamplingKnobs`` (model/knobs.py: their one
    definition, official defaults and bounds; keyword-only here).
    """

    prompt: str
    seed: int = 0
    height: int = 512
    width: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        # Checked here, where a Python caller builds them, rather than deep in the tokenizer or torch.full:
        # a prompt of None or 5, a seed of 1.5 or True and a height of 64.0 failed there with messages
        # naming no field, or (an int prompt, a float seed) were silently drawn.
        if not isinstance(self.prompt, str):
            raise KnobError("prompt", f"prompt must be a string, got {type(self.prompt).__name__}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise KnobError("seed", f"seed must be an integer between 0 and {MAX_SEED}, got {self.seed!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise KnobError(name, f"{name} must be a positive integer (pixels), got {value!r}")
        for name in ("seed", "height", "width"):  # a NumPy integer is stored as a Python int
            object.__setattr__(self, name, int(getattr(self, name)))


def _is_int(value: object) -> bool:
    # numbers.Integral: a seed drawn with NumPy (np.int64) was refused as "not an integer".
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False)
class EditSpec:
    """The known part of an image being edited (inpainting), already tokenized.

    ``tokens`` (L,) and ``residual`` (L, C) come from the tokenizer on the input image;
    ``token_mask`` (L,) is True where tokens are regenerated. ``image`` (3, H, W) in [-1, 1] and
    ``pixel_mask`` (1, H, W) in [0, 1] (1 = regenerate) are used to blend the input back outside the mask.
    """

    tokens: torch.Tensor
    residual: torch.Tensor
    token_mask: torch.Tensor
    image: torch.Tensor | None = None
    pixel_mask: torch.Tensor | None = None
    blend: bool = True


@dataclass
class RowResult:
    """One finished image: pixels in [0, 1] (3, H, W) float, its tokens and where its time went.

    ``finite`` is False when the image or its residuals held NaN or inf (a numerical failure of this row
    alone; a server must not deliver such an image: see ``NonFiniteOutput``).
    """

    image: torch.Tensor
    tokens: torch.Tensor
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    tag: object = None
    finite: bool = True
    residual: torch.Tensor | None = None  # (L, C) float32 residuals the head sampled (None without the head)


class NonFiniteOutput(ArithmeticError):
    """A row's output held NaN or inf; raised for that row only, its batch mates are unaffected."""
