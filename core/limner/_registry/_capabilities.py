"""The capabilities as one table: for each, the base class a plugin's backend subclasses and
the async front that serves it. The registry derives a spec's capability from its backend's
base class and wraps backends through this table; nothing else switches on capability."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from limner._inputs._decode import ImageLimits
from limner._registry._spec import Capability, ModelSpec
from limner.plugin._backends import ImageEmbeddingBackend, TextToImageBackend

if TYPE_CHECKING:
    from limner._registry._registry import Model

__all__ = ["CAPABILITIES", "CapabilityRow", "FrontOptions", "row_for", "row_of_backend"]


@dataclass(frozen=True)
class FrontOptions:
    """What a registry hands every front it builds."""

    limits: ImageLimits
    max_text_chars: int


@dataclass(frozen=True)
class CapabilityRow:
    """One capability: ``backend`` is the base class plugins subclass, ``front`` builds the
    async front over a backend, ``noun`` names its models in messages. ``batched`` and
    ``streamed`` are the backend methods a runtime runs for it, as a
    :class:`~limner.runtime.BatchCall` or a :class:`~limner.runtime.StreamCall`: the front
    shapes each request into one of them, and a runtime runs no other method."""

    capability: Capability
    backend: type  # a subclass of Backend (abstract: a plain type keeps mypy content)
    front: Callable[[ModelSpec, Any, FrontOptions], Model]
    noun: str
    batched: frozenset[str] = frozenset()
    streamed: frozenset[str] = frozenset()


# The fronts are imported when the first one is built: they use the pool, which imports
# limner.runtime, which imports this table.


def _embedder(spec: ModelSpec, backend: Any, options: FrontOptions) -> Model:
    from limner._fronts._embedder import ImageEmbedder

    return ImageEmbedder(
        spec, backend, limits=options.limits, max_text_chars=options.max_text_chars
    )


def _generator(spec: ModelSpec, backend: Any, options: FrontOptions) -> Model:
    from limner._fronts._generator import ImageGenerator

    return ImageGenerator(spec, backend, limits=options.limits)


CAPABILITIES: tuple[CapabilityRow, ...] = (
    CapabilityRow(
        Capability.IMAGE_EMBEDDING,
        ImageEmbeddingBackend,
        _embedder,
        "image-embedding model",
        batched=frozenset({"embed_prepared", "embed_texts"}),
    ),
    CapabilityRow(
        Capability.TEXT_TO_IMAGE,
        TextToImageBackend,
        _generator,
        "text-to-image model",
        # edit: a feature of the capability, which a backend may offer (supports_editing)
        streamed=frozenset({"generate", "edit"}),
    ),
)


def row_for(capability: Capability) -> CapabilityRow:
    """The row of a declared capability."""
    return next(row for row in CAPABILITIES if row.capability is capability)


def row_of_backend(backend: type) -> CapabilityRow | None:
    """The row whose base class ``backend`` subclasses, if any."""
    return next((row for row in CAPABILITIES if issubclass(backend, row.backend)), None)
