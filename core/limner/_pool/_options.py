"""The pool's settings as one frozen value: what the CLI, the server and a cluster's replicas
hand a :class:`~limner.Pool`, validated once where they are made."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from limner.errors import InvalidInput

__all__ = ["PoolOptions"]


@dataclass(frozen=True, kw_only=True)
class PoolOptions:
    """How a :class:`~limner.Pool` shares memory and time between its models.

    The budget is what the pool's models may hold per device (their accounted footprints
    plus loads in progress): ``memory_budget_mb``, else ``memory_budget_fraction`` of the
    device's total. Apart from it, ``memory_floor_mb`` of the device's memory is kept free
    for everything else on the machine (``None``: 5% of the device's total, at most 2 GB;
    ``0`` turns the floor off). See the policy page of docs/architecture.md.
    """

    memory_budget_fraction: float = 0.8
    """Share of each device's total memory the pool's models may hold, in (0, 1]."""
    memory_budget_mb: float | None = None
    """The same as an absolute size per device, in MB; wins over the fraction."""
    memory_floor_mb: float | None = None
    """MB of each device's memory that must stay available to the rest of the machine."""
    keep_alive: float = 300.0
    """Seconds an idle model stays loaded."""
    keep_alive_per_key: Mapping[str, float] = field(default_factory=dict)
    """``keep_alive`` per model key."""
    max_queue: int = 1024
    """Requests (and generations) waiting per key, loaded or not, before ``PoolBusy``."""
    max_wait: float = 60.0
    """Seconds a call may wait for the pool to start on it before ``WaitTimeout``;
    ``limner.max_wait(seconds)`` sets it per call."""
    min_turn: float | None = None
    """Seconds a loaded model with work keeps its memory before it may be drained for
    another model's waiting callers; ``None``: three times its load time, at least 0.5 s
    and at most a quarter of ``max_wait``."""
    max_batch_wait: float = 0.002
    """Seconds a batch may wait to fill while other batches of its key run."""
    max_workers: int = 2
    """Workers per key over one copy of the weights."""
    max_threads: int = 4
    """Batches and generations running at once, across keys."""
    maintenance_interval: float = 5.0
    """Seconds between sweeps for models idle past their keep-alive."""
    drain_timeout: float = 30.0
    """Seconds the pool's exit lets work finish before cancelling it."""
    load_retry_backoff: tuple[float, float] = (1.0, 60.0)
    """Seconds before a failed load is tried again: doubling from the first to the second."""

    def __post_init__(self) -> None:
        fraction = self.memory_budget_fraction
        if not (_is_number(fraction) and 0 < fraction <= 1):
            raise InvalidInput(
                f"must be a fraction in (0, 1], got {fraction!r}", field="memory_budget_fraction"
            )
        if self.memory_budget_mb is not None:
            _positive(self.memory_budget_mb, "memory_budget_mb", "a size in MB")
        if self.memory_floor_mb is not None and not (
            _is_number(self.memory_floor_mb) and self.memory_floor_mb >= 0
        ):
            raise InvalidInput(
                f"must be a size in MB, 0 or more, got {self.memory_floor_mb!r}",
                field="memory_floor_mb",
            )
        for name in ("keep_alive", "drain_timeout"):
            value = getattr(self, name)
            if not (_is_number(value, finite=False) and value >= 0):
                raise InvalidInput(f"must be seconds, 0 or more, got {value!r}", field=name)
        for name in ("max_wait", "maintenance_interval"):
            _positive(getattr(self, name), name, "seconds")
        if self.min_turn is not None and not (_is_number(self.min_turn) and self.min_turn >= 0):
            raise InvalidInput(
                f"must be seconds, 0 or more, got {self.min_turn!r}", field="min_turn"
            )
        if not (_is_number(self.max_batch_wait) and self.max_batch_wait >= 0):
            raise InvalidInput(
                f"must be seconds, 0 or more, got {self.max_batch_wait!r}", field="max_batch_wait"
            )
        for name in ("max_queue", "max_workers", "max_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"must be an integer, at least 1, got {value!r}", field=name)
        keep = dict(self.keep_alive_per_key)
        for key, seconds in keep.items():
            if not (_is_number(seconds, finite=False) and seconds >= 0):
                raise InvalidInput(
                    f"{key!r}: must be seconds, 0 or more, got {seconds!r}",
                    field="keep_alive_per_key",
                )
        object.__setattr__(self, "keep_alive_per_key", MappingProxyType(keep))
        backoff = tuple(self.load_retry_backoff)
        if len(backoff) != 2 or not all(_is_number(b) and b >= 0 for b in backoff):
            raise InvalidInput(
                f"must be two seconds, 0 or more (first, most), got {self.load_retry_backoff!r}",
                field="load_retry_backoff",
            )
        object.__setattr__(self, "load_retry_backoff", (float(backoff[0]), float(backoff[1])))

    def keywords(self) -> dict[str, Any]:
        """The options as :class:`~limner.Pool`'s keyword arguments."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}


def _is_number(value: object, *, finite: bool = True) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not math.isnan(value) and (math.isfinite(value) or not finite)


def _positive(value: object, name: str, what: str) -> None:
    if not (_is_number(value) and value > 0):  # type: ignore[operator]
        raise InvalidInput(f"must be {what}, more than 0, got {value!r}", field=name)
