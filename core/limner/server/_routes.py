"""The endpoints: models, embeddings, image generation and editing, probes, pool stats,
metrics."""

from __future__ import annotations

import base64
import dataclasses
import functools
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from limner import (
    Capability,
    GenerationChunk,
    GenerationResult,
    ImageEmbedder,
    ImageGenerationConfig,
    ImageGenerator,
    ModelEntry,
)
from limner.errors import InvalidInput
from limner.inputs import ImageLimits, InputKind, decode_image, decode_mask

from ._errors import APIError, input_param, to_api_error
from ._forms import MAX_SOURCES, EditForm, read_edit_form
from ._images import (
    ImageAnswer,
    Job,
    Kind,
    limner_events,
    next_chunk,
    openai_events,
    whole_answer,
)
from ._inputs import split_inputs
from ._loras import lora_cards, lora_pairs
from ._metrics import Metrics
from ._middleware import is_authorized
from ._schemas import (
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ImageEditRequest,
    ImageRequest,
    ImageResponse,
    LoraList,
    ModelCard,
    ModelList,
    PoolResponse,
)
from ._service import Service
from ._streaming import EventStream, run_for_client

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


async def _card(service: Service, entry: ModelEntry) -> ModelCard:
    spec = entry.spec
    return ModelCard(
        id=spec.key,
        created=service.created,
        owned_by=entry.plugin.distribution or entry.plugin.name,
        capability=entry.capability.value,
        embedding_dimension=spec.info.embedding_dimension,
        tiny=spec.info.tiny,
        aliases=list(spec.aliases),
        limits=await service.limits(entry.key)
        if entry.capability is Capability.TEXT_TO_IMAGE
        else None,
    )


@_route("GET", "/v1/models", response_model=ModelList, responses=_errors(401))
async def list_models(request: Request) -> ModelList:
    """The models this server serves, in OpenAI's list shape plus limner's facts: for a
    text-to-image model, each request field's default and bounds (``limits``)."""
    service = _service(request)
    return ModelList(data=[await _card(service, entry) for entry in service.entries()])


@_route("GET", "/v1/models/{model:path}", response_model=ModelCard, responses=_errors(401, 404))
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """One model by key or alias."""
    service = _service(request)
    key = service.resolve(model)
    entry = next(e for e in service.entries() if e.key == key)
    return await _card(service, entry)


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
    if len(vectors) <= _INLINE_VECTORS:
        content = _embeddings_body(vectors, model.key, body.encoding_format)
    else:  # thousands of vectors take a while to render: not on the event loop
        content = await anyio.to_thread.run_sync(
            _embeddings_body, vectors, model.key, body.encoding_format
        )
    return Response(content, media_type="application/json")


# Rendered on the event loop up to this many vectors (about 15 us each with orjson): less
# than the hop to a worker thread and back costs.
_INLINE_VECTORS = 16


def _embeddings_body(vectors: Vector, model: str, encoding_format: str) -> bytes:
    """The OpenAI embeddings body. orjson writes float32 rows as they are, each number the
    shortest text that reads back as the same float32 (json.dumps of ``tolist()`` took 20x
    as long, and wrote float64's longer digits); the pool's vectors are finite."""
    encode = _base64_vector if encoding_format == "base64" else _float_vector
    data = [
        {"object": "embedding", "index": index, "embedding": encode(vector)}
        for index, vector in enumerate(vectors)
    ]
    usage = {"prompt_tokens": 0, "total_tokens": 0}
    body = {"object": "list", "data": data, "model": model, "usage": usage}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


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


def _float_vector(vector: Vector) -> Vector:
    """The row itself, C-contiguous float32, as orjson serialises numpy arrays."""
    return np.ascontiguousarray(vector, dtype=np.float32)


def _base64_vector(vector: Vector) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


# -- image generation and editing ---------------------------------------------------------

_SIZE = re.compile(r"^([0-9]+)x([0-9]+)$")

# One server-sent event, as OpenAPI 3.2 describes an event stream's items.
_SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {
            "type": "string",
            "enum": [
                "image_generation.partial_image",
                "image_generation.completed",
                "image_edit.partial_image",
                "image_edit.completed",
                "progress",
                "completed",
                "done",
                "error",
            ],
        },
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}

_STREAM_DOC = (
    "With `stream: true`: `text/event-stream` of OpenAI's image events, as the `openai` "
    "package parses them: `partial_images` (0 to 3) `{kind}.partial_image` events (`b64_json` "
    "of the step's latent preview scaled to the output size, `background`, `created_at`, "
    "`output_format`, `partial_image_index`, `quality`, `size`, `type`), then one "
    "`{kind}.completed` event per image (the same fields less the index, plus `usage`). With "
    '`stream_format: "limner"`: one `progress` event per step (`{{"step","total","elapsed"}}`, '
    'plus `"preview"`, a base64 PNG, with `preview: true`), then `completed` (the JSON body '
    "below), then `done` (`[DONE]`). A failure is an `error` event in the error shape, with "
    "`status`."
)


