"""Admission by predicted completion: 429 with a Retry-After computed from the work ahead, queue_full only
when the running batch has no free slot, a backlog bounded by max_queue_delay_s, and no accepted request
left to expire. Steps are slowed with a hook before the server starts, so warm-up measures slow steps and
the predictions are in tenths of seconds; a gate holds the engine while requests queue."""

from __future__ import annotations

import asyncio
import math
import re
import threading

import pytest
from server_harness import StepHook, metric, metrics_text, serve

pytestmark = pytest.mark.anyio


def slow_and_held(pipe, monkeypatch, delay: float) -> threading.Event:
    """Every step takes ``delay`` s; steps of real requests also wait for the returned gate."""
    gate = threading.Event()

    def hold(state):
        if state.rows[0].params.prompt != "warm-up":
            gate.wait(60)

    StepHook(pipe, monkeypatch, delay=delay, fail=hold)
    return gate


async def until(client, name: str, value: float) -> None:
    while metric(await metrics_text(client), name) < value:
        await asyncio.sleep(0.01)


def numbers(message: str, *labels: str) -> list[float]:
    return [float(re.search(label, message).group(1)) for label in labels]


async def test_a_deadline_that_cannot_be_met_gets_429_with_the_predicted_wait(pipe, monkeypatch):
    gate = slow_and_held(pipe, monkeypatch, delay=0.05)
    async with serve(
        pipe, max_batch_size=1, max_queue=16, max_n=1, max_wait_ms=0, max_queue_delay_s=100
    ) as client:
        accepted = [asyncio.create_task(client.post("/v1/generate", json={"prompt": "runs", "steps": 12}))]
        await until(client, "dcar_rows_running", 1)
        retry_afters = []
        for ahead in (3, 7):  # more work ahead: a later Retry-After
            while len(accepted) <= ahead:
                accepted.append(asyncio.create_task(client.post("/v1/generate", json={"prompt": "waits"})))
                await until(client, "dcar_queue_size", len(accepted) - 1)
            r = await client.post("/v1/generate", json={"prompt": "in a hurry", "timeout": 1.5})
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert err["code"] == "deadline_unmeetable" and err["param"] == "timeout"
            predicted, left = numbers(err["message"], r"completion in ([\d.]+) s", r"\(([\d.]+) s left\)")
            assert predicted > 0.5 * ahead  # at least half a second of slowed steps per row ahead
            assert abs(int(r.headers["retry-after"]) - math.ceil(predicted - left)) <= 1
            retry_afters.append(int(r.headers["retry-after"]))
        assert retry_afters[1] > retry_afters[0]
        gate.set()
        assert [t.status_code for t in await asyncio.gather(*(t for t in accepted))] == [200] * 8
        assert metric(await metrics_text(client), "dcar_rejections_total", reason="deadline") == 2


async def test_queue_full_only_counts_rows_that_find_no_free_slot(pipe, monkeypatch):
    gate = slow_and_held(pipe, monkeypatch, delay=0.0)
    async with serve(pipe, max_batch_size=4, max_queue=1, max_n=1, max_wait_ms=0) as client:
        tasks = [asyncio.create_task(client.post("/v1/generate", json={"prompt": "runs", "steps": 2}))]
        await until(client, "dcar_rows_running", 1)
        # 3 free slots in the running batch + 1 queued row: all accepted while the engine is held mid-step.
        for i in range(4):
            tasks.append(
                asyncio.create_task(client.post("/v1/generate", json={"prompt": f"joins {i}", "steps": 2}))
            )
            await until(client, "dcar_queue_size", i + 1)
        r = await client.post("/v1/generate", json={"prompt": "one too many", "steps": 2})
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "queue_full" and "max_queue=1" in err["message"] and "3 free" in err["message"]
        assert int(r.headers["retry-after"]) >= 1
        gate.set()
        assert [t.status_code for t in await asyncio.gather(*tasks)] == [200] * 5


async def test_the_backlog_is_bounded_in_seconds_and_nothing_accepted_expires(pipe, monkeypatch):
    slow_and_held(pipe, monkeypatch, delay=0.02).set()  # slowed, never held
    async with serve(pipe, max_batch_size=2, max_queue=64, max_wait_ms=0, max_queue_delay_s=0.5) as client:
        burst = [
            client.post("/v1/generate", json={"prompt": f"burst {i}", "n": 2, "timeout": 20})
            for i in range(12)
        ]
        responses = await asyncio.gather(*burst)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, codes  # no 504: what was accepted finished in time
        assert 2 <= codes.count(200) < 12, codes  # some were accepted, the backlog limit refused the rest
        for r in responses:
            if r.status_code == 429:
                err = r.json()["error"]
                assert err["code"] == "queue_full" and "max_queue_delay_s=0.5" in err["message"]
                assert int(r.headers["retry-after"]) >= 1
        text = await metrics_text(client)
        assert metric(text, "dcar_dropped_rows_total", reason="deadline") == 0
        assert metric(text, "dcar_rejections_total", reason="queue_full") == codes.count(429)
        assert (await client.post("/v1/generate", json={"prompt": "after the burst"})).status_code == 200
