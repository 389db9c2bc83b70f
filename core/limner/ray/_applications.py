"""Each key's Serve application over its life: deployed (or shared, when another runtime
serves it), room made for it by scaling another key of the cluster to zero (an idle one, or
one that has held its room long enough while others wait), and scaled to zero itself.

Kept apart from :class:`~limner.ray.RayRuntime`, which routes calls and keeps the keys'
figures: this is the part that waits on the cluster. It acts through
:mod:`limner.ray._cluster` (run in threads, cut short when the control plane goes away) and
decides by :mod:`limner.ray._placement` and :mod:`limner.ray._eviction`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from limner.errors import LimnerError, PluginError, RuntimeUnavailable

from . import _cluster as cluster
from ._calls import result
from ._eviction import Holder, choose_victim, free, freed_counted, holders
from ._health import ControlPlaneWatch
from ._keys import KeyEntry
from ._placement import GPU_MB, check_fits, fits, replica_resources
from ._usage import BOARD_NAME, AppUsage, ReplicaReport, app_usage

__all__ = ["ROOM_POLL", "Applications"]

log = logging.getLogger("limner.ray")

T = TypeVar("T")

ROOM_POLL = 0.2
"""Seconds between two looks at the cluster while a caller waits for room."""


@dataclass(eq=False)
class Applications:
    """One runtime's keys' applications (``keys``, shared with the runtime): named
    ``app_prefix`` + key, deployed with ``log_level`` within ``deploy_timeout``, waiting up
    to ``room_timeout`` for room, a busy key keeping its room ``min_hold`` seconds at least.
    ``board`` is the cluster's board actor while connected; ``health`` what the runtime's
    probes of the control plane saw."""

    keys: Mapping[str, KeyEntry]
    app_prefix: str
    log_level: str
    deploy_timeout: float
    room_timeout: float
    min_hold: float = 0.0
    board: Any = None
    health: ControlPlaneWatch = field(default_factory=lambda: ControlPlaneWatch(timeout=10.0))

    def __post_init__(self) -> None:
        self._waits: set[anyio.CancelScope] = set()
        self._turn = anyio.Lock()  # one key at a time makes room and takes it

    # -- the cluster, in threads ----------------------------------------------------------

    def check_reachable(self, key: str | None = None) -> None:
        """Raise :class:`~limner.RuntimeUnavailable` while the control plane is unreachable."""
        if self.health.problem is not None:
            verdict = "is gone" if self.health.lost else "does not answer"
            raise RuntimeUnavailable(
                f"the Ray cluster's control plane {verdict}: {self.health.problem}",
                key=key,
                retry_after=5.0,
            )

    def cut_waits(self) -> None:
        """The control plane went away: every call to it waiting in a thread gives up."""
        for scope in list(self._waits):
            scope.cancel()

    async def _on_cluster(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a thread; :class:`~limner.RuntimeUnavailable` at once if the
        control plane is unreachable, or as soon as it turns so (Ray's calls then hang)."""
        self.check_reachable()
        with anyio.CancelScope() as scope:
            self._waits.add(scope)
            try:
                return await anyio.to_thread.run_sync(function, *args, abandon_on_cancel=True)
            finally:
                self._waits.discard(scope)
        self.check_reachable()
        raise RuntimeUnavailable("the Ray cluster's control plane does not answer")

    async def statuses(self) -> dict[str, cluster.AppStatus]:
        """Each limner application as Serve sees it now."""
        return await self._on_cluster(cluster.statuses, self.app_prefix)

    async def _nodes(self, kind: str) -> list[dict[str, float]]:
        return await self._on_cluster(cluster.nodes, kind)

    async def usage(self) -> dict[str, AppUsage] | None:
        """Every limner application's replicas' reports, summed per application; None when
        the board does not answer (it is made again: the replicas report to the new one
        within a second)."""
        if self.board is None:
            return None
        try:
            with anyio.fail_after(5):
                reports: list[ReplicaReport] = await result(
                    self.board.reports.remote(self.app_prefix), "the cluster's board"
                )
        except (LimnerError, TimeoutError) as error:
            self.check_reachable()
            log.warning(
                "the cluster's board (%s) did not answer: %s; making it again (until the "
                "replicas report to it, only this runtime's own keys give room up)",
                BOARD_NAME,
                error or type(error).__name__,
            )
            self.board = await self._on_cluster(cluster.board)
            return None
        return app_usage(reports)

    # -- a key's application --------------------------------------------------------------

    async def ready(self, entry: KeyEntry) -> None:
        """Give the key a handle: deployed if it was not, room made if it is at zero
        replicas (the scale from zero then happens on the call itself). Callers that waited
        while another caller's attempt failed get that attempt's error, not a wait of their
        own after it."""
        if entry.handle is not None and entry.replicas > 0:
            return
        self.check_reachable(entry.key)
        asked = time.monotonic()
        async with entry.lock:
            if entry.failure is not None and entry.failure[0] > asked:
                raise copy.copy(entry.failure[1])
            try:
                if entry.handle is None:
                    await self._deploy(entry)
                elif entry.replicas == 0:
                    async with self._room_for(entry):
                        pass
                    entry.replicas = 1  # the call starts one; the next refresh says for sure
                    entry.since = time.monotonic()
            except LimnerError as error:
                entry.failure = (time.monotonic(), error)
                raise

    async def _deploy(self, entry: KeyEntry) -> None:
        """Share the key's application if it runs already, else make room and deploy it,
        waiting until a replica runs (deleted again if none does by ``deploy_timeout``)."""
        started = time.monotonic()
        totals = await self._nodes("total")
        entry.resources = replica_resources(
            entry.spec,
            entry.settings,
            entry.options,
            cluster_has_gpu_mb=any(GPU_MB in node for node in totals),
        )
        need = entry.resources.as_ray()
        check_fits(entry.key, need, totals, busy=False)
        running = (await self.statuses()).get(entry.app)
        if running is not None and running.status == "RUNNING" and running.running:
            # Another runtime (or an HTTP ingress replica) serves it already: share it.
            entry.handle = await self._on_cluster(cluster.app_handle, entry.app)
            entry.replicas, entry.status, entry.owned = running.running, running.status, False
            return
        async with self._room_for(entry):  # held until its replica holds the room
            handle = await self._on_cluster(cluster.run_application, entry, self.log_level)
            entry.owned = True
            deadline = started + self.deploy_timeout
            while True:
                statuses = await self.statuses()
                found = statuses.get(entry.app, cluster.NOT_DEPLOYED)
                entry.status = found.status
                if found.status == "RUNNING" and found.running:
                    break
                if found.status in ("DEPLOY_FAILED", "UNHEALTHY") or time.monotonic() > deadline:
                    await self._on_cluster(cluster.delete_application, entry.app)
                    entry.status = "NOT_STARTED"
                    if found.status != "DEPLOYING":
                        raise PluginError(
                            f"{entry.key} failed to deploy on the cluster: {found.message}"
                        )
                    available = await self._nodes("available")
                    check_fits(entry.key, need, available, busy=True)
                    raise LimnerError(
                        f"{entry.key} was not running on the cluster after "
                        f"{self.deploy_timeout:g} s ({found.message or found.status}); its "
                        "application was deleted"
                    )
                await anyio.sleep(0.1)
        entry.handle, entry.replicas = handle, found.running
        entry.since = time.monotonic()
        entry.loads += 1
        entry.load_seconds += time.monotonic() - started
        log.info("deployed %s in %.1f s", entry.key, time.monotonic() - started)

    @contextlib.asynccontextmanager
    async def _room_for(self, entry: KeyEntry) -> AsyncIterator[None]:
        """This runtime's turn at the cluster's room (one key at a time, so that two keys do
        not both see the same free room and deploy into it), with room made for one replica
        of the key; the turn is held until the caller has taken the room. A caller that does
        not get its turn within ``room_timeout`` gets :class:`~limner.ray.NoRoomInCluster`
        unless there is room now."""
        assert entry.resources is not None
        deadline = time.monotonic() + self.room_timeout
        with anyio.move_on_after(self.room_timeout) as waiting:
            await self._turn.acquire()
        if waiting.cancelled_caught:
            available = await self._nodes("available")
            check_fits(entry.key, entry.resources.as_ray(), available, busy=True)
            await self._turn.acquire()  # there is room: the turn comes
        try:
            await self._make_room(entry, deadline)
            yield
        finally:
            self._turn.release()

    async def _make_room(self, entry: KeyEntry, deadline: float) -> None:
        """Until a node has room for one replica of the key, looking again every
        ``ROOM_POLL`` seconds: another application gives its room up if
        :func:`~limner.ray._eviction.choose_victim` names one (any limner application under
        ``app_prefix``, whichever runtime deployed it), then Ray is waited on to count what
        it freed; else the caller waits. With no room at ``deadline`` (monotonic),
        :class:`~limner.ray.NoRoomInCluster` naming the largest room there is."""
        assert entry.resources is not None
        need = entry.resources.as_ray()
        while True:
            available = await self._nodes("available")
            if any(fits(need, node) for node in available):
                return
            victim = await self._victim(entry)
            if victim is not None and await self._scale_to_zero(victim, entry.key):
                before = free(available)
                with anyio.move_on_after(self.room_timeout):  # until Ray counts what it freed
                    while not any(fits(need, node) for node in available) and not freed_counted(
                        available, before, victim.resources
                    ):
                        await anyio.sleep(0.1)
                        available = await self._nodes("available")
                continue
            if time.monotonic() >= deadline:
                check_fits(entry.key, need, available, busy=True)
                return
            await anyio.sleep(ROOM_POLL)

    async def _victim(self, entry: KeyEntry) -> Holder | None:
        """:func:`~limner.ray._eviction.choose_victim` of the cluster as it is now."""
        statuses = await self.statuses()
        usage = await self.usage()
        candidates = holders(entry.app, statuses, usage, list(self.keys.values()))
        return choose_victim(candidates, now=time.time(), min_hold=self.min_hold)

    async def _scale_to_zero(self, victim: Holder, wanted: str) -> bool:
        """Delete the victim's application so that ``wanted`` gets its room: this runtime's
        through its entry, another's directly (that runtime deploys it again on its next
        call). Its calls in flight finish first (Serve drains a deleted replica). Whether it
        was deleted."""
        held = f", held {time.time() - victim.held_since:.0f} s" if victim.held_since else ""
        reason = f"to make room for {wanted} ({'busy' if victim.busy else 'idle'}{held})"
        own = next((other for other in self.keys.values() if other.app == victim.app), None)
        if own is not None and own.handle is not None:
            return await self.retire(own, reason=reason, busy=victim.busy)
        log.info("scaling %s to zero: %s", victim.app, reason)
        await self._on_cluster(cluster.delete_application, victim.app)
        return True

    async def retire(self, entry: KeyEntry, *, reason: str, busy: bool = False) -> bool:
        """Scale one of this runtime's keys to zero, unless a call of its is in flight (or,
        with ``busy``, even then: the calls finish first); not while another caller deploys
        or retires it. Whether it was."""
        if entry.lock.locked():
            return False
        async with entry.lock:
            if entry.handle is None or (entry.in_flight and not busy):
                return False
            entry.handle, entry.replicas = None, 0  # new calls wait on the lock, then deploy
            log.info("scaling %s to zero: %s", entry.key, reason)
            await self._on_cluster(cluster.delete_application, entry.app)
            entry.status = "NOT_STARTED"
            entry.evictions += 1
            return True
