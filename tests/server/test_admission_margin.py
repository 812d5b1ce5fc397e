"""The forecast's margin: admission adds how late recent requests finished (a high quantile) to its forecast,
so ``max_queue_delay_s`` and timeouts hold for most requests rather than for the median one. Pure logic first,
then the margin learnt by a served model from requests that finish later than forecast."""

from __future__ import annotations

import re
import threading
import time
from collections import deque

import pytest
from server_harness import StepHook, metric, metrics_text, serve

from dcar.server.admission import Limits, Request, admit_or_refuse
from dcar.server.errors import ApiError
from dcar.server.forecast import CostModel, Lateness

A = (4, 4)


def test_the_margin_is_zero_until_enough_requests_then_the_quantile_of_their_lateness():
    late = Lateness(quantile=0.9, window=100, least=20, max_age_s=60)
    for i in range(19):
        late.observe(predicted=1.0, actual=1.0 + i / 100, now=i)
    assert late.margin(now=19) == 0.0  # 19 requests say nothing about a tail
    late.observe(predicted=1.0, actual=1.19, now=19)
    # errors 0.00 .. 0.19: the 90th percentile of 20 is the 18th smallest
    assert late.margin(now=19) == pytest.approx(0.17)
    for i in range(100):  # the window moves on: every recent request finished early
        late.observe(predicted=2.0, actual=1.5, now=20 + i / 10)
    assert late.margin(now=30) == 0.0  # never negative: early finishes do not loosen the limits
    with pytest.raises(ValueError, match="quantile"):
        Lateness(quantile=1.0)


def test_the_margin_can_be_read_from_another_thread_while_the_loop_observes():
    """Under Ray's metrics_port, prometheus_client scrapes dcar_admission_margin_seconds on its own thread
    while the event loop observes finished requests: a read that met a write failed the scrape ("deque
    mutated during iteration"). Here the loop's write is made to land in the middle of the read."""
    late = Lateness(quantile=0.5, window=100, least=1, max_age_s=1e9)
    for i in range(10):
        late.observe(predicted=1.0, actual=1.0 + i / 10, now=i)

    class WriteMidRead(deque):
        def __iter__(self):
            it = super().__iter__()
            yield next(it)
            writer = threading.Thread(
                target=late.observe, kwargs={"predicted": 1.0, "actual": 9.0, "now": 10}
            )
            writer.start()
            writer.join(timeout=0.5)  # a write that must wait for the read ends after it, as it should
            yield from it

    late._errors = WriteMidRead(late._errors, maxlen=100)
    assert late.margin(now=10) == pytest.approx(0.4)  # the ten requests the read began with
    deadline = time.monotonic() + 5
    while len(late._errors) < 11 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late.margin(now=10) == pytest.approx(0.5)  # the write landed after the read


def test_the_margin_forgets_requests_older_than_its_age_limit():
    late = Lateness(quantile=0.5, window=100, least=20, max_age_s=60)
    for i in range(30):  # a burst that found the engine idle: its rows were slowed by later arrivals
        late.observe(predicted=1.0, actual=6.0, now=100 + i)
    assert late.margin(now=130) == pytest.approx(5.0)
    assert late.margin(now=170) == pytest.approx(5.0)  # 20 of them are within the last minute
    assert late.margin(now=171) == 0.0  # 19 are: too few to say anything
    for i in range(20):  # later requests as forecast
        late.observe(predicted=1.0, actual=1.2, now=200 + i)
    assert late.margin(now=220) == pytest.approx(0.2)  # the burst has aged out even without a scrape


def busy() -> tuple[CostModel, list, list]:
    """Two busy slots (3 and 5 steps left, 0.1 s per step of one row, 0.2 of two, finish 1 s); one row waits:
    a new one-row request gets a slot after 3.0 s and is done at 5.8 s (later arrivals keep both slots busy)."""
    model = CostModel()
    for rows, seconds in {1: 0.1, 2: 0.2}.items():
        model.observe("step", A, rows, seconds)
        model.observe("finish", A, rows, 1.0)
    return model, [(A, 3, 12), (A, 5, 12)], [(A, 4)]


def admit(margin: float, timeout: float = 60.0, queue_delay: float = 3.5, running=None, waiting=None):
    model, busy_running, busy_waiting = busy()
    return admit_or_refuse(
        Request(A, 1, 4, timeout, timeout),
        busy_running if running is None else running,
        busy_waiting if waiting is None else waiting,
        model,
        Limits(max_batch_size=2, cap=2, max_queue=16, max_queue_delay_s=queue_delay, margin_s=margin),
    )


