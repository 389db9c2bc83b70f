"""Request validation for diffusion families: ``resolve_config`` and its checks. No torch.

:func:`resolve_config` fills a :class:`Checkpoint`'s defaults into an
``ImageGenerationConfig`` and checks every field against its limits. The checks it is made
of are public too, for a family with rules of its own: each checks one field and returns its
resolved value, or raises ``InvalidInput`` naming the field. Which names are public is said
once, by ``limner.diffusion``'s ``__all__``.
"""

from __future__ import annotations

import dataclasses
import math
import secrets

from limner.errors import InvalidInput
from limner.plugin import ImageGenerationConfig

from ._checkpoint import Checkpoint

#: Images per request: one pipeline call, batched inside it.
MAX_NUM_IMAGES = 4
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts
_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}


def resolve_config(checkpoint: Checkpoint, config: ImageGenerationConfig) -> ImageGenerationConfig:
    """``config`` with the checkpoint's defaults filled in and every field checked; a seed is
    drawn when none was given. Raises ``InvalidInput`` naming the first bad field.

    Idempotent: a resolved config resolves to itself, so ``generate`` can resolve again.
    """
    if not isinstance(config, ImageGenerationConfig):
        raise InvalidInput(
            f"expected an ImageGenerationConfig, got {type(config).__name__}", field="config"
        )
    width = _side(checkpoint, "width", config.width)
    height = _side(checkpoint, "height", config.height)
    steps = resolve_integer(
        "steps", config.steps, checkpoint.default_steps, 1, checkpoint.max_steps
    )
    guidance = _guidance(checkpoint, config.guidance)
    num_images = resolve_integer("num_images", config.num_images, 1, 1, MAX_NUM_IMAGES)
    seed = resolve_seed(config.seed)
    negative_prompt = _negative_prompt(checkpoint, config, guidance)
    max_sequence_length = resolve_integer(
        "max_sequence_length",
        config.max_sequence_length,
        checkpoint.default_prompt_tokens,
        1,
        checkpoint.max_prompt_tokens,
    )
    output_format = resolve_output_format(config.output_format)
    resolve_preview(config.preview)
    strength = resolve_strength(config.strength)
    return dataclasses.replace(
        config,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seed=seed,
        num_images=num_images,
        negative_prompt=negative_prompt,
        max_sequence_length=max_sequence_length,
        output_format=output_format,  # type: ignore[arg-type]
        strength=strength,
    )


def _side(checkpoint: Checkpoint, name: str, value: object) -> int:
    return resolve_side(
        name,
        value,
        default=checkpoint.default_size,
        low=checkpoint.min_size,
        high=checkpoint.max_size,
        multiple=checkpoint.size_multiple,
        key=checkpoint.key,
    )


def _guidance(checkpoint: Checkpoint, value: object) -> float:
    distilled_away = checkpoint.guidance_distilled_away and value is not None
    if distilled_away and resolve_number("guidance", value) != 0:
        raise InvalidInput(
            f"{checkpoint.key} has no guidance input (it was distilled to run without); "
            f"leave guidance unset or 0, got {value}",
            field="guidance",
        )
    return resolve_guidance(
        value, default=checkpoint.default_guidance, high=checkpoint.max_guidance
    )


def _negative_prompt(
    checkpoint: Checkpoint, config: ImageGenerationConfig, guidance: float
) -> str | None:
    """The negative prompt, ``None`` for an empty one; refused where it would do nothing."""
    negative_prompt = config.negative_prompt
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise InvalidInput("must be a string or None", field="negative_prompt")
    if not negative_prompt:
        return None
    if checkpoint.negative_prompt_refusal is not None:
        raise InvalidInput(
            f"{checkpoint.key} does not take a negative prompt: "
            + checkpoint.negative_prompt_refusal,
            field="negative_prompt",
        )
    if guidance <= 1:
        raise InvalidInput(
            "a negative prompt takes effect only with classifier-free guidance, which needs "
            f"guidance above 1 (it is {guidance:g}"
            + (f", the default of {checkpoint.key}" if config.guidance is None else "")
            + "); raise guidance or drop the negative prompt",
            field="negative_prompt",
        )
    return negative_prompt


