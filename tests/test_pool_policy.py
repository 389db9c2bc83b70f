"""The pool's rules as plain functions of plain values: no threads, no event loop, no fakes."""

from __future__ import annotations

import pytest

from limner._pool._policy import (
    Evict,
    NoRoom,
    Start,
    is_expired,
    plan_cold_start,
    retry_delay,
    workers_need_mb,
)

NONE_IDLE: list[tuple[str, float | None]] = []


def test_a_second_worker_costs_its_overhead_or_a_whole_copy() -> None:
    assert workers_need_mb(400, 50, 1) == 400
    assert workers_need_mb(400, 50, 2) == 450
    assert workers_need_mb(400, None, 2) == 800  # no overhead declared: a full copy


@pytest.mark.parametrize(
    ("used_mb", "expected"),
    [
        (0, Start(workers=2, need_mb=450)),
        (350, Start(workers=2, need_mb=450)),  # exactly the budget still fits
        (351, Start(workers=1, need_mb=400)),
        (400, Start(workers=1, need_mb=400)),
    ],
)
def test_two_workers_if_they_fit_else_one(used_mb: float, expected: Start) -> None:
    plan = plan_cold_start(need_mb=[400, 450], used_mb=used_mb, budget_mb=800, idle=NONE_IDLE)
    assert plan == expected


def test_with_no_room_the_least_recently_used_idle_model_goes_first() -> None:
    idle = [("b", 30.0), ("a", 10.0), ("c", 20.0)]
    plan = plan_cold_start(need_mb=[400, 450], used_mb=700, budget_mb=800, idle=idle)
    assert plan == Evict("a")


def test_an_idle_model_never_used_counts_as_oldest() -> None:
    plan = plan_cold_start(
        need_mb=[400], used_mb=700, budget_mb=800, idle=[("a", 5.0), ("n", None)]
    )
    assert plan == Evict("n")


def test_with_no_room_and_nothing_idle_it_names_need_and_room() -> None:
    plan = plan_cold_start(need_mb=[400, 450], used_mb=700, budget_mb=800, idle=NONE_IDLE)
    assert plan == NoRoom(need_mb=400, available_mb=100)
    over = plan_cold_start(need_mb=[400], used_mb=900, budget_mb=800, idle=NONE_IDLE)
    assert over == NoRoom(need_mb=400, available_mb=0)


def test_max_workers_is_the_length_of_the_needs() -> None:
    plan = plan_cold_start(need_mb=[100, 110, 120], used_mb=0, budget_mb=1000, idle=NONE_IDLE)
    assert plan == Start(workers=3, need_mb=120)


def test_expiry_is_strictly_after_keep_alive() -> None:
    assert not is_expired(last_used=100.0, now=400.0, keep_alive=300.0)
    assert is_expired(last_used=100.0, now=400.5, keep_alive=300.0)
    assert not is_expired(last_used=None, now=1e9, keep_alive=0.0)  # never used: not idle


def test_retry_backoff_doubles_up_to_its_ceiling() -> None:
    delays = [retry_delay(failures, (1.0, 60.0)) for failures in range(1, 9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
