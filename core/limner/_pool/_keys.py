"""What the pool knows about one model key, and the snapshot of it that callers see."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from limner._registry._spec import ModelSpec
from limner.plugin._backends import Backend
from limner.runtime import KeyStats, ModelState

from ._batching import RequestQueue

__all__ = ["KeyState", "Ticket"]


@dataclass(eq=False)
class Ticket:
    """A caller waiting for a key outside its request queue: a generation waiting for its
    turn and a slot, or a ``load`` waiting for the weights. The scheduler answers it with
    ``error`` when the key cannot be had."""

    kind: Literal["generation", "load"]
    arrived: float
    error: BaseException | None = None
    group: Hashable = None  # a generation's StreamCall.group


@dataclass(eq=False)
class KeyState:
    """One key's queue, workers and counters. Only the pool's orchestrator changes it."""

    spec: ModelSpec
    backend: Backend
    queue: RequestQueue
    phase: ModelState = "cold"
    device: str | None = None
    device_lock: anyio.Lock = field(default_factory=anyio.Lock)
    workers: list[anyio.CancelScope] = field(default_factory=list)
    busy_workers: int = 0
    decoding: int = 0  # inputs callers are decoding for this key, to submit next
    generations: int = 0
    group: Hashable = None  # the group of the streamed calls running (when generations > 0)
    tickets: list[Ticket] = field(default_factory=list)
    slots: anyio.CapacityLimiter | None = None  # batches or generations running at once
    preparing: bool = False  # the weights check and the device are being resolved
    prepared: bool = False  # ... and were: the key may be admitted
    draining: bool = False  # its turn is over: no new batch or generation starts
    promised: bool = False  # other keys are draining to make room for this one
    turn_started: float = 0.0
    served_in_turn: int = 0  # batches and generations finished since it became ready
    load_done: anyio.Event | None = None
    load_error: BaseException | None = None
    retry_at: float = 0.0
    failures: int = 0
    batches: int = 0
    batched_items: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    last_load_seconds: float = 0.0
    evictions: int = 0
    swaps: int = 0  # evictions that made room for another model's callers
    wait_timeouts: int = 0
    worker_mb: float | None = None  # measured after a load
    accounted_mb: float = 0.0
    last_used: float | None = None
    loaded: bool = False
    released: anyio.Event | None = None  # set when the last unload has finished
    baseline: dict[str, Any] | None = None  # the backend's attributes before its load
    _changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def idle(self) -> bool:
        return (
            self.phase == "ready"
            and not self.queue.items
            and self.queue.taken == 0
            and self.generations == 0
            and not self.tickets
        )

    @property
    def serving(self) -> bool:
        """Ready, and its turn not over: new batches and generations may start."""
        return self.phase == "ready" and not self.draining and bool(self.workers)

    @property
    def quiescent(self) -> bool:
        """Nothing taken or running: a draining key can go now."""
        return self.busy_workers == 0 and self.queue.taken == 0 and self.generations == 0

    @property
    def has_work(self) -> bool:
        return bool(
            self.queue.taken or self.generations or self.queue.has_waiting() or self.tickets
        )

    def streamed_waiting(self) -> list[tuple[Hashable, float]]:
        """The group and arrival of each generation waiting for its turn, in order."""
        return [(t.group, t.arrived) for t in self.tickets if t.kind == "generation"]

    def waiting(self) -> tuple[int, float | None]:
        """Callers waiting (queued, or holding a ticket) and when the oldest arrived."""
        arrivals = [request.arrived for request in self.queue.items if not request.cancelled]
        arrivals += [ticket.arrived for ticket in self.tickets]
        return len(arrivals), min(arrivals, default=None)

    def notify(self) -> None:
        """Wake whoever waits in :meth:`changed`: the key's phase, turn or tickets moved."""
        self._changed.set()
        self._changed = anyio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    def snapshot(self, now: float) -> KeyStats:
        waiting, oldest = self.waiting()
        return KeyStats(
            key=self.spec.key,
            state=self.phase,
            workers=len(self.workers),
            queue_depth=len(self.queue),
            in_flight=self.queue.taken + self.generations,
            batches=self.batches,
            mean_batch_size=self.batched_items / self.batches if self.batches else 0.0,
            loads=self.loads,
            load_seconds=self.load_seconds,
            evictions=self.evictions,
            memory_mb=self.accounted_mb,
            device=self.device,
            last_used=self.last_used,
            waiting=waiting,
            oldest_wait_seconds=0.0 if oldest is None else max(0.0, now - oldest),
            swaps=self.swaps,
            draining=self.draining,
            wait_timeouts=self.wait_timeouts,
        )
