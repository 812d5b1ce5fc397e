"""The batching policy and the service-time estimate: pure objects, no torch, no asyncio (unit-testable alone).

``BatchPolicy`` decides *which* waiting rows join *which* running group at a step boundary and how long an
idle engine keeps collecting rows; ``ServiceEstimate`` turns measured step times into a predicted completion
time (deadline-aware admission) and a ``Retry-After``. The engine (server/engine.py) asks them and executes.

Vocabulary: a *row* is one image; a *group* is one running ``BatchState`` (rows that share a token grid and
go through one forward per step). Several groups may run at once (other image sizes, or the halves of a
batch split after out-of-memory); each engine iteration steps every group once.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol


class Waiting(Protocol):
    """What the policy needs to know about a waiting row."""

    grid: Hashable
    enqueued: float


@dataclass(frozen=True)
class GroupView:
    """A running group as the policy sees it: its token grid and how many rows it holds."""

    grid: Hashable
    size: int


class BatchPolicy:
    """Admission between steps, first come first served.

    * ``max_batch_size`` bounds the rows in flight (all groups together);
    * ``cap`` bounds the rows of one forward; it starts at ``max_batch_size`` and is halved below the size
      of a batch that ran out of memory (``lower_cap``);
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
        head = waiting[0]
        same_grid = sum(1 for w in waiting if w.grid == head.grid)
        if same_grid >= min(self.cap, self.max_batch_size):
            return 0.0
        return max(0.0, head.enqueued + self.max_wait_s - now)

    def admit(self, waiting: Sequence[Waiting], groups: Sequence[GroupView]) -> list[int]:
        """Targets for the longest FIFO prefix of ``waiting`` that fits now.

        Returns one group index per admitted row: an existing group of the same grid with room under the cap,
        else a new group (indices ``len(groups)``, ``len(groups) + 1``, ... in order of creation).
        """
        grids = [g.grid for g in groups]
        sizes = [g.size for g in groups]
        free = self.max_batch_size - sum(sizes)
        targets = []
        for w in waiting:
            if free <= 0:
                break
            target = next((i for i, (g, s) in enumerate(zip(grids, sizes)) if g == w.grid and s < self.cap), None)
            if target is None:
                grids.append(w.grid)
                sizes.append(0)
                target = len(grids) - 1
            sizes[target] += 1
            free -= 1
            targets.append(target)
        return targets

    def merges(self, groups: Sequence[GroupView]) -> list[list[int]]:
        """Partition of group indices: same-grid groups packed together while they fit under the cap.

        Groups shrink as rows finish; packing them back saves forwards. Each part keeps index order.
        """
        parts: list[list[int]] = []
        sizes: list[int] = []
        for i, g in enumerate(groups):
            for p, part in enumerate(parts):
                if groups[part[0]].grid == g.grid and sizes[p] + g.size <= self.cap:
                    part.append(i)
                    sizes[p] += g.size
                    break
            else:
                parts.append([i])
                sizes.append(g.size)
        return parts

    def lower_cap(self, failed_size: int) -> int:
        """A forward of ``failed_size`` rows ran out of memory: cap at half of it (at least 1)."""
        self.cap = max(1, min(self.cap, failed_size // 2))
        return self.cap


class ServiceEstimate:
    """Exponential moving averages of the engine's step time, for admission and ``Retry-After``.

    ``step_s``: wall time of one engine iteration (every running row advances one step);
    ``row_step_s``: that time divided by the rows it advanced (the marginal cost of a row-step).
    Both include the head and decoder of rows that finished in the iteration, amortised.
    """

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.step_s: float | None = None
        self.row_step_s: float | None = None

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= 0 or seconds < 0:
            return
        per_row = seconds / rows
        a = self.alpha
        self.step_s = seconds if self.step_s is None else (1 - a) * self.step_s + a * seconds
        self.row_step_s = per_row if self.row_step_s is None else (1 - a) * self.row_step_s + a * per_row

    def predict(self, rows: int, steps: int, waiting: int, running: int, capacity: int) -> float | None:
        """Seconds until ``rows`` new rows of ``steps`` steps are done; None before any measurement.

        Rows beyond ``capacity`` (ours included) must wait for earlier rows to finish, at the measured
        throughput; then ours take ``steps`` iterations of a batch of the expected size.
        """
        if self.step_s is None or self.row_step_s is None:
            return None
        total = waiting + running + rows
        queued_work = max(0, total - capacity) * steps * self.row_step_s
        batch = min(total, capacity)
        service = steps * max(self.step_s, self.row_step_s * batch)
        return queued_work + service

    def retry_after(self, waiting: int, steps: int, low: int = 1, high: int = 600) -> int:
        """Whole seconds after which the queue will have worked off the ``waiting`` rows."""
        per_row = self.row_step_s if self.row_step_s is not None else 0.0
        seconds = waiting * steps * per_row
        return int(min(high, max(low, math.ceil(seconds))))
