"""Each key's Serve application over its life: deployed (or shared, when another runtime
serves it), room made for it by scaling the cluster's least recently used idle key to zero,
and scaled to zero itself.

Kept apart from :class:`~limner.ray.RayRuntime`, which routes calls and keeps the keys'
figures: this is the part that waits on the cluster. It acts through
:mod:`limner.ray._cluster` (run in threads) and decides by :mod:`limner.ray._placement`
and :mod:`limner.ray._room`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

from limner.errors import LimnerError, PluginError

from . import _cluster as cluster
from ._board import AppUsage, ReplicaReport, app_usage
from ._calls import result
from ._keys import KeyEntry
from ._placement import GPU_MB, check_fits, fits, replica_resources
from ._room import free, freed_counted, idle_victim

__all__ = ["Applications"]

log = logging.getLogger("limner.ray")


@dataclass(eq=False)
class Applications:
    """One runtime's keys' applications (``keys``, shared with the runtime): named
    ``app_prefix`` + key, deployed with ``log_level`` within ``deploy_timeout``, waiting up
    to ``room_timeout`` for room. ``board`` is the cluster's board actor while connected."""

    keys: Mapping[str, KeyEntry]
    app_prefix: str
    log_level: str
    deploy_timeout: float
    room_timeout: float
    board: Any = None

    async def statuses(self) -> dict[str, cluster.AppStatus]:
        """Each limner application as Serve sees it now."""
        return await anyio.to_thread.run_sync(cluster.statuses, self.app_prefix)

    async def usage(self) -> dict[str, AppUsage]:
        """Every limner application's replicas' reports, summed per application."""
        if self.board is None:
            return {}
        with anyio.move_on_after(5):
            reports: list[ReplicaReport] = await result(
                self.board.reports.remote(self.app_prefix), "the cluster's board"
            )
            return app_usage(reports)
        return {}

    async def ready(self, entry: KeyEntry) -> None:
        """Give the key a handle: deployed if it was not, room made if it is at zero
        replicas (the scale from zero then happens on the call itself)."""
        if entry.handle is not None and entry.replicas > 0:
            return
        async with entry.lock:
            if entry.handle is None:
                await self._deploy(entry)
            elif entry.replicas == 0:
                await self._make_room(entry)
                entry.replicas = 1  # the call starts one; the next refresh says for sure

    async def _deploy(self, entry: KeyEntry) -> None:
        """Share the key's application if it runs already, else make room and deploy it,
        waiting until a replica runs (deleted again if none does by ``deploy_timeout``)."""
        started = time.monotonic()
        totals = await anyio.to_thread.run_sync(cluster.nodes, "total")
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
            entry.handle = await anyio.to_thread.run_sync(cluster.app_handle, entry.app)
            entry.replicas, entry.status, entry.owned = running.running, running.status, False
            return
        await self._make_room(entry)
        handle = await anyio.to_thread.run_sync(cluster.run_application, entry, self.log_level)
        entry.owned = True
        deadline = started + self.deploy_timeout
        while True:
            statuses = await self.statuses()
            found = statuses.get(entry.app, cluster.NOT_DEPLOYED)
            entry.status = found.status
            if found.status == "RUNNING" and found.running:
                break
            if found.status in ("DEPLOY_FAILED", "UNHEALTHY") or time.monotonic() > deadline:
                await anyio.to_thread.run_sync(cluster.delete_application, entry.app)
                entry.status = "NOT_STARTED"
                if found.status != "DEPLOYING":
                    raise PluginError(
                        f"{entry.key} failed to deploy on the cluster: {found.message}"
                    )
                available = await anyio.to_thread.run_sync(cluster.nodes, "available")
                check_fits(entry.key, need, available, busy=True)
                raise LimnerError(
                    f"{entry.key} was not running on the cluster after {self.deploy_timeout:g} "
                    f"s ({found.message or found.status}); its application was deleted"
                )
            await anyio.sleep(0.1)
        entry.handle, entry.replicas = handle, found.running
        entry.loads += 1
        entry.load_seconds += time.monotonic() - started
        log.info("deployed %s in %.1f s", entry.key, time.monotonic() - started)

    async def _make_room(self, entry: KeyEntry) -> None:
        """Until a node has room for one replica: scale the least recently used idle key of
        the cluster to zero (any limner application under ``app_prefix``, whichever runtime
        deployed it); with none left, wait ``room_timeout`` for room, then fail with the
        largest room there is."""
        assert entry.resources is not None
        need = entry.resources.as_ray()
        while True:
            available = await anyio.to_thread.run_sync(cluster.nodes, "available")
            if any(fits(need, node) for node in available):
                return
            victim = await self._least_recently_used_idle(entry)
            if victim is None:
                # Room may still come: a replica stopping here or elsewhere.
                with anyio.move_on_after(self.room_timeout):
                    while not any(fits(need, node) for node in available):
                        await anyio.sleep(0.1)
                        available = await anyio.to_thread.run_sync(cluster.nodes, "available")
                check_fits(entry.key, need, available, busy=True)
                return
            app, freed = victim
            before = free(available)
            await self._scale_to_zero(app, reason=f"to make room for {entry.key}")
            with anyio.move_on_after(self.room_timeout):  # until Ray counts what it freed
                while not any(fits(need, node) for node in available) and not freed_counted(
                    available, before, freed
                ):
                    await anyio.sleep(0.1)
                    available = await anyio.to_thread.run_sync(cluster.nodes, "available")

    async def _least_recently_used_idle(
        self, entry: KeyEntry
    ) -> tuple[str, Mapping[str, float]] | None:
        """:func:`~limner.ray._room.idle_victim` of the cluster as it is now."""
        statuses = await self.statuses()
        usage = await self.usage()
        return idle_victim(entry.app, statuses, usage, list(self.keys.values()))

    async def _scale_to_zero(self, app: str, *, reason: str) -> None:
        """Delete an application: this runtime's through its entry, another's directly (that
        runtime deploys it again on its next call)."""
        own = next((other for other in self.keys.values() if other.app == app), None)
        if own is not None and own.handle is not None:
            await self.retire(own, reason=reason)
            return
        log.info("scaling %s to zero: %s", app, reason)
        await anyio.to_thread.run_sync(cluster.delete_application, app)

    async def retire(self, entry: KeyEntry, *, reason: str) -> None:
        """Scale one of this runtime's keys to zero, unless a call of its is in flight."""
        async with entry.lock:
            if entry.handle is None or entry.in_flight:
                return
            entry.handle, entry.replicas = None, 0  # new calls wait on the lock, then deploy
            log.info("scaling %s to zero: %s", entry.key, reason)
            await anyio.to_thread.run_sync(cluster.delete_application, entry.app)
            entry.status = "NOT_STARTED"
            entry.evictions += 1
