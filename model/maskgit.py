"""The MaskGIT parts of DC-AR's sampler as pure functions (tests/golden/README.md section D pins the schedule).

Everything is per row, so rows of one batch may sit at different steps, use different step counts,
guidance scales and temperatures. The official ``generate()`` shares these scalars across the batch
(and takes the re-mask count from row 0); per row gives the same numbers for each row alone.
"""

from __future__ import annotations

import math

import torch

from dcar.model.knobs import GUIDANCE_DECAYS


def masked_after_step(num_tokens: int, ratio: torch.Tensor, currently_masked: torch.Tensor) -> torch.Tensor:
    """How many positions stay masked after a step (arccos schedule), per row.

    ``floor(L * arccos(r) / (pi/2))``, then at most ``currently_masked - 1`` and at least 1, in the
    official order (min first, then max): a row keeps at least one masked token until its last step.
    """
    target = torch.floor(num_tokens * (torch.arccos(ratio.double()) / (math.pi * 0.5))).long()
    return torch.clamp(torch.minimum(currently_masked - 1, target), min=1)


def schedule_counts(num_tokens: int, steps: int) -> list[int]:
    """Masked tokens remaining after each step of an unconditional run (the last is always 0)."""
    masked = torch.tensor([num_tokens])
    out = []
    for s in range(steps):
        if s == steps - 1:
            out.append(0)
            break
        masked = masked_after_step(num_tokens, torch.tensor([(s + 1) / steps]), masked)
        out.append(int(masked))
    return out


def guidance_at(decay: str, scale: float, step: int, steps: int, power: float = 2.5) -> float:
    """Effective CFG weight g at ``step``, in the form logits = cond + g * (cond - uncond).

    constant: g = scale (the official default). linear (MUSE): the official loop starts at 0 and uses
    scale * step / steps afterwards. power-cosine (MDT): w = 1 + (scale - 1) * (1 - cos(pi (step/steps)^p)) / 2
    in the form uncond + w (cond - uncond), i.e. g = w - 1.
    """
    if decay == "constant":
        return scale
    if decay == "linear":
        return scale * step / steps
    if decay == "power-cosine":
        w = (scale - 1) * (1 - math.cos(((step / steps) ** power) * math.pi)) / 2 + 1
        return w - 1
    raise ValueError(f"guidance_decay={decay!r} is not supported; expected one of {list(GUIDANCE_DECAYS)}")


def guidance_on_device(
    decay: torch.Tensor, scale: torch.Tensor, step: torch.Tensor, steps: torch.Tensor, power: float = 2.5
) -> torch.Tensor:
    """``guidance_at`` for a batch of rows as float64 tensors (B,), computed where the tensors live.

    ``decay`` holds indices into ``GUIDANCE_DECAYS``. Same operations in the same order as the scalar form,
    so each row's value is the one ``guidance_at`` gives (float64 both).
    """
    scale, step, steps = scale.double(), step.double(), steps.double()
    linear = scale * step / steps
    w = (scale - 1) * (1 - torch.cos(((step / steps) ** power) * math.pi)) / 2 + 1
    return torch.where(decay == 0, scale, torch.where(decay == 1, linear, w - 1))


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniforms, with 1d-tokenizer's clamps at 1e-20."""
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


def softmax_temperature(ratio: torch.Tensor) -> torch.Tensor:
    """The annealed softmax temperature 0.5 + 0.8 (1 - r): 1.233 at the first of 12 steps, 0.5 at the last."""
    return 0.5 + 0.8 * (1 - ratio)
