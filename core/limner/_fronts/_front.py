"""What both async fronts are (``ImageEmbedder``, ``ImageGenerator``): a spec, the backend
built for it, the runtime the front is bound to, if any, and the two calls every request
becomes on its way there."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from limner._exports import warn_deprecated
from limner._fronts._default_pool import in_runtime, iterate_in_runtime
from limner._pool import current_pool
from limner._registry._spec import ModelSpec
from limner.errors import LimnerError
from limner.plugin._backends import Backend
from limner.plugin._generation import GenerationChunk
from limner.runtime import BatchCall, RequestKind, Runtime, StreamCall

__all__ = ["ModelFront"]

BackendT = TypeVar("BackendT", bound=Backend)

Vector = npt.NDArray[np.float32]


class ModelFront(Generic[BackendT]):
    """A model's async front: its calls go to the bound runtime (``using``), else the
    innermost ``async with Pool()``, else the process-wide default pool."""

    def __init__(self, spec: ModelSpec, backend: BackendT) -> None:
        self.spec = spec
        self.backend = backend
        self._runtime: Runtime | None = None

    @property
    def key(self) -> str:
        return self.spec.key

    async def load(self) -> None:
        """Load the weights now, through the same pool requests would use."""
        await in_runtime(self._runtime, lambda runtime: runtime.load(self.backend))

    async def _run_batch(self, call: BatchCall) -> Vector:
        return await in_runtime(self._runtime, lambda runtime: _batch(runtime, self.backend, call))

    def _run_stream(self, call: StreamCall) -> AsyncGenerator[GenerationChunk, None]:
        return iterate_in_runtime(
            self._runtime, lambda runtime: _stream(runtime, self.backend, call)
        )

    @contextlib.contextmanager
    def _preparing(self, count: int) -> Iterator[None]:
        """Tell the runtime of this loop (the bound one, else the innermost ``async with
        Pool()``) that ``count`` items are being prepared for this model: an idle model then
        waits for them, so a burst of single calls runs as one batch. The default pool runs
        on a loop of its own and is not told."""
        runtime = self._runtime or current_pool()
        preparing = getattr(runtime, "preparing", None)  # absent from runtimes before 0.2
        with preparing(self.backend, count) if preparing else contextlib.nullcontext():
            yield


# Runtimes written before run_batch and run_stream implement embed and generate: they keep
# working for a release, with a DeprecationWarning.


async def _batch(runtime: Runtime, backend: Backend, call: BatchCall) -> Vector:
    if hasattr(runtime, "run_batch"):
        return await runtime.run_batch(backend, call)
    _warn(runtime, "embed", "run_batch")
    kind: RequestKind = "image" if call.method == "embed_prepared" else "text"
    return await runtime.embed(backend, kind, call.items)


def _stream(runtime: Runtime, backend: Backend, call: StreamCall) -> AsyncIterator[Any]:
    if hasattr(runtime, "run_stream"):
        return runtime.run_stream(backend, call)
    if call.method != "generate":  # the old call carries generations only
        raise LimnerError(
            f"{type(runtime).__name__} cannot run {call.method!r}: it implements generate "
            "without run_stream (limner.runtime.Runtime)"
        )
    _warn(runtime, "generate", "run_stream")
    prompt, config = call.args
    return runtime.generate(backend, prompt, config)


def _warn(runtime: Runtime, old: str, new: str) -> None:
    warn_deprecated(
        f"a runtime implementing {old} without {new} ({type(runtime).__name__})",
        f"implement {new} (limner.runtime.Runtime)",
        stacklevel=4,
    )
