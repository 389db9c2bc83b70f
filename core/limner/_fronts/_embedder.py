"""The async front of an image-embedding model: inputs in, vectors out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt

from limner._fronts._blocking import BlockingFront, call_blocking
from limner._fronts._front import ModelFront
from limner._fronts._protocols import ImageInput
from limner._inputs._decode import DEFAULT_LIMITS, ImageLimits, decode_image
from limner._inputs._fetch import fetch_image_bytes
from limner._inputs._kinds import InputKind, classify_input
from limner._pool._vectors import describe_backend
from limner._registry._spec import ModelSpec
from limner.errors import InvalidInput, LimnerError, ModelError
from limner.plugin._backends import ImageEmbeddingBackend
from limner.runtime import BatchCall, Runtime

__all__ = ["DEFAULT_MAX_TEXT_CHARS", "ImageEmbedder", "check_max_text_chars"]

Vector = npt.NDArray[np.float32]

DEFAULT_MAX_TEXT_CHARS = 10_000
"""Longest text ``embed_text`` takes. CLIP reads its first 77 tokens (a few hundred
characters); the bound keeps one call from holding megabytes of text."""


def check_max_text_chars(value: object) -> int:
    """``value`` if it is a positive integer; ``InvalidInput`` naming max_text_chars if not."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"must be a positive integer, got {value!r}", field="max_text_chars")
    return value


def _first(vectors: Vector) -> Vector:
    row: Vector = vectors[0]
    return row


