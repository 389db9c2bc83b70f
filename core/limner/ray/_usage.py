"""What every limner replica on the cluster reports: one small detached actor per cluster.

Each replica says every ``REPORT_SECONDS`` what its pool did (its :class:`~limner.KeyStats`),
when it last answered a call (wall-clock time, comparable across nodes) and what it holds of
the cluster. Any :class:`~limner.ray.RayRuntime` reads it all in one call: ``stats()`` sums a
key's replicas, and a runtime that needs room scales to zero the least recently used idle key
of the whole cluster, whichever runtime deployed it. A replica that stops reporting (it died)
is forgotten after a few periods.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from limner import KeyStats

__all__ = [
    "BOARD_NAME",
    "BOARD_NAMESPACE",
    "REPORT_SECONDS",
    "AppUsage",
    "Board",
    "ReplicaReport",
    "app_usage",
]

BOARD_NAME = "limner-board"
BOARD_NAMESPACE = "limner"
REPORT_SECONDS = 1.0
_FORGET_AFTER = 5 * REPORT_SECONDS


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's word: the calls it is answering, its pool's figures, when it last
    answered one and what it holds of the cluster; when it started (it holds its room since)
    and when it said all this. Times are wall-clock, comparable across nodes."""

    app: str
    replica: str
    calls: int
    stats: KeyStats | None
    last_used: float | None
    resources: Mapping[str, float] = field(default_factory=dict)
    started: float | None = None
    reported: float | None = None

    @property
    def busy(self) -> bool:
        return bool(self.calls) or (self.stats is not None and bool(self.stats.queue_depth))


@dataclass(frozen=True)
class AppUsage:
    """One application summed over its replicas as reported: ``held_since`` is when its
    oldest replica started, ``busy_reported`` when the latest busy report was made (None
    when none is busy), so a host that saw its own last call end later knows better."""

    app: str
    replicas: int
    busy: bool
    last_used: float | None
    resources: Mapping[str, float]
    batches: int
    mean_batch_size: float
    queue_depth: int
    held_since: float | None = None
    busy_reported: float | None = None


def app_usage(reports: Sequence[ReplicaReport]) -> dict[str, AppUsage]:
    """Per application: busy if any replica is, last used when its latest replica was,
    resources, batches and queues summed, batch size weighted by batches."""
    by_app: dict[str, list[ReplicaReport]] = {}
    for report in reports:
        by_app.setdefault(report.app, []).append(report)
    usage: dict[str, AppUsage] = {}
    for app, rows in by_app.items():
        resources: dict[str, float] = {}
        for row in rows:
            for name, amount in row.resources.items():
                resources[name] = resources.get(name, 0.0) + amount
        stats = [row.stats for row in rows if row.stats is not None]
        batches = sum(s.batches for s in stats)
        items = sum(s.batches * s.mean_batch_size for s in stats)
        used = [row.last_used for row in rows if row.last_used is not None]
        started = [row.started for row in rows if row.started is not None]
        busy_at = [row.reported for row in rows if row.busy and row.reported is not None]
        usage[app] = AppUsage(
            app=app,
            replicas=len(rows),
            busy=any(row.busy for row in rows),
            last_used=max(used, default=None),
            resources=resources,
            batches=batches,
            mean_batch_size=items / batches if batches else 0.0,
            queue_depth=sum(s.queue_depth for s in stats),
            held_since=min(started, default=None),
            busy_reported=max(busy_at, default=None),
        )
    return usage


class Board:
    """The replicas' reports, fresh ones only. (A detached Ray actor, one per cluster,
    restarted by Ray if its process dies and made again by a runtime that finds it gone:
    it holds nothing the replicas do not say again within a second.)"""

    def __init__(self) -> None:
        self._reports: dict[tuple[str, str], tuple[float, ReplicaReport]] = {}

    async def report(self, report: ReplicaReport) -> None:
        self._reports[report.app, report.replica] = (time.monotonic(), report)

    async def forget(self, app: str, replica: str) -> None:
        self._reports.pop((app, replica), None)

    async def reports(self, prefix: str = "") -> list[ReplicaReport]:
        now = time.monotonic()
        for name, (seen, _) in list(self._reports.items()):
            if now - seen > _FORGET_AFTER:
                del self._reports[name]
        return [report for _, report in self._reports.values() if report.app.startswith(prefix)]
