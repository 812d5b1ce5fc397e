"""The batching policy and the service estimate as pure logic (no model, no event loop)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dcar.server.batching import BatchPolicy, GroupView, ServiceEstimate

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


def test_admission_is_fifo_and_bounded_by_max_batch_size():
    policy = BatchPolicy(max_batch_size=4, max_wait_s=0.0)
    targets = policy.admit([Row(A)] * 6, [GroupView(A, 1)])
    assert targets == [0, 0, 0]  # 1 running + 3 admitted = 4


def test_rows_of_another_grid_open_a_new_group():
    policy = BatchPolicy(max_batch_size=8, max_wait_s=0.0)
    targets = policy.admit([Row(B), Row(A), Row(B)], [GroupView(A, 2)])
    assert targets == [1, 0, 1]


def test_cap_bounds_one_forward_not_the_rows_in_flight():
    policy = BatchPolicy(max_batch_size=8, max_wait_s=0.0)
    assert policy.lower_cap(6) == 3
    targets = policy.admit([Row(A)] * 8, [GroupView(A, 2)])
    assert targets == [0, 1, 1, 1, 2, 2]  # groups of at most 3, 8 rows in flight
    assert policy.lower_cap(1) == 1  # never below one row
    assert policy.lower_cap(16) == 1  # never raised by a larger failure


def test_full_engine_admits_nothing():
    policy = BatchPolicy(max_batch_size=2, max_wait_s=0.0)
    assert policy.admit([Row(A)], [GroupView(A, 2)]) == []


def test_merges_pack_same_grid_groups_under_the_cap():
    policy = BatchPolicy(max_batch_size=8, max_wait_s=0.0)
    policy.cap = 4
    groups = [GroupView(A, 1), GroupView(B, 3), GroupView(A, 2), GroupView(A, 3), GroupView(B, 1)]
    assert policy.merges(groups) == [[0, 2], [1, 4], [3]]


def test_policy_refuses_an_empty_batch_size():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchPolicy(0, 0.0)


def test_estimate_knows_nothing_before_a_measurement():
    est = ServiceEstimate()
    assert est.predict(1, 12, waiting=0, running=0, capacity=4) is None
    assert est.retry_after(10, 12) == 1


def test_estimate_predicts_service_and_queueing():
    est = ServiceEstimate(alpha=1.0)
    est.observe(rows=4, seconds=0.04)  # 10 ms per iteration, 10 ms per row-step at batch 4
    alone = est.predict(1, 12, waiting=0, running=0, capacity=4)
    assert alone == pytest.approx(12 * 0.04)  # an iteration never takes less than the measured step
    behind = est.predict(1, 12, waiting=7, running=4, capacity=4)
    assert behind == pytest.approx(8 * 12 * 0.01 + 12 * 0.04)  # 8 rows must finish first
    assert est.retry_after(waiting=20, steps=12) == 3  # 20 * 12 * 0.01 = 2.4 s
    assert est.retry_after(waiting=10**6, steps=12) == 600


def test_estimate_is_a_moving_average():
    est = ServiceEstimate(alpha=0.5)
    est.observe(1, 1.0)
    est.observe(1, 3.0)
    assert est.step_s == pytest.approx(2.0)
    est.observe(0, 100.0)  # nothing stepped: ignored
    assert est.step_s == pytest.approx(2.0)
