"""What the engine's loop makes of an ``Outcome``, the worker's report on one plan (server/worker.py).

The measured seconds feed the cost model (server/forecast.py) and, for real work, the metrics and each
row's share of compute; progress goes onto the rows' tickets and streams, results into their jobs, failures
to their jobs. Ending a job stays with the engine (server/engine.py), which owns the jobs: ``deliver`` calls
back into it, at the moment the inline loop would have.
"""

from __future__ import annotations

from collections.abc import Callable

from dcar.model.params import RowResult
from dcar.server.errors import ApiError
from dcar.server.failures import failure_error, failure_reason
from dcar.server.forecast import CostModel
from dcar.server.jobs import Job, Progress, Ticket
from dcar.server.metrics import Metrics
from dcar.server.worker import Outcome


def learn(out: Outcome, costs: CostModel, metrics: Metrics, running: dict[int, Ticket], count: bool) -> None:
    """Feed the measured costs into the cost model; with ``count`` (real work, not warm-up) also into the
    metrics and the running rows' compute shares."""
    for grid, rows, seconds in out.starts:
        costs.observe("start", grid, rows, seconds)
    for f in out.forwards:
        costs.observe("step", f.grid, len(f.rows), f.step_s)
        if f.finished:
            costs.observe("finish", f.grid, f.finished, f.finish_s)
        if count:
            metrics.batch(len(f.rows), f.step_s + f.finish_s)
            share = (f.step_s + f.finish_s) / len(f.rows)
            for rid in f.rows:
                if (t := running.get(rid)) is not None:
                    t.compute_s += share


def deliver(
    out: Outcome,
    running: dict[int, Ticket],
    metrics: Metrics,
    finish: Callable[[Job, list[RowResult]], None],
    fail: Callable[[Job, ApiError], None],
) -> bool:
    """Progress, results and failures onto the rows in ``running``; rows with a result or a failure leave it.

    ``finish(job, results)`` as soon as a job has every row's result; ``fail(job, error)`` for a failed row of
    a job still running. True when a failure may be the engine's own, not the row's (out-of-memory and a
    non-finite row are the row's): the engine then probes the model.
    """
    for ev, preview in out.progress:
        t = running.get(ev.tag)  # type: ignore[call-overload]  # the sampler's row tags are the row ids
        if t is None:
            continue
        t.steps_done = ev.step
        job = t.job
        if job.events is not None and not job.done:
            job.events.put_nowait(Progress(t.index, ev.step, ev.steps, ev.revealed, ev.tokens, preview))
    for res in out.results:
        t = running.pop(res.tag, None)  # type: ignore[call-overload]  # row ids, as above
        if t is None:
            continue
        job = t.job
        if job.done:  # ended while its last step ran
            metrics.rows_dropped(job.closed or "finished", 1, t.compute_s)
            continue
        job.results[t.index] = res
        job.results_compute_s += t.compute_s
        metrics.row_finished(res.timings)
        if all(r is not None for r in job.results):
            finish(job, list(job.results))
    real_failure = False
    for rid, exc in out.failures:
        t = running.pop(rid, None)
        reason = failure_reason(exc)
        # out-of-memory and a non-finite row are the row's own trouble; anything else may be the engine's
        real_failure |= reason == "error"
        metrics.rows_failed(reason, 1)
        if t is not None and not t.job.done:
            fail(t.job, failure_error(t.job.id, t.params, exc))
    return real_failure