def _image_route(path: str, kind: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    return _route(
        "POST",
        path,
        response_model=ImageResponse,
        responses={
            200: {
                "description": "The images; or, with stream, server-sent events",
                "content": {"text/event-stream": {"itemSchema": _SSE_EVENT}},
            },
            **_MODEL_ERRORS,
        },
        description=_STREAM_DOC.format(kind=kind),
        **options,
    )


@_image_route("/v1/images/generations", "image_generation")
async def create_images(body: ImageRequest, request: Request) -> Response:
    """Generate images from a prompt; base64 PNG/JPEG/WebP inline."""
    service = _service(request)
    deadline = _deadline(service)
    _check_image_options(body)
    model = await service.generator(body.model)
    _check_background(body, model)
    with _input_errors(field=None):  # the backend names the field (size, steps, ...)
        config = _config(body)
        resolved = await anyio.to_thread.run_sync(model.resolve_config, config)
    answer = _answer(body, "image_generation")
    return await _images(request, model, [Job(body.prompt, resolved)], body, answer, deadline)


# The form's fields as the JSON body's schema gives them; what they refer to (LoraChoice) is
# in the document's components, where the generations' body puts it.
_EDIT_FIELDS = {
    name: value
    for name, value in ImageEditRequest.model_json_schema(
        ref_template="#/components/schemas/{model}"
    ).items()
    if name != "$defs"
}

_EDIT_FORM = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                **_EDIT_FIELDS,
                "title": "ImageEditForm",
                "properties": {
                    "image": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "The image to edit; one part per image (`image[]` "
                        "also), each edited on its own, at most 16.",
                    },
                    "mask": {
                        "type": "string",
                        "format": "binary",
                        "description": "A PNG the image's size whose fully transparent "
                        "pixels mark the area to edit; applies to the first image.",
                    },
                    **_EDIT_FIELDS["properties"],
                },
                "required": ["image", "prompt", "model"],
            }
        }
    },
}


@_image_route("/v1/images/edits", "image_edit", openapi_extra={"requestBody": _EDIT_FORM})
async def create_image_edits(request: Request) -> Response:
    """Edit images after a prompt (image-to-image, or inpainting inside a mask), as OpenAI's
    `images.edit` sends it: `multipart/form-data` with the image files, an optional `mask`,
    and the generation fields, plus limner's `strength`, `seed`, `steps`."""
    service = _service(request)
    deadline = _deadline(service)
    limits = service.settings.image_limits
    form = await read_edit_form(request, limits=limits)
    body = form.body
    _check_image_options(body)
    if len(form.sources) > MAX_SOURCES:
        raise APIError(
            400,
            f"{len(form.sources)} images is over the limit of {MAX_SOURCES} per edit",
            param="image",
            code="invalid_request",
        )
    model = await service.generator(body.model)
    _check_background(body, model)
    if not model.supports_editing:
        raise APIError(
            400,
            f"model {model.key} cannot edit images; it generates from a prompt alone "
            "(POST /v1/images/generations)",
            param="model",
            code="unsupported_model",
        )
    config = dataclasses.replace(_config(body), strength=body.strength)
    jobs = await _edit_jobs(model, body.prompt, config, form, limits)
    answer = _answer(body, "image_edit")
    return await _images(request, model, jobs, body, answer, deadline)


# Not an operation of this API, so not in its schema: a clear answer for OpenAI's clients.
@_route("POST", "/v1/images/variations", include_in_schema=False)
async def create_image_variations(request: Request) -> Response:
    """Not served: vary an image with `POST /v1/images/edits`, a prompt and a `strength`."""
    raise APIError(
        400,
        "image variations are not served here: the diffusion models vary an image after a "
        "prompt, so use POST /v1/images/edits with the image, a prompt and a strength "
        "(0.6 by default)",
        code="unsupported_endpoint",
    )


