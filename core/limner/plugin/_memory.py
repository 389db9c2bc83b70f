"""Memory a loaded model takes on while it serves, and gives back when asked.

A model's footprint is measured after its load (``Backend.memory_mb``), but some backends
hold more as they serve: a diffusion model loads the LoRA adapters requests name, each a few
MB to hundreds. Such a backend asks its runtime before it grows (:func:`reserve_memory`),
and lists what it can drop without stopping work (``Backend.caches``), so that a pool short
of room drops the least recently used of those before it evicts any model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["CachedPart", "reserve_memory", "reserving_memory"]


@dataclass(frozen=True)
class CachedPart:
    """Something a loaded model holds that it can drop and load again when needed (a LoRA
    adapter): its ``name`` among the model's, the memory it holds, when it was last used (on
    ``time.monotonic``'s clock)."""

    name: str
    memory_mb: float
    last_used: float


Reserve = Callable[[float, str], None]
"""A runtime's answer to :func:`reserve_memory`: returns once the room is there, or raises."""

_local = threading.local()


def reserve_memory(memory_mb: float, *, what: str) -> None:
    """Ask the runtime running this call for ``memory_mb`` more on the model's memory device,
    before taking it (``what`` names it in errors: ``"LoRA adapter 'ink' (FILE)"``).

    A pool makes the room (dropping other models' least recently used cached parts, then
    evicting idle models) and counts it in the model's footprint until the call ends, when it
    measures ``memory_mb()`` again; it raises :class:`~limner.MemoryExhausted` when the room
    cannot be made. Called from a backend's method while a runtime runs it; elsewhere (a
    backend called directly) it returns at once.
    """
    ask: Reserve | None = getattr(_local, "ask", None)
    if ask is not None:
        ask(memory_mb, what)


@contextmanager
def reserving_memory(ask: Reserve) -> Iterator[None]:
    """Within the block, :func:`reserve_memory` on this thread asks ``ask``: a runtime wraps
    the backend calls it runs in it."""
    previous = getattr(_local, "ask", None)
    _local.ask = ask
    try:
        yield
    finally:
        _local.ask = previous
