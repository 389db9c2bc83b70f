"""The Stable Diffusion 3.5 keys, their defaults and limits, and config validation. No torch.

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
    resolve_output_format,
    resolve_preview,
    resolve_seed,
    resolve_side,
)

from ._tiny import TINY_KEY, TINY_REVISION

__all__ = ["MAX_NUM_IMAGES", "MAX_SEED", "VARIANTS", "SD35Variant", "resolve_config"]

#: SD3 latents are 8x smaller than the image and cut into 2x2 patches: sides must divide 16.
SIZE_MULTIPLE = 16
#: The pipeline refuses longer T5 sequences.
MAX_SEQUENCE_LENGTH = 512

# Peak GPU memory of one bf16 StableDiffusion3Pipeline (SD3.5 Large) at 1024x1024, no
# offload, as measured on an H100 with plain diffusers (torch.cuda.max_memory_allocated):
# 28.5 GiB. Large Turbo is the same architecture and sizes, distilled.
_LARGE_PEAK_MB = 28.5 * 1024
# Of that, the bf16 weights are 25.6 GiB (transformer 8.1B, T5-XXL encoder 4.76B, CLIP-G
# 0.69B, CLIP-L 0.12B, VAE 0.08B parameters at 2 bytes); the rest is one generation's working
# memory, which a second concurrent generation on the same weights adds again.
_WORKING_MB = _LARGE_PEAK_MB - 13.76e9 * 2 / 2**20
# SD3.5 Medium, estimated rather than measured: its weights from parameter counts (MMDiT-X
# 2.5B, T5-XXL encoder 4.8B, CLIP-G 0.7B, CLIP-L 0.1B, VAE 0.1B: about 15 GiB in bf16) plus the
# 2.9 GiB of working memory measured for Large above its own weights.
_MEDIUM_PEAK_MB = 8.16e9 * 2 / 2**20 + _WORKING_MB
_LICENSE = "stabilityai-ai-community"


@dataclass(frozen=True, kw_only=True)
class SD35Variant:
    """One SD3.5 checkpoint's facts and the request limits limner enforces for it."""

    key: str
    aliases: tuple[str, ...] = ()
    source_repo: str
    revision: str | None = None
    license: str
    description: str
    memory_mb: float
    #: Activations of one generation at the default size in bf16, on top of the weights.
    working_mb: float = _WORKING_MB
    tiny: bool = False
    gated: bool = True
    default_size: int = 1024
    min_size: int = 256
    max_size: int = 2048
    default_steps: int
    max_steps: int = 100
    default_guidance: float
    max_guidance: float = 20.0
    default_max_sequence_length: int = 256


VARIANTS: tuple[SD35Variant, ...] = (
    SD35Variant(
        key="stabilityai/stable-diffusion-3.5-large-turbo",
        aliases=("sd3.5-large-turbo",),
        source_repo="stabilityai/stable-diffusion-3.5-large-turbo",
        license=_LICENSE,
        description=(
            "Stable Diffusion 3.5 Large Turbo: 8B MMDiT distilled to 4 steps without guidance"
        ),
        memory_mb=_LARGE_PEAK_MB,
        default_steps=4,
        default_guidance=0.0,
    ),
    SD35Variant(
        key="stabilityai/stable-diffusion-3.5-large",
        aliases=("sd3.5-large",),
        source_repo="stabilityai/stable-diffusion-3.5-large",
        license=_LICENSE,
        description="Stable Diffusion 3.5 Large: 8B MMDiT, ~28 steps with guidance 3.5",
        memory_mb=_LARGE_PEAK_MB,
        default_steps=28,
        default_guidance=3.5,
    ),
    SD35Variant(
        key="stabilityai/stable-diffusion-3.5-medium",
        aliases=("sd3.5-medium",),
        source_repo="stabilityai/stable-diffusion-3.5-medium",
        license=_LICENSE,
        description="Stable Diffusion 3.5 Medium: 2.5B MMDiT-X, ~40 steps with guidance 4.5",
        memory_mb=_MEDIUM_PEAK_MB,
        default_steps=40,
        default_guidance=4.5,
    ),
    SD35Variant(
        key=TINY_KEY,
        source_repo=TINY_KEY,
        revision=TINY_REVISION,
        license="apache-2.0",
        description="TINY random-weight SD3.5 for tests and offline demos; its images are noise",
        memory_mb=64.0,
        working_mb=16.0,
        tiny=True,
        gated=False,
        default_size=64,
        min_size=16,
        max_size=1024,
        default_steps=4,
        default_guidance=0.0,
        default_max_sequence_length=32,
    ),
)


def resolve_config(variant: SD35Variant, config: ImageGenerationConfig) -> ImageGenerationConfig:
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
    negative_prompt = config.negative_prompt
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise InvalidInput("must be a string or None", field="negative_prompt")
    if negative_prompt and guidance <= 1:
        raise InvalidInput(
            "a negative prompt takes effect only with classifier-free guidance, which needs "
            f"guidance above 1 (it is {guidance:g}"
            + (f", the default of {variant.key}" if config.guidance is None else "")
            + "); raise guidance or drop the negative prompt",
            field="negative_prompt",
        )
    max_sequence_length = resolve_integer(
        "max_sequence_length",
        config.max_sequence_length,
        variant.default_max_sequence_length,
        1,
        MAX_SEQUENCE_LENGTH,
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
        negative_prompt=negative_prompt or None,
        max_sequence_length=max_sequence_length,
        output_format=output_format,  # type: ignore[arg-type]
    )


def _size(variant: SD35Variant, name: str, value: object) -> int:
    return resolve_side(
        name,
        value,
        default=variant.default_size,
        low=variant.min_size,
        high=variant.max_size,
        multiple=SIZE_MULTIPLE,
        key=variant.key,
    )


def _guidance(variant: SD35Variant, value: object) -> float:
    return resolve_guidance(value, default=variant.default_guidance, high=variant.max_guidance)