def resolve_integer(name: str, value: object, default: int, low: int, high: int) -> int:
    """``default`` for ``None``, else an integer (not a bool) in ``[low, high]``."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"must be an integer, got {value!r}", field=name)
    if not low <= value <= high:
        raise InvalidInput(f"must be between {low} and {high}, got {value}", field=name)
    return value


def resolve_side(
    name: str, value: object, *, default: int, low: int, high: int, multiple: int, key: str
) -> int:
    """An image side: an integer in ``[low, high]`` that divides by ``multiple`` (the VAE's
    downsampling times the transformer's patch size), suggesting the nearest valid sides."""
    side = resolve_integer(name, value, default, low, high)
    if side % multiple:
        below = max(low, side - side % multiple)
        raise InvalidInput(
            f"must be a multiple of {multiple} for {key}, got {side} "
            f"(try {below} or {below + multiple})",
            field=name,
        )
    return side


def resolve_number(name: str, value: object) -> float:
    """A finite real number (not a bool)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidInput(f"must be a finite number, got {value!r}", field=name)
    return float(value)


def resolve_guidance(value: object, *, default: float, high: float) -> float:
    """``default`` for ``None``, else a finite guidance scale in ``[0, high]``."""
    if value is None:
        return default
    guidance = resolve_number("guidance", value)
    if not 0 <= guidance <= high:
        raise InvalidInput(f"must be between 0 and {high:g}, got {value}", field="guidance")
    return guidance


def resolve_seed(value: object) -> int:
    """The given seed, checked, or a fresh random one for ``None``."""
    if value is None:
        return secrets.randbelow(2**32)  # short enough to read out and type back in
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"must be an integer, got {value!r}", field="seed")
    if not 0 <= value <= MAX_SEED:
        raise InvalidInput(f"must be between 0 and 2**64 - 1, got {value}", field="seed")
    return value


def resolve_output_format(value: object) -> str:
    """``"png"``, ``"jpeg"`` or ``"webp"``, from any case and from ``"jpg"``."""
    if not isinstance(value, str) or value.lower() not in _FORMATS:
        raise InvalidInput(
            f"must be one of 'png', 'jpeg', 'webp', got {value!r}", field="output_format"
        )
    return _FORMATS[value.lower()]


def resolve_strength(value: object) -> float | None:
    """An edit's strength: ``None`` (the model's default, decided when it edits) or a finite
    number from 0 (the source as it is) to 1 (the prompt alone)."""
    if value is None:
        return None
    strength = resolve_number("strength", value)
    if not 0 <= strength <= 1:
        raise InvalidInput(f"must be from 0 to 1, got {value}", field="strength")
    return strength


def fit_edit_size(checkpoint: Checkpoint, width: int, height: int) -> tuple[int, int]:
    """The size an edit of a ``width`` x ``height`` source comes out at when the request
    gives none: the source's, scaled down to fit ``max_size`` (its shape kept), each side
    rounded to the nearest multiple of ``size_multiple`` within the checkpoint's limits."""
    multiple = checkpoint.size_multiple
    low = -(-checkpoint.min_size // multiple) * multiple
    high = checkpoint.max_size // multiple * multiple
    scale = min(1.0, checkpoint.max_size / max(width, height, 1))

    def side(value: int) -> int:
        return min(high, max(low, round(value * scale / multiple) * multiple))

    return side(width), side(height)


def resolve_preview(value: object) -> bool:
    """The ``preview`` flag, which must be a real bool."""
    if not isinstance(value, bool):
        raise InvalidInput(f"must be true or false, got {value!r}", field="preview")
    return value
