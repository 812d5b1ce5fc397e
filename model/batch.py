"""The sampler's running-batch state: rows, their knobs on the device, captions, and the padding buckets.

``BatchState`` is what ``Sampler.start`` returns and ``step``/``finish`` advance. Everything a step needs per
row lives on the device (``RowKnobs``), created when rows are admitted, so a step never copies knobs from
the host. Bucketed shapes (``bucket``) keep the number of distinct forward shapes small, which is what
CUDA graphs and ``torch.compile`` without dynamic shapes need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dcar.model.maskgit import GUIDANCE_DECAYS
from dcar.model.noise import OfficialOrderNoise, RowNoise
from dcar.model.params import EditSpec, SamplingParams
from dcar.model.transformer import TextKV

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CAPTION_BUCKETS = (32, 64, 128, 300)


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; past the largest, the next multiple of it (never smaller than n)."""
    for b in buckets:
        if n <= b:
            return b
    top = buckets[-1]
    return -(-n // top) * top


@dataclass
class Caption:
    """Raw caption inputs of 2B interleaved rows, for the uncached path: states (2B, L, C), mask, drop."""

    states: torch.Tensor
    mask: torch.Tensor
    drop: torch.Tensor

    def select(self, idx: list[int]) -> Caption:
        return Caption(self.states[idx], self.mask[idx], self.drop[idx])

    @staticmethod
    def cat(parts: list[Caption]) -> Caption:
        n = max(p.states.shape[1] for p in parts)
        pad = [
            (F.pad(p.states, (0, 0, 0, n - p.states.shape[1])), F.pad(p.mask, (0, n - p.mask.shape[1])))
            for p in parts
        ]
        return Caption(
            torch.cat([s for s, _ in pad]), torch.cat([m for _, m in pad]), torch.cat([p.drop for p in parts])
        )


@dataclass
class Row:
    """Sampler-side state of one image (host side: what the engine reads without touching the device)."""

    params: SamplingParams
    edit: EditSpec | None = None
    tag: object = None
    step: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    final_hidden: tuple[torch.Tensor, torch.Tensor] | None = None  # (cond, uncond) (L, C) after last step

    @property
    def done(self) -> bool:
        return self.step >= self.params.steps

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


@dataclass
class RowKnobs:
    """Per-row knobs and step counters as device tensors (B,); the device twin of the rows' params.

    ``step`` advances on the device in step with ``Row.step`` on the host, so a step reads no host value.
    """

    step: torch.Tensor  # int64
    steps: torch.Tensor  # int64
    guidance_scale: torch.Tensor  # float64
    guidance_decay: torch.Tensor  # int64, index into GUIDANCE_DECAYS
    randomize_temperature: torch.Tensor  # float64
    annealing: torch.Tensor  # bool
    residual_temperature: torch.Tensor  # float32

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device: torch.device) -> RowKnobs:
        def t(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device)

        return cls(
            step=t([0] * len(params), torch.long),
            steps=t([p.steps for p in params], torch.long),
            guidance_scale=t([p.guidance_scale for p in params], torch.float64),
            guidance_decay=t([GUIDANCE_DECAYS.index(p.guidance_decay) for p in params], torch.long),
            randomize_temperature=t([p.randomize_temperature for p in params], torch.float64),
            annealing=t([p.softmax_temperature_annealing for p in params], torch.bool),
            residual_temperature=t([p.residual_temperature for p in params], torch.float32),
        )

    def _map(self, fn) -> RowKnobs:
        return RowKnobs(**{k: fn(v) for k, v in vars(self).items()})

    def select(self, idx: torch.Tensor) -> RowKnobs:
        return self._map(lambda v: v[idx])

    @staticmethod
    def cat(parts: Sequence[RowKnobs]) -> RowKnobs:
        return RowKnobs(**{k: torch.cat([getattr(p, k) for p in parts]) for k in vars(parts[0])})


@dataclass
class BatchState:
    """A running batch. ``ids`` (B, L); ``text`` holds 2B interleaved rows (cond 2i, uncond 2i+1):
    cached keys/values, or the raw captions when the sampler recomputes them every step."""

    grid: tuple[int, int]
    rows: list[Row]
    ids: torch.Tensor
    text: TextKV | Caption
    noise: RowNoise | OfficialOrderNoise
    predicted: torch.Tensor  # (B, L) the latest sampled ids, for previews
    knobs: RowKnobs
    padded_text: TextKV | None = None  # ``text`` padded to the batch bucket (built on first use)

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, idx: Sequence[int]) -> BatchState:
        """The same batch restricted to rows ``idx`` (dropping cancelled or finished rows)."""
        idx = list(idx)
        pairs = [j for i in idx for j in (2 * i, 2 * i + 1)]
        dev_idx = torch.tensor(idx, dtype=torch.long).to(self.ids.device)
        return BatchState(
            self.grid,
            [self.rows[i] for i in idx],
            self.ids[dev_idx],
            self.text.select(pairs),
            self.noise.subset(idx),
            self.predicted[dev_idx],
            self.knobs.select(dev_idx),
        )

    @staticmethod
    def merge(a: BatchState, b: BatchState) -> BatchState:
        """Admit the rows of ``b`` into ``a``; both must use the same token grid."""
        if a.grid != b.grid:
            raise ValueError(f"cannot merge batches with token grids {a.grid} and {b.grid}")
        if not (isinstance(a.noise, RowNoise) and isinstance(b.noise, RowNoise)):
            raise ValueError("only per-row noise sources can be merged")
        return BatchState(
            a.grid,
            a.rows + b.rows,
            torch.cat([a.ids, b.ids]),
            type(a.text).cat([a.text, b.text]),  # type: ignore[list-item]  # both of one kind
            RowNoise(a.noise.generators + b.noise.generators),
            torch.cat([a.predicted, b.predicted]),
            RowKnobs.cat([a.knobs, b.knobs]),
        )
