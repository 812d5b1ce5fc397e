"""Priority scheduling (``scheduling_policy=priority``): a request's ``priority`` orders the waiting rows.

Lower values first, then arrival (vLLM's and Triton's sense); rows already running are never preempted. Under
the default first-come-first-served policy a priority other than 0 is refused, so that no client believes
it was honoured.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from server_harness import StepHook, metric, metrics_text, serve

pytestmark = pytest.mark.anyio


def first_steps(hook: StepHook) -> list[str]:
    """Prompts in the order their first unmasking step ran."""
    order: list[str] = []
    for call in hook.calls:
        order += [prompt for prompt, step in call if step == 0 and prompt not in order]
    return order


async def queued(client, rows: int) -> None:
    deadline = time.monotonic() + 10
    while metric(await metrics_text(client), "dcar_queue_size") < rows:
        assert time.monotonic() < deadline, "the requests never queued"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("route", "body"),
    [("/v1/generate", {"steps": 2}), ("/v1/images/generations", {"steps": 2, "quality": "low"})],
)
async def test_lower_priority_values_are_admitted_first_and_equal_ones_keep_their_order(
    pipe, monkeypatch, route, body
):
    gate = threading.Event()

    def hold(state):
        if state.rows[0].params.prompt == "running":
            gate.wait(30)  # the others queue behind the one running row meanwhile

    hook = StepHook(pipe, monkeypatch, fail=hold)
    async with serve(pipe, scheduling_policy="priority", max_batch_size=1, max_wait_ms=0) as client:
        hook.calls.clear()
        running = asyncio.create_task(client.post("/v1/generate", json={"prompt": "running", "steps": 2}))
        await asyncio.sleep(0.2)
        sent = []
        for prompt, priority in [("late a", 5), ("default", None), ("urgent", -3), ("late b", 5)]:
            extra = {} if priority is None else {"priority": priority}
            sent.append(asyncio.create_task(client.post(route, json={"prompt": prompt, **body, **extra})))
            await queued(client, len(sent))
        gate.set()
        for r in await asyncio.gather(running, *sent):
            assert r.status_code == 200, r.text
        assert first_steps(hook) == ["running", "urgent", "default", "late a", "late b"]


async def test_a_queued_stream_reports_its_place_moving_back_behind_the_rows_that_overtook_it(
    pipe, monkeypatch
):
    gate = threading.Event()
    StepHook(pipe, monkeypatch, fail=lambda s: s.rows[0].params.prompt == "running" and gate.wait(30))
    settings = dict(scheduling_policy="priority", max_batch_size=1, max_wait_ms=0, sse_keepalive_s=0.05)
    async with serve(pipe, **settings) as client:
        running = asyncio.create_task(client.post("/v1/generate", json={"prompt": "running", "steps": 2}))
        await asyncio.sleep(0.2)
        low = {"prompt": "low", "steps": 2, "priority": 9, "stream": True}
        low_stream = asyncio.create_task(client.post("/v1/generate", json=low))
        await queued(client, 1)
        await asyncio.sleep(0.2)  # a few keep-alive ticks: its place is sent
        high = {"prompt": "high", "n": 2, "steps": 2, "priority": -1}
        high_request = asyncio.create_task(client.post("/v1/generate", json=high))
        await queued(client, 3)
        await asyncio.sleep(0.2)
        gate.set()
        r = await low_stream
        places = [
            json.loads(block.split("data: ", 1)[1])
            for block in r.text.strip().split("\n\n")
            if block.startswith("event: queued")
        ]
        assert places[:2] == [{"position": 1, "queued_rows": 1}, {"position": 3, "queued_rows": 3}]
        after = [p["position"] for p in places[1:]]  # then forward again as the overtaking rows run
        assert after == sorted(after, reverse=True) and len(set(after)) == len(after)
        assert (await running).status_code == 200 and (await high_request).status_code == 200


async def test_admission_predicts_a_request_at_its_own_place_in_the_queue(pipe, monkeypatch):
    """Two waiting rows of priority 5 would keep another request of priority 5 waiting ~1.8 s for the one
    slot, over max_queue_delay_s=1.5 (429); a request of priority 0 waits only for the running row, so it
    is accepted (and FCFS would have refused it too)."""
    gate = threading.Event()

    def hold(state):
        if state.rows[0].params.prompt == "running":
            gate.wait(30)

    hook = StepHook(pipe, monkeypatch, delay=0.15, fail=hold)  # warm-up learns ~0.15 s a step
    settings = dict(scheduling_policy="priority", max_batch_size=1, max_wait_ms=0, max_queue_delay_s=1.5)
    async with serve(pipe, **settings) as client:
        hook.calls.clear()
        running = asyncio.create_task(client.post("/v1/generate", json={"prompt": "running", "steps": 2}))
        while not hook.calls:
            await asyncio.sleep(0.01)
        body = {"steps": 6, "priority": 5}  # ~0.9 s a row
        low = asyncio.create_task(client.post("/v1/generate", json={"prompt": "low", "n": 2, **body}))
        await queued(client, 2)
        same = await client.post("/v1/generate", json={"prompt": "same", **body})
        assert same.status_code == 429 and same.json()["error"]["code"] == "queue_full", same.text
        high = asyncio.create_task(
            client.post("/v1/generate", json={**body, "prompt": "high", "priority": 0})
        )
        await queued(client, 3)
        gate.set()
        assert [r.status_code for r in await asyncio.gather(running, low, high)] == [200, 200, 200]
        assert first_steps(hook)[:3] == ["running", "high", "low"]


async def test_an_overtaken_request_does_not_widen_the_admission_margin(pipe, monkeypatch):
    """Its lateness is the priority's doing: only the requests that kept their place feed the forecast's
    margin (server/forecast.py Lateness), which would otherwise tighten admission for everyone."""
    gate = threading.Event()
    StepHook(pipe, monkeypatch, fail=lambda s: s.rows[0].params.prompt == "running" and gate.wait(30))
    async with serve(pipe, scheduling_policy="priority", max_batch_size=1, max_wait_ms=0) as client:
        lateness = client.app.state.runtime.engine.lateness
        observed: list[float] = []
        original = lateness.observe
        monkeypatch.setattr(lateness, "observe", lambda p, a, now: (observed.append(a), original(p, a, now)))
        running = asyncio.create_task(client.post("/v1/generate", json={"prompt": "running", "steps": 2}))
        await asyncio.sleep(0.2)
        low = asyncio.create_task(
            client.post("/v1/generate", json={"prompt": "low", "steps": 2, "priority": 1})
        )
        await queued(client, 1)
        high = asyncio.create_task(client.post("/v1/generate", json={"prompt": "high", "steps": 2}))
        await queued(client, 2)
        gate.set()
        assert [r.status_code for r in await asyncio.gather(running, low, high)] == [200, 200, 200]
        assert len(observed) == 2  # "running" and "high"; "low" was overtaken


async def test_priority_is_refused_by_name_under_fcfs_and_out_of_range(pipe):
    async with serve(pipe) as client:
        r = await client.post("/v1/generate", json={"prompt": "a", "steps": 2, "priority": 3})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "priority" and "scheduling_policy=priority" in err["message"]
        assert "got priority=3" in err["message"]
        r = await client.post("/v1/images/generations", json={"prompt": "a", "priority": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
        # 0 is the default's value: accepted, as is leaving it out
        r = await client.post("/v1/generate", json={"prompt": "a", "steps": 2, "priority": 0})
        assert r.status_code == 200, r.text
    async with serve(pipe, scheduling_policy="priority") as client:
        limits = (await client.get("/v1/status")).json()["limits"]  # how a client learns it is honoured
        assert (limits["scheduling_policy"], limits["min_priority"], limits["max_priority"]) == (
            "priority",
            -100,
            100,
        )
        r = await client.post("/v1/generate", json={"prompt": "a", "steps": 2, "priority": 101})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "priority must be between -100 and 100, got 101"
        r = await client.post("/v1/generate", json={"prompt": "a", "steps": 2, "priority": 1.5})
        assert r.status_code == 422 and r.json()["error"]["param"] == "priority"
        r = await client.post("/v1/generate", json={"prompt": "a", "steps": 2, "priority": True})
        assert r.status_code == 422 and r.json()["error"]["param"] == "priority"


def test_the_setting_takes_only_the_two_policies():
    from pydantic import ValidationError

    from dcar.server.settings import Settings

    assert Settings(scheduling_policy="priority").scheduling_policy == "priority"
    with pytest.raises(ValidationError, match="scheduling_policy"):
        Settings(scheduling_policy="lifo")


async def test_a_full_queue_tells_a_priority_request_when_the_queued_rows_make_room(pipe, monkeypatch):
    """max_queue=1 and one row waiting: a request of a lower value passes once that row is admitted, which
    happens as the held row finishes (Retry-After: 1). The refusal's forecast counted the refused request's
    20 steps (~3 s) ahead of that row, as if it were queued, and answered Retry-After: 3 or more."""
    gate = threading.Event()

    def hold(state):
        if state.rows[0].params.prompt == "running":
            gate.wait(30)

    hook = StepHook(pipe, monkeypatch, delay=0.15, fail=hold)  # warm-up learns ~0.15 s a step
    settings = dict(scheduling_policy="priority", max_batch_size=1, max_wait_ms=0, max_queue=1, max_n=1)
    async with serve(pipe, **settings) as client:
        hook.calls.clear()
        running = asyncio.create_task(client.post("/v1/generate", json={"prompt": "running", "steps": 2}))
        while not hook.calls:
            await asyncio.sleep(0.01)
        low = asyncio.create_task(
            client.post("/v1/generate", json={"prompt": "low", "steps": 2, "priority": 5})
        )
        await queued(client, 1)
        high = await client.post("/v1/generate", json={"prompt": "high", "steps": 20, "priority": -5})
        gate.set()
        assert high.status_code == 429 and high.json()["error"]["code"] == "queue_full", high.text
        assert high.headers["Retry-After"] == "1", high.text
        assert [r.status_code for r in await asyncio.gather(running, low)] == [200, 200]


async def test_an_idle_engine_collects_from_its_oldest_waiting_row_not_from_the_head_of_the_queue(
    pipe, monkeypatch
):
    """max_wait_ms counts from the oldest waiting row's arrival. A later row of a lower value goes to the
    head of the queue; the engine took the head's arrival as the start of its collection, so the wait began
    again (here it started after ~3.5 s instead of ~2 s)."""
    hook = StepHook(pipe, monkeypatch)
    started: list[float] = []
    monkeypatch.setattr(hook, "fail", lambda state: started.append(time.monotonic()))
    async with serve(pipe, scheduling_policy="priority", max_batch_size=4, max_wait_ms=2000) as client:
        started.clear()
        t0 = time.monotonic()
        low = asyncio.create_task(
            client.post("/v1/generate", json={"prompt": "low", "steps": 1, "priority": 5})
        )
        await asyncio.sleep(1.5)
        high = asyncio.create_task(client.post("/v1/generate", json={"prompt": "high", "steps": 1}))
        assert [r.status_code for r in await asyncio.gather(low, high)] == [200, 200]
        assert started and started[0] - t0 < 2.8, started[0] - t0
