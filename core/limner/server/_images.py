"""Images as OpenAI's Images API answers them, generated or edited: the JSON body, its
server-sent events as the ``openai`` package's types declare them, and limner's own
progress stream.

A request becomes one or more :class:`Job`: a generation, or an edit of each source image
(OpenAI's ``image[]``). Their images are encoded in the request's ``output_format``; a
stream sends OpenAI's ``image_generation.partial_image`` / ``image_edit.partial_image``
events (the step's latent preview, scaled to the output size) at ``partial_images`` steps
spread over those that run, then one ``*.completed`` event per image. Every field those
types require is there; ``usage`` is zeros, since limner counts no tokens.
"""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.to_thread
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from limner import (
    GenerationChunk,
    GenerationResult,
    ImageGenerationConfig,
    ImageGenerator,
    ModelError,
    Progress,
)

from ._streaming import sse_event

__all__ = [
    "USAGE",
    "ImageAnswer",
    "Job",
    "Kind",
    "limner_events",
    "next_chunk",
    "openai_events",
    "partial_steps",
    "whole_answer",
]

Kind = Literal["image_generation", "image_edit"]

USAGE: dict[str, Any] = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}
"""OpenAI's token counts: limner keeps none, so zeros, which clients reading them accept."""

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# What ImagesResponse.quality may hold; the events' quality also takes "auto".
_RESPONSE_QUALITIES = frozenset({"low", "medium", "high", "xhigh", "max"})


@dataclass(frozen=True)
class Job:
    """One call to the model: a generation, or the edit of one source image."""

    prompt: str
    config: ImageGenerationConfig
    image: Image.Image | None = None
    mask: Image.Image | None = None

    def chunks(self, model: ImageGenerator) -> AsyncGenerator[GenerationChunk, None]:
        if self.image is None:
            return model.generate_image(self.prompt, self.config)
        return model.generate_image(self.prompt, self.config, image=self.image, mask=self.mask)


@dataclass(frozen=True)
class ImageAnswer:
    """How a request's images are encoded and described."""

    kind: Kind
    output_format: str
    compression: int | None
    background: str  # the request's: "auto" or "opaque" (transparent is refused before)
    quality: str | None

    @property
    def event_quality(self) -> str:
        return self.quality if self.quality in _RESPONSE_QUALITIES else "auto"

    def encode(self, image: Image.Image, result: GenerationResult | None, index: int) -> str:
        """``image`` as base64 in the output format; a PNG of a result carries its text
        chunks (prompt, seed, model, settings), as ``GenerationResult.save`` writes them.
        Blocking."""
        buffer = io.BytesIO()
        if self.output_format == "jpeg" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")  # JPEG has no alpha
        options: dict[str, Any] = {}
        if self.output_format == "png":
            if result is not None:
                info = PngInfo()
                for key, value in result.text_metadata(index).items():
                    info.add_itxt(key, value)
                options["pnginfo"] = info
        elif self.compression is not None:
            options["quality"] = self.compression
        image.save(buffer, format=_PIL_FORMATS[self.output_format], **options)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def event(self, name: str, b64_json: str, size: tuple[int, int], **fields: Any) -> bytes:
        """One OpenAI image event, ``<kind>.<name>``, with every field its type requires."""
        body = {
            "type": f"{self.kind}.{name}",
            "b64_json": b64_json,
            "background": self.background,
            "created_at": int(time.time()),
            "output_format": self.output_format,
            "quality": self.event_quality,
            "size": f"{size[0]}x{size[1]}",
            **fields,
        }
        return sse_event(body["type"], body)


def partial_steps(total: int, count: int) -> list[int]:
    """The steps (1-based) whose previews are sent as partial images: ``count`` of the
    ``total`` that run, evenly spread (every step when there are no more than ``count``)."""
    if count <= 0 or total <= 0:
        return []
    if count >= total:
        return list(range(1, total + 1))
    return [math.floor(index * total / (count + 1) + 0.5) for index in range(1, count + 1)]


async def next_chunk(
    model: ImageGenerator, stream: AsyncGenerator[GenerationChunk, None]
) -> GenerationChunk:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise ModelError(f"{model.key} ended its stream without a result") from None


