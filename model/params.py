"""Plain, frozen request types of the sampler: what one image (one row) is asked to be.

The server validates user input into these (model/ never sees pydantic); the CLI builds them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from dcar.model.maskgit import GUIDANCE_DECAYS

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """Everything that determines one generated image, together with the weights.

    Defaults are the official recipe (12 steps, CFG 4.5 constant, Gumbel temperature 1.5 annealed to 0,
    softmax-temperature annealing, 32 head steps at temperature 1).
    """

    prompt: str
    seed: int = 0
    height: int = 512
    width: int = 512
    steps: int = 12
    guidance_scale: float = 4.5
    guidance_decay: str = "constant"
    randomize_temperature: float = 1.5
    softmax_temperature_annealing: bool = True
    residual_steps: int = 32
    residual_temperature: float = 1.0
    use_residuals: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.residual_steps < 1:
            raise ValueError(f"residual_steps={self.residual_steps} must be >= 1")
        if self.guidance_decay not in GUIDANCE_DECAYS:
            raise ValueError(f"guidance_decay={self.guidance_decay!r}; expected one of {list(GUIDANCE_DECAYS)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed={self.seed} must be in [0, {MAX_SEED}]")
        if self.randomize_temperature < 0 or self.residual_temperature < 0:
            raise ValueError("temperatures must be >= 0")


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


class NonFiniteOutput(ArithmeticError):
    """A row's output held NaN or inf; raised for that row only, its batch mates are unaffected."""
