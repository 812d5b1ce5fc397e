"""The batching policy: a pure object, no torch, no asyncio.

``BatchPolicy`` decides *how many* waiting rows join the running batch at a step boundary, how long an idle
engine keeps collecting rows, and holds the one per-forward cap; ``pack`` groups rows into forwards under
that cap. The engine (server/engine.py) asks and executes; the worker (server/worker.py) packs with the cap
the engine hands it in each plan.

Vocabulary: a *row* is one image; a *group* is one running ``BatchState`` (rows that share a token grid and
go through one forward per step). Several groups may run at once (other image sizes, or the parts of a
batch above the cap); each engine iteration steps every group once.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol


class Waiting(Protocol):
    """What the policy needs to know about a waiting row (read-only, so any row type with these fits)."""

    @property
    def grid(self) -> Hashable: ...

    @property
    def enqueued(self) -> float: ...


@dataclass(frozen=True)
class GroupView:
    """A running group as the policy sees it: its token grid and how many rows it holds."""

    grid: Hashable
    size: int


class BatchPolicy:
    """Admission between steps, in the order of the waiting rows (the engine keeps that order: arrival, or
    priority then arrival under ``scheduling_policy=priority``); the policy only counts rows.

    * ``max_batch_size`` bounds the rows in flight (all groups together);
    * ``cap`` bounds the rows of one forward; it starts at ``max_batch_size`` and is halved below the size
      of a batch that ran out of memory (``lower_cap``). It is the only cap: plans carry its value;
    * an idle engine waits up to ``max_wait_s`` after the oldest waiting row arrived, or until a full batch of
      that row's grid is waiting (Triton's ``max_queue_delay``, Ray's timer from the first arrival).
    """

    def __init__(self, max_batch_size: int, max_wait_s: float):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.cap = max_batch_size

    def start_delay(self, waiting: Sequence[Waiting], now: float) -> float | None:
        """For an idle engine: seconds to keep collecting (0 = start now); None when nothing waits."""
        if not waiting:
            return None
        # the oldest row, not the head of the queue: under priority scheduling the head may be a later row
        # that went ahead, whose arrival would start the wait again
        head = min(waiting, key=lambda w: w.enqueued)
        same_grid = sum(1 for w in waiting if w.grid == head.grid)
        if same_grid >= min(self.cap, self.max_batch_size):
            return 0.0
        return max(0.0, head.enqueued + self.max_wait_s - now)

    def free_slots(self, running: int) -> int:
        return max(0, self.max_batch_size - running)

    def admit(self, waiting: Sequence[Waiting], running: int) -> int:
        """How many rows of the FIFO ``waiting`` join now, with ``running`` rows in flight."""
        return min(len(waiting), self.free_slots(running))

    def lower_cap(self, failed_size: int) -> int:
        """A forward of ``failed_size`` rows ran out of memory: cap at half of it (at least 1)."""
        self.cap = max(1, min(self.cap, failed_size // 2))
        return self.cap


def pack(groups: Sequence[GroupView], cap: int) -> list[list[tuple[int, int, int]]]:
    """Forwards for ``groups`` under ``cap``: each a list of (group index, first row, end row) slices.

    Groups above the cap are cut into cap-sized slices; slices of one grid are packed together while they fit
    (first fit, in index order), so groups that shrank as rows finished go back into one forward.
    """
    slices = []
    for i, g in enumerate(groups):
        slices += [(i, s, min(s + cap, g.size)) for s in range(0, g.size, cap)]
    parts: list[list[tuple[int, int, int]]] = []
    sizes: list[int] = []
    for sl in slices:
        grid, n = groups[sl[0]].grid, sl[2] - sl[1]
        for p, part in enumerate(parts):
            if groups[part[0][0]].grid == grid and sizes[p] + n <= cap:
                part.append(sl)
                sizes[p] += n
                break
        else:
            parts.append([sl])
            sizes.append(n)
    return parts