async def _results(
    model: ImageGenerator,
    jobs: list[Job],
    first: tuple[AsyncGenerator[GenerationChunk, None], GenerationChunk],
    on_chunk: Callable[[Job, GenerationChunk], Awaitable[list[bytes]]],
) -> AsyncGenerator[bytes, None]:
    """Each job's chunks in turn (the first job's stream already started, with its first
    chunk), handed to ``on_chunk`` for the events to send; every stream is closed."""
    stream, chunk = first
    for number, job in enumerate(jobs):
        if number:
            stream = job.chunks(model)
            chunk = await next_chunk(model, stream)
        try:
            while True:
                for event in await on_chunk(job, chunk):
                    yield event
                if isinstance(chunk, GenerationResult):
                    break
                chunk = await next_chunk(model, stream)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()


async def openai_events(
    model: ImageGenerator,
    jobs: list[Job],
    first: tuple[AsyncGenerator[GenerationChunk, None], GenerationChunk],
    answer: ImageAnswer,
    partial_images: int,
) -> AsyncGenerator[bytes, None]:
    """OpenAI's events: partial images at the chosen steps, then a completed event per
    image. Closing this closes the running generation, which stops it."""
    sent = 0
    chosen: list[int] = []

    async def on_chunk(job: Job, chunk: GenerationChunk) -> list[bytes]:
        nonlocal sent, chosen
        if isinstance(chunk, Progress):
            if chunk.step == 1 or not chosen:
                chosen = partial_steps(chunk.total, partial_images)
            if chunk.preview is None or chunk.step not in chosen:
                return []
            width, height = job.config.width, job.config.height  # resolved: both set
            size = (width or chunk.preview.width, height or chunk.preview.height)
            encoded = await anyio.to_thread.run_sync(_partial, answer, chunk.preview, size)
            sent += 1
            return [answer.event("partial_image", encoded, size, partial_image_index=sent - 1)]
        encoded_images = await anyio.to_thread.run_sync(_encoded, answer, chunk)
        return [
            answer.event("completed", b64, image.size, usage=USAGE)
            for image, b64 in zip(chunk.images, encoded_images)
        ]

    async for event in _results(model, jobs, first, on_chunk):
        yield event


async def limner_events(
    model: ImageGenerator,
    jobs: list[Job],
    first: tuple[AsyncGenerator[GenerationChunk, None], GenerationChunk],
    answer: ImageAnswer,
) -> AsyncGenerator[bytes, None]:
    """limner's stream: a ``progress`` event per step (with ``preview``, a small PNG), then
    ``completed`` with the whole answer's body, then ``done``."""
    results: list[GenerationResult] = []

    async def on_chunk(job: Job, chunk: GenerationChunk) -> list[bytes]:
        if isinstance(chunk, GenerationResult):
            results.append(chunk)
            return []
        progress: dict[str, Any] = {
            "step": chunk.step,
            "total": chunk.total,
            "elapsed": chunk.elapsed,
        }
        if chunk.preview is not None:
            progress["preview"] = await anyio.to_thread.run_sync(_png_b64, chunk.preview)
        return [sse_event("progress", progress)]

    async for event in _results(model, jobs, first, on_chunk):
        yield event
    body = await anyio.to_thread.run_sync(whole_answer, results, answer)
    yield sse_event("completed", body)
    yield sse_event("done", "[DONE]")


def whole_answer(results: list[GenerationResult], answer: ImageAnswer) -> dict[str, Any]:
    """OpenAI's ``ImagesResponse`` body for the results, with limner's ``seed`` and
    ``model``. Blocking: it encodes every image."""
    data = []
    for result in results:
        for index, image in enumerate(result.images):
            encoded = answer.encode(image, result, index)
            data.append({"b64_json": encoded, "revised_prompt": None})
    first = results[0]
    config = first.config
    width, height = first.images[0].size if first.images else (config.width, config.height)
    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": data,
        "background": "opaque",
        "output_format": answer.output_format,
        "size": f"{width}x{height}",
        "usage": USAGE,
        "seed": first.seed,
        "model": first.model,
    }
    if answer.quality in _RESPONSE_QUALITIES:
        body["quality"] = answer.quality
    return body


def _encoded(answer: ImageAnswer, result: GenerationChunk) -> list[str]:
    assert isinstance(result, GenerationResult)
    return [answer.encode(image, result, index) for index, image in enumerate(result.images)]


def _partial(answer: ImageAnswer, preview: Image.Image, size: tuple[int, int]) -> str:
    """A step's preview (one pixel per latent) scaled to the output size, encoded."""
    return answer.encode(preview.resize(size, Image.Resampling.BILINEAR), None, 0)


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
