"""The capabilities as one table: for each, the base class a plugin's backend subclasses and
the async front that serves it. The registry derives a spec's capability from its backend's
base class and wraps backends through this table; nothing else switches on capability."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._backends import ImageEmbeddingBackend, TextToImageBackend
from ._embedder import ImageEmbedder
from ._generator import ImageGenerator
from ._images import ImageLimits
from ._spec import Capability, ModelSpec

__all__ = ["CAPABILITIES", "CapabilityRow", "FrontOptions", "Model", "row_for", "row_of_backend"]

Model = ImageEmbedder | ImageGenerator
"""What ``Registry.get`` returns: the async front matching the key's capability."""


@dataclass(frozen=True)
class FrontOptions:
    """What a registry hands every front it builds."""

    limits: ImageLimits
    max_text_chars: int


@dataclass(frozen=True)
class CapabilityRow:
    """One capability: ``backend`` is the base class plugins subclass, ``front`` builds the
    async front over a backend, ``noun`` names its models in messages."""

    capability: Capability
    backend: type  # a subclass of Backend (abstract: a plain type keeps mypy content)
    front: Callable[[ModelSpec, Any, FrontOptions], Model]
    noun: str


def _embedder(spec: ModelSpec, backend: Any, options: FrontOptions) -> Model:
    return ImageEmbedder(
        spec, backend, limits=options.limits, max_text_chars=options.max_text_chars
    )


def _generator(spec: ModelSpec, backend: Any, options: FrontOptions) -> Model:
    return ImageGenerator(spec, backend)


CAPABILITIES: tuple[CapabilityRow, ...] = (
    CapabilityRow(
        Capability.IMAGE_EMBEDDING, ImageEmbeddingBackend, _embedder, "image-embedding model"
    ),
    CapabilityRow(Capability.TEXT_TO_IMAGE, TextToImageBackend, _generator, "text-to-image model"),
)


def row_for(capability: Capability) -> CapabilityRow:
    """The row of a declared capability."""
    return next(row for row in CAPABILITIES if row.capability is capability)


def row_of_backend(backend: type) -> CapabilityRow | None:
    """The row whose base class ``backend`` subclasses, if any."""
    return next((row for row in CAPABILITIES if issubclass(backend, row.backend)), None)
