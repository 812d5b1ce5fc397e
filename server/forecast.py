"""When will a row finish? Measured costs per batch size, and a simulation of the engine that uses them.

``CostModel`` fits, per token grid, a line ``seconds = a + b x rows`` to each of three measured costs: a
``start`` (text encoding of admitted rows), one unmasking ``step`` of a forward, and a ``finish`` (diffusion
head + decoder of the rows that took their last step); and keeps one ``overhead`` per iteration: the wall
time of an iteration that no forward accounts for (the step boundary on the event loop, whose thread also
parses requests and sends responses). The worker measures every forward and the engine every iteration,
and feeds them in as they come, so the model follows the hardware, the load and the batch sizes seen.
The fits are robust (Theil-Sen: the median of the pairwise slopes; the median for the overhead) over the
last ``window`` measurements: on a shared CPU single forwards can take ten times their usual time, and one
such outlier must not move a prediction. One batch size only: proportional to the rows.

``forecast`` replays the engine on those costs: running rows advance one step per iteration, rows that
reach their last step pay the finish, freed slots take the next waiting rows (FIFO, at most
``max_batch_size`` in flight, forwards of at most ``cap`` rows). It gives, for each waiting row, when it is
admitted and when it is done, which is what admission needs: the queue delay of a new request (its last
row's admission), its completion time (its last row's finish), and how long until either fits a limit.
``Lateness`` closes the loop: the forecast is a median, so about half of the requests finish after it and
a few by much more (an image's time in the batch spreads with the batch's composition and the machine's
other work). It keeps how late each recent request finished against its forecast, and its ``margin_s`` (a
high quantile of that) is what admission adds before comparing with a limit.
Pure: no torch, no asyncio.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

KINDS = ("start", "step", "finish")


class _Line:
    """A robust line through the last ``window`` (rows, seconds) measurements; refitted when asked after a change."""

    def __init__(self, window: int):
        self.points: deque[tuple[int, float]] = deque(maxlen=window)
        self._fit: tuple[float, float] | None = None

    def add(self, rows: int, seconds: float) -> None:
        self.points.append((rows, seconds))
        self._fit = None

    def __call__(self, rows: int) -> float:
        if self._fit is None:
            pts = list(self.points)
            slopes = [
                (y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(pts) for x2, y2 in pts[i + 1 :] if x2 != x1
            ]
            if slopes:
                slope = max(0.0, statistics.median(slopes))
                self._fit = (statistics.median(y - slope * x for x, y in pts), slope)
            else:  # one batch size seen: proportional (pessimistic below it where batching helps)
                self._fit = (0.0, statistics.median(y / x for x, y in pts))
        a, b = self._fit
        return max(0.0, a + b * rows)


class CostModel:
    """Robust fits of measured seconds per (kind, grid) against rows, and of the per-iteration overhead."""

    def __init__(self, window: int = 64):
        self.window = window
        self._lines: dict[tuple[str, Hashable], _Line] = {}
        self._overheads: deque[float] = deque(maxlen=window)
        self.overhead_s = 0.0

    def observe_overhead(self, seconds: float) -> None:
        """Seconds of one iteration's wall time outside its forwards."""
        self._overheads.append(max(0.0, seconds))
        self.overhead_s = statistics.median(self._overheads)

    def observe(self, kind: str, grid: Hashable, rows: int, seconds: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown cost kind {kind!r}; one of {KINDS}")
        if rows > 0 and seconds >= 0:
            self._lines.setdefault((kind, grid), _Line(self.window)).add(rows, seconds)

    def known(self, grid: Hashable) -> bool:
        return all((kind, grid) in self._lines for kind in ("step", "finish"))

    def cost(self, kind: str, grid: Hashable, rows: int, cap: int) -> float:
        """Seconds for ``rows`` rows of ``grid``, in forwards of at most ``cap`` rows; 0 for no rows."""
        if rows <= 0:
            return 0.0
        line = self._lines.get((kind, grid))
        if line is None:
            return 0.0 if kind == "start" else float("nan")  # start costs are small; the others are required
        full, rest = divmod(rows, cap)
        return full * line(cap) + (line(rest) if rest else 0.0)

    def table(self, kind: str, grid: Hashable, sizes: Sequence[int] = (1, 2, 4, 8, 16)) -> dict[int, float]:
        """The fitted seconds at some batch sizes (for logs and benchmarks); empty before a measurement."""
        line = self._lines.get((kind, grid))
        return {n: line(n) for n in sizes} if line is not None else {}


class Lateness:
    """Seconds by which recent requests finished after their forecast, and the margin that covers most of them.

    ``margin_s`` is the ``quantile`` of the last ``window`` errors (actual - predicted, early ones negative),
    never below 0, and 0 until ``least`` requests have finished: a handful of requests says nothing about a
    tail. Only successes count: an expired or cancelled request's actual time is unknown.
    """

    def __init__(self, quantile: float = 0.99, window: int = 256, least: int = 20):
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be between 0 and 1, got {quantile}")
        self.quantile, self.least = quantile, least
        self._errors: deque[float] = deque(maxlen=window)
        self.margin_s = 0.0

    def observe(self, predicted: float, actual: float) -> None:
        self._errors.append(actual - predicted)
        if len(self._errors) >= self.least:
            errors = sorted(self._errors)
            self.margin_s = max(0.0, errors[min(len(errors) - 1, math.ceil(self.quantile * len(errors)) - 1)])


@dataclass(frozen=True)
class Forecast:
    """Per waiting row (in queue order): seconds from now until it is admitted, and until it is done."""

    admitted: list[float]
    finished: list[float]


def forecast(
    running: Sequence[tuple[Hashable, int, int]],
    waiting: Sequence[tuple[Hashable, int]],
    costs: CostModel,
    max_batch_size: int,
    cap: int,
    elapsed: float = 0.0,
    refill: bool = True,
) -> Forecast | None:
    """Replay the engine from the state it was in ``elapsed`` seconds ago.

    ``running``: (grid, steps left, steps) of each row in flight; ``waiting``: (grid, steps) of each queued row
    in FIFO order. With ``refill``, the load is taken to go on as it is: a slot freed after the queue ran dry
    is taken by a later arrival (of the grid and steps of the row that left) as long as the batch holds fewer
    rows of that grid than running and waiting rows hold now. Without it a busy batch would seem to drain
    under the waiting rows, which on a CPU (cost ~ rows) makes them look up to twice as fast as under a
    steady load. Returns None when a grid involved has no measured step or finish cost yet.
    """
    grids = {g for g, _, _ in running} | {g for g, _ in waiting}
    if not all(costs.known(g) for g in grids):
        return None
    level = Counter(g for g, _, _ in running) + Counter(g for g, _ in waiting) if refill else Counter()
    admitted = [0.0] * len(waiting)
    finished = [0.0] * len(waiting)
    # (grid, steps left, steps, index in waiting; -1: a row that is not ours to report)
    active = [(g, max(1, left), steps, -1) for g, left, steps in running]
    queue = deque(enumerate(waiting))
    t, remaining = 0.0, len(waiting)
    while remaining:
        joined: Counter = Counter()
        while queue and len(active) < max_batch_size:
            i, (grid, steps) = queue.popleft()
            admitted[i] = t
            active.append((grid, max(1, steps), steps, i))
            joined[grid] += 1
        t += sum(costs.cost("start", g, n, cap) for g, n in joined.items())
        per_grid = Counter(a[0] for a in active)
        iteration = costs.overhead_s + sum(costs.cost("step", g, n, cap) for g, n in per_grid.items())
        m = min(a[1] for a in active)
        t += m * iteration
        done = [a for a in active if a[1] == m]
        t += sum(costs.cost("finish", g, n, cap) for g, n in Counter(a[0] for a in done).items())
        for a in done:
            if a[3] >= 0:
                finished[a[3]] = t
                remaining -= 1
        active = [(g, left - m, steps, i) for g, left, steps, i in active if left > m]
        if not queue:  # later arrivals take the freed slots, up to the present load
            have = Counter(a[0] for a in active)
            for g, _, steps, _ in done:
                if have[g] < level[g] and len(active) < max_batch_size:
                    have[g] += 1
                    active.append((g, max(1, steps), steps, -1))
                    t += costs.cost("start", g, 1, cap)
    # Times are from the snapshot; the part already past is gone (nothing is admitted before now).
    return Forecast([max(0.0, a - elapsed) for a in admitted], [max(0.0, f - elapsed) for f in finished])


def alone(
    grid: Hashable, rows: int, steps: int, costs: CostModel, max_batch_size: int, cap: int
) -> float | None:
    """Seconds for ``rows`` rows of ``steps`` steps on an idle engine; None before measurements."""
    f = forecast([], [(grid, steps)] * rows, costs, max_batch_size, cap, refill=False)
    return None if f is None else max(f.finished)
