"""The seam between a model's front and where its calls run.

The fronts (:class:`~limner.ImageEmbedder`, :class:`~limner.ImageGenerator`) decode and
validate inputs here, then hand a runtime only data: prepared arrays, texts, a config; back
come vectors, chunks, or a typed error. The in-process :class:`~limner.Pool` is one runtime;
one on a cluster reads the backend's ``spec`` and ``settings`` (frozen data), builds its own
copy where the work runs, and never ships the backend object itself.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol, runtime_checkable

import anyio

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from ._backends import Backend
    from ._generation_types import GenerationChunk, ImageGenerationConfig

__all__ = ["KeyStats", "ModelState", "RequestKind", "Runtime", "repeat_every"]

RequestKind = Literal["image", "text"]
"""What an embedding call holds: prepared images, or texts."""

ModelState = Literal["cold", "loading", "ready"]


@dataclass(frozen=True)
class KeyStats:
    """A snapshot of one model key in a runtime.

    ``waiting`` counts the callers waiting for the key (queued, or waiting for its turn or
    its load) and ``oldest_wait_seconds`` is how long the oldest of them has waited;
    ``swaps`` counts the evictions that made room for another model's callers, and
    ``draining`` says its turn is over (it finishes what it runs, then goes);
    ``wait_timeouts`` counts callers that gave up after ``max_wait``.
    """

    key: str
    state: ModelState
    workers: int
    queue_depth: int
    in_flight: int
    batches: int
    mean_batch_size: float
    loads: int
    load_seconds: float
    evictions: int
    memory_mb: float
    device: str | None
    last_used: float | None
    waiting: int = 0
    oldest_wait_seconds: float = 0.0
    swaps: int = 0
    draining: bool = False
    wait_timeouts: int = 0


@runtime_checkable
class Runtime(Protocol):
    """Runs models' calls: the contract every runtime keeps.

    - Each call answers: with its result, or with a :class:`~limner.LimnerError` (never an
      ``ExceptionGroup``); errors cross process boundaries (they pickle).
    - ``embed`` returns ``(len(items), d)`` float32 rows, L2-normalised, in order.
    - ``generate`` yields :class:`~limner.Progress` chunks then one
      :class:`~limner.GenerationResult`; closing the iterator stops the run at its next step.
    """

    async def embed(
        self, backend: Backend, kind: RequestKind, items: Sequence[Any]
    ) -> npt.NDArray[np.float32]:
        """Embed prepared images (``kind="image"``) or texts."""
        ...

    def generate(
        self, backend: Backend, prompt: str, config: ImageGenerationConfig
    ) -> AsyncIterator[GenerationChunk]:
        """Stream one generation with a resolved config."""
        ...

    async def load(self, backend: Backend) -> None:
        """Make the model ready now, so its first call finds it warm."""
        ...

    def stats(self) -> Mapping[str, KeyStats]:
        """A frozen snapshot per model key."""
        ...

    async def evict(self, key: str) -> bool:
        """Unload a model now if it is idle; return whether it was."""
        ...

    async def aclose(self) -> None:
        """Finish or cancel what runs, and release every model."""
        ...


async def repeat_every(
    interval: float, action: Callable[[], Awaitable[object]], log: logging.Logger, what: str
) -> NoReturn:
    """``action()`` every ``interval`` seconds until cancelled: a runtime's housekeeping
    (evicting idle keys, reading a cluster's state). A failure is logged as ``what`` failing,
    and the next round runs as planned."""
    while True:
        await anyio.sleep(interval)
        try:
            await action()
        except Exception:
            log.exception("%s failed", what)