class ImageEmbedder(ModelFront[ImageEmbeddingBackend]):
    """Implements :class:`~limner.ImageEmbeddingCapable` over a plugin's backend.

    Decoding and preprocessing run per input in worker threads before any batching, so one
    bad image fails only its own call. The work then goes to a pool: the one given to
    ``using``, else the innermost ``async with Pool()``, else the process-wide default pool,
    which loads the weights on first use.
    """

    def __init__(
        self,
        spec: ModelSpec,
        backend: ImageEmbeddingBackend,
        *,
        limits: ImageLimits = DEFAULT_LIMITS,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    ) -> None:
        super().__init__(spec, backend)
        self.limits = limits
        self.max_text_chars = check_max_text_chars(max_text_chars)

    def __repr__(self) -> str:
        return f"<ImageEmbedder {self.spec.key} dim={self.embedding_dimension}>"

    @property
    def embedding_dimension(self) -> int:
        dimension = self.spec.info.embedding_dimension
        if dimension is None:
            raise LimnerError(f"plugin for {self.key} did not declare an embedding_dimension")
        return dimension

    @property
    def supports_text(self) -> bool:
        return self.backend.supports_text

    def blocking(self) -> BlockingImageEmbedder:
        """The same model behind plain blocking calls, for synchronous host code."""
        return BlockingImageEmbedder(self)

    # -- the capability -------------------------------------------------------------------

    async def embed_image(self, path: str | os.PathLike[str]) -> Vector:
        return _first(await self._embed([path], expect=(InputKind.PATH,)))

    async def embed_image_url(self, url: str) -> Vector:
        return _first(await self._embed([url], expect=(InputKind.URL,)))

    async def embed_image_base64(self, data: str | bytes) -> Vector:
        if isinstance(data, bytes):
            data = data.decode("ascii", errors="replace")
        return _first(await self._embed([data], expect=(InputKind.BASE64, InputKind.DATA_URL)))

    async def batch_embed_images(self, paths: Sequence[str | os.PathLike[str]]) -> Vector:
        return await self._embed(list(paths), expect=(InputKind.PATH,))

    async def embed_images(self, inputs: Sequence[ImageInput]) -> Vector:
        return await self._embed(list(inputs), expect=None)

    async def embed_text(self, texts: str | Sequence[str]) -> Vector:
        """Embed text into the same space as the images: ``(d,)`` for a string, else ``(n, d)``."""
        if not self.backend.supports_text:
            raise InvalidInput(f"model {self.key} does not embed text; pick a CLIP-style model")
        single = isinstance(texts, str)
        batch = [texts] if isinstance(texts, str) else list(texts)
        for index, text in enumerate(batch):
            if not isinstance(text, str):
                raise InvalidInput("text must be a string", input=text, index=index)
            if len(text) > self.max_text_chars:
                raise InvalidInput(
                    f"text is {len(text)} characters, over the limit of {self.max_text_chars} "
                    "(max_text_chars)",
                    input=text,
                    index=None if single else index,
                )
        if not batch:
            return np.zeros((0, self.embedding_dimension), dtype=np.float32)
        prepared = await anyio.to_thread.run_sync(self._prepare_texts, batch, single)
        vectors = await self._run_batch(BatchCall("embed_texts", prepared))
        return _first(vectors) if single else vectors

    def using(self, runtime: Runtime) -> ImageEmbedder:
        """The same model, served by ``runtime`` (a :class:`~limner.Pool`, or any
        :class:`~limner.Runtime`) instead of the current or default pool."""
        return self._copy(runtime=runtime, limits=self.limits)

    def with_limits(self, limits: ImageLimits) -> ImageEmbedder:
        """The same model, served by the same runtime, decoding its inputs within ``limits``."""
        return self._copy(runtime=self._runtime, limits=limits)

    def _copy(self, *, runtime: Runtime | None, limits: ImageLimits) -> ImageEmbedder:
        copy = ImageEmbedder(
            self.spec, self.backend, limits=limits, max_text_chars=self.max_text_chars
        )
        copy._runtime = runtime
        return copy

    # -- the machinery --------------------------------------------------------------------

    async def _embed(self, inputs: list[Any], *, expect: tuple[InputKind, ...] | None) -> Vector:
        if not inputs:
            return np.zeros((0, self.embedding_dimension), dtype=np.float32)
        # A decoded image may take hundreds of megabytes and a call may hold thousands of
        # inputs: decode only so many of them at once.
        decode_slots = anyio.CapacityLimiter(self.limits.max_concurrent_decodes)
        prepared: list[Any] = [None] * len(inputs)
        errors: list[LimnerError | None] = [None] * len(inputs)
        with self._preparing(len(inputs)):
            async with anyio.create_task_group() as group:
                for index, source in enumerate(inputs):
                    group.start_soon(
                        self._prepare_one, index, source, expect, decode_slots, prepared, errors
                    )
        for index, error in enumerate(errors):
            if isinstance(error, InvalidInput) and len(inputs) > 1:
                raise error.at_index(index)
            if error is not None:
                raise error
        return await self._run_batch(BatchCall("embed_prepared", prepared))

    async def _prepare_one(
        self,
        index: int,
        source: Any,
        expect: tuple[InputKind, ...] | None,
        decode_slots: anyio.CapacityLimiter,
        out: list[Any],
        errors: list[LimnerError | None],
    ) -> None:
        """Decode and prepare one input; every failure is recorded, typed, for its caller."""
        try:
            kind = classify_input(source, allow_paths=True, texts=False)  # the Python API's
            if expect is not None and kind not in expect:
                expected = " or ".join(each.value for each in expect)
                raise InvalidInput(f"expected {expected}, got {kind.value}", input=source)
            data: Any = source
            name: str | None = None
            if kind is InputKind.URL:
                data = await fetch_image_bytes(source, limits=self.limits)
                kind, name = InputKind.BYTES, source
            async with decode_slots:  # after any fetch: only decoding is bounded
                out[index] = await anyio.to_thread.run_sync(
                    self._decode_and_prepare, data, kind, name
                )
        except LimnerError as error:
            errors[index] = error
        except Exception as error:  # the plugin's prepare() raised: its bug, not the input's
            failure = ModelError(
                f"{describe_backend(self.key, self.backend)} failed to prepare input #{index}: "
                f"{error!r}"
            )
            failure.__cause__ = error
            errors[index] = failure

    def _prepare_texts(self, texts: list[str], single: bool) -> list[Any]:
        """Each text as the backend takes it, before queueing: tokenizing scales with the
        caller's own texts and never holds the model's turn."""
        prepared = []
        for index, text in enumerate(texts):
            try:
                prepared.append(self.backend.prepare_text(text))
            except InvalidInput as error:
                raise error if single else error.at_index(index) from None
            except LimnerError:
                raise
            except Exception as error:  # the plugin's prepare_text() raised: its bug
                raise ModelError(
                    f"{describe_backend(self.key, self.backend)} failed to prepare text "
                    f"#{index}: {error!r}"
                ) from error
        return prepared

    def _decode_and_prepare(self, data: Any, kind: InputKind, name: str | None) -> Any:
        image = decode_image(
            data, kind=kind, limits=self.limits, draft_size=self.backend.image_size, name=name
        )
        return self.backend.prepare(image)


class BlockingImageEmbedder(BlockingFront[ImageEmbedder]):
    """The same methods as :class:`~limner.ImageEmbedder`, as plain blocking calls.

    Safe to use from many threads at once: every call is handed to the default pool's loop.
    """

    @property
    def embedding_dimension(self) -> int:
        return self.model.embedding_dimension

    def embed_image(self, path: str | os.PathLike[str]) -> npt.NDArray[np.float32]:
        return call_blocking("embed_image", self.model.embed_image, path)

    def embed_image_url(self, url: str) -> npt.NDArray[np.float32]:
        return call_blocking("embed_image_url", self.model.embed_image_url, url)

    def embed_image_base64(self, data: str | bytes) -> npt.NDArray[np.float32]:
        return call_blocking("embed_image_base64", self.model.embed_image_base64, data)

    def batch_embed_images(
        self, paths: Sequence[str | os.PathLike[str]]
    ) -> npt.NDArray[np.float32]:
        return call_blocking("batch_embed_images", self.model.batch_embed_images, paths)

    def embed_images(self, inputs: Sequence[ImageInput]) -> npt.NDArray[np.float32]:
        return call_blocking("embed_images", self.model.embed_images, inputs)

    def embed_text(self, texts: str | Sequence[str]) -> npt.NDArray[np.float32]:
        return call_blocking("embed_text", self.model.embed_text, texts)
