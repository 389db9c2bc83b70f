"""Which application gives its room up, and when the runtime gives up on the control plane,
as plain rules: no cluster, and no ray needed."""

from __future__ import annotations

import socket
import time

import pytest

from limner import ModelSettings
from limner.ray import RayKeyOptions
from limner.ray._cluster import AppStatus, unreachable
from limner.ray._eviction import Holder, choose_victim, holders
from limner.ray._health import ControlPlaneWatch
from limner.ray._keys import KeyEntry
from limner.ray._placement import ReplicaResources
from limner.ray._usage import AppUsage
from limner.testing import fake_embedding_spec

pytestmark = pytest.mark.anyio

RUNNING = AppStatus(status="RUNNING", running=1)
NOW = 1_000.0


def usage(app: str, *, busy: bool, reported: float | None = None, **fields: float) -> AppUsage:
    """A board's summary of ``app``: busy as reported at ``reported`` (wall clock)."""
    return AppUsage(
        app=app,
        replicas=1,
        busy=busy,
        last_used=fields.get("last_used"),
        resources={"CPU": 1.0},
        batches=0,
        mean_batch_size=0.0,
        queue_depth=int(fields.get("queue_depth", 0)),
        held_since=fields.get("held_since"),
        busy_reported=reported if busy else None,
    )


def own(key: str, *, in_flight: int = 0, idle_for: float | None = None) -> KeyEntry:
    """This host's entry of ``key``: ``in_flight`` calls now, its last one ended
    ``idle_for`` seconds ago."""
    entry = KeyEntry(
        key=key,
        app=f"limner:{key}",
        spec=fake_embedding_spec(key),
        settings=ModelSettings(weights="w"),
        options=RayKeyOptions(),
        resources=ReplicaResources(num_cpus=1, num_gpus=0.0, memory_mb=0.0),
    )
    entry.in_flight = in_flight
    entry.last_used = None if idle_for is None else time.monotonic() - idle_for
    return entry


def test_an_idle_key_gives_its_room_up_before_a_busy_one_least_recently_used_first() -> None:
    candidates = [
        Holder("limner:busy", busy=True, held_since=0.0),
        Holder("limner:recent", busy=False, last_used=30.0),
        Holder("limner:old", busy=False, last_used=10.0),
        Holder("limner:never", busy=False, last_used=None),
    ]
    assert choose_victim(candidates, now=NOW, min_hold=5).app == "limner:never"  # type: ignore[union-attr]
    assert choose_victim(candidates[:3], now=NOW, min_hold=5).app == "limner:old"  # type: ignore[union-attr]
    assert choose_victim([], now=NOW, min_hold=5) is None


def test_with_every_key_busy_the_one_holding_its_room_longest_goes_after_its_minimum() -> None:
    """A busy key keeps its room ``min_hold`` seconds; past that, the one held longest goes,
    one with nobody queued on it before one with callers queued."""
    fresh = Holder("limner:fresh", busy=True, held_since=NOW - 2)
    unknown = Holder("limner:unknown", busy=True, held_since=None)
    assert choose_victim([fresh, unknown], now=NOW, min_hold=5) is None
    older = Holder("limner:older", busy=True, held_since=NOW - 60, queued=3)
    old = Holder("limner:old", busy=True, held_since=NOW - 30)
    newer = Holder("limner:newer", busy=True, held_since=NOW - 10)
    assert choose_victim([fresh, older], now=NOW, min_hold=5) == older
    assert choose_victim([fresh, older, newer], now=NOW, min_hold=5) == newer
    assert choose_victim([fresh, older, old, newer], now=NOW, min_hold=5) == old
    assert choose_victim([fresh, older, old], now=NOW, min_hold=100) is None


