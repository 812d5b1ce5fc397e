"""The engine: an admission queue on the event loop and one worker thread that owns the model.

Shape (vLLM's three beats, TGI's running batch): the loop task ``_run`` decides what happens at each step
boundary (``_plan``: drop rows whose client left or whose deadline passed, admit waiting rows into free
slots), hands the plan to the worker thread (server/worker.py: start new rows, pack forwards under the cap,
one unmasking step each, head + decode for finished rows), then delivers the outcome (``_deliver``,
server/outcomes.py). The 503/504 errors it answers with are built in server/refusals.py.

Concurrency: the loop and the worker thread run at the same time; while the worker steps, the loop admits and
refuses requests, cancels jobs and answers /metrics. They share no mutable state. The loop owns jobs,
tickets, queue, policy, cost model and metrics, and sends a ``Plan`` of plain data (row ids to drop,
``RowSpec``s to admit: params, deadline, stream flag; the batch cap). The worker owns the model, the
``BatchState``s and its copies of the specs, and returns an ``Outcome`` (progress, results, failures by row
id; the measured cost of every forward). The one shared object is ``_attention``, an Event the loop sets
when a step boundary is needed (new rows, a cancellation, draining) and the worker only reads.

Admission (server/admission.py) predicts a request's completion from measured per-batch-size costs
(server/forecast.py) and refuses at once what cannot finish in time or would wait over
``max_queue_delay_s``. Rows are images with their own generators (model/noise.py), so joining, leaving or
splitting a batch never changes an image. Faults fail only the rows of the forward they hit (500 with the
request id, server/failures.py), then a probe generation checks the model; out-of-memory splits the forward
in halves and lowers the cap.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dcar.model.params import RowResult, SamplingParams
from dcar.server.admission import Limits, Request, admit_or_refuse
from dcar.server.batching import BatchPolicy
from dcar.server.errors import ApiError
from dcar.server.forecast import CostModel, Lateness, forecast
from dcar.server.jobs import Job, RowSpec, Ticket
from dcar.server.memory import HeapTrimmer
from dcar.server.outcomes import deliver, learn
from dcar.server.refusals import deadline_exceeded, drain_timed_out, refusal
from dcar.server.worker import ModelWorker, Outcome, Plan

log = logging.getLogger("dcar.engine")


def _retrieve(fut: asyncio.Future) -> None:
    # Jobs whose client left fail with nobody awaiting them; reading the exception silences asyncio's warning.
    if not fut.cancelled():
        fut.exception()


class Engine:
    """Queue + batching loop + model worker. Create, ``await start()``, ``await warmup(...)``, ``set_ready()``."""

    def __init__(
        self,
        pipe,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics,
        max_queue_delay_s: float = 2.0,
        admission_quantile: float = 0.99,
        trim_heap: bool = True,
        preview_size: int = 64,
        probe_size: tuple[int, int] | None = None,
    ):
        self.pipe = pipe
        self.policy = BatchPolicy(max_batch_size, max_wait_s)
        self.costs = CostModel()
        self.lateness = Lateness(admission_quantile)
        self.max_queue = max_queue
        self.max_queue_delay_s = max_queue_delay_s
        self.metrics = metrics
        native = pipe.config.sampling.size
        self.probe_size = probe_size or (native, native)
        self.status = "starting"  # starting -> ready -> draining -> stopped; or failed
        self.failure: str | None = None
        self._waiting: deque[Ticket] = deque()
        self._running: dict[int, Ticket] = {}  # admitted rows, by row id, until their result or drop
        self._released: list[str] = []  # edit keys of ended jobs, for the next plan
        self._row_ids = itertools.count()
        self._reported = time.monotonic()  # when _running was last brought up to date (a plan or an outcome)
        self._drain_deadline: float | None = None
        # Set from the loop when a step boundary needs it (new rows, a cancellation, draining): until then
        # the worker keeps stepping without a round trip through the event loop per step.
        self._attention = threading.Event()
        self._jobs: set[Job] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcar-engine")
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._worker = ModelWorker(pipe, self._attention, preview_size)
        self._trimmer = HeapTrimmer(enabled=trim_heap and pipe.device.type == "cpu")
        metrics.set_batch_limit(self.policy.cap)
        # Read when scraped (on the loop, like every use of it): the margin also shrinks as errors age out.
        metrics.admission_margin.set_function(lambda: self.lateness.margin(time.monotonic()))

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = asyncio.create_task(self._run(), name="dcar-engine")
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task) -> None:
        # The loop only returns on stop(); anything else is a bug that must not leave requests hanging.
        if task.cancelled() or task.exception() is None:
            return
        log.error("the engine loop crashed", exc_info=task.exception())
        self.failure = f"engine loop crashed: {type(task.exception()).__name__}: {task.exception()}"
        self.status = "failed"
        self.metrics.set_ready(False)
        for job in list(self._jobs):
            self._close(job, "failed", ApiError(500, "internal_error", self.failure))
        # No plan will drop the rows that were running: without this the gauge kept them for good. A job
        # that had already ended (its client left, its deadline passed) keeps its reason, as a plan would.
        self._drop_running(list(self._running), "failed")
        self._publish()

    async def call(self, fn: Callable[..., Any], *args) -> Any:
        """Run ``fn`` on the model thread (between iterations, never during one)."""
        return await self._loop.run_in_executor(self._executor, fn, *args)

    async def warmup(self, sizes: Sequence[tuple[int, int]]) -> None:
        """Per (width, height): one generation for the one-time setup, then batches of 1 and 2 rows through
        the worker, whose measured costs seed the cost model (two batch sizes give it a slope)."""
        for width, height in sizes:
            t0 = time.perf_counter()
            await self.call(
                self.pipe.generate, [self.pipe.params("warm-up", seed=0, height=height, width=width)]
            )
            grid = self.pipe.sampler.grid_for(height, width)
            for n in sorted({1, min(2, self.policy.max_batch_size)}):
                params = [self.pipe.params("warm-up", seed=i, height=height, width=width) for i in range(n)]
                await self._run_alone(
                    [RowSpec(next(self._row_ids), p, grid, math.inf, False) for p in params]
                )
            log.info(
                "warm-up %dx%d: %.3f s; step costs %s",
                width,
                height,
                time.perf_counter() - t0,
                {n: round(s, 4) for n, s in self.costs.table("step", grid).items()},
            )

    async def _run_alone(self, specs: list[RowSpec]) -> None:
        left = {s.id for s in specs}
        plan = Plan(self.policy.cap, admit=tuple(specs))
        while left:
            out = await self.call(self._worker.work, plan)
            plan = Plan(self.policy.cap)
            self._learn(out, count=False)
            if out.failures:
                raise out.failures[0][1]
            left -= {r.tag for r in out.results}

    def set_ready(self) -> None:
        if self.status == "starting":
            self.status = "ready"
            self.metrics.set_ready(True)

    def begin_drain(self) -> None:
        """Stop admitting (503); rows already accepted keep running."""
        if self.status in ("starting", "ready"):
            self.status = "draining"
            self.metrics.set_ready(False)
            log.info("draining: %d rows waiting, %d running", len(self._waiting), self.running_rows)
            if self._wake is not None:
                self._wake.set()

    async def drain(self, timeout: float) -> bool:
        """Stop admitting and wait for accepted rows, up to ``timeout`` s from the first call (later calls share
        that deadline); refuse what is left with 503 then. True when everything finished."""
        self.begin_drain()
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + timeout
        if self._idle is None:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, self._drain_deadline - time.monotonic()))
            return True
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            for job in list(self._jobs):
                self._close(job, "shutdown", drain_timed_out(timeout))
            return False

    async def stop(self) -> None:
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            # a crashed loop was logged and answered by _loop_ended; raising it again here failed the
            # shutdown (and with it the process's exit) after the requests had long been answered
            await asyncio.wait([self._task])
        self._executor.shutdown(wait=True)
        if self.status != "failed":
            self.status = "stopped"
        self.metrics.set_ready(False)

    # --- observation -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def queued_rows(self) -> int:
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        return len(self._running)

    def rows_ahead(self, job: Job) -> int | None:
        """Rows waiting ahead of the job's first waiting row (0: next in line); None once none of its rows waits."""
        for i, t in enumerate(self._waiting):
            if t.job is job:
                return i
        return None

    def backlog_s(self) -> float:
        """Predicted seconds until every accepted row is done (0 when idle or before any measurement)."""
        rows = [(t.grid, t.steps_left) for t in self._running.values()]
        rows += [(t.grid, t.params.steps) for t in self._waiting]
        fc = forecast([], rows, self.costs, self.policy.max_batch_size, self.policy.cap, refill=False)
        return max(fc.finished, default=0.0) if fc is not None else 0.0

    def admission_state(self) -> dict[str, float]:
        """The admission's limits and what it currently adds and sees (for /v1/status)."""
        return {
            "max_queue": self.max_queue,
            "max_queue_delay_s": self.max_queue_delay_s,
            "quantile": self.lateness.quantile,
            "margin_s": round(self.lateness.margin(time.monotonic()), 4),
            "backlog_s": round(self.backlog_s(), 4),
        }

    def _publish(self) -> None:
        self.metrics.occupancy(len(self._waiting), self.running_rows)
        if self._idle is not None:
            if self._waiting or self._running:
                self._idle.clear()
            else:
                self._idle.set()

    # --- admission (event loop) --------------------------------------------------------------------

    def _refusal(self) -> ApiError:
        return refusal(self.status, self.failure, self.backlog_s, self._drain_deadline)

    def submit(self, job: Job) -> None:
        """Queue the job's rows or refuse it (503 not accepting; 429/400 by ``admit_or_refuse``)."""
        if self.status != "ready":
            raise self._refusal()
        n, p = len(job.params), job.params[0]
        grid = self.pipe.sampler.grid_for(p.height, p.width)
        now = time.monotonic()
        limits = Limits(
            self.policy.max_batch_size,
            self.policy.cap,
            self.max_queue,
            self.max_queue_delay_s,
            self.lateness.margin(now),
        )
        running = [(t.grid, t.steps_left, t.params.steps) for t in self._running.values()]
        # its place: behind every waiting row of its priority or a lower value (always the end under fcfs,
        # where every priority is 0)
        at = next(
            (i for i, t in enumerate(self._waiting) if t.job.priority > job.priority), len(self._waiting)
        )
        predicted = admit_or_refuse(
            Request(grid, n, p.steps, job.timeout, job.deadline - now),
            running,
            [(t.grid, t.params.steps) for t in self._waiting],
            self.costs,
            limits,
            now - self._reported if running else 0.0,
            at,
        )
        job.predicted_s = predicted
        job.future = self._loop.create_future()
        job.future.add_done_callback(_retrieve)
        job.results = [None] * n
        job.enqueued, job.admitted = now, [None] * n
        if job.stream:
            job.events = asyncio.Queue()
        self._jobs.add(job)
        # a deadline may pass while the job's rows wait and the worker keeps stepping the running batch
        job.expiry = self._loop.call_later(max(0.0, job.deadline - now), self._expire, job)
        for t in itertools.islice(self._waiting, at, None):  # none under fcfs, where ``at`` is the end
            t.job.overtaken = True
        for i in range(n):
            self._waiting.insert(at + i, Ticket(next(self._row_ids), job, i, grid, now))
        self._attention.set()
        self._wake.set()  # type: ignore[union-attr]  # submit() comes after start()
        self._publish()

    def cancel(self, job: Job, reason: str, error: ApiError | None = None) -> None:
        """End a job early (client gone, deadline); its rows leave the queue now and the batch at the next step."""
        if job.future is None or job.done:
            return
        self._close(job, reason, error or ApiError(499, "cancelled", f"request cancelled ({reason})"))

    def _close(self, job: Job, reason: str, error: ApiError) -> None:
        if job.done:
            return
        job.closed = reason
        self._attention.set()
        removed = [t for t in self._waiting if t.job is job]
        if removed:
            self._waiting = deque(t for t in self._waiting if t.job is not job)
            self.metrics.rows_dropped(reason, len(removed), 0.0)
        # its finished images are never delivered: their work was wasted like that of the rows still running
        finished = sum(r is not None for r in job.results)
        if finished:
            self.metrics.rows_dropped(reason, finished, job.results_compute_s)
        self._finish_job(job, error=error)
        self._publish()

    def _finish_job(
        self, job: Job, results: list[RowResult] | None = None, error: ApiError | None = None
    ) -> None:
        self._jobs.discard(job)
        if job.expiry is not None:
            job.expiry.cancel()
        if job.edit is not None:
            self._released.append(job.edit_key)
        assert job.future is not None  # set by submit()
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(results)
            self.metrics.delivered(job.task, len(job.params))
            # an overtaken job's lateness is the priority's doing, not a forecast error to widen the margin by
            if job.predicted_s is not None and job.enqueued is not None and not job.overtaken:
                now = time.monotonic()
                actual = now - job.enqueued
                self.lateness.observe(job.predicted_s, actual, now)
                log.debug("request %s: done in %.3f s, predicted %.3f s", job.id, actual, job.predicted_s)
        if job.events is not None:
            job.events.put_nowait(None)

    @staticmethod
    def deadline_error(job: Job) -> ApiError:
        return deadline_exceeded(job.timeout)

    # --- the loop ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._running:
                if self._stopping and not self._waiting:
                    return
                delay = self.policy.start_delay(self._waiting, time.monotonic())
                if delay is None or delay > 0:
                    wake = self._wake
                    assert wake is not None  # made by start(), which runs this loop
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                    continue
            failed = await self._iterate()
            if failed:
                await self._probe()
            if self._trimmer.due(not self._running and not self._waiting):
                await self.call(self._trimmer.trim)

    def _expire(self, job: Job) -> None:
        """Its deadline passed (the timer set by submit): 504 now if no row of it runs, else at the next step."""
        if any(t.job is job for t in self._running.values()):
            self._attention.set()  # the worker returns after this step; _plan ends the job as it drops its rows
        elif not job.done:
            self._close(job, "deadline", self.deadline_error(job))

    async def _iterate(self) -> bool:
        """One step boundary + the worker's steps. Returns True when a non-OOM error failed rows."""
        started = time.monotonic()
        plan = self._plan(started)
        if plan is None:
            return False
        try:
            out = await self.call(self._worker.work, plan)
        except Exception as exc:  # a bug outside any one batch: fail everything in flight, keep serving
            log.exception("engine iteration failed")
            out = Outcome(failures=[(rid, exc) for rid in self._running])
        failed = self._deliver(out)
        # What the wall time of these rounds spent outside the forwards: the per-iteration overhead.
        if out.rounds:
            compute = sum(f.step_s + f.finish_s for f in out.forwards) + sum(s for _, _, s in out.starts)
            self.costs.observe_overhead((time.monotonic() - started - compute) / out.rounds)
        return failed

    def _plan(self, now: float) -> Plan | None:
        # 1. jobs whose deadline passed end now (504); their rows are dropped below.
        for t in list(self._running.values()):
            if not t.job.done and t.job.deadline < now:
                self._close(t.job, "deadline", self.deadline_error(t.job))
        # 2. drop rows of ended jobs (client gone, deadline, failed sibling), counting the work they cost.
        drop = [rid for rid, t in self._running.items() if t.job.done]
        self._drop_running(drop, "finished")
        # 3. admit waiting rows, first come first served, into the free slots.
        admit = []
        for _ in range(self.policy.admit(self._waiting, len(self._running))):
            t = self._waiting.popleft()
            t.job.admitted[t.index] = now
            self.metrics.row_started(now - t.enqueued)
            self._running[t.id] = t
            admit.append(t.spec())
        if not admit and not drop and not self._running:
            self._publish()
            return None
        release, self._released = tuple(self._released), []
        self._reported = now
        self._attention.clear()
        self._trimmer.saw(Counter(t.grid for t in self._running.values()))
        self._publish()
        return Plan(self.policy.cap, tuple(admit), frozenset(drop), release)

    def _drop_running(self, rids: list[int], default: str) -> None:
        """Take rows out of the running batch, counting them and their compute under their job's reason
        (``default`` for a job that ended without one)."""
        wasted: dict[str, list[float]] = defaultdict(list)
        for rid in rids:
            t = self._running.pop(rid)
            wasted[t.job.closed or default].append(t.compute_s)
        for reason, costs in wasted.items():
            self.metrics.rows_dropped(reason, len(costs), sum(costs))

    def _learn(self, out: Outcome, count: bool = True) -> None:
        """Feed the measured costs into the cost model (and, for real work, the metrics and rows' shares)."""
        self._reported = time.monotonic()
        learn(out, self.costs, self.metrics, self._running, count)

    def _deliver(self, out: Outcome) -> bool:
        """Out-of-memory lowers the cap; the rest reaches tickets and jobs through ``deliver``."""
        for size in out.ooms:
            split = size > 1
            self.metrics.out_of_memory(split)
            if split:
                self.metrics.set_batch_limit(self.policy.lower_cap(size))
        self._learn(out)
        real_failure = deliver(
            out, self._running, self.metrics, self._finish_job, lambda job, e: self._close(job, "failed", e)
        )
        self._publish()
        return real_failure

    async def _probe(self) -> None:
        """After a failed batch: one tiny generation; if even that fails the engine is unhealthy."""
        width, height = self.probe_size
        params: SamplingParams = self.pipe.params(
            "", seed=0, steps=1, residual_steps=1, height=height, width=width
        )
        try:
            await self.call(self.pipe.generate, [params])
        except Exception as exc:
            log.exception("health probe failed; the engine stops serving")
            self.failure = f"health probe failed after a batch error ({type(exc).__name__}: {exc})"
            self.status = "failed"
            self.metrics.set_ready(False)
            for job in list(self._jobs):
                error = self._refusal()
                error.reason = None  # accepted work: counted as dropped rows (failed), not as a refusal
                self._close(job, "failed", error)
