"""The async front of a text-to-image model: a prompt (and, to edit, an image and a mask)
in, a stream of chunks out."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio.to_thread
import numpy as np
import numpy.typing as npt

from limner._fronts._blocking import BlockingFront, call_blocking
from limner._fronts._front import ModelFront
from limner._fronts._protocols import ImageInput
from limner._inputs._decode import DEFAULT_LIMITS, ImageLimits, decode_image
from limner._inputs._fetch import fetch_image_bytes
from limner._inputs._kinds import InputKind, input_kind
from limner._inputs._masks import decode_mask
from limner._registry._spec import ModelSpec
from limner.errors import InvalidInput, LimnerError, ModelError
from limner.plugin._backends import TextToImageBackend
from limner.plugin._generation import GenerationChunk, GenerationResult, ImageGenerationConfig
from limner.runtime import Runtime, StreamCall

__all__ = [
    "EditInputs",
    "ImageGenerator",
    "check_prompt",
    "check_strength",
    "edit_config",
    "read_edit_inputs",
]

EditInputs = tuple[npt.NDArray[np.uint8], "npt.NDArray[np.uint8] | None"]
"""An edit's source (RGB, ``(h, w, 3)`` uint8) and mask (``(h, w)`` uint8, 0 or 255), as a
backend's ``edit`` takes them."""


def check_prompt(prompt: object) -> None:
    """Raise ``InvalidInput`` naming the prompt unless it is a string with something in it:
    the first thing a generation checks, before its config and long before any weights."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInput("prompt must be a non-empty string", field="prompt")


def check_strength(value: object) -> None:
    """Raise ``InvalidInput`` naming strength unless it is ``None`` or a number in [0, 1]."""
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and 0 <= value <= 1)
    ):
        raise InvalidInput(f"must be a number from 0 to 1, got {value!r}", field="strength")


def read_edit_inputs(
    image: object, mask: object, *, limits: ImageLimits = DEFAULT_LIMITS
) -> EditInputs:
    """Decode an edit's source and mask (any non-URL input ``embed_images`` takes; a path is
    a file), within ``limits``: the arrays a backend's ``edit`` takes. ``InvalidInput`` naming
    ``image`` or ``mask`` for one that cannot be read, and ``mask`` for a mask whose size is
    not the image's. Blocking: the CLI checks its files with it before any model loads."""
    try:
        source = decode_image(image, limits=limits)
    except InvalidInput as error:
        raise error.in_field("image") from None
    if mask is None:
        return np.asarray(source, dtype=np.uint8), None
    try:
        area = decode_mask(mask, limits=limits)
    except InvalidInput as error:
        raise error.in_field("mask") from None
    if area.size != source.size:
        raise InvalidInput(
            f"the mask is {area.width}x{area.height} and the image {source.width}x"
            f"{source.height}; they must be the same size",
            field="mask",
        )
    return np.asarray(source, dtype=np.uint8), np.asarray(area, dtype=np.uint8)


def edit_config(
    backend: TextToImageBackend, config: ImageGenerationConfig, source_size: tuple[int, int]
) -> ImageGenerationConfig:
    """``config`` for an edit of a source of ``source_size`` (width, height), resolved: a
    size it leaves out is the model's nearest to the source's (``backend.edit_size``)."""
    if config.width is None or config.height is None:
        fitted_width, fitted_height = backend.edit_size(*source_size)
        config = dataclasses.replace(
            config,
            width=fitted_width if config.width is None else config.width,
            height=fitted_height if config.height is None else config.height,
        )
    return backend.resolve_config(config)


def _adapters(config: ImageGenerationConfig) -> tuple[tuple[str, float], ...]:
    """A call's LoRA adapters: state of the one shared model, so calls with another set of
    them never run beside it (see :attr:`StreamCall.group`)."""
    return tuple(sorted(config.loras))


