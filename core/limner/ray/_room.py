"""Making room on the cluster for one more replica: which idle application gives its room
up, and when Ray has counted what that freed.

The eviction side of :mod:`limner.ray._placement`'s rules: plain functions of what the
runtime read from Serve, the cluster's board and its own keys, so the runtime only reads
and acts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ._board import AppUsage
from ._cluster import AppStatus
from ._keys import KeyEntry, wall_clock
from ._placement import least_recently_used

__all__ = ["free", "freed_counted", "idle_victim"]


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


def idle_victim(
    exclude: str,
    statuses: Mapping[str, AppStatus],
    usage: Mapping[str, AppUsage],
    mine: Sequence[KeyEntry],
) -> tuple[str, Mapping[str, float]] | None:
    """The cluster's idle application used longest ago, other than ``exclude``, and what
    its replicas hold (Ray's units): idle by its replicas' reports and, for the runtime's
    own keys (``mine``), by the calls in flight there."""
    own_keys = {entry.app: entry for entry in mine}
    idle: list[tuple[str, float | None]] = []
    for app, status in statuses.items():
        own = own_keys.get(app)
        if app == exclude or not status.running or (own is not None and own.in_flight):
            continue
        found = usage.get(app)
        if found is not None and found.busy:
            continue
        last_used = found.last_used if found is not None else None
        if own is not None and own.last_used is not None:  # this host's calls count too
            last_used = max(last_used or 0.0, wall_clock(own.last_used))
        idle.append((app, last_used))
    oldest = least_recently_used(idle)
    if oldest is None:
        return None
    own, replicas = own_keys.get(oldest), statuses[oldest].running
    if own is not None and own.resources is not None:
        return oldest, {name: n * replicas for name, n in own.resources.as_ray().items()}
    return oldest, usage[oldest].resources if oldest in usage else {}
