"""Where the sampler's random numbers come from.

``RowNoise`` is the production source: every row owns a ``torch.Generator`` seeded from its request, and
each draw is the concatenation of per-row draws, so a row's image does not depend on its batch mates.
``OfficialOrderNoise`` replays the official code's single-generator draw order for a fixed batch; it exists
so the goldens recorded with ``torch.manual_seed`` can be reproduced exactly (goldens section E).

Both return (B, *shape) for their B rows; kinds are "token" and "confidence" (uniform), "head_init" and
"head_step" (normal).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RowNoise:
    """One generator per row; a draw is the stack of each row's own draw, in row order."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    def subset(self, rows: Sequence[int]) -> RowNoise:
        return RowNoise([self.generators[i] for i in rows])

    def caption_dropout(self) -> None:
        """The official forward draws caption-dropout uniforms even at probability 0/1; nothing to do here."""

    def uniform(self, kind: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.stack(
            [torch.rand(shape, generator=g, device=g.device).to(device) for g in self.generators]
        )

    def normal(self, kind: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.stack(
            [torch.randn(shape, generator=g, device=g.device).to(device) for g in self.generators]
        )


class OfficialOrderNoise:
    """One CPU generator drawn in the official ``generate()`` order for a static batch of ``rows`` rows.

    Per step: 2B caption-dropout uniforms, (B, L, V) uniforms for the token Gumbel noise, (B, L) for the
    confidence Gumbel noise. Head: (B*L, C) initial normals, then (2B*L, C) per step of which the
    conditional half is used (the official sampler also draws noise for the unconditional copy).
    """

    def __init__(self, generator: torch.Generator, rows: int):
        self.generator = generator
        self.rows = rows

    def subset(self, rows: Sequence[int]) -> OfficialOrderNoise:
        if list(rows) not in ([], list(range(self.rows))):
            raise ValueError("OfficialOrderNoise replays a static batch: all rows must finish together")
        return self

    def caption_dropout(self) -> None:
        torch.rand(2 * self.rows, generator=self.generator)

    def uniform(self, kind: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.rand((self.rows, *shape), generator=self.generator).to(device)

    def normal(self, kind: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if kind == "head_step":
            n = self.rows * shape[0]
            full = torch.randn((2 * n, *shape[1:]), generator=self.generator)
            return full[:n].reshape(self.rows, *shape).to(device)
        return torch.randn((self.rows, *shape), generator=self.generator).to(device)
