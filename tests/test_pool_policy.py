"""The pool's rules as plain functions of plain values: no threads, no event loop, no fakes."""

from __future__ import annotations

import pytest

from limner._pool._policy import (
    Drain,
    Evict,
    NoRoom,
    Reclaimable,
    Resident,
    Room,
    Start,
    Wait,
    budget_mb,
    floor_mb,
    is_expired,
    may_start_streamed,
    next_in_line,
    plan_cold_start,
    plan_reclaim,
    plan_turn,
    retry_after,
    retry_delay,
    turn_seconds,
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


# -- the budget's meaning -----------------------------------------------------------------------


def test_the_budget_is_an_absolute_size_or_a_share_of_the_device() -> None:
    assert budget_mb(total_mb=16_000, fraction=0.8, absolute_mb=None) == 12_800
    assert budget_mb(total_mb=16_000, fraction=0.8, absolute_mb=90) == 90


def test_the_default_floor_is_five_percent_at_most_two_gigabytes() -> None:
    assert floor_mb(total_mb=16_000, floor=None) == 800
    assert floor_mb(total_mb=1_000_000, floor=None) == 2048
    assert floor_mb(total_mb=16_000, floor=0) == 0  # turned off
    assert floor_mb(total_mb=16_000, floor=300) == 300


def test_room_counts_the_pool_against_the_budget_and_the_machine_against_the_floor() -> None:
    # A 90 MB budget on a machine others fill to 2.7 of 16 GB: the room is the budget's.
    assert Room(budget_mb=90, pool_mb=0, available_mb=13_300, floor_mb=800).free_mb == 90
    assert Room(budget_mb=90, pool_mb=50, available_mb=13_300, floor_mb=800).free_mb == 40
    # A large budget on a nearly full machine: the floor's.
    assert Room(budget_mb=12_800, pool_mb=0, available_mb=1_000, floor_mb=800).free_mb == 200


# -- turns --------------------------------------------------------------------------------------

NOW = 100.0


def resident(
    name: str,
    *,
    memory_mb: float = 500,
    turn_started: float = 0.0,
    turn_seconds: float = 2.0,
    served: int = 5,
    idle: bool = False,
    draining: bool = False,
    last_used: float | None = 90.0,
    oldest_wait: float | None = None,
) -> Resident[str]:
    return Resident(
        model=name,
        memory_mb=memory_mb,
        turn_started=turn_started,
        turn_seconds=turn_seconds,
        served=served,
        last_used=last_used,
        idle=idle,
        draining=draining,
        oldest_wait=oldest_wait,
    )


def full(pool_mb: float = 1000, **extra: float) -> Room:
    """A 1000 MB budget the residents fill; the machine has plenty available."""
    return Room(budget_mb=1000, pool_mb=pool_mb, available_mb=50_000, floor_mb=500, **extra)


def plan(room: Room, residents: list[Resident[str]], waited_since: float = 99.0) -> object:
    return plan_turn(
        need_mb=[500, 550], room=room, residents=residents, waited_since=waited_since, now=NOW
    )


def test_a_turn_starts_the_waiting_model_when_it_fits() -> None:
    assert plan(full(pool_mb=0), []) == Start(workers=2, need_mb=550)
    assert plan(full(pool_mb=480), [resident("a", memory_mb=480)]) == Start(1, 500)


def test_an_idle_model_goes_first_least_recently_used() -> None:
    residents = [
        resident("busy", turn_started=0.0),
        resident("idle-late", idle=True, last_used=95.0),
        resident("idle-early", idle=True, last_used=80.0),
    ]
    assert plan(full(pool_mb=1500), residents) == Evict("idle-early")


def test_a_busy_model_whose_turn_is_over_is_drained() -> None:
    assert plan(full(), [resident("a"), resident("b", turn_started=10.0)]) == Drain(("a",))


def test_those_nobody_waits_for_drain_before_the_longest_held() -> None:
    residents = [
        resident("held-longest", turn_started=0.0, oldest_wait=99.5),
        resident("nobody-waits", turn_started=50.0),
    ]
    assert plan(full(), residents) == Drain(("nobody-waits",))


def test_enough_models_are_drained_to_make_room() -> None:
    residents = [resident("a", memory_mb=300), resident("b", memory_mb=300, turn_started=5.0)]
    room = Room(budget_mb=1000, pool_mb=900, available_mb=50_000, floor_mb=0)  # 100 free
    assert plan(room, residents) == Drain(("a", "b"))  # 100 + 300 < 500 <= 100 + 600


def test_a_model_keeps_its_memory_for_its_turn_then_waits_name_the_end() -> None:
    started = NOW - 1.0  # one second into a two-second turn
    assert plan(full(), [resident("a", turn_started=started)]) == Wait(until=started + 2.0)


def test_a_model_that_has_not_served_yet_is_not_drained() -> None:
    # It loaded for callers who have not had an answer yet: draining it would waste the load.
    assert plan(full(), [resident("a", served=0)]) == Wait(until=None)


def test_a_model_whose_own_callers_waited_longer_keeps_serving_them() -> None:
    older = resident("a", oldest_wait=90.0)
    assert plan(full(), [older], waited_since=95.0) == Wait(until=None)
    assert plan(full(), [older], waited_since=85.0) == Drain(("a",))


def test_drains_under_way_that_make_room_are_waited_for_not_added_to() -> None:
    residents = [resident("a", draining=True), resident("b", turn_started=5.0)]
    assert plan(full(), residents) == Wait(until=None)
    releasing = full(releasing_mb=500)
    assert plan(releasing, [resident("b", memory_mb=500)]) == Wait(until=None)


def test_no_room_only_when_it_could_never_fit() -> None:
    over_budget = Room(budget_mb=400, pool_mb=0, available_mb=50_000, floor_mb=0)
    assert plan(over_budget, []) == NoRoom(need_mb=500, available_mb=400)
    # others fill the machine: even with every model gone, 300 MB stay above the floor
    crowded = Room(budget_mb=10_000, pool_mb=200, available_mb=600, floor_mb=500)
    assert plan(crowded, [resident("a", memory_mb=200)]) == NoRoom(need_mb=500, available_mb=300)
    # everything loaded or loading could go: wait for it instead
    loading = Room(budget_mb=1000, pool_mb=1000, available_mb=50_000, floor_mb=0, loading_mb=1000)
    assert plan(loading, []) == Wait(until=None)


def test_the_model_most_callers_wait_for_loads_next() -> None:
    waiting = [("few", 10.0, 2), ("most", 12.0, 20), ("some", 11.0, 5)]
    assert next_in_line(waiting, now=13.0, patience=15.0) == ["most", "some", "few"]
    # equal counts: the callers who came last, so that a group on the move catches up with
    # the one ahead; full ties keep their order
    assert next_in_line([("a", 7.0, 3), ("b", 12.0, 3)], now=13.0, patience=15.0) == ["b", "a"]
    assert next_in_line([("x", 1.0, 1), ("y", 1.0, 1)], now=2.0, patience=15.0) == ["x", "y"]


def test_a_model_whose_caller_waited_past_patience_goes_first_oldest_first() -> None:
    waiting = [("busy", 29.0, 30), ("lone", 10.0, 1), ("older", 5.0, 1)]
    assert next_in_line(waiting, now=30.0, patience=15.0) == ["older", "lone", "busy"]


def test_the_model_others_were_drained_for_keeps_its_place() -> None:
    # "drained" just went cold with more callers than "waited-for": it does not take back
    # the room its drain made for "waited-for".
    waiting = [("drained", 29.0, 20), ("waited-for", 28.0, 1)]
    order = next_in_line(waiting, now=30.0, patience=15.0, promised={"waited-for"})
    assert order == ["waited-for", "drained"]


def test_a_turn_is_three_loads_long_within_bounds_unless_set() -> None:
    assert turn_seconds(min_turn=None, load_seconds=2.0, max_wait=60.0) == 6.0
    assert turn_seconds(min_turn=None, load_seconds=0.01, max_wait=60.0) == 0.5
    assert turn_seconds(min_turn=None, load_seconds=30.0, max_wait=60.0) == 15.0
    assert turn_seconds(min_turn=7.0, load_seconds=30.0, max_wait=60.0) == 7.0


def test_callers_sent_away_come_back_after_a_turn_and_a_load() -> None:
    assert retry_after(turn_s=6.0, load_s=2.0) == 8.0
    assert retry_after(turn_s=0.1, load_s=0.1) == 1.0


# -- cached parts (LoRA adapters) go before any model ---------------------------------------------


def part(model: str, name: str, memory_mb: float, last_used: float) -> Reclaimable[str]:
    return Reclaimable(model, name, memory_mb, last_used)


def test_the_least_recently_used_parts_are_dropped_just_enough() -> None:
    parts = [part("a", "ink", 10, 5.0), part("b", "oil", 30, 1.0), part("a", "tea", 20, 3.0)]
    assert plan_reclaim(shortfall_mb=25, parts=parts) == [parts[1]]  # oil alone is enough
    assert plan_reclaim(shortfall_mb=45, parts=parts) == [parts[1], parts[2]]
    assert plan_reclaim(shortfall_mb=60, parts=parts) == [parts[1], parts[2], parts[0]]


def test_parts_are_not_dropped_when_they_would_not_make_the_room() -> None:
    """All of them would not do: a model must go anyway, and its parts with it."""
    parts = [part("a", "ink", 10, 5.0), part("b", "oil", 30, 1.0)]
    assert plan_reclaim(shortfall_mb=41, parts=parts) is None
    assert plan_reclaim(shortfall_mb=1, parts=[]) is None


def test_nothing_is_dropped_when_nothing_is_short() -> None:
    assert plan_reclaim(shortfall_mb=0, parts=[part("a", "ink", 10, 5.0)]) == []
    assert plan_reclaim(shortfall_mb=-3, parts=[]) == []


# -- streamed calls of one group share a model; other groups wait ---------------------------------

INK, OIL = (("ink", 0.8),), (("oil", 1.0),)


def may_start(
    position: int,
    waiting: list[tuple[object, float]],
    *,
    group: object = None,
    running: int = 0,
    now: float = 10.0,
    patience: float = 3.0,
) -> bool:
    return may_start_streamed(
        position=position,
        waiting=waiting,
        running_group=group,
        running=running,
        now=now,
        patience=patience,
    )


def test_when_nothing_runs_the_call_that_waited_longest_goes() -> None:
    waiting: list[tuple[object, float]] = [(INK, 1.0), (OIL, 2.0), (INK, 3.0)]
    assert may_start(0, waiting)
    assert not may_start(1, waiting)
    assert not may_start(2, waiting)  # its group's first call goes first


def test_calls_of_another_group_wait_for_the_running_ones() -> None:
    waiting: list[tuple[object, float]] = [(OIL, 1.0)]
    assert not may_start(0, waiting, group=INK, running=1)
    assert may_start(0, waiting, group=OIL, running=1)
    assert not may_start(0, [((), 1.0)], group=INK, running=2)  # no adapters is a group too


def test_a_call_of_the_running_group_goes_ahead_for_a_while() -> None:
    """The oil call came first; the ink call joins the running ink calls while the oil
    call has waited less than the patience, and waits behind it after."""
    waiting: list[tuple[object, float]] = [(OIL, 8.0), (INK, 9.0)]
    assert may_start(1, waiting, group=INK, running=1, now=10.0, patience=3.0)
    assert not may_start(1, waiting, group=INK, running=1, now=11.5, patience=3.0)


def test_a_call_that_came_before_the_other_group_always_joins() -> None:
    waiting: list[tuple[object, float]] = [(INK, 1.0), (OIL, 2.0)]
    assert may_start(0, waiting, group=INK, running=1, now=100.0)


def test_within_a_group_calls_start_in_the_order_they_came() -> None:
    waiting: list[tuple[object, float]] = [(INK, 5.0), (INK, 5.0)]
    assert may_start(0, waiting, group=INK, running=1)
    assert not may_start(1, waiting, group=INK, running=1)


def test_a_free_model_stays_with_its_group_for_a_while() -> None:
    """Ink ran last and its calls have ended; the next ink call goes before an earlier oil
    call while that has waited less than the patience, and after it past that."""
    waiting: list[tuple[object, float]] = [(OIL, 8.0), (INK, 9.0)]
    assert may_start(1, waiting, group=INK, running=0, now=10.0)
    assert not may_start(0, waiting, group=INK, running=0, now=10.0)
    assert may_start(0, waiting, group=INK, running=0, now=11.5)
    assert not may_start(1, waiting, group=INK, running=0, now=11.5)
