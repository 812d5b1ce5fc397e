"""The engine: an admission queue on the event loop and one worker thread that owns the model.

Shape (vLLM's three beats, TGI's running batch): the asyncio loop task ``_run`` decides what happens at each
step boundary (``_plan``: drop rows whose client left or whose deadline passed, admit waiting rows by the
``BatchPolicy``), hands that plan to the single worker thread (server/worker.py: start the new rows, merge them into
the running groups, one unmasking step per group, head + decode for rows that took their last step), then
delivers progress and results back to the requests (``_deliver``). All scheduling state lives on the loop;
the worker only ever touches the model and the ``BatchState``s, and the two never run at the same time.

Rows are images: a request for n images is n rows with seeds seed, seed+1, ... Each row draws from its own
generator (model/noise.py), so joining, leaving or splitting a batch never changes an image.

Faults: an exception fails the rows of the forward it happened in (500 with the request id), then a probe
generation checks the model still works (readiness fails if not). ``torch.cuda.OutOfMemoryError`` splits
the forward in halves and retries each, and lowers the per-forward cap; one row that still does not fit
fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dcar.model.params import NonFiniteOutput, RowResult, SamplingParams
from dcar.model.sampler import BatchState
from dcar.server.batching import BatchPolicy, GroupView, ServiceEstimate
from dcar.server.errors import ApiError
from dcar.server.jobs import Job, Progress, Ticket
from dcar.server.worker import ModelWorker, Outcome, OutOfMemory, Plan

log = logging.getLogger("dcar.engine")


def _retrieve(fut: asyncio.Future) -> None:
    # Jobs whose client left fail with nobody awaiting them; reading the exception silences asyncio's warning.
    if not fut.cancelled():
        fut.exception()


class Engine:
    """Queue + batching loop + model worker. Create, ``await start()``, ``await warmup(...)``, ``set_ready()``."""

    def __init__(self, pipe, *, max_batch_size: int, max_wait_s: float, max_queue: int, metrics,
                 preview_size: int = 64, probe_size: tuple[int, int] | None = None):
        self.pipe = pipe
        self.policy = BatchPolicy(max_batch_size, max_wait_s)
        self.estimate = ServiceEstimate()
        self.max_queue = max_queue
        self.metrics = metrics
        self.preview_size = preview_size
        native = pipe.config.sampling.size
        self.probe_size = probe_size or (native, native)
        self.status = "starting"  # starting -> ready -> draining -> stopped; or failed
        self.failure: str | None = None
        self._waiting: deque[Ticket] = deque()
        self._groups: list[BatchState] = []
        # Rows of the iteration in flight (running groups + rows admitted into it); None between iterations.
        # While the worker steps, admitted rows are in neither the queue nor _groups yet.
        self._planned_rows: int | None = None
        # Set from the loop when a step boundary needs it (new rows, a cancellation, draining): until then
        # the worker keeps stepping without a round trip through the event loop per step.
        self._attention = threading.Event()
        self._jobs: set[Job] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcar-engine")
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._worker = ModelWorker(pipe, self.policy, self._attention, preview_size)
        metrics.set_batch_limit(self.policy.cap)

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

    async def call(self, fn: Callable[..., Any], *args) -> Any:
        """Run ``fn`` on the model thread (between iterations, never during one)."""
        return await self._loop.run_in_executor(self._executor, fn, *args)

    async def warmup(self, sizes: Sequence[tuple[int, int]]) -> None:
        """One real generation per (width, height); seeds the service-time estimate."""
        for width, height in sizes:
            params = self.pipe.params("warm-up", seed=0, height=height, width=width)
            seconds = await self.call(self._timed_generate, params)
            self.estimate.observe(1, seconds / params.steps)
            log.info("warm-up %dx%d: %.3f s", width, height, seconds)

    def _timed_generate(self, params: SamplingParams) -> float:
        t0 = time.perf_counter()
        self.pipe.generate([params])
        return time.perf_counter() - t0

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
        """Stop admitting and wait up to ``timeout`` s for accepted rows; refuse the rest with 503."""
        self.begin_drain()
        if self._idle is None:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            for job in list(self._jobs):
                self._close(job, "shutdown", ApiError(503, "shutting_down", "the server shut down before this "
                                                      f"request finished (drain timeout {timeout:g} s)"))
            return False

    async def stop(self) -> None:
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
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
        if self._planned_rows is not None:
            return self._planned_rows
        return sum(len(g) for g in self._groups)

    def rows_ahead(self, job: Job) -> int | None:
        """Rows waiting ahead of the job's first waiting row (0: next in line); None once none of its rows waits."""
        for i, t in enumerate(self._waiting):
            if t.job is job:
                return i
        return None

    def _publish(self) -> None:
        self.metrics.occupancy(len(self._waiting), self.running_rows)
        if self._idle is not None:
            if self._waiting or self._groups:
                self._idle.clear()
            else:
                self._idle.set()

    # --- admission (event loop) --------------------------------------------------------------------

    def _refusal(self) -> ApiError:
        if self.status == "starting":
            return ApiError(503, "not_ready", "the model is still loading or warming up; retry shortly",
                            headers={"Retry-After": "1"}, reason="not_ready")
        if self.status == "failed":
            return ApiError(503, "engine_failed", f"the engine failed and serves nothing: {self.failure}",
                            reason="not_ready")
        return ApiError(503, "shutting_down", "the server is shutting down and accepts no new requests",
                        reason="draining")

    def submit(self, job: Job) -> None:
        """Queue the job's rows or refuse it (503 not accepting, 429 queue full or deadline unmeetable)."""
        if self.status != "ready":
            raise self._refusal()
        n, steps = len(job.params), max(p.steps for p in job.params)
        queued = len(self._waiting)
        if queued + n > self.max_queue:
            wait = self.estimate.retry_after(queued + n - self.max_queue, steps)
            raise ApiError(429, "queue_full", f"the queue holds {queued} of max_queue={self.max_queue} rows and "
                           f"cannot take n={n} more; retry after {wait} s", headers={"Retry-After": str(wait)},
                           reason="queue_full")
        now = time.monotonic()
        predicted = self.estimate.predict(n, steps, queued, self.running_rows, self.policy.max_batch_size)
        if predicted is not None and now + predicted > job.deadline:
            wait = self.estimate.retry_after(queued, steps)
            raise ApiError(429, "deadline_unmeetable", f"predicted completion in {predicted:.3f} s exceeds "
                           f"timeout={job.timeout:g} s; retry later or allow more time", param="timeout",
                           headers={"Retry-After": str(wait)}, reason="deadline")
        grid = self.pipe.sampler.grid_for(job.params[0].height, job.params[0].width)
        job.future = self._loop.create_future()
        job.future.add_done_callback(_retrieve)
        job.results = [None] * n
        if job.stream:
            job.events = asyncio.Queue()
        self._jobs.add(job)
        self._waiting.extend(Ticket(job, i, grid, now) for i in range(n))
        self._attention.set()
        self._wake.set()
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
        self._finish_job(job, error=error)
        self._publish()

    def _finish_job(self, job: Job, results: list[RowResult] | None = None, error: ApiError | None = None) -> None:
        self._jobs.discard(job)
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(results)
        if job.events is not None:
            job.events.put_nowait(None)

    @staticmethod
    def deadline_error(job: Job) -> ApiError:
        return ApiError(504, "deadline_exceeded", f"the request did not finish within timeout={job.timeout:g} s",
                        param="timeout", reason=None)

    # --- the loop ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._expire_waiting(time.monotonic())
            if not self._groups:
                if self._stopping and not self._waiting:
                    return
                delay = self.policy.start_delay(self._waiting, time.monotonic())
                if delay is None or delay > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                    continue
            failed = await self._iterate()
            if failed:
                await self._probe()

    def _expire_waiting(self, now: float) -> None:
        for job in {t.job for t in self._waiting if t.job.deadline < now}:
            self._close(job, "deadline", self.deadline_error(job))

    async def _iterate(self) -> bool:
        """One step boundary + one step. Returns True when a non-OOM error failed rows."""
        plan = self._plan(time.monotonic())
        if plan is None:
            return False
        try:
            out = await self.call(self._worker.work, plan)
        except Exception as exc:  # a bug outside any one batch: fail everything in flight, keep serving
            log.exception("engine iteration failed")
            tickets = [r.tag for g in plan.groups for r in g.rows] + [t for ts in plan.admit.values() for t in ts]
            out = Outcome(failures=[(t, exc) for t in tickets])
        return self._deliver(out)

    def _plan(self, now: float) -> Plan | None:
        # 1. jobs whose deadline passed end now (504); their rows are dropped below.
        for g in self._groups:
            for r in g.rows:
                job = r.tag.job
                if not job.done and job.deadline < now:
                    self._close(job, "deadline", self.deadline_error(job))
        # 2. drop rows of ended jobs (client gone, deadline, failed sibling), counting the work they cost.
        keep: list[list[int] | None] = []
        wasted: dict[str, list[float]] = defaultdict(list)
        for g in self._groups:
            kept = [i for i, r in enumerate(g.rows) if not r.tag.job.done]
            for r in g.rows:
                if r.tag.job.done:
                    wasted[r.tag.job.closed or "finished"].append(r.tag.compute_s)
            keep.append(None if len(kept) == len(g) else kept)
        for reason, costs in wasted.items():
            self.metrics.rows_dropped(reason, len(costs), sum(costs))
        # 3. admit waiting rows, first come first served, into groups of their grid.
        views = [GroupView(g.grid, len(g) if k is None else len(k)) for g, k in zip(self._groups, keep) if k != []]
        targets = self.policy.admit(self._waiting, views)
        admit: dict[int, list[Ticket]] = defaultdict(list)
        for target in targets:
            t = self._waiting.popleft()
            t.admitted = now
            self.metrics.row_started(now - t.enqueued)
            admit[target].append(t)
        if not views and not admit:
            self._groups = []
            self._publish()
            return None
        self._planned_rows = sum(v.size for v in views) + len(targets)
        self.metrics.occupancy(len(self._waiting), self._planned_rows)
        self._attention.clear()
        return Plan(list(self._groups), keep, dict(admit), self.policy.cap)

    def _deliver(self, out: Outcome) -> bool:
        self._groups = out.groups
        self._planned_rows = None
        for size in out.ooms:
            split = size > 1
            self.metrics.out_of_memory(split)
            if split:
                self.metrics.set_batch_limit(self.policy.lower_cap(size))
        for rows, seconds in out.batches:
            self.metrics.batch(rows, seconds)
        for rows, seconds in out.steps:
            self.estimate.observe(rows, seconds)
        for t, ev, preview in out.progress:
            job = t.job
            if job.events is not None and not job.done:
                job.events.put_nowait(Progress(t.index, ev.step, ev.steps, ev.revealed, ev.tokens, preview))
        for t, res in out.results:
            job = t.job
            if job.done:  # ended while its last step ran
                self.metrics.rows_dropped(job.closed or "finished", 1, t.compute_s)
                continue
            job.results[t.index] = res
            self.metrics.row_finished(job.task, res.timings)
            if all(r is not None for r in job.results):
                self._finish_job(job, results=list(job.results))
        real_failure = False
        for t, exc in out.failures:
            reason = failure_reason(exc)
            # out-of-memory and a non-finite row are the row's own trouble; anything else may be the engine's
            real_failure |= reason == "error"
            self.metrics.rows_failed(reason, 1)
            if not t.job.done:
                self._close(t.job, "failed", self._failure_error(t, exc))
        self._publish()
        return real_failure

    def _failure_error(self, t: Ticket, exc: BaseException) -> ApiError:
        p = t.params
        if isinstance(exc, NonFiniteOutput):
            log.error("request %s: non-finite output (NaN/inf) for seed %d at %dx%d", t.job.id, p.seed, p.width,
                      p.height)
            return ApiError(500, "non_finite_output", f"the generated image held NaN or inf values and was not "
                            f"delivered; request id {t.job.id}")
        if isinstance(exc, OutOfMemory):
            return ApiError(500, "out_of_memory", f"out of memory even for one {p.width}x{p.height} image; "
                            f"request id {t.job.id}")
        log.error("request %s: batch failed: %s: %s", t.job.id, type(exc).__name__, exc)
        return ApiError(500, "internal_error", f"the batch holding this request failed ({type(exc).__name__}: "
                        f"{exc}); request id {t.job.id}")

    async def _probe(self) -> None:
        """After a failed batch: one tiny generation; if even that fails the engine is unhealthy."""
        width, height = self.probe_size
        params = self.pipe.params("", seed=0, steps=1, residual_steps=1, height=height, width=width)
        try:
            await self.call(self.pipe.generate, [params])
        except Exception as exc:
            log.exception("health probe failed; the engine stops serving")
            self.failure = f"health probe failed after a batch error ({type(exc).__name__}: {exc})"
            self.status = "failed"
            self.metrics.set_ready(False)
            for job in list(self._jobs):
                self._close(job, "failed", self._refusal())


def failure_reason(exc: BaseException) -> str:
    """The bounded ``reason`` label of ``dcar_failed_rows_total`` for a row's failure."""
    if isinstance(exc, OutOfMemory):
        return "out_of_memory"
    if isinstance(exc, NonFiniteOutput):
        return "non_finite_output"
    return "error"
