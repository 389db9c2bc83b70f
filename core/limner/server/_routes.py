"""The endpoints: models, embeddings, image generation, probes, pool stats, metrics."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from limner import (
    GenerationChunk,
    GenerationResult,
    ImageEmbedder,
    ImageGenerationConfig,
    ImageGenerator,
    ModelEntry,
    Progress,
)
from limner.errors import InvalidInput, ModelError

from ._errors import APIError, input_param, to_api_error
from ._inputs import split_inputs
from ._loras import lora_cards, lora_pairs
from ._metrics import Metrics
from ._middleware import is_authorized
from ._schemas import (
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ImageRequest,
    ImageResponse,
    LoraList,
    ModelCard,
    ModelList,
    PoolResponse,
)
from ._service import Service
from ._streaming import EventStream, run_for_client, sse_event

__all__ = ["add_routes"]

Endpoint = Callable[..., Awaitable[Any]]
_ROUTES: list[tuple[str, Endpoint, dict[str, Any]]] = []


def _route(method: str, path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """Record an endpoint; ``add_routes`` adds them all to an app."""

    def record(endpoint: Endpoint) -> Endpoint:
        _ROUTES.append((path, endpoint, {"methods": [method], **options}))
        return endpoint

    return record


def add_routes(app: FastAPI) -> None:
    """Every endpoint, as plain routes of ``app`` (so middleware can match them by path)."""
    for path, endpoint, options in _ROUTES:
        app.add_api_route(path, endpoint, **options)


Vector = npt.NDArray[np.float32]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "Bad input; `param` names the field",
        401: "Missing or wrong API key",
        404: "Unknown model (with suggestions)",
        413: "Body over max_body_bytes",
        429: "The model's queue is full; see Retry-After",
        500: "The model failed while running (never bad input)",
        503: "The model waited past max_wait for its turn (see Retry-After), could never fit "
        "the memory budget, or failed to load",
        504: "Over request_timeout",
    }
    return {
        status: {"model": ErrorResponse, "description": described[status]} for status in statuses
    }


_MODEL_ERRORS = _errors(400, 401, 404, 413, 429, 500, 503, 504)


def _service(request: Request) -> Service:
    return cast(Service, request.app.state.limner)


def _deadline(service: Service) -> float:
    return anyio.current_time() + service.settings.request_timeout


@contextmanager
def _input_errors(*, field: str | None, indexed: bool = False) -> Iterator[None]:
    """Bad input as a 400 whose ``param`` names the request field."""
    try:
        yield
    except InvalidInput as error:
        raise to_api_error(error, param=input_param(error, field=field, indexed=indexed)) from None


# -- models -----------------------------------------------------------------------------------


def _card(entry: ModelEntry, created: int) -> ModelCard:
    spec = entry.spec
    return ModelCard(
        id=spec.key,
        created=created,
        owned_by=entry.plugin.distribution or entry.plugin.name,
        capability=entry.capability.value,
        embedding_dimension=spec.info.embedding_dimension,
        tiny=spec.info.tiny,
        aliases=list(spec.aliases),
    )


@_route("GET", "/v1/models", response_model=ModelList, responses=_errors(401))
async def list_models(request: Request) -> ModelList:
    """The models this server serves, in OpenAI's list shape plus limner's facts."""
    service = _service(request)
    return ModelList(data=[_card(entry, service.created) for entry in service.entries()])


@_route("GET", "/v1/models/{model:path}", response_model=ModelCard, responses=_errors(401, 404))
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """One model by key or alias."""
    service = _service(request)
    key = service.resolve(model)
    entry = next(e for e in service.entries() if e.key == key)
    return _card(entry, service.created)


# -- embeddings -------------------------------------------------------------------------------


@_route("POST", "/v1/embeddings", response_model=EmbeddingResponse, responses=_MODEL_ERRORS)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """Embed images (data URL, http(s) URL, base64) and, for CLIP-style models, texts."""
    service = _service(request)
    deadline = _deadline(service)

    async def work() -> Response:
        return await _embed(service, body)

    return await run_for_client(request.receive, work, deadline=deadline)


async def _embed(service: Service, body: EmbeddingRequest) -> Response:
    model = await service.embedder(body.model)
    indexed = isinstance(body.input, list)
    items = list(body.input) if isinstance(body.input, list) else [body.input]
    limit = service.settings.max_inputs
    if len(items) > limit:
        raise APIError(
            400,
            f"{len(items)} inputs is over this server's limit of {limit} per request",
            param="input",
            code="too_many_inputs",
        )
    dimension = model.embedding_dimension
    if body.dimensions is not None and body.dimensions != dimension:
        raise APIError(
            400,
            f"{model.key} makes {dimension}-dimensional vectors; it cannot make {body.dimensions}",
            param="dimensions",
            code="invalid_input",
        )
    assert service.client is not None and service.fetch_slots is not None
    with _input_errors(field="input", indexed=indexed):
        split = await split_inputs(
            items,
            supports_text=model.supports_text,
            model=model.key,
            limits=service.settings.image_limits,
            check_url=service.guard,
            client=service.client,
            fetch_slots=service.fetch_slots,
        )
        vectors = np.zeros((len(items), dimension), dtype=np.float32)
        if split.images:
            positions = [index for index, _ in split.images]
            vectors[positions] = await _embed_images(model, split.images)
        if split.texts:
            positions = [index for index, _ in split.texts]
            vectors[positions] = await _in_request_order(model.embed_text, split.texts)
    # Thousands of vectors take a while to render: not on the event loop.
    content = await anyio.to_thread.run_sync(
        _embeddings_body, vectors, model.key, body.encoding_format
    )
    return Response(content, media_type="application/json")


def _embeddings_body(vectors: Vector, model: str, encoding_format: str) -> bytes:
    encode = _base64_vector if encoding_format == "base64" else _float_vector
    data = [
        {"object": "embedding", "index": index, "embedding": encode(vector)}
        for index, vector in enumerate(vectors)
    ]
    usage = {"prompt_tokens": 0, "total_tokens": 0}
    body = {"object": "list", "data": data, "model": model, "usage": usage}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


async def _embed_images(model: ImageEmbedder, images: list[tuple[int, bytes]]) -> Vector:
    return await _in_request_order(model.embed_images, images)


async def _in_request_order(
    embed: Callable[[list[Any]], Awaitable[Vector]], items: list[tuple[int, Any]]
) -> Vector:
    """``embed`` the items; an input error is located at its item's index in the request."""
    try:
        return await embed([item for _, item in items])
    except InvalidInput as error:
        # The error counts within these items; the client counts within its whole input.
        local = error.index if error.index is not None else 0
        if local < len(items) and (error.index is not None or len(items) == 1):
            raise error.at_index(items[local][0]) from None
        raise


