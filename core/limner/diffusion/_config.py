"""Checks shared by the diffusion plugins' ``resolve_config``. No torch here.

Each checks one field of an ``ImageGenerationConfig`` and returns its resolved value, or
raises ``InvalidInput`` naming the field; the plugin decides the limits and the order.
"""

from __future__ import annotations

import math
import secrets

from limner.errors import InvalidInput

__all__ = [
    "MAX_NUM_IMAGES",
    "MAX_SEED",
    "resolve_guidance",
    "resolve_integer",
    "resolve_number",
    "resolve_output_format",
    "resolve_preview",
    "resolve_seed",
    "resolve_side",
]

#: Images per request: one pipeline call, batched inside it.
MAX_NUM_IMAGES = 4
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts
_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}


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


def resolve_preview(value: object) -> bool:
    """The ``preview`` flag, which must be a real bool."""
    if not isinstance(value, bool):
        raise InvalidInput(f"must be true or false, got {value!r}", field="preview")
    return value
