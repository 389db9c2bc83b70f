"""What a :class:`~limner.ray.RayRuntime` host knows of each key's application, and the
:class:`~limner.KeyStats` it makes of that.

Plain data shared by the runtime (which updates it) and the room policy
(:mod:`limner.ray._eviction`, which reads it), so neither imports the other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from limner import KeyStats, ModelSettings, ModelSpec
from limner.errors import LimnerError
from limner.runtime import ModelState

from ._placement import RayKeyOptions, ReplicaResources
from ._usage import AppUsage

__all__ = ["KeyEntry", "snapshot", "wall_clock"]


@dataclass
class KeyEntry:
    """What the host knows of one key's application."""

    key: str
    app: str
    spec: ModelSpec
    settings: ModelSettings
    options: RayKeyOptions
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    resources: ReplicaResources | None = None
    handle: Any = None  # a Serve DeploymentHandle while the application is deployed
    replicas: int = 0  # running, as last seen
    status: str = "NOT_STARTED"
    in_flight: int = 0
    last_used: float | None = None
    since: float | None = None  # when room was last made for it (it holds its room since)
    loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    usage: AppUsage | None = None  # its replicas' reports, summed, as of the last refresh
    owned: bool = True  # deployed by this runtime (deleted when it closes), not adopted
    failure: tuple[float, LimnerError] | None = None  # the last attempt to deploy or make room

    def forget_application(self) -> None:
        """The key's application is gone (another runtime scaled it to zero): its next call
        deploys it again. Not while this runtime deploys or retires it."""
        if self.handle is not None and not self.lock.locked():
            self.handle, self.replicas, self.status = None, 0, "NOT_STARTED"

    @property
    def state(self) -> ModelState:
        if self.handle is not None and self.replicas > 0:
            return "ready"
        return "loading" if self.status == "DEPLOYING" else "cold"


def wall_clock(monotonic: float) -> float:
    """A ``time.monotonic()`` reading of this process as wall-clock time, which the
    replicas' reports use."""
    return time.time() - (time.monotonic() - monotonic)


def snapshot(entry: KeyEntry) -> KeyStats:
    """The key's figures: this host's calls, its replicas' reports summed."""
    usage = entry.usage
    memory = 0.0
    if entry.resources is not None:
        memory = entry.resources.memory_mb or entry.resources.gpu_memory_mb
    return KeyStats(
        key=entry.key,
        state=entry.state,
        workers=entry.replicas,
        queue_depth=usage.queue_depth if usage else 0,
        in_flight=entry.in_flight,
        batches=usage.batches if usage else 0,
        mean_batch_size=usage.mean_batch_size if usage else 0.0,
        loads=entry.loads,
        load_seconds=entry.load_seconds,
        evictions=entry.evictions,
        memory_mb=memory * entry.replicas,
        device="ray",
        last_used=entry.last_used,
    )
