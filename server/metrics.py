"""Every Prometheus instrument of the server, on one per-app registry (two apps in one process never share counters).

The engine and the routes report plain numbers through the methods below; nothing else touches
prometheus_client. Names follow the Prometheus naming guide: prefix ``dcar_``, base units (seconds,
bytes), ``_total`` on counters, and no unbounded label values (no prompt, no request id).

Latency buckets are geometric from 1 ms to 120 s so that they resolve a GPU step (milliseconds) as well
as a CPU generation or a long queue (seconds).

Beside the ``dcar_*`` instruments every registry carries the standard process collector (``process_*``:
resident memory, CPU seconds, open file descriptors) and ``dcar_build_info{version, torch, cuda}``, so a
dashboard can tell which build each target runs. ``_created`` series are switched off for the whole
process: they double every counter and histogram and nothing here reads them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

import dcar

# Process-wide switch of prometheus_client (no per-registry option exists); see the module docstring.
prometheus_client.disable_created_metrics()

SECONDS_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
STAGES = ("text_encode", "unmask", "residual", "decode", "image_encode")
TASKS = ("generate", "edit")
REJECTIONS = ("invalid", "unauthorized", "too_large", "queue_full", "deadline", "not_ready", "draining")
DROPS = ("disconnected", "deadline", "failed", "shutdown")
FAILURES = ("error", "out_of_memory", "non_finite_output")  # server/failures.py failure_reason
IDEMPOTENCY_OUTCOMES = ("first", "replayed", "conflict")


def build_info() -> dict[str, str]:
    """Labels of ``dcar_build_info``: dcar's version, torch's, and the CUDA torch was built for (``none``)."""
    import torch

    return {"version": dcar.__version__, "torch": torch.__version__, "cuda": torch.version.cuda or "none"}


class RecentRate:
    """Events per second over a sliding window, kept in one-second buckets (memory bounded by the window).

    Until the window has passed since creation, the rate is over the time elapsed so far, so a fresh server
    does not under-report.
    """

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self.started = clock()
        self._buckets: deque[list[int]] = deque()  # [whole second, count], oldest first

    def add(self, n: int = 1) -> None:
        second = int(self.clock())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([second, n])
        self._trim(second)

    def rate(self) -> float:
        now = self.clock()
        self._trim(int(now))
        span = min(self.window_s, max(now - self.started, 1.0))
        return sum(count for _, count in self._buckets) / span

    def _trim(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - self.window_s:
            self._buckets.popleft()


class Metrics:
    """The instruments of one app; ``registry`` is what ``/metrics`` exposes."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        Info(
            "dcar_build",
            "The running build: dcar, torch and the CUDA version torch was built for.",
            registry=r,
        ).info(build_info())
        self.requests = Counter(
            "dcar_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "dcar_request_duration_seconds",
            "Time from request received to response sent, by endpoint.",
            ["endpoint"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "dcar_queue_wait_seconds",
            "Time a row (one image) waited between admission to the queue and its first step.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_size = Gauge("dcar_queue_size", "Rows (images) waiting to join a batch.", registry=r)
        self.rows_running = Gauge("dcar_rows_running", "Rows (images) inside running batches.", registry=r)
        self.batch_size = Histogram(
            "dcar_batch_size",
            "Rows per forward batch (one unmasking step).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "dcar_batch_duration_seconds",
            "Time of one batch iteration: admission, one unmasking step, and the "
            "head and decoder for rows that finished.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_limit = Gauge(
            "dcar_batch_size_limit",
            "Current cap on rows per forward batch (lowered after out-of-memory).",
            registry=r,
        )
        self.admission_margin = Gauge(
            "dcar_admission_margin_seconds",
            "Seconds admission adds to its forecasts: the admission_quantile of how late recent requests "
            "finished against their forecast.",
            registry=r,
        )
        self.stage_duration = Histogram(
            "dcar_stage_duration_seconds",
            "Time one image spent in each stage (the stage's batch wall time).",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "dcar_images_generated", "Images delivered, by task (generate or edit).", ["task"], registry=r
        )
        self.rejections = Counter("dcar_rejections", "Requests refused, by reason.", ["reason"], registry=r)
        self.dropped_rows = Counter(
            "dcar_dropped_rows",
            "Rows removed before finishing, by reason (disconnected, deadline, failed, shutdown).",
            ["reason"],
            registry=r,
        )
        self.wasted = Counter(
            "dcar_wasted_seconds",
            "Engine seconds spent on rows that were later dropped (each row's share of its batches).",
            ["reason"],
            registry=r,
        )
        self.failed_rows = Counter(
            "dcar_failed_rows",
            "Rows failed by an engine error, by reason (error, out_of_memory, non_finite_output).",
            ["reason"],
            registry=r,
        )
        self.oom = Counter("dcar_oom", "Out-of-memory errors caught by the engine.", registry=r)
        self.idempotency = Counter(
            "dcar_idempotent_requests",
            "Requests with an Idempotency-Key, by outcome (first: drawn; replayed: a kept response sent "
            "again; conflict: the key came with another body).",
            ["outcome"],
            registry=r,
        )
        self.splits = Counter("dcar_batch_splits", "Batches split in halves after out-of-memory.", registry=r)
        self.ready = Gauge(
            "dcar_ready", "1 when the server accepts work (loaded, warmed up, not draining).", registry=r
        )
        self.model = Info("dcar_model", "The served model.", registry=r)
        self.recent_images = RecentRate(60.0)  # for the playground's status strip (GET /v1/status)
        self.occupied = (0, 0)  # (queued, running) as last set on the gauges, for the same strip
        # Every known label value exists from the start, so dashboards and alerts see zeros, not gaps.
        for stage in STAGES:
            self.stage_duration.labels(stage)
        for task in TASKS:
            self.images.labels(task)
        for reason in REJECTIONS:
            self.rejections.labels(reason)
        for outcome in IDEMPOTENCY_OUTCOMES:
            self.idempotency.labels(outcome)
        for reason in DROPS:
            self.dropped_rows.labels(reason)
            self.wasted.labels(reason)
        for reason in FAILURES:
            self.failed_rows.labels(reason)

    # --- model and device --------------------------------------------------------------------------

    def set_model(self, info: dict) -> None:
        self.model.info({k: str(v) for k, v in info.items()})

    def watch_gpu_memory(self, allocated: Callable[[], float], reserved: Callable[[], float]) -> None:
        """Only called on CUDA: the gauges read the allocator when scraped."""
        Gauge(
            "dcar_gpu_memory_allocated_bytes", "GPU memory held by tensors.", registry=self.registry
        ).set_function(allocated)
        Gauge(
            "dcar_gpu_memory_reserved_bytes",
            "GPU memory reserved by the caching allocator.",
            registry=self.registry,
        ).set_function(reserved)

    # --- HTTP --------------------------------------------------------------------------------------

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.request_duration.labels(endpoint).observe(seconds)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def idempotent(self, outcome: str) -> None:
        self.idempotency.labels(outcome).inc()

    def image_encoded(self, seconds: float) -> None:
        self.stage_duration.labels("image_encode").observe(seconds)

    # --- engine ------------------------------------------------------------------------------------

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def occupancy(self, queued: int, running: int) -> None:
        self.occupied = (queued, running)
        self.queue_size.set(queued)
        self.rows_running.set(running)

    def set_batch_limit(self, n: int) -> None:
        self.batch_limit.set(n)

    def batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.batch_duration.observe(seconds)

    def row_started(self, waited: float) -> None:
        self.queue_wait.observe(waited)

    def row_finished(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            if stage in STAGES:
                self.stage_duration.labels(stage).observe(seconds)

    def delivered(self, task: str, images: int) -> None:
        """A job ended with all its images: counted here, not per finished row, so the finished rows of an
        n > 1 job that then fails (a sibling's error, its deadline) are not counted as delivered."""
        self.images.labels(task).inc(images)
        self.recent_images.add(images)

    def load(self) -> dict[str, float]:
        """What the playground's status strip shows: rows waiting and running (as on the gauges), and images
        delivered per second over the last minute (``rate(dcar_images_generated_total[1m])`` computed
        in-process, for clients without Prometheus)."""
        queued, running = self.occupied
        return {
            "queue_size": queued,
            "rows_running": running,
            "images_per_second": round(self.recent_images.rate(), 4),
            "window_s": self.recent_images.window_s,
        }

    def rows_dropped(self, reason: str, rows: int, wasted_seconds: float) -> None:
        self.dropped_rows.labels(reason).inc(rows)
        self.wasted.labels(reason).inc(wasted_seconds)

    def rows_failed(self, reason: str, rows: int) -> None:
        self.failed_rows.labels(reason).inc(rows)

    def out_of_memory(self, split: bool) -> None:
        self.oom.inc()
        if split:
            self.splits.inc()
