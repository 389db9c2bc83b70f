"""What a text-to-image model takes, field by field: the limits ``/v1/models`` tells clients
(the playground's form reads them), so that a form never offers what the server refuses.

Defaults are the model's own: its ``resolve_config`` of an empty request (no weights needed).
Bounds are the narrower of the request schema's and, for a model built on
``limner.diffusion``, its :class:`~limner.diffusion.Checkpoint`'s, which are exactly what its
``resolve_config`` enforces. Another plugin's ``resolve_config`` is code, not data: for its
models the bounds of steps and n are found by asking it (a binary search from the default
out to the schema's bounds, a few dozen calls of a pure function), and the sides' are left
null, as a multiple cannot be found that way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from annotated_types import Ge, Le

from limner import ImageGenerationConfig, ImageGenerator
from limner.diffusion import MAX_NUM_IMAGES, Checkpoint, DiffusersBackend
from limner.errors import InvalidInput

from ._schemas import FieldLimits, GenerationLimits, ImageRequest

__all__ = ["generation_limits"]

Number = int | float
_EMPTY = ImageGenerationConfig(seed=0)  # a seed given: none is drawn


def generation_limits(model: ImageGenerator) -> GenerationLimits:
    """``model``'s limits for ``POST /v1/images/generations``. Blocking: it may run plugin
    code (``resolve_config``)."""
    defaults = model.resolve_config(_EMPTY)
    checkpoint = _checkpoint(model)
    steps_low, steps_high = _schema_bounds("steps")
    n_low, n_high = _schema_bounds("n")
    guidance_low, guidance_high = _schema_bounds("guidance")
    if checkpoint is None:
        return GenerationLimits(
            width=FieldLimits(default=defaults.width, min=None, max=None),
            height=FieldLimits(default=defaults.height, min=None, max=None),
            steps=_asked(model, "steps", defaults.steps, steps_low, steps_high),
            n=_asked(model, "num_images", defaults.num_images, n_low, n_high),
            guidance=FieldLimits(default=defaults.guidance, min=guidance_low, max=guidance_high),
        )
    # A checkpoint distilled without guidance takes only 0 (see resolve_config).
    guidance_max = 0 if checkpoint.guidance_distilled_away else checkpoint.max_guidance
    return GenerationLimits(
        width=_side(checkpoint, defaults.width),
        height=_side(checkpoint, defaults.height),
        steps=FieldLimits(
            default=defaults.steps, min=steps_low, max=_lower(steps_high, checkpoint.max_steps)
        ),
        n=FieldLimits(default=defaults.num_images, min=n_low, max=_lower(n_high, MAX_NUM_IMAGES)),
        guidance=FieldLimits(
            default=defaults.guidance, min=guidance_low, max=_lower(guidance_high, guidance_max)
        ),
    )


def _checkpoint(model: ImageGenerator) -> Checkpoint | None:
    backend = model.backend
    if isinstance(backend, DiffusersBackend) and isinstance(backend.variant, Checkpoint):
        return backend.variant
    return None


def _side(checkpoint: Checkpoint, default: int | None) -> FieldLimits:
    return FieldLimits(
        default=default,
        min=checkpoint.min_size,
        max=checkpoint.max_size,
        multiple=checkpoint.size_multiple,
    )


def _asked(
    model: ImageGenerator, name: str, default: int | None, low: Number | None, high: Number | None
) -> FieldLimits:
    """An integer field's bounds within ``[low, high]``, as ``model.resolve_config`` answers:
    the values it takes are taken to be one interval around its default."""
    if default is None or low is None or high is None or not low <= default <= high:
        return FieldLimits(default=default, min=low, max=high)

    def takes(value: int) -> bool:
        change: dict[str, Any] = {name: value}
        try:
            model.resolve_config(dataclasses.replace(_EMPTY, **change))
        except InvalidInput:
            return False
        return True

    return FieldLimits(
        default=default,
        min=_last_taken(takes, default, math.ceil(low)),
        max=_last_taken(takes, default, math.floor(high)),
    )


def _last_taken(takes: Callable[[int], bool], start: int, end: int) -> int:
    """The value farthest from ``start`` (which ``takes``) towards ``end`` that ``takes``,
    all between taken too."""
    if takes(end):
        return end
    near, far = start, end  # near is taken, far is not
    while abs(far - near) > 1:
        middle = (near + far) // 2
        near, far = (middle, far) if takes(middle) else (near, middle)
    return near


def _schema_bounds(field: str) -> tuple[Number | None, Number | None]:
    """The ``ge`` and ``le`` that the request schema puts on ``field``."""
    low: Number | None = None
    high: Number | None = None
    for constraint in ImageRequest.model_fields[field].metadata:
        if isinstance(constraint, Ge) and isinstance(constraint.ge, (int, float)):
            low = constraint.ge
        elif isinstance(constraint, Le) and isinstance(constraint.le, (int, float)):
            high = constraint.le
    return low, high


def _lower(schema: Number | None, own: Number) -> Number:
    return own if schema is None else min(schema, own)