def test_a_host_s_own_idle_key_wins_over_a_busy_report_made_before_its_last_call_ended() -> None:
    """The board's busy report is stale once this host saw its last call end later; a call
    in flight here is busy whatever the board says."""
    now = time.time()
    statuses = {"limner:a": RUNNING, "limner:b": RUNNING, "limner:c": RUNNING}
    board = {
        "limner:a": usage("limner:a", busy=True, reported=now - 5.0),
        "limner:b": usage("limner:b", busy=True, reported=now - 0.05),
        "limner:c": usage("limner:c", busy=False),
    }
    mine = [own("a", idle_for=1.0), own("b", idle_for=2.0), own("c", in_flight=1)]
    found = {holder.app: holder.busy for holder in holders("limner:x", statuses, board, mine)}
    assert found == {"limner:a": False, "limner:b": True, "limner:c": True}


def test_another_runtime_s_key_is_as_its_replicas_report_it() -> None:
    statuses = {
        "limner:theirs": RUNNING,
        "limner:idle": RUNNING,
        "limner:wanted": RUNNING,
        "limner:stopped": AppStatus(status="RUNNING", running=0),
    }
    board = {
        "limner:theirs": usage("limner:theirs", busy=True, reported=1.0, held_since=50.0),
        "limner:idle": usage("limner:idle", busy=False, last_used=7.0),
    }
    found = holders("limner:wanted", statuses, board, [])
    assert [(h.app, h.busy, h.last_used, h.held_since) for h in found] == [
        ("limner:idle", False, 7.0, None),
        ("limner:theirs", True, None, 50.0),
    ]
    assert found[0].resources == {"CPU": 1.0}


async def test_a_key_this_runtime_deploys_or_retires_now_is_no_candidate() -> None:
    deploying = own("a", idle_for=60.0)
    async with deploying.lock:
        assert holders("limner:x", {"limner:a": RUNNING}, {}, [deploying]) == []
    assert len(holders("limner:x", {"limner:a": RUNNING}, {}, [deploying])) == 1


def test_without_the_board_only_this_runtime_s_own_keys_may_give_room_up() -> None:
    statuses = {"limner:mine": RUNNING, "limner:theirs": RUNNING}
    [only] = holders("limner:x", statuses, None, [own("mine", idle_for=1.0)])
    assert (only.app, only.busy, only.resources) == ("limner:mine", False, {"CPU": 1.0})


def test_a_key_that_turns_idle_while_a_caller_waits_is_chosen_at_the_next_look() -> None:
    """The runtime asks again on every poll: the first look finds every key busy and too
    fresh to go; a tenth of a second later this host's call on one has ended."""
    statuses = {"limner:a": RUNNING}
    entry = own("a", in_flight=1)
    entry.since = time.monotonic()
    first = holders("limner:x", statuses, {}, [entry])
    assert choose_victim(first, now=time.time(), min_hold=5) is None
    entry.in_flight, entry.last_used = 0, time.monotonic()
    second = holders("limner:x", statuses, {}, [entry])
    assert choose_victim(second, now=time.time(), min_hold=5) == second[0]


def test_the_control_plane_is_given_up_on_after_its_timeout_unless_it_comes_back() -> None:
    watch = ControlPlaneWatch(timeout=10)
    assert watch.observe(None, 0.0) is None
    assert watch.since is None
    assert watch.observe("the GCS refused", 1.0) == "unreachable"
    assert watch.since == 1.0
    assert watch.observe("the GCS refused", 5.0) is None
    assert watch.observe(None, 6.0) == "back"
    assert watch.since is None
    assert watch.observe("the raylet refused", 7.0) == "unreachable"
    assert watch.observe("the raylet refused", 16.9) is None and not watch.lost
    assert watch.observe("the raylet refused", 17.0) == "lost" and watch.lost
    assert watch.observe(None, 18.0) is None  # given up on: for good
    assert watch.problem == "the raylet refused"
    assert ControlPlaneWatch(timeout=0).observe("gone", 1.0) == "lost"


def test_a_port_that_takes_no_connection_is_named() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert unreachable([("the GCS", "127.0.0.1", port)], 2.0) is None
    problem = unreachable([("the GCS", "127.0.0.1", port)], 2.0)
    assert problem == f"the GCS at 127.0.0.1:{port} takes no connection (ECONNREFUSED)"
