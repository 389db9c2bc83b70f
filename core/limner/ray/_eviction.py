"""Making room on the cluster for one more replica: which application gives its room up,
and when Ray has counted what that freed.

The eviction side of :mod:`limner.ray._placement`'s rules, and the cluster's share of the
pool's fairness: plain functions of what the runtime read from Serve, the cluster's board
and its own keys, so the runtime only reads and acts. It asks again on every poll while a
caller waits, so a key that turned idle a moment after the last look is seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ._cluster import AppStatus
from ._keys import KeyEntry, wall_clock
from ._usage import AppUsage

__all__ = ["Holder", "choose_victim", "free", "freed_counted", "holders"]


def free(nodes: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each resource summed over the nodes."""
    total: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def freed_counted(
    available: Sequence[Mapping[str, float]],
    before: Mapping[str, float],
    freed: Mapping[str, float],
) -> bool:
    """Whether the nodes' free resources have grown by ``freed`` since they were
    ``before`` (Ray counts a deleted replica's resources back a little later)."""
    now = free(available)
    return all(
        now.get(name, 0.0) + 1e-9 >= before.get(name, 0.0) + amount
        for name, amount in freed.items()
    )


@dataclass(frozen=True)
class Holder:
    """An application holding room on the cluster, as a runtime that needs room sees it:
    whether calls run on it, how many callers its replicas queue, when it was last used
    and since when it holds its room (wall clock; None: unknown), and what it holds (Ray's
    units)."""

    app: str
    busy: bool
    queued: int = 0
    last_used: float | None = None
    held_since: float | None = None
    resources: Mapping[str, float] = field(default_factory=dict)


def holders(
    exclude: str,
    statuses: Mapping[str, AppStatus],
    usage: Mapping[str, AppUsage] | None,
    mine: Sequence[KeyEntry],
) -> list[Holder]:
    """Every running application but ``exclude``, from Serve's statuses, the board's
    reports (``usage``) and this runtime's own keys (``mine``).

    For its own keys the runtime knows better than a report made before its last call
    ended: a call in flight here is busy, and no call in flight here since the last busy
    report is idle; one it deploys or retires now is no candidate. With no board to read
    (``usage`` None) only its own keys are candidates: it cannot tell whether another
    runtime's key is in use.
    """
    own_keys = {entry.app: entry for entry in mine}
    found: list[Holder] = []
    for app, status in sorted(statuses.items()):
        own = own_keys.get(app)
        if app == exclude or not status.running or (usage is None and own is None):
            continue
        if own is not None and own.lock.locked():
            continue  # this runtime deploys or retires it right now
        report = usage.get(app) if usage is not None else None
        busy = report is not None and report.busy
        last_used = report.last_used if report is not None else None
        held_since = report.held_since if report is not None else None
        resources: Mapping[str, float] = report.resources if report is not None else {}
        if own is not None:
            own_last = wall_clock(own.last_used) if own.last_used is not None else None
            if own.in_flight:
                busy = True
            elif report is not None and own_last is not None:
                # a busy report made before this host's last call ended is stale
                busy = busy and own_last < (report.busy_reported or 0.0)
            if own_last is not None:  # this host's calls count too
                last_used = max(last_used or 0.0, own_last)
            if held_since is None and own.since is not None:
                held_since = wall_clock(own.since)
            if own.resources is not None:
                resources = {n: a * status.running for n, a in own.resources.as_ray().items()}
        found.append(
            Holder(
                app=app,
                busy=busy,
                queued=report.queue_depth if report is not None else 0,
                last_used=last_used,
                held_since=held_since,
                resources=resources,
            )
        )
    return found


def choose_victim(candidates: Sequence[Holder], *, now: float, min_hold: float) -> Holder | None:
    """Which application gives its room up for a key whose callers wait for room.

    An idle one first, the least recently used. When every one is busy, the one that has
    held its room longest, once it has held it ``min_hold`` seconds (so the cluster does not
    thrash: a key keeps its room that long while others wait), preferring one with nobody
    queued on it; its calls finish before it goes. None: nothing may go now, wait and ask
    again. ``now`` is wall-clock time; a holder whose start is unknown has just started.
    """
    idle = [holder for holder in candidates if not holder.busy]
    if idle:
        return min(idle, key=lambda holder: holder.last_used or 0.0)
    served = [
        holder
        for holder in candidates
        if holder.held_since is not None and now - holder.held_since >= min_hold
    ]
    if not served:
        return None
    return min(served, key=lambda holder: (holder.queued > 0, holder.held_since or 0.0))
