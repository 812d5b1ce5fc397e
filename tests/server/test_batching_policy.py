"""The batching policy, the cost model and the forecast as pure logic (no model, no event loop)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dcar.server.batching import BatchPolicy, GroupView, pack
from dcar.server.forecast import CostModel, alone, forecast

A, B = (4, 4), (8, 8)  # two token grids


@dataclass
class Row:
    grid: tuple[int, int]
    enqueued: float = 0.0


def test_idle_engine_waits_for_max_wait_after_first_arrival():
    policy = BatchPolicy(max_batch_size=4, max_wait_s=0.1)
    assert policy.start_delay([], now=5.0) is None
    waiting = [Row(A, enqueued=1.0), Row(A, enqueued=1.05)]
    assert policy.start_delay(waiting, now=1.06) == pytest.approx(0.04)
    assert policy.start_delay(waiting, now=1.2) == 0.0


def test_idle_engine_starts_at_once_when_a_full_batch_of_the_head_grid_waits():
    policy = BatchPolicy(max_batch_size=3, max_wait_s=10.0)
    assert policy.start_delay([Row(A), Row(B), Row(A)], now=0.0) > 0
    assert policy.start_delay([Row(A), Row(B), Row(A), Row(A)], now=0.0) == 0.0


def test_admission_fills_the_free_slots_whatever_the_grid():
    policy = BatchPolicy(max_batch_size=4, max_wait_s=0.0)
    assert policy.admit([Row(A)] * 6, running=1) == 3  # 1 running + 3 admitted = 4
    assert policy.admit([Row(B), Row(A)], running=1) == 2
    assert policy.admit([Row(A)], running=4) == 0


def test_cap_is_halved_below_an_out_of_memory_size_and_never_raised():
    policy = BatchPolicy(max_batch_size=8, max_wait_s=0.0)
    assert policy.lower_cap(6) == 3
    assert policy.admit([Row(A)] * 8, running=2) == 6  # the cap bounds one forward, not the rows in flight
    assert policy.lower_cap(1) == 1  # never below one row
    assert policy.lower_cap(16) == 1  # never raised by a larger failure


def test_pack_cuts_groups_at_the_cap_and_merges_same_grid_slices():
    groups = [GroupView(A, 1), GroupView(B, 3), GroupView(A, 2), GroupView(A, 6), GroupView(B, 1)]
    parts = pack(groups, cap=4)
    assert parts == [[(0, 0, 1), (2, 0, 2)], [(1, 0, 3), (4, 0, 1)], [(3, 0, 4)], [(3, 4, 6)]]
    for part in parts:  # every forward holds one grid and at most cap rows
        assert len({groups[i].grid for i, _, _ in part}) == 1
        assert sum(b - a for _, a, b in part) <= 4
    assert sorted((i, a, b) for part in parts for i, a, b in part) == [
        (0, 0, 1),
        (1, 0, 3),
        (2, 0, 2),
        (3, 0, 4),
        (3, 4, 6),
        (4, 0, 1),
    ]  # every row exactly once


def test_policy_refuses_an_empty_batch_size():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchPolicy(0, 0.0)


def costs_of(step: dict[int, float], finish: dict[int, float], grid=A) -> CostModel:
    model = CostModel()
    for rows, seconds in step.items():
        model.observe("step", grid, rows, seconds)
    for rows, seconds in finish.items():
        model.observe("finish", grid, rows, seconds)
    return model


def test_cost_model_fits_a_line_through_the_batch_sizes_seen():
    model = costs_of({1: 0.10, 2: 0.12, 8: 0.24, 16: 0.40}, {1: 0.5})  # 0.08 + 0.02 x rows
    assert model.cost("step", A, 2, cap=16) == pytest.approx(0.12)
    assert model.cost("step", A, 5, cap=16) == pytest.approx(0.18)  # between measured sizes
    assert model.cost("step", A, 32, cap=32) == pytest.approx(0.72)  # beyond them
    assert model.cost("step", A, 24, cap=16) == pytest.approx(0.40 + 0.24)  # forwards of 16 and 8
    assert model.cost("finish", A, 3, cap=16) == pytest.approx(1.5)  # one size seen: proportional
    assert model.cost("step", A, 0, cap=16) == 0.0
    assert not model.known(B) and model.known(A)


def test_one_slow_outlier_does_not_move_the_fit():
    model = costs_of({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 6: 0.6}, {1: 0.5})
    model.observe("step", A, 2, 9.0)  # one forward of a starved process
    assert model.cost("step", A, 2, cap=16) == pytest.approx(0.2)
    for seconds in (0.01, 0.01, 5.0):
        model.observe_overhead(seconds)
    assert model.overhead_s == pytest.approx(0.01)
    with pytest.raises(ValueError, match="kind"):
        model.observe("decode", A, 1, 1.0)


def test_the_fit_follows_the_last_measurements():
    model = CostModel(window=8)
    for _ in range(8):
        model.observe("step", A, 4, 0.4)
    for _ in range(8):  # the machine got twice as slow
        model.observe("step", A, 4, 0.8)
    assert model.cost("step", A, 4, cap=4) == pytest.approx(0.8)


def test_forecast_knows_nothing_before_a_measurement():
    assert forecast([], [(A, 12)], CostModel(), max_batch_size=4, cap=4) is None


def test_forecast_of_an_idle_engine_is_steps_times_step_plus_finish():
    model = costs_of({1: 0.1, 2: 0.15}, {1: 0.4, 2: 0.5})
    assert alone(A, 1, 12, model, max_batch_size=4, cap=4) == pytest.approx(12 * 0.1 + 0.4)
    assert alone(A, 2, 12, model, max_batch_size=4, cap=4) == pytest.approx(12 * 0.15 + 0.5)
    assert alone(A, 2, 12, model, max_batch_size=1, cap=1) == pytest.approx(
        2 * (12 * 0.1 + 0.4)
    )  # one by one


def test_forecast_waits_for_running_rows_to_free_slots_fifo():
    model = costs_of({1: 0.1, 2: 0.2}, {1: 1.0, 2: 1.0})
    # Two slots, both busy: one row with 3 steps left, one with 5. Two rows wait, 4 steps each.
    running, waiting = [(A, 3, 12), (A, 5, 12)], [(A, 4), (A, 4)]
    fc = forecast(running, waiting, model, max_batch_size=2, cap=2, refill=False)
    # t=0.6: 3 steps of 2 rows; the first running row finishes (1.0) -> t=1.6, waiting row 0 joins.
    assert fc.admitted[0] == pytest.approx(1.6)
    # 2 more steps of 2 rows (0.4) -> the second running row finishes (1.0) at 3.0; waiting row 1 joins.
    assert fc.admitted[1] == pytest.approx(3.0)
    # row 0 had 2 steps left: 2 x 0.2 + finish 1.0 -> 4.4; row 1: 2 more steps alone (0.2) + finish -> 5.6
    assert fc.finished == [pytest.approx(4.4), pytest.approx(5.6)]
    later = forecast(running, waiting, model, max_batch_size=2, cap=2, elapsed=1.0, refill=False)
    assert later.admitted[0] == pytest.approx(0.6) and later.finished[1] == pytest.approx(4.6)


def test_forecast_under_a_steady_load_keeps_the_batch_as_full_as_it_is():
    model = costs_of({1: 0.1, 2: 0.2, 3: 0.3}, {1: 0.0})
    running, waiting = [(A, 1, 4), (A, 2, 4)], [(A, 4)]  # three rows of demand now
    draining = forecast(running, waiting, model, max_batch_size=3, cap=3, refill=False)
    steady = forecast(running, waiting, model, max_batch_size=3, cap=3)
    # A free slot, but the step in progress has no room: in at the next boundary (one step of 2 rows) either way
    assert draining.admitted == steady.admitted == [pytest.approx(0.2)]
    # then one step of 2 rows, after which the other running row has left too;
    # draining: 3 more steps alone (0.3) -> 0.7; steady: later arrivals take both freed slots -> 3 x 0.3 -> 1.3
    assert draining.finished == [pytest.approx(0.7)] and steady.finished == [pytest.approx(1.3)]


def test_forecast_joins_a_busy_engine_at_the_first_step_boundary_from_now():
    model = costs_of({1: 0.1, 2: 0.2}, {1: 0.0, 2: 0.0})
    running = [(A, 10, 12)]
    fresh = forecast(running, [(A, 4)], model, max_batch_size=2, cap=2, refill=False)
    assert fresh.admitted == [pytest.approx(0.1)]  # the step that started at the snapshot comes first
    # 0.25 s after the snapshot the third step (0.2 to 0.3) is under way: in at 0.3, 0.05 s from now
    later = forecast(running, [(A, 4)], model, max_batch_size=2, cap=2, elapsed=0.25, refill=False)
    assert later.admitted == [pytest.approx(0.05)]
    assert later.finished == [pytest.approx(0.3 + 4 * 0.2 - 0.25)]
    idle = forecast([], [(A, 4)], model, max_batch_size=2, cap=2)
    assert idle.admitted == [0.0]  # an idle engine starts at once