def _float_vector(vector: Vector) -> list[float]:
    values: list[float] = vector.tolist()
    return values


def _base64_vector(vector: Vector) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


# -- image generation -------------------------------------------------------------------------

_SIZE = re.compile(r"^([0-9]+)x([0-9]+)$")
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

# One server-sent event, as OpenAPI 3.2 describes an event stream's items.
_SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["progress", "completed", "done", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}

_STREAM_DOC = (
    "With `stream: true`: `text/event-stream` with one `progress` event per step "
    '(`{"step","total","elapsed"}`, plus `"preview"`, a base64 PNG, with `preview: true`), '
    "then `completed` (the JSON body below), then `done` (`[DONE]`); a failure is an `error` "
    "event in the error shape, with `status`."
)


@_route(
    "POST",
    "/v1/images/generations",
    response_model=ImageResponse,
    responses={
        200: {
            "description": "The images; or, with stream, server-sent events",
            "content": {"text/event-stream": {"itemSchema": _SSE_EVENT}},
        },
        **_MODEL_ERRORS,
    },
    description=_STREAM_DOC,
)
async def create_images(body: ImageRequest, request: Request) -> Response:
    """Generate images from a prompt; base64 PNG/JPEG/WebP inline."""
    service = _service(request)
    deadline = _deadline(service)
    if body.response_format == "url":
        raise APIError(
            400,
            "this server returns images inline only: use response_format b64_json",
            param="response_format",
            code="unsupported_response_format",
        )
    model = await service.generator(body.model)
    with _input_errors(field=None):  # the backend names the field (size, steps, ...)
        config = _config(body)
        resolved = await anyio.to_thread.run_sync(model.resolve_config, config)
    output_format = body.output_format
    if not body.stream:

        async def whole() -> GenerationResult:
            with _input_errors(field=None):
                return await model.generate(body.prompt, resolved)

        result = await run_for_client(request.receive, whole, deadline=deadline)
        return JSONResponse(await anyio.to_thread.run_sync(_image_payload, result, output_format))
    stream = model.generate_image(body.prompt, resolved)
    try:

        async def first_chunk() -> GenerationChunk:
            with _input_errors(field=None):
                return await _next(model, stream)

        first = await run_for_client(request.receive, first_chunk, deadline=deadline)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return EventStream(_events(model, first, stream, output_format), deadline=deadline)


def _config(body: ImageRequest) -> ImageGenerationConfig:
    width = height = None
    if body.size is not None and body.size != "auto":
        match = _SIZE.match(body.size)
        if match is None:
            raise InvalidInput("must look like 1024x768", field="size")
        width, height = int(match.group(1)), int(match.group(2))
    return ImageGenerationConfig(
        width=width,
        height=height,
        steps=body.steps,
        guidance=body.guidance,
        seed=body.seed,
        num_images=body.n,
        negative_prompt=body.negative_prompt,
        output_format=body.output_format,
        preview=body.preview and body.stream,  # only a stream has somewhere to send them
        loras=lora_pairs(body.loras),
    )