def _check_image_options(body: ImageRequest | ImageEditRequest) -> None:
    """What a request asks that no model here does, or that contradicts itself: a 400."""
    if body.response_format == "url":
        raise APIError(
            400,
            "this server returns images inline only: use response_format b64_json",
            param="response_format",
            code="unsupported_response_format",
        )
    openai_stream = body.stream and body.stream_format == "openai"
    if openai_stream and body.preview:
        raise APIError(
            400,
            'preview applies to stream_format "limner" (a preview at every step); '
            "OpenAI's stream sends partial_images instead",
            param="preview",
            code="invalid_request",
        )
    if body.stream and not openai_stream and body.partial_images:
        raise APIError(
            400,
            'partial_images applies to OpenAI\'s stream (stream_format "openai"); '
            'stream_format "limner" sends a preview at every step with preview: true',
            param="partial_images",
            code="invalid_request",
        )


def _check_background(body: ImageRequest | ImageEditRequest, model: ImageGenerator) -> None:
    if body.background == "transparent":
        raise APIError(
            400,
            f"{model.key} cannot make transparent images: its images are opaque; use "
            "background opaque or auto",
            param="background",
            code="unsupported_value",
        )


def _config(body: ImageRequest | ImageEditRequest) -> ImageGenerationConfig:
    width = height = None
    if body.size is not None and body.size != "auto":
        match = _SIZE.match(body.size)
        if match is None:
            raise InvalidInput("must look like 1024x768", field="size")
        width, height = int(match.group(1)), int(match.group(2))
    # Previews cost a small matrix product a step: only a stream that sends them asks.
    preview = body.preview if body.stream_format == "limner" else bool(body.partial_images)
    return ImageGenerationConfig(
        width=width,
        height=height,
        steps=body.steps,
        guidance=body.guidance,
        seed=body.seed,
        num_images=body.n,
        negative_prompt=body.negative_prompt,
        output_format=body.output_format,
        preview=body.stream and preview,  # only a stream has somewhere to send them
        loras=lora_pairs(body.loras),
    )


def _answer(body: ImageRequest | ImageEditRequest, kind: Kind) -> ImageAnswer:
    return ImageAnswer(
        kind=kind,
        output_format=body.output_format,
        compression=body.output_compression,
        background=body.background or "auto",
        quality=body.quality,
    )


async def _edit_jobs(
    model: ImageGenerator,
    prompt: str,
    config: ImageGenerationConfig,
    form: EditForm,
    limits: ImageLimits,
) -> list[Job]:
    """One job per source image, each decoded and its config resolved now, before any
    load: the mask (OpenAI's: transparent pixels) applies to the first, whose size it must
    have; every source after the first takes the first's seed."""
    several = len(form.sources) > 1
    sources = []
    for index, data in enumerate(form.sources):
        param = f"image[{index}]" if several else "image"
        with _input_errors(field=param):
            sources.append(
                await anyio.to_thread.run_sync(
                    functools.partial(decode_image, data, kind=InputKind.BYTES, limits=limits)
                )
            )
    mask = None
    if form.mask is not None:
        with _input_errors(field="mask"):
            mask = await anyio.to_thread.run_sync(
                functools.partial(
                    decode_mask, form.mask, kind=InputKind.BYTES, limits=limits, convention="alpha"
                )
            )
        if mask.size != sources[0].size:
            raise APIError(
                400,
                f"the mask is {mask.width}x{mask.height} and the image {sources[0].width}x"
                f"{sources[0].height}; they must be the same size",
                param="mask",
                code="invalid_input",
            )
    jobs: list[Job] = []
    for index, source in enumerate(sources):
        if jobs:
            config = dataclasses.replace(config, seed=jobs[0].config.seed)
        with _input_errors(field=None):
            resolved = model.resolve_config(config, source_size=source.size)
        jobs.append(Job(prompt, resolved, source, mask if index == 0 else None))
    return jobs


async def _images(
    request: Request,
    model: ImageGenerator,
    jobs: list[Job],
    body: ImageRequest | ImageEditRequest,
    answer: ImageAnswer,
    deadline: float,
) -> Response:
    """The jobs' images as one answer, or as a stream of events."""
    if not body.stream:

        async def whole() -> list[GenerationResult]:
            with _input_errors(field=None):
                return [
                    await model.generate(job.prompt, job.config, image=job.image, mask=job.mask)
                    for job in jobs
                ]

        results = await run_for_client(request.receive, whole, deadline=deadline)
        return JSONResponse(await anyio.to_thread.run_sync(whole_answer, results, answer))
    stream = jobs[0].chunks(model)
    try:

        async def first_chunk() -> GenerationChunk:
            with _input_errors(field=None):
                return await next_chunk(model, stream)

        first = await run_for_client(request.receive, first_chunk, deadline=deadline)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    if body.stream_format == "limner":
        events = limner_events(model, jobs, (stream, first), answer)
    else:
        events = openai_events(model, jobs, (stream, first), answer, body.partial_images or 0)
    return EventStream(events, deadline=deadline)


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
