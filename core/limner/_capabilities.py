"""The two capabilities host code programs against. Async first."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol, Union, runtime_checkable

import numpy as np
import numpy.typing as npt

from ._generation_types import GenerationChunk, ImageGenerationConfig

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["ImageEmbeddingCapable", "ImageInput", "TextToImageCapable"]

ImageInput = Union[str, "os.PathLike[str]", bytes, "Image"]
"""A file path, an http(s) URL, base64 or a ``data:`` URL, raw encoded bytes, or a PIL image."""

Vector = npt.NDArray[np.float32]


@runtime_checkable
class ImageEmbeddingCapable(Protocol):
    """Images in, L2-normalised float32 vectors of ``embedding_dimension`` floats out."""

    @property
    def key(self) -> str: ...

    @property
    def embedding_dimension(self) -> int: ...

    async def embed_image(self, path: str | os.PathLike[str]) -> Vector:
        """Embed one image file: a ``(d,)`` vector."""
        ...

    async def embed_image_url(self, url: str) -> Vector:
        """Fetch an http(s) URL and embed the image: a ``(d,)`` vector."""
        ...

    async def embed_image_base64(self, data: str | bytes) -> Vector:
        """Embed base64-encoded image bytes or a ``data:`` URL: a ``(d,)`` vector."""
        ...

    async def batch_embed_images(self, paths: Sequence[str | os.PathLike[str]]) -> Vector:
        """Embed image files: an ``(n, d)`` array, one row per path, in order."""
        ...

    async def embed_images(self, inputs: Sequence[ImageInput]) -> Vector:
        """Embed any mix of accepted inputs: an ``(n, d)`` array, one row per input, in order."""
        ...


@runtime_checkable
class TextToImageCapable(Protocol):
    """A prompt and a config in; progress chunks and then a final result out."""

    @property
    def key(self) -> str: ...

    def generate_image(
        self, prompt: str, config: ImageGenerationConfig | None = None
    ) -> AsyncIterator[GenerationChunk]:
        """Stream ``Progress`` chunks, then one ``GenerationResult``; errors end the stream."""
        ...
