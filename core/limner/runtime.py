"""The contract a runtime implements, as ``anyio.abc`` is for anyio: the seam between a
model's front and where its calls run.

The fronts (:class:`~limner.ImageEmbedder`, :class:`~limner.ImageGenerator`) decode and
validate inputs, then hand a runtime only data: prepared arrays, texts, a config; back come
vectors, chunks, or a typed error. A runtime carries two shapes of call, whatever the
capability: a :class:`BatchCall` (items a runtime may batch with other callers' items, one
row back for each) and a :class:`StreamCall` (one run on a worker of its own, streaming
progress chunks, then its result). Each names the backend method that runs it; the
capability table says which methods a capability's backends offer (:func:`backend_method`).

A runtime runs a model's calls somewhere: :class:`~limner.Pool` in this process,
:class:`limner.ray.RayRuntime` on a cluster. It implements :class:`Runtime`, answers
:class:`KeyStats` per key, and, where the work runs, builds a backend from the key's
:class:`~limner.ModelSpec` and checks it against its capability's row (:func:`row_for`);
:func:`repeat_every` runs its housekeeping. Everything else it needs is public in
:mod:`limner` (``Pool``, ``ModelSpec``, ``ModelSettings``, ``GenerationChunk``,
``ImageGenerationConfig``, ``default_registry``) and :mod:`limner.plugin` (``Backend``,
``TextToImageBackend``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol, runtime_checkable

import anyio

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from limner.plugin._backends import Backend
    from limner.plugin._generation import GenerationChunk, ImageGenerationConfig

from limner._exports import present_as_public
from limner._pool._readings import Clock, MemoryProbe, MonotonicClock, SystemMemory
from limner._registry._capabilities import CapabilityRow, row_for, row_of_backend
from limner.errors import LimnerError

__all__ = [
    "BatchCall",
    "CapabilityRow",
    "Clock",
    "KeyStats",
    "MemoryProbe",
    "ModelState",
    "MonotonicClock",
    "RequestKind",
    "Runtime",
    "StreamCall",
    "SystemMemory",
    "backend_method",
    "repeat_every",
    "row_for",
]

RequestKind = Literal["image", "text"]
"""What an embedding call holds: prepared images, or texts (the deprecated ``embed``'s)."""


@dataclass(frozen=True)
class BatchCall:
    """Items a runtime may batch with other callers' calls of the same ``method``: the
    backend method runs on a list of items and returns one float32 row per item, in order
    (``embed_prepared``, ``embed_texts``). A call larger than the model's batch is split and
    answered as one."""

    method: str
    items: Sequence[Any]


@dataclass(frozen=True)
class StreamCall:
    """One run of ``method`` on a worker of its own: ``method(*args, on_step=...)`` calls
    ``on_step`` with a :class:`~limner.Progress` per step and returns the last chunk (a
    :class:`~limner.GenerationResult`). Closing the runtime's iterator stops the run at its
    next step (``generate``).

    ``group`` (any hashable value, picklable) says which calls may share the loaded model at
    once: calls of different groups never run at the same time on one loaded copy of a
    model; calls of one group may. A generation's group is its set of LoRA adapters, which
    are state of the one shared model. A runtime may run a waiting call of the running group
    ahead of an earlier call of another group, for a bounded time (see docs/architecture.md).
    """

    method: str
    args: tuple[Any, ...] = ()
    group: Hashable = None


def backend_method(backend: Backend, call: BatchCall | StreamCall) -> Callable[..., Any]:
    """The bound backend method ``call`` names, once its capability's row says its backends
    offer it in that shape: a runtime runs no other method, whoever sent the call."""
    capability = backend.spec.capability
    row = row_for(capability) if capability is not None else row_of_backend(type(backend))
    offered = () if row is None else row.batched if isinstance(call, BatchCall) else row.streamed
    method = getattr(backend, call.method, None) if call.method in offered else None
    if method is None:
        shape = "batched" if isinstance(call, BatchCall) else "streamed"
        raise LimnerError(
            f"{backend.spec.key} offers no {shape} method {call.method!r} "
            f"(its capability's are: {', '.join(sorted(offered)) or 'none'})"
        )
    bound: Callable[..., Any] = method
    return bound


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
    - ``run_batch`` returns ``(len(call.items), d)`` float32 rows, L2-normalised, in order.
    - ``run_stream`` yields :class:`~limner.Progress` chunks then one
      :class:`~limner.GenerationResult`; closing the iterator stops the run at its next step.
    - ``embed`` and ``generate`` are the two calls runtimes carried before: deprecated,
      removed in limner 0.3 (a front falls back to them, warning, for a runtime that has no
      ``run_batch`` or ``run_stream``).
    """

    async def run_batch(self, backend: Backend, call: BatchCall) -> npt.NDArray[np.float32]:
        """Rows for ``call.items``, from ``backend``'s batched method ``call.method``."""
        ...

    def run_stream(self, backend: Backend, call: StreamCall) -> AsyncIterator[GenerationChunk]:
        """The chunks of one run of ``backend``'s streamed method ``call.method``."""
        ...

    def preparing(self, backend: Backend, count: int) -> AbstractContextManager[None]:
        """A caller of this loop is preparing ``count`` items to send ``backend`` next: a
        runtime that batches may hold an idle model's batch for them; others do nothing."""
        ...

    async def embed(
        self, backend: Backend, kind: RequestKind, items: Sequence[Any]
    ) -> npt.NDArray[np.float32]:
        """Deprecated: ``run_batch(backend, BatchCall("embed_prepared" or "embed_texts",
        items))``."""
        ...

    def generate(
        self, backend: Backend, prompt: str, config: ImageGenerationConfig
    ) -> AsyncIterator[GenerationChunk]:
        """Deprecated: ``run_stream(backend, StreamCall("generate", (prompt, config)))``."""
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


present_as_public(__name__, globals(), __all__)