async def _next(
    model: ImageGenerator, stream: AsyncGenerator[GenerationChunk, None]
) -> GenerationChunk:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise ModelError(f"{model.key} ended its stream without a result") from None


async def _events(
    model: ImageGenerator,
    first: GenerationChunk,
    stream: AsyncGenerator[GenerationChunk, None],
    output_format: str,
) -> AsyncGenerator[bytes, None]:
    """The stream's chunks as events; closing this closes the generation (which stops it)."""
    try:
        chunk = first
        while True:
            if isinstance(chunk, Progress):
                progress: dict[str, Any] = {
                    "step": chunk.step,
                    "total": chunk.total,
                    "elapsed": chunk.elapsed,
                }
                if chunk.preview is not None:
                    progress["preview"] = await anyio.to_thread.run_sync(_png_b64, chunk.preview)
                yield sse_event("progress", progress)
            else:
                payload = await anyio.to_thread.run_sync(_image_payload, chunk, output_format)
                yield sse_event("completed", payload)
                yield sse_event("done", "[DONE]")
                return
            chunk = await _next(model, stream)
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()


def _image_payload(result: GenerationResult, output_format: str) -> dict[str, Any]:
    """The OpenAI images body: each image base64-encoded in ``output_format``. Blocking."""
    data = []
    for index, image in enumerate(result.images):
        buffer = io.BytesIO()
        if output_format == "jpeg" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")  # JPEG has no alpha
        if output_format == "png":  # the text chunks GenerationResult.save writes: prompt,
            # seed, model, settings travel with the file wherever it goes
            info = PngInfo()
            for key, value in result.text_metadata(index).items():
                info.add_itxt(key, value)
            image.save(buffer, format="PNG", pnginfo=info)
        else:
            image.save(buffer, format=_PIL_FORMATS[output_format])
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        data.append({"b64_json": encoded, "revised_prompt": None})
    config = result.config
    width, height = result.images[0].size if result.images else (config.width, config.height)
    return {
        "created": int(time.time()),
        "data": data,
        "seed": result.seed,
        "model": result.model,
        "size": f"{width}x{height}",
    }


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# -- LoRA adapters ----------------------------------------------------------------------------


@_route("GET", "/v1/loras", response_model=LoraList, responses=_errors(401))
async def list_loras(request: Request) -> LoraList:
    """The LoRA adapters in the server's adapter folders (`limner serve --lora-dir`): each
    one's family, the served models it fits, its rank, size and file; an adapter no served
    model can use is listed with the reason. Generations name them in `loras`."""
    return LoraList(data=lora_cards(await _service(request).loras()))


# -- operations -------------------------------------------------------------------------------


@_route("GET", "/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process serves requests."""
    return {"status": "ok"}


@_route(
    "GET",
    "/readyz",
    responses={
        503: {"model": ErrorResponse, "description": "Preloads not loaded, or runtime unavailable"}
    },
)
async def readyz(request: Request) -> dict[str, str]:
    """200 once every preloaded model is loaded; 503 before, if one failed, or while the
    runtime cannot serve (a Ray cluster's control plane is gone). Why not is told only to a
    request with the API key (or when there is none), and in the log."""
    service = _service(request)
    unavailable = service.unavailable()
    if unavailable is None and service.ready:
        return {"status": "ready"}
    if not is_authorized(request.scope):
        raise APIError(503, "not ready", type="server_error", code="not_ready")
    if unavailable is not None:
        raise APIError(
            503,
            unavailable,
            type="server_error",
            code="runtime_unavailable",
            headers={"Retry-After": "5"},
        )
    if service.preload_errors:
        failed = "; ".join(f"{key}: {error}" for key, error in service.preload_errors.items())
        raise APIError(503, f"preloading failed: {failed}", type="server_error", code="not_ready")
    raise APIError(
        503,
        f"loading {', '.join(service.preload)}",
        type="server_error",
        code="not_ready",
        headers={"Retry-After": "1"},
    )


@_route("GET", "/v1/pool", response_model=PoolResponse, responses=_errors(401))
async def pool_stats(request: Request) -> PoolResponse:
    """The pool's per-model state: workers, queue, in flight, loads, evictions, memory; the
    callers waiting, the oldest wait in seconds, swaps, and whether its turn is draining."""
    service = _service(request)
    stats = service.pool.stats() if service.pool is not None else {}
    models = [dataclasses.asdict(s) for _, s in sorted(stats.items())]
    return PoolResponse.model_validate({"ready": service.serving(), "models": models})


@_route(
    "GET",
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text: HTTP requests and latency by route, and the pool's per-model state."""
    registry = cast(Metrics, request.app.state.limner_metrics).registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