class ImageGenerator(ModelFront[TextToImageBackend]):
    """Implements :class:`~limner.TextToImageCapable` over a plugin's backend.

    The config is validated before any weights load; generation runs in a pool worker
    thread and streams ``Progress`` chunks, then one ``GenerationResult``. Stop iterating
    (or cancel the consumer) and the run stops at its next step.

    Given an ``image`` (and a ``mask``), a model that can edit (:attr:`supports_editing`)
    repaints it instead: the inputs are decoded within ``limits``, as ``embed_images``
    decodes, and checked before any weights load.
    """

    def __init__(
        self, spec: ModelSpec, backend: TextToImageBackend, *, limits: ImageLimits = DEFAULT_LIMITS
    ) -> None:
        super().__init__(spec, backend)
        self.limits = limits

    def __repr__(self) -> str:
        return f"<ImageGenerator {self.spec.key}>"

    @property
    def supports_editing(self) -> bool:
        """Whether ``image=`` works: the plugin's backend edits images."""
        return self.backend.supports_editing

    def using(self, runtime: Runtime) -> ImageGenerator:
        """The same model, served by ``runtime`` (a :class:`~limner.Pool`, or any
        :class:`~limner.Runtime`) instead of the current or default pool."""
        return self._copy(runtime=runtime, limits=self.limits)

    def with_limits(self, limits: ImageLimits) -> ImageGenerator:
        """The same model, served by the same runtime, decoding edits' inputs within
        ``limits``."""
        return self._copy(runtime=self._runtime, limits=limits)

    def _copy(self, *, runtime: Runtime | None, limits: ImageLimits) -> ImageGenerator:
        bound = ImageGenerator(self.spec, self.backend, limits=limits)
        bound._runtime = runtime
        return bound

    def blocking(self) -> BlockingImageGenerator:
        """The same model behind a plain blocking call, for synchronous host code."""
        return BlockingImageGenerator(self)

    def resolve_config(
        self,
        config: ImageGenerationConfig | None = None,
        *,
        source_size: tuple[int, int] | None = None,
    ) -> ImageGenerationConfig:
        """The config with the model's defaults filled in and a seed drawn; validated (its
        LoRA adapters too, in their canonical order). For an edit of a ``source_size``
        (width, height) image, a size the config leaves out is the nearest the model takes
        to the image's."""
        config = config or ImageGenerationConfig()
        if config.loras and not self.backend.supports_loras:
            raise InvalidInput(f"{self.key} takes no LoRA adapters", field="loras")
        if source_size is None:
            return self.backend.resolve_config(config)
        return edit_config(self.backend, config, source_size)

    async def generate_image(
        self,
        prompt: str,
        config: ImageGenerationConfig | None = None,
        *,
        image: ImageInput | None = None,
        mask: ImageInput | None = None,
    ) -> AsyncGenerator[GenerationChunk, None]:
        """Stream ``Progress`` chunks, then one ``GenerationResult``. With ``image``, an edit
        of it (only the ``mask``'s white pixels, or an OpenAI mask's transparent ones, when
        given); see :meth:`generate`."""
        check_prompt(prompt)
        call = await self._stream_call(prompt, config or ImageGenerationConfig(), image, mask)
        stream = self._run_stream(call)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    async def generate(
        self,
        prompt: str,
        config: ImageGenerationConfig | None = None,
        on_progress: Callable[[GenerationChunk], None] | None = None,
        *,
        image: ImageInput | None = None,
        mask: ImageInput | None = None,
    ) -> GenerationResult:
        """Run a whole generation and return its result; ``on_progress`` sees every chunk.

        ``image`` (a path, an http(s) URL, base64 or a ``data:`` URL, bytes, a PIL image)
        makes it an edit of that image, at ``config.strength``, in the image's size unless
        the config gives one; ``mask`` (the image's size) limits it to the mask's white
        pixels, or, for a mask with transparency, to its fully transparent ones (OpenAI's
        convention). Both are decoded and checked before any weights load.
        """
        result: GenerationResult | None = None
        async for chunk in self.generate_image(prompt, config, image=image, mask=mask):
            if on_progress is not None:
                on_progress(chunk)
            if isinstance(chunk, GenerationResult):
                result = chunk
        if result is None:
            raise ModelError(f"{self.key} ended its stream without a result")
        return result

    # -- the machinery --------------------------------------------------------------------

    async def _stream_call(
        self, prompt: str, config: ImageGenerationConfig, image: object, mask: object
    ) -> StreamCall:
        """What the runtime runs: a generation, or an edit with its inputs decoded."""
        if image is None:
            if mask is not None:
                raise InvalidInput("a mask needs an image to edit: pass image= too", field="mask")
            if config.strength is not None:
                raise InvalidInput(
                    "strength applies to edits only: pass image= too, or leave it unset",
                    field="strength",
                )
            resolved = self.resolve_config(config)
            return StreamCall("generate", (prompt, resolved), group=_adapters(resolved))
        if not self.backend.supports_editing:
            raise InvalidInput(
                f"model {self.key} cannot edit images; it generates from a prompt alone",
                field="image",
            )
        check_strength(config.strength)
        source, area = await self._read_edit_inputs(image, mask)
        resolved = self.resolve_config(config, source_size=(source.shape[1], source.shape[0]))
        return StreamCall("edit", (prompt, resolved, source, area), group=_adapters(resolved))

    async def _read_edit_inputs(self, image: object, mask: object) -> EditInputs:
        """Fetch the inputs that are URLs, then decode both in a thread."""
        fetched = [
            await self._fetched(value, field) for value, field in ((image, "image"), (mask, "mask"))
        ]
        return await anyio.to_thread.run_sync(
            functools.partial(read_edit_inputs, *fetched, limits=self.limits)
        )

    async def _fetched(self, value: object, field: str) -> Any:
        """An http(s) URL's bytes; any other input as it is."""
        if value is None:
            return None
        try:
            if input_kind(value) is InputKind.URL:
                assert isinstance(value, str)
                return await fetch_image_bytes(value.strip(), limits=self.limits)
        except LimnerError as error:
            raise (error.in_field(field) if isinstance(error, InvalidInput) else error) from None
        return value


class BlockingImageGenerator(BlockingFront[ImageGenerator]):
    """:class:`~limner.ImageGenerator` as a blocking call with a progress callback."""

    @property
    def supports_editing(self) -> bool:
        return self.model.supports_editing

    def generate(
        self,
        prompt: str,
        config: ImageGenerationConfig | None = None,
        *,
        on_progress: Callable[[GenerationChunk], None] | None = None,
        image: ImageInput | None = None,
        mask: ImageInput | None = None,
    ) -> GenerationResult:
        """Generate (or, with ``image``, edit) and return the result; ``on_progress`` sees
        each chunk on the loop thread."""
        edit = functools.partial(self.model.generate, image=image, mask=mask)
        return call_blocking("generate", edit, prompt, config, on_progress)
