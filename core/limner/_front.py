"""What both async fronts are (``ImageEmbedder``, ``ImageGenerator``): a spec, the backend
built for it, and the runtime the front is bound to, if any."""

from __future__ import annotations

from typing import Generic, TypeVar

from ._backends import Backend
from ._default_pool import in_runtime
from ._runtime import Runtime
from ._spec import ModelSpec

__all__ = ["ModelFront"]

BackendT = TypeVar("BackendT", bound=Backend)


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
