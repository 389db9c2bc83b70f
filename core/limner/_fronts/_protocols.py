"""The two capabilities host code programs against. Async first."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, Union, runtime_checkable

import numpy as np
import numpy.typing as npt

from limner.plugin._generation import GenerationChunk, GenerationResult, ImageGenerationConfig

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["ImageEmbeddingCapable", "ImageInput", "TextToImageCapable"]

ImageInput = Union[str, "os.PathLike[str]", bytes, "Image"]
"""A file path, an http(s) URL, base64 or a ``data:`` URL, raw encoded bytes, or a PIL image."""

Vector = npt.NDArray[np.float32]


@runtime_checkable
class ImageEmbeddingCapable(Protocol):
    """Images (and, where the model can, texts) in; L2-normalised float32 vectors of
    ``embedding_dimension`` floats out. What ``limner.embedder(key)`` returns; host code that
    types against this works with any runtime and any embedding plugin."""

    @property
    def key(self) -> str: ...

    @property
    def embedding_dimension(self) -> int: ...

    @property
    def supports_text(self) -> bool:
        """Whether :meth:`embed_text` works: CLIP-style models embed texts into the same
        space as their images."""
        ...

    async def load(self) -> None:
        """Load the weights now, so the first call finds them warm."""
        ...

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

    async def embed_text(self, texts: str | Sequence[str]) -> Vector:
        """Embed text into the images' space: ``(d,)`` for a string, else ``(n, d)``;
        ``InvalidInput`` where the model embeds no text."""
        ...


@runtime_checkable
class TextToImageCapable(Protocol):
    """A prompt and a config (and, to edit, an image and a mask) in; progress chunks and
    then a final result out. What ``limner.generator(key)`` returns."""

    @property
    def key(self) -> str: ...

    async def load(self) -> None:
        """Load the weights now, so the first generation finds them warm."""
        ...

    def resolve_config(
        self,
        config: ImageGenerationConfig | None = None,
        *,
        source_size: tuple[int, int] | None = None,
    ) -> ImageGenerationConfig:
        """The config with the model's defaults filled in and a seed drawn; ``InvalidInput``
        naming the field for a bad one. Needs no weights. For an edit of a ``source_size``
        (width, height) image, a size it leaves out is the nearest the model takes."""
        ...

    @property
    def supports_editing(self) -> bool:
        """Whether ``image=`` works: the model can repaint an image (and a mask's area)."""
        ...

    def generate_image(
        self,
        prompt: str,
        config: ImageGenerationConfig | None = None,
        *,
        image: ImageInput | None = None,
        mask: ImageInput | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream ``Progress`` chunks, then one ``GenerationResult``; errors end the stream,
        and stopping the iteration stops the run at its next step. With ``image``, an edit
        of it (limited to ``mask``'s area when given)."""
        ...

    async def generate(
        self,
        prompt: str,
        config: ImageGenerationConfig | None = None,
        on_progress: Callable[[GenerationChunk], None] | None = None,
        *,
        image: ImageInput | None = None,
        mask: ImageInput | None = None,
    ) -> GenerationResult:
        """Run a whole generation (or, with ``image``, an edit) and return its result;
        ``on_progress`` sees every chunk."""
        ...
