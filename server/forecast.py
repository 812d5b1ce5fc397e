"""When will a row finish? Measured costs per batch size, and a simulation of the engine that uses them.

``CostModel`` keeps, per token grid and per number of rows, a moving average of three measured costs: a
``start`` (text encoding of admitted rows), one unmasking ``step`` of a forward, and a ``finish`` (diffusion
head + decoder of the rows that took their last step). The worker measures every forward; the engine feeds
the measurements in after each iteration, so the model follows the hardware, the load and the batch sizes
actually seen. A size never measured is interpolated between its measured neighbours, or extrapolated
from the two largest (proportionally from one).

``forecast`` replays the engine on those costs: running rows advance one step per iteration, rows that
reach their last step pay the finish, freed slots take the next waiting rows (FIFO, at most
``max_batch_size`` in flight, forwards of at most ``cap`` rows). It gives, for each waiting row, when it is
admitted and when it is done, which is what admission needs: the queue delay of a new request (its last
row's admission), its completion time (its last row's finish), and how long until either fits a limit.
Arrivals after now are unknown and not simulated. Pure: no torch, no asyncio.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

KINDS = ("start", "step", "finish")


class CostModel:
    """Moving averages of measured seconds per (kind, grid, rows)."""

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self._tables: dict[tuple[str, Hashable], dict[int, float]] = {}

    def observe(self, kind: str, grid: Hashable, rows: int, seconds: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown cost kind {kind!r}; one of {KINDS}")
        if rows <= 0 or not seconds >= 0:
            return
        table = self._tables.setdefault((kind, grid), {})
        old = table.get(rows)
        table[rows] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def known(self, grid: Hashable) -> bool:
        return all((kind, grid) in self._tables for kind in ("step", "finish"))

    def cost(self, kind: str, grid: Hashable, rows: int, cap: int) -> float:
        """Seconds for ``rows`` rows of ``grid``, in forwards of at most ``cap`` rows; 0 for no rows."""
        if rows <= 0:
            return 0.0
        table = self._tables.get((kind, grid))
        if not table:
            return 0.0 if kind == "start" else float("nan")  # start costs are small; the others are required
        full, rest = divmod(rows, cap)
        return full * _lookup(table, cap) + (_lookup(table, rest) if rest else 0.0)

    def table(self, kind: str, grid: Hashable) -> dict[int, float]:
        """The measured averages (for logs and benchmarks)."""
        return dict(sorted(self._tables.get((kind, grid), {}).items()))


def _lookup(table: dict[int, float], rows: int) -> float:
    if rows in table:
        return table[rows]
    sizes = sorted(table)
    below = [s for s in sizes if s < rows]
    above = [s for s in sizes if s > rows]
    if below and above:
        lo, hi = below[-1], above[0]
        return table[lo] + (table[hi] - table[lo]) * (rows - lo) / (hi - lo)
    if above:  # smaller than anything measured: no faster than the smallest measured batch
        return table[above[0]]
    top = sizes[-1]
    if len(sizes) == 1:  # one point: proportional (pessimistic where batching helps)
        return table[top] * rows / top
    prev = sizes[-2]
    slope = max(0.0, (table[top] - table[prev]) / (top - prev))
    return table[top] + slope * (rows - top)


@dataclass(frozen=True)
class Forecast:
    """Per waiting row (in queue order): seconds from now until it is admitted, and until it is done."""

    admitted: list[float]
    finished: list[float]


def forecast(running: Sequence[tuple[Hashable, int]], waiting: Sequence[tuple[Hashable, int]], costs: CostModel,
             max_batch_size: int, cap: int, elapsed: float = 0.0) -> Forecast | None:
    """Replay the engine from the state it was in ``elapsed`` seconds ago.

    ``running``: (grid, steps left) of each row in flight; ``waiting``: (grid, steps) of each queued row in
    FIFO order. Returns None when a grid involved has no measured step or finish cost yet.
    """
    grids = {g for g, _ in running} | {g for g, _ in waiting}
    if not all(costs.known(g) for g in grids):
        return None
    admitted = [0.0] * len(waiting)
    finished = [0.0] * len(waiting)
    active: list[tuple[Hashable, int, int]] = [(g, max(1, left), -1) for g, left in running]  # (grid, left, index)
    queue = deque(enumerate(waiting))
    t, remaining = 0.0, len(waiting)
    while remaining:
        joined: Counter = Counter()
        while queue and len(active) < max_batch_size:
            i, (grid, steps) = queue.popleft()
            admitted[i] = t
            active.append((grid, max(1, steps), i))
            joined[grid] += 1
        t += sum(costs.cost("start", g, n, cap) for g, n in joined.items())
        per_grid = Counter(g for g, _, _ in active)
        iteration = sum(costs.cost("step", g, n, cap) for g, n in per_grid.items())
        m = min(left for _, left, _ in active)
        t += m * iteration
        done = [a for a in active if a[1] == m]
        t += sum(costs.cost("finish", g, n, cap) for g, n in Counter(g for g, _, _ in done).items())
        for _, _, i in done:
            if i >= 0:
                finished[i] = t
                remaining -= 1
        active = [(g, left - m, i) for g, left, i in active if left > m]
    # Times are from the snapshot; the part already past is gone (nothing is admitted before now).
    return Forecast([max(0.0, a - elapsed) for a in admitted], [max(0.0, f - elapsed) for f in finished])


def alone(grid: Hashable, rows: int, steps: int, costs: CostModel, max_batch_size: int, cap: int) -> float | None:
    """Seconds for ``rows`` rows of ``steps`` steps on an idle engine; None before measurements."""
    f = forecast([], [(grid, steps)] * rows, costs, max_batch_size, cap)
    return None if f is None else max(f.finished)
