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
reach their last step pay the finish, free slots take the next waiting rows at the next step boundary
(FIFO, at most ``max_batch_size`` in flight, forwards of at most ``cap`` rows). It gives, for each waiting
row, when it is admitted and when it is done, which is what admission needs: the queue delay of a new
request (its last row's admission), its completion time (its last row's finish), and how long until either
fits a limit.

``Lateness`` closes the loop: the forecast is a median, so about half of the requests finish after it and
a few by much more (an image's time in the batch spreads with the batch's composition and the machine's
other work). It keeps how late each recent request finished against its forecast, and its margin (a high
quantile of that) is what admission adds before comparing with a limit.

Pure: no torch, no asyncio.
"""

from __future__ import annotations

import math
import statistics
import threading
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

    ``margin(now)`` is the ``quantile`` of the errors (actual - predicted, early ones negative) of the last
    ``window`` requests that finished within ``max_age_s`` of ``now``, never below 0, and 0 while fewer than
    ``least`` such requests are known: a handful of requests says nothing about a tail. The age limit matters
    after a burst that found the engine idle: its rows were slowed by the rows that arrived after them, which
    no forecast of the present can know, and their errors must not hold the limits tight for long after.
    Only successes count: an expired or cancelled request's actual time is unknown.
    """

    def __init__(self, quantile: float = 0.99, window: int = 256, least: int = 20, max_age_s: float = 60.0):
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be between 0 and 1, got {quantile}")
        self.quantile, self.least, self.max_age_s = quantile, least, max_age_s
        self._errors: deque[tuple[float, float]] = deque(maxlen=window)  # (when it finished, error)
        self._margin: float | None = 0.0  # None: to compute again
        # The event loop observes and reads; a scrape of dcar_admission_margin_seconds reads too, and under
        # Ray's metrics_port that scrape runs on prometheus_client's own thread ("deque mutated during
        # iteration", or an IndexError after another thread's popleft).
        self._lock = threading.Lock()

    def observe(self, predicted: float, actual: float, now: float) -> None:
        with self._lock:
            self._errors.append((now, actual - predicted))
            self._margin = None

    def margin(self, now: float) -> float:
        with self._lock:
            while self._errors and self._errors[0][0] < now - self.max_age_s:
                self._errors.popleft()
                self._margin = None
            if self._margin is None:
                errors = sorted(e for _, e in self._errors)
                n = len(errors)
                self._margin = max(0.0, errors[math.ceil(self.quantile * n) - 1]) if n >= self.least else 0.0
            return self._margin


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
    in FIFO order. Rows join a busy engine only at a step boundary after now: the step in progress (started
    at the snapshot, or later) has no room for them. With ``refill``, the load is taken to go on as it is:
    once the queue has run dry, free slots are taken by later arrivals (of the grid and steps of the last row
    that left) as long as the batch holds fewer rows of that grid than running and waiting rows hold now.
    Without it a busy batch would seem to drain under the waiting rows, which on a CPU (cost ~ rows) makes
    them look up to twice as fast as under a steady load. Returns None when a grid involved has no measured
    step or finish cost yet.
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
    left_with: dict[Hashable, int] = {}  # per grid, the steps of the last row that left
    while remaining:
        # A busy engine takes rows in only at a step boundary, and the one in progress has passed: free slots
        # are taken at the first boundary from now on (waiting for it is ~half a step on average).
        can_join = not active or t > elapsed
        joined: Counter = Counter()
        while can_join and queue and len(active) < max_batch_size:
            i, (grid, steps) = queue.popleft()
            admitted[i] = t
            active.append((grid, max(1, steps), steps, i))
            joined[grid] += 1
        t += sum(costs.cost("start", g, n, cap) for g, n in joined.items())
        per_grid = Counter(a[0] for a in active)
        iteration = costs.overhead_s + sum(costs.cost("step", g, n, cap) for g, n in per_grid.items())
        m = 1 if queue and len(active) < max_batch_size else min(a[1] for a in active)
        t += m * iteration
        done = [a for a in active if a[1] == m]
        t += sum(costs.cost("finish", g, n, cap) for g, n in Counter(a[0] for a in done).items())
        for a in done:
            if a[3] >= 0:
                finished[a[3]] = t
                remaining -= 1
        active = [(g, left - m, steps, i) for g, left, steps, i in active if left > m]
        left_with.update({g: steps for g, _, steps, _ in done})
        if not queue:  # later arrivals take the freed slots (of the rows that left), up to the present load
            have = Counter(a[0] for a in active)
            for g, steps in left_with.items():
                while have[g] < level[g] and len(active) < max_batch_size:
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
