"""What a request becomes inside the server, and what the engine's two threads hand each other.

Loop side (owned by the event loop, server/engine.py): a ``Job`` of n rows, each row a ``Ticket``.
Worker side (server/worker.py): a ``RowSpec`` per admitted row, a frozen copy of what the model thread needs.
The two sides exchange only ``RowSpec``s, row ids and results; neither reads the other's objects.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import torch

from dcar.model.params import RowResult, SamplingParams

_EDIT_KEYS = itertools.count()


@dataclass(eq=False)
class EditInput:
    """A decoded edit upload: image (3, H, W) in [-1, 1]; mask (1, H, W), 1 = regenerate; blend = keep the
    input's pixels outside the mask. Never modified after decoding, so the worker may read it."""

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
    priority: int = 0  # lower first, with scheduling_policy=priority (else always 0)
    submitted: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None
    events: asyncio.Queue | None = None
    closed: str | None = None  # why it ended early: disconnected, deadline, failed, shutdown
    results: list[RowResult | None] = field(default_factory=list)
    results_compute_s: float = 0.0  # the compute shares of the rows in ``results``: wasted if the job fails
    enqueued: float | None = None  # time.monotonic() when its rows entered the queue
    predicted_s: float | None = None  # admission's forecast of seconds from enqueued to done
    admitted: list[float | None] = field(default_factory=list)  # per row: when it entered the running batch
    expiry: asyncio.TimerHandle | None = None  # ends the job at its deadline (set by Engine.submit)
    # rows of a later job of a lower priority value were queued ahead of it: its forecast no longer held
    overtaken: bool = False
    # the key of its prepared edit input in the worker's cache: unique per job, never the request id, which
    # comes from the client's X-Request-Id and may be shared by concurrent requests
    edit_key: str = field(default_factory=lambda: f"edit-{next(_EDIT_KEYS)}")

    @property
    def deadline(self) -> float:
        return self.submitted + self.timeout

    def queue_wait(self, index: int) -> float:
        """Seconds row ``index`` waited between the queue and the running batch (0 if never admitted)."""
        admitted = self.admitted[index] if index < len(self.admitted) else None
        return 0.0 if admitted is None or self.enqueued is None else admitted - self.enqueued

    def wants_preview(self, step: int) -> bool:
        return self.preview and (self.preview_steps is None or step in self.preview_steps)

    @property
    def done(self) -> bool:
        return self.future is not None and self.future.done()


@dataclass(eq=False)
class Ticket:
    """One row of a job on the loop side, from the queue to its result."""

    id: int  # the row id the worker knows this row by
    job: Job
    index: int
    grid: tuple[int, int]
    enqueued: float
    steps_done: int = 0  # as last reported by the worker
    compute_s: float = 0.0  # this row's share of the forwards it was in

    @property
    def params(self) -> SamplingParams:
        return self.job.params[self.index]

    @property
    def steps_left(self) -> int:
        return max(1, self.params.steps - self.steps_done)

    def spec(self) -> RowSpec:
        job = self.job
        preview_steps = frozenset() if not job.preview else job.preview_steps
        return RowSpec(
            self.id,
            self.params,
            self.grid,
            job.deadline,
            job.stream,
            preview_steps,
            job.preview_size,
            job.edit,
            job.edit_key if job.edit is not None else None,
        )


@dataclass(frozen=True)
class RowSpec:
    """What the worker gets for one admitted row: plain values, copied from the job at admission."""

    id: int
    params: SamplingParams
    grid: tuple[int, int]
    deadline: float  # time.monotonic() seconds; the worker returns to the loop once it passes
    stream: bool  # a client waits for every step's progress event
    preview_steps: frozenset[int] | None = frozenset()  # steps that carry a preview image; None: every step
    preview_size: int | None = None  # longest side of previews; None: the server's preview_size
    edit: EditInput | None = None
    edit_key: str | None = None  # rows of one edit job share one tokenized input (the worker caches it)

    def wants_preview(self, step: int) -> bool:
        return self.preview_steps is None or step in self.preview_steps