def test_the_queue_delay_limit_counts_the_margin():
    assert admit(margin=0.0) == pytest.approx(5.8)  # waits 3.0 s for a slot: within 3.5 s
    assert admit(margin=0.4) == pytest.approx(5.8)  # 3.0 + 0.4 still fits
    with pytest.raises(ApiError) as refused:
        admit(margin=1.2)  # 3.0 + 1.2 does not: the slot must come within 3.5 - 1.2 = 2.3 s
    err = refused.value
    assert err.status == 429 and err.code == "queue_full"
    assert "margin of 1.2 s" in err.message and "max_queue_delay_s=3.5" in err.message
    assert err.headers["Retry-After"] == "1"  # 3.0 - 2.3 = 0.7 s, rounded up
    with pytest.raises(ApiError) as refused:
        admit(margin=3.0, queue_delay=1.0)  # a margin beyond the limit: only a free slot now passes
    assert refused.value.headers["Retry-After"] == "3"
    free = admit(margin=9.0, queue_delay=1.0, running=[(A, 3, 12)], waiting=[])
    # A free slot now, nobody waiting: admitted whatever the margin. In after the step in progress (one row,
    # 0.1 s), 2 steps of two rows, the other finishes (1 s) and a later arrival takes its slot, 2 more steps of
    # two rows, then its own finish.
    assert free == pytest.approx(0.1 + 2 * 0.2 + 1.0 + 2 * 0.2 + 1.0)


def test_rows_that_all_fit_the_free_slots_at_the_next_boundary_pass_whatever_the_margin():
    model, _, _ = busy()
    limits = Limits(max_batch_size=4, cap=4, max_queue=16, max_queue_delay_s=1.0, margin_s=5.0)
    running, waiting = [(A, 3, 12)], [(A, 4)]  # 3 free slots, one row already waiting for the boundary
    assert admit_or_refuse(Request(A, 2, 4, 60, 60), running, waiting, model, limits) is not None
    with pytest.raises(ApiError) as refused:  # 1 + 3 rows for 3 slots: one would wait for a finish
        admit_or_refuse(Request(A, 3, 4, 60, 60), running, waiting, model, limits)
    assert refused.value.code == "queue_full"


def test_the_deadline_counts_the_margin():
    assert admit(margin=0.0, timeout=6.0) == pytest.approx(5.8)
    with pytest.raises(ApiError) as refused:
        admit(margin=0.5, timeout=6.0)  # 5.8 + 0.5 > 6.0
    err = refused.value
    assert err.status == 429 and err.code == "deadline_unmeetable" and err.param == "timeout"
    assert "completion in 5.80 s (+0.50 s margin)" in err.message
    assert err.headers["Retry-After"] == "1"


@pytest.mark.anyio
async def test_a_served_model_learns_its_margin_from_requests_that_finish_late(pipe, monkeypatch):
    # One request in four takes 12 x 30 ms longer than the measured step costs say: the robust cost fits
    # ignore them, so the forecast stays the fast requests' time, and the margin must cover the slow ones.
    def slow(state):
        if state.rows[0].params.prompt.startswith("slow"):
            time.sleep(0.03)

    StepHook(pipe, monkeypatch, fail=slow)
    async with serve(pipe, max_batch_size=1, max_wait_ms=0, admission_quantile=0.9) as client:
        assert metric(await metrics_text(client), "dcar_admission_margin_seconds") == 0.0
        took = []
        for i in range(24):
            prompt = f"slow {i}" if i % 4 == 3 else f"fast {i}"
            r = await client.post("/v1/generate", json={"prompt": prompt, "steps": 12})
            assert r.status_code == 200, r.text
            took.append(r.json()["timings"]["total"])
        margin = metric(await metrics_text(client), "dcar_admission_margin_seconds")
        assert 0.25 <= margin <= 2.0, margin  # about 12 x 30 ms late, measured on a noisy machine
        state = (await client.get("/v1/status")).json()["admission"]
        assert state["quantile"] == 0.9 and state["margin_s"] == pytest.approx(margin, abs=1e-3)
        # A timeout that the forecast alone would meet but the forecast plus the margin would not.
        fast = sorted(took)[len(took) // 2]
        r = await client.post(
            "/v1/generate", json={"prompt": "in a hurry", "steps": 12, "timeout": fast + margin / 2}
        )
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "deadline_unmeetable"
        shown = float(re.search(r"\+([\d.]+) s margin", err["message"]).group(1))
        assert shown == pytest.approx(margin, abs=0.006)
