"""What a request becomes inside the server: a ``Job`` of n rows, each row a ``Ticket``; plus the edit input
and the progress items a streaming job receives. Plain dataclasses, created by the routes, driven by the
engine (server/engine.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from dcar.model.params import EditSpec, RowResult, SamplingParams


@dataclass(eq=False)
class EditInput:
    """A decoded edit upload: image (3, H, W) in [-1, 1]; mask (1, H, W), 1 = regenerate; blend = keep the
    input's pixels outside the mask."""

    image: torch.Tensor
    mask: torch.Tensor
    blend: bool = True


@dataclass(frozen=True)
class Progress:
    """One unmasking step of one image, as streamed to the client."""

    index: int
    step: int
    steps: int
    revealed: int
    tokens: int
    preview: str | None = None  # base64 PNG


@dataclass(eq=False)
class Job:
    """One request: its rows' parameters, its deadline, and where results go.

    ``future`` resolves to the list of ``RowResult`` in row order, or raises an ``ApiError``. A streaming job
    also gets ``Progress`` items on ``events``, then ``None`` when the future is done.
    """

    id: str
    task: str  # "generate" or "edit"
    params: list[SamplingParams]
    timeout: float
    edit: EditInput | None = None
    stream: bool = False
    preview: bool = False
    # OpenAI partial images: previews only at these steps, at this longest side (None: every step, and the
    # server's preview_size)
    preview_steps: frozenset[int] | None = None
    preview_size: int | None = None
    submitted: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None
    events: asyncio.Queue | None = None
    closed: str | None = None  # why it ended early: disconnected, deadline, failed, shutdown
    spec: EditSpec | None = None  # tokenized edit input, prepared by the worker when first admitted
    results: list[RowResult | None] = field(default_factory=list)

    @property
    def deadline(self) -> float:
        return self.submitted + self.timeout

    def wants_preview(self, step: int) -> bool:
        return self.preview and (self.preview_steps is None or step in self.preview_steps)

    @property
    def done(self) -> bool:
        return self.future is not None and self.future.done()


@dataclass(eq=False)
class Ticket:
    """One row of a job, from the queue to its result. The sampler carries it as the row's tag."""

    job: Job
    index: int
    grid: tuple[int, int]
    enqueued: float
    admitted: float | None = None
    compute_s: float = 0.0  # this row's share of the batches it was in

    @property
    def params(self) -> SamplingParams:
        return self.job.params[self.index]
