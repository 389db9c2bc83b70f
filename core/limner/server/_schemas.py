"""Request and response bodies, in the OpenAI shapes, with limner's extras.

Requests refuse unknown fields, so a misspelt option is a 400 rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool

from limner import KeyStats
from limner.plugin import MAX_LORA_SCALE, MAX_LORAS, MIN_LORA_SCALE

__all__ = [
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ErrorDetail",
    "ErrorResponse",
    "FieldLimits",
    "GeneratedImage",
    "GenerationLimits",
    "ImageEditRequest",
    "ImageRequest",
    "ImageResponse",
    "ImageUsage",
    "LoraCard",
    "LoraChoice",
    "LoraList",
    "ModelCard",
    "ModelList",
    "PoolResponse",
    "ProgressEvent",
    "Usage",
]

_MAX_SEED = 2**63 - 1

_Item = Annotated[str, Field(min_length=1)]

# Numbers as JSON numbers only: lax parsing would take `true` for 1 and "7" for 7, and a
# request that means something else would run rather than fail. A float field still takes
# an integer (3 is 3.0).
_Int = Annotated[int, Strict()]
_Float = Annotated[float, Strict()]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1, max_length=256, description="Model key or alias.")
    input: _Item | Annotated[list[_Item], Field(min_length=1)] = Field(
        description=(
            "One item or a list. Each item is an image (a data: URL, an http(s) URL, or base64 "
            "of an image file) or, for models that embed text (CLIP), text."
        ),
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float",
        description="base64: each vector as little-endian float32 bytes, base64-encoded.",
    )
    dimensions: _Int | None = Field(
        default=None, ge=1, description="Must equal the model's dimension when given."
    )
    user: str | None = Field(default=None, max_length=256, description="Accepted and ignored.")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class LoraChoice(_Request):
    name: str = Field(
        min_length=1, max_length=100, description="An adapter's name, as GET /v1/loras lists it."
    )
    scale: _Float = Field(
        default=1.0,
        ge=MIN_LORA_SCALE,
        le=MAX_LORA_SCALE,
        allow_inf_nan=False,
        description="How strongly it applies: 1 as trained, 0 not at all.",
    )


class _ImageOptions(_Request):
    """The fields of OpenAI's image generation and edit requests, and limner's extras."""

    prompt: str = Field(min_length=1, max_length=10_000)
    model: str = Field(min_length=1, max_length=256, description="Model key or alias.")
    n: _Int = Field(default=1, ge=1, le=10, description="Number of images.")
    size: str | None = Field(
        default=None,
        pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$",
        description="WIDTHxHEIGHT in pixels; omitted or auto takes the model's default (for "
        "an edit, the image's own size, to the nearest the model takes).",
    )
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json", description="Only b64_json: this server returns images inline."
    )
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: _Int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="jpeg and webp: the encoder's quality, 0 to 100 (default: Pillow's, "
        "75 for jpeg, 80 for webp); ignored for png, which is lossless.",
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        default=None,
        description="opaque or auto: the images are opaque; transparent is a 400, since no "
        "model served here makes transparent images.",
    )
    # Strict: "no" or 0 read as a boolean would silently pick the wrong kind of answer.
    stream: StrictBool = Field(
        default=False,
        description="Server-sent events: OpenAI's partial_image and completed events, or "
        "with stream_format limner, a progress event per step.",
    )
    stream_format: Literal["openai", "limner"] = Field(
        default="openai",
        description="With stream: openai (OpenAI's image events, as its clients parse them) "
        "or limner (progress at every step, then the answer; what the playground reads).",
    )
    partial_images: _Int | None = Field(
        default=None,
        ge=0,
        le=3,
        description="With stream (openai): how many partial images to send, spread over the "
        "steps that run; each is the step's latent preview, scaled to the output size.",
    )
    preview: StrictBool = Field(
        default=False,
        description="With stream_format limner: each progress event carries a small PNG of "
        "the image so far.",
    )
    seed: _Int | None = Field(default=None, ge=0, le=_MAX_SEED)
    steps: _Int | None = Field(default=None, ge=1, le=1000)
    guidance: _Float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    negative_prompt: str | None = Field(default=None, max_length=10_000)
    # What OpenAI clients send for DALL-E and gpt-image; the model's own settings (steps,
    # guidance) decide here, so they are accepted and ignored, yet a misspelt value is a 400.
    quality: Literal["auto", "standard", "hd", "low", "medium", "high", "xhigh", "max"] | None = (
        Field(default=None, description="Accepted for OpenAI clients and ignored: use steps.")
    )
    moderation: Literal["low", "auto"] | None = Field(
        default=None, description="Accepted for OpenAI clients and ignored."
    )
    user: str | None = Field(default=None, max_length=256, description="Accepted and ignored.")
    loras: list[LoraChoice] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description="LoRA adapters to apply, each with its scale (GET /v1/loras lists them).",
    )
    safety_identifier: str | None = Field(
        default=None, max_length=256, description="Accepted and ignored."
    )


class ImageRequest(_ImageOptions):
    style: Literal["vivid", "natural"] | None = Field(
        default=None, description="Accepted for OpenAI clients and ignored."
    )


class ImageEditRequest(_ImageOptions):
    """The text fields of a ``multipart/form-data`` edit request; the files (``image`` or
    ``image[]``, ``mask``) come beside them."""

    strength: _Float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="How far from the image to go: 0 returns it, 1 keeps only its size "
        "(default: the model's).",
    )
    input_fidelity: Literal["high", "low"] | None = Field(
        default=None, description="Accepted for OpenAI clients and ignored: use strength."
    )


class GeneratedImage(BaseModel):
    b64_json: str
    revised_prompt: None = None


class ImageUsageDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class ImageUsage(BaseModel):
    """OpenAI's token counts, which limner does not keep: zeros, so that clients reading
    them work."""

    input_tokens: int = 0
    input_tokens_details: ImageUsageDetails = Field(default_factory=ImageUsageDetails)
    output_tokens: int = 0
    total_tokens: int = 0


class ImageResponse(BaseModel):
    created: int
    data: list[GeneratedImage]
    background: Literal["opaque"]
    output_format: Literal["png", "jpeg", "webp"]
    quality: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    size: str
    usage: ImageUsage
    seed: int
    model: str


class ProgressEvent(BaseModel):
    step: int
    total: int
    elapsed: float
    preview: str | None = None


class FieldLimits(BaseModel):
    """One request field: what an omitted value becomes, and what the server takes."""

    default: int | float | None = Field(description="What an omitted value becomes.")
    min: int | float | None = Field(description="Smallest value taken; null when not known.")
    max: int | float | None = Field(description="Largest value taken; null when not known.")
    multiple: int | None = Field(
        default=None, description="Values must divide by it (image sides); null for any."
    )


class GenerationLimits(BaseModel):
    """What ``POST /v1/images/generations`` takes for one model, field by field: ``width``
    and ``height`` are the sides in ``size``."""

    width: FieldLimits
    height: FieldLimits
    steps: FieldLimits
    n: FieldLimits
    guidance: FieldLimits


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    capability: Literal["image-embedding", "text-to-image"]
    embedding_dimension: int | None
    tiny: bool
    aliases: list[str]
    limits: GenerationLimits | None = Field(
        default=None,
        description="Text-to-image models: each request field's default and bounds, as this "
        "server checks them. Null for embedding models.",
    )


class LoraCard(BaseModel):
    object: Literal["lora"] = "lora"
    name: str
    family: str | None = Field(description="The family of the models it fits (FLUX.1, SD3.5).")
    models: list[str] = Field(description="The served models it fits; empty: see reason.")
    rank: int | None
    size_bytes: int = Field(description="Its tensors, as the file holds them.")
    where: str = Field(description="Its file, within its adapter folder.")
    reason: str | None = Field(description="Why no served model can use it, if none can.")


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraCard]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PoolResponse(BaseModel):
    object: Literal["pool"] = "pool"
    ready: bool
    models: list[KeyStats]  # the runtime's own snapshot type, one per model key


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
