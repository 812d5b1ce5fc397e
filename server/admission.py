"""Admission by predicted completion: accept a request only if the engine can finish it in time.

``admit_or_refuse`` runs at submission, on the event loop, with the engine's state (rows running, rows
waiting) and its measured costs (server/forecast.py). In order:

1. ``queue_full`` (429) when the rows that find no free slot in the running batch would exceed
   ``max_queue`` rows; rows that fit the running batch never count as queued.
2. ``timeout_too_short`` (400) when the request could not finish in its timeout even on an idle engine:
   retrying cannot help.
3. ``queue_full`` (429) when the request's last row would wait longer than ``max_queue_delay_s`` for a slot,
   counting the forecast's margin (``Limits.margin_s``, server/forecast.py ``Lateness``): the wait plus the
   margin must fit. So an accepted request takes at most about ``max_queue_delay_s`` plus its own time in the
   batch, with the margin's quantile as the confidence; the backlog is bounded in seconds, and latency
   recovers within about that much once the load stops. A request that fits the running batch's free slots
   together with the rows already waiting (they all join at the next step boundary) always passes.
4. ``deadline_unmeetable`` (429) when it would finish after its deadline, margin included.

Every 429 carries ``Retry-After``: the predicted seconds until the same request would pass (the queue has
shrunk below the limit, or the backlog has shrunk enough for the deadline), rounded up, at least 1.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from dcar.server.errors import ApiError
from dcar.server.forecast import CostModel, alone, forecast


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    cap: int
    max_queue: int
    max_queue_delay_s: float
    # Seconds added to the forecast: how late recent requests finished (a high quantile, forecast.Lateness).
    margin_s: float = 0.0


@dataclass(frozen=True)
class Request:
    grid: Hashable
    rows: int
    steps: int
    timeout: float
    remaining: float  # seconds until its deadline


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def admit_or_refuse(
    req: Request,
    running: Sequence[tuple[Hashable, int, int]],
    waiting: Sequence[tuple[Hashable, int]],
    costs: CostModel,
    limits: Limits,
    elapsed: float = 0.0,
    position: int | None = None,
) -> float | None:
    """Raise the refusal, or return the predicted seconds until the request is done (None: no measurements yet).

    ``running``: (grid, steps left, steps) per row in flight; ``waiting``: (grid, steps) per queued row, in the
    order they will be admitted; ``position``: where the request's rows go in that order (None: at the end,
    first come first served; earlier under priority scheduling); ``elapsed``: seconds since the engine state
    was last reported (see ``forecast``).
    """
    queued = len(waiting)
    at = queued if position is None else position
    free = max(0, limits.max_batch_size - len(running))
    fc = forecast(
        running,
        [*waiting[:at], *[(req.grid, req.steps)] * req.rows, *waiting[at:]],
        costs,
        limits.max_batch_size,
        limits.cap,
        elapsed,
    )
    mine = slice(at, at + req.rows)  # the request's rows in the forecast
    if queued + req.rows - free > limits.max_queue:
        # Passes once the queue is down to max_queue - rows: after the shrink-th queued row is admitted.
        shrink = queued + req.rows - limits.max_queue
        # the queued rows' admission times without the refused request: placed ahead of them (priority), its
        # rows would delay them by its whole run and the Retry-After with them
        ahead = (
            fc
            if at == queued
            else forecast(running, waiting, costs, limits.max_batch_size, limits.cap, elapsed)
        )
        wait = ahead.admitted[shrink - 1] if ahead is not None and 0 < shrink <= queued else 0.0
        raise ApiError(
            429,
            "queue_full",
            f"{queued} rows wait for a slot and the running batch has {free} free; "
            f"n={req.rows} more would exceed max_queue={limits.max_queue} waiting rows; retry after "
            f"{max(1, math.ceil(wait))} s",
            headers=retry_after(wait),
            reason="queue_full",
        )
    if fc is None:
        return None
    least = alone(req.grid, req.rows, req.steps, costs, limits.max_batch_size, limits.cap)
    if least is not None and least > req.timeout:
        raise ApiError(
            400,
            "timeout_too_short",
            f"timeout={req.timeout:g} s is shorter than this request takes "
            f"on an idle server (predicted {least:.2f} s for n={req.rows}, steps={req.steps}); allow "
            "more time",
            param="timeout",
            reason="invalid",
        )
    delay = fc.admitted[mine][-1]
    allowed = max(0.0, limits.max_queue_delay_s - limits.margin_s)
    fits_now = at + req.rows <= free  # it joins at the next step boundary: no backlog to bound
    if delay > allowed and not fits_now:
        raise ApiError(
            429,
            "queue_full",
            f"the work ahead of this request would keep it waiting {delay:.1f} s for a slot; the limit is "
            f"max_queue_delay_s={limits.max_queue_delay_s:g} less the forecast's margin of "
            f"{limits.margin_s:.1f} s; retry after {max(1, math.ceil(delay - allowed))} s",
            headers=retry_after(delay - allowed),
            reason="queue_full",
        )
    done = max(fc.finished[mine])
    late = done + limits.margin_s
    if late > req.remaining:
        raise ApiError(
            429,
            "deadline_unmeetable",
            f"predicted completion in {done:.2f} s (+{limits.margin_s:.2f} s margin) exceeds timeout="
            f"{req.timeout:g} s ({req.remaining:.2f} s left); retry after "
            f"{max(1, math.ceil(late - req.remaining))} s or allow more time",
            param="timeout",
            headers=retry_after(late - req.remaining),
            reason="deadline",
        )
    return done
