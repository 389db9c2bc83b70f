"""The pool's decisions, as plain functions of plain values: no threads, no event loop.

The orchestrator reads memory, clocks and its models, asks these functions what to do, and
does it. Each rule is the one on the policy page of docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "Evict",
    "NoRoom",
    "Start",
    "is_expired",
    "plan_cold_start",
    "retry_delay",
    "workers_need_mb",
]

Model = TypeVar("Model")


@dataclass(frozen=True)
class Start:
    """Start ``workers`` workers, reserving ``need_mb`` while they load."""

    workers: int
    need_mb: float


@dataclass(frozen=True)
class Evict(Generic[Model]):
    """Evict ``victim`` (the least recently used idle model), then plan again."""

    victim: Model


@dataclass(frozen=True)
class NoRoom:
    """Not even one worker fits and nothing idle can go: the caller gets ``MemoryExhausted``."""

    need_mb: float
    available_mb: float


def workers_need_mb(per_worker_mb: float, overhead_mb: float | None, workers: int) -> float:
    """Memory for ``workers`` workers sharing one copy of the weights.

    Each worker after the first costs ``overhead_mb`` (activations only), or a whole copy
    when the plugin did not say.
    """
    each_extra = per_worker_mb if overhead_mb is None else overhead_mb
    return per_worker_mb + (workers - 1) * each_extra


def plan_cold_start(
    *,
    need_mb: Sequence[float],
    used_mb: float,
    budget_mb: float,
    idle: Sequence[tuple[Model, float | None]],
) -> Start | Evict[Model] | NoRoom:
    """The seed's rule: as many workers as fit (``need_mb[n - 1]`` is what ``n`` cost, most
    first tried), else evict the least recently used idle model, else no room.

    ``idle`` lists the models that may be evicted, each with when it was last used.
    """
    for workers in range(len(need_mb), 0, -1):
        if used_mb + need_mb[workers - 1] <= budget_mb:
            return Start(workers=workers, need_mb=need_mb[workers - 1])
    if idle:
        victim, _ = min(idle, key=lambda entry: entry[1] or 0.0)
        return Evict(victim)
    return NoRoom(need_mb=need_mb[0], available_mb=max(0.0, budget_mb - used_mb))


def is_expired(*, last_used: float | None, now: float, keep_alive: float) -> bool:
    """Whether an idle model has outlived its keep-alive."""
    return last_used is not None and now - last_used > keep_alive


def retry_delay(failures: int, backoff: tuple[float, float]) -> float:
    """Seconds before a failed load is tried again: doubling from ``low`` up to ``high``."""
    low, high = backoff
    return float(min(high, low * 2 ** (failures - 1)))
