"""What the pool knows about one model key, and the snapshot of it that callers see."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio

from limner._backends import Backend
from limner._runtime import KeyStats, ModelState
from limner._spec import ModelSpec

from ._batching import RequestQueue

__all__ = ["KeyState"]


@dataclass
class KeyState:
    """One key's queue, workers and counters. Only the pool's orchestrator changes it."""

    spec: ModelSpec
    backend: Backend
    queue: RequestQueue
    phase: ModelState = "cold"
    device: str | None = None
    workers: list[anyio.CancelScope] = field(default_factory=list)
    busy_workers: int = 0
    decoding: int = 0  # inputs callers are decoding for this key, to submit next
    generations: int = 0
    waiting_generations: int = 0
    slots: anyio.CapacityLimiter | None = None  # batches or generations running at once
    load_done: anyio.Event | None = None
    load_error: BaseException | None = None
    retry_at: float = 0.0
    failures: int = 0
    batches: int = 0
    batched_items: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    worker_mb: float | None = None  # measured after a load
    accounted_mb: float = 0.0
    last_used: float | None = None
    loaded: bool = False
    released: anyio.Event | None = None  # set when the last unload has finished
    baseline: dict[str, Any] | None = None  # the backend's attributes before its load

    @property
    def idle(self) -> bool:
        return (
            self.phase == "ready"
            and not self.queue.items
            and self.queue.taken == 0
            and self.generations == 0
            and self.waiting_generations == 0
        )

    @property
    def has_work(self) -> bool:
        return bool(self.queue.taken or self.generations or self.queue.has_waiting())

    def snapshot(self) -> KeyStats:
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
        )
