"""The FLUX.1 keys, their defaults and limits, and config validation. No torch here.

``resolve_config`` needs no weights, so the core can validate a request (and tell the caller
which field is wrong) before any worker is started.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from limner import ImageGenerationConfig, InvalidInput
from limner.diffusion import (
    MAX_NUM_IMAGES,
    MAX_SEED,
    resolve_guidance,
    resolve_integer,
    resolve_number,
    resolve_output_format,
    resolve_preview,
    resolve_seed,
    resolve_side,
)

from ._tiny import TINY_KEY, TINY_REVISION

__all__ = ["MAX_NUM_IMAGES", "MAX_SEED", "VARIANTS", "FluxVariant", "resolve_config"]

#: Flux latents are 8x smaller than the image and packed in 2x2 patches: sides must divide 16.
SIZE_MULTIPLE = 16

# Peak GPU memory of one bf16 FluxPipeline at 1024x1024, 4 steps, no offload, as measured on
# an H100 with plain diffusers (torch.cuda.max_memory_allocated): 33.8 GiB. FLUX.1-dev has the
# same architecture and sizes plus a small guidance embedder, so the same figure is used.
_FLUX_PEAK_MB = 33.8 * 1024
# Of that, the bf16 weights are 31.4 GiB (transformer 11.9B, T5-XXL encoder 4.76B, CLIP-L
# 0.12B, VAE 0.08B parameters at 2 bytes); the rest is one generation's working memory, which
# a second concurrent generation on the same weights adds again.
_FLUX_WORKING_MB = _FLUX_PEAK_MB - 16.86e9 * 2 / 2**20


@dataclass(frozen=True, kw_only=True)
class FluxVariant:
    """One FLUX.1 checkpoint's facts and the request limits limner enforces for it."""

    key: str
    aliases: tuple[str, ...] = ()
    source_repo: str
    revision: str | None = None
    license: str
    description: str
    memory_mb: float
    #: Activations of one generation at the default size in bf16, on top of the weights.
    working_mb: float
    tiny: bool = False
    default_size: int = 1024
    min_size: int = 256
    max_size: int = 2048
    default_steps: int
    max_steps: int = 100
    default_guidance: float
    #: schnell was distilled without guidance: it has no guidance input at all.
    guidance_distilled_away: bool
    max_guidance: float = 20.0
    default_max_sequence_length: int
    max_max_sequence_length: int


VARIANTS: tuple[FluxVariant, ...] = (
    FluxVariant(
        key="black-forest-labs/FLUX.1-schnell",
        aliases=("flux-schnell",),
        source_repo="black-forest-labs/FLUX.1-schnell",
        license="apache-2.0",
        description="FLUX.1 [schnell]: 12B rectified-flow transformer, 1-4 steps, no guidance",
        memory_mb=_FLUX_PEAK_MB,
        working_mb=_FLUX_WORKING_MB,
        default_steps=4,
        default_guidance=0.0,
        guidance_distilled_away=True,
        # schnell was trained with 256 T5 tokens; longer prompts are cut off by the pipeline.
        default_max_sequence_length=256,
        max_max_sequence_length=256,
    ),
    FluxVariant(
        key="black-forest-labs/FLUX.1-dev",
        aliases=("flux-dev",),
        source_repo="black-forest-labs/FLUX.1-dev",
        license="flux-1-dev-non-commercial-license",
        description=(
            "FLUX.1 [dev]: 12B guidance-distilled transformer, ~28 steps; gated repo, "
            "non-commercial licence"
        ),
        memory_mb=_FLUX_PEAK_MB,
        working_mb=_FLUX_WORKING_MB,
        default_steps=28,
        default_guidance=3.5,
        guidance_distilled_away=False,
        default_max_sequence_length=512,
        max_max_sequence_length=512,
    ),
    FluxVariant(
        key=TINY_KEY,
        source_repo=TINY_KEY,
        revision=TINY_REVISION,
        license="apache-2.0",
        description="TINY random-weight FLUX for tests and offline demos; its images are noise",
        memory_mb=64.0,
        working_mb=16.0,
        tiny=True,
        default_size=64,
        min_size=16,
        max_size=512,
        default_steps=4,
        default_guidance=0.0,
        guidance_distilled_away=True,
        default_max_sequence_length=32,
        max_max_sequence_length=256,
    ),
)


def resolve_config(variant: FluxVariant, config: ImageGenerationConfig) -> ImageGenerationConfig:
    """``config`` with the variant's defaults filled in and every field checked; a seed is
    drawn when none was given. Raises ``InvalidInput`` naming the first bad field."""
    if not isinstance(config, ImageGenerationConfig):
        raise InvalidInput(
            f"expected an ImageGenerationConfig, got {type(config).__name__}", field="config"
        )
    width = _size(variant, "width", config.width)
    height = _size(variant, "height", config.height)
    steps = resolve_integer("steps", config.steps, variant.default_steps, 1, variant.max_steps)
    guidance = _guidance(variant, config.guidance)
    num_images = resolve_integer("num_images", config.num_images, 1, 1, MAX_NUM_IMAGES)
    seed = resolve_seed(config.seed)
    if config.negative_prompt is not None and not isinstance(config.negative_prompt, str):
        raise InvalidInput("must be a string or None", field="negative_prompt")
    if config.negative_prompt:
        raise InvalidInput(
            f"{variant.key} does not take a negative prompt: FLUX.1 is guidance-distilled and "
            "runs without classifier-free guidance; describe what you want in the prompt",
            field="negative_prompt",
        )
    max_sequence_length = resolve_integer(
        "max_sequence_length",
        config.max_sequence_length,
        variant.default_max_sequence_length,
        1,
        variant.max_max_sequence_length,
    )
    output_format = resolve_output_format(config.output_format)
    resolve_preview(config.preview)
    return dataclasses.replace(
        config,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seed=seed,
        num_images=num_images,
        negative_prompt=None,
        max_sequence_length=max_sequence_length,
        output_format=output_format,  # type: ignore[arg-type]
    )


def _size(variant: FluxVariant, name: str, value: object) -> int:
    return resolve_side(
        name,
        value,
        default=variant.default_size,
        low=variant.min_size,
        high=variant.max_size,
        multiple=SIZE_MULTIPLE,
        key=variant.key,
    )


def _guidance(variant: FluxVariant, value: object) -> float:
    distilled_away = variant.guidance_distilled_away and value is not None
    if distilled_away and resolve_number("guidance", value) != 0:
        raise InvalidInput(
            f"{variant.key} has no guidance input (it was distilled to run without); "
            f"leave guidance unset or 0, got {value}",
            field="guidance",
        )
    return resolve_guidance(value, default=variant.default_guidance, high=variant.max_guidance)
