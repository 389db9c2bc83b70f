"""Reading an edit's mask: which pixels to repaint, from the two conventions people send.

Image editors and diffusers paint what to repaint white on black; OpenAI's Images API
sends an image whose fully transparent pixels mark the area to edit. Either way limner
hands a model one thing: an ``L`` image, 255 where it repaints and 0 where it keeps, so
"outside the mask" is exact, never a matter of grey levels.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

from limner._inputs._decode import DEFAULT_LIMITS, ImageLimits, decode_with_alpha
from limner._inputs._kinds import InputKind
from limner.errors import InvalidInput

__all__ = ["MaskConvention", "decode_mask", "mask_of"]

MaskConvention = Literal["auto", "alpha", "white"]
"""How a mask image marks what to repaint: ``"alpha"``, OpenAI's (its fully transparent
pixels; an image without transparency is refused); ``"white"``, diffusers' and image
editors' (pixels at least half-bright); ``"auto"``: ``"alpha"`` for an image with a pixel
that is not fully opaque, else ``"white"``."""

_CONVENTIONS = ("auto", "alpha", "white")


def decode_mask(
    source: object,
    *,
    kind: InputKind | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    name: str | None = None,
    convention: MaskConvention = "auto",
) -> Image.Image:
    """Decode a mask within ``limits`` (any input :func:`decode_image` takes): an ``L`` image,
    255 where the model repaints, 0 where it keeps the source. ``InvalidInput`` for an input
    that is no image, or, with ``convention="alpha"``, one without transparency. Blocking."""
    if convention not in _CONVENTIONS:
        raise InvalidInput(
            f"must be one of {', '.join(map(repr, _CONVENTIONS))}, got {convention!r}",
            field="convention",
        )
    return mask_of(decode_with_alpha(source, kind=kind, limits=limits, name=name), convention)


def mask_of(image: Image.Image, convention: MaskConvention = "auto") -> Image.Image:
    """``image`` (RGB, or RGBA where it has transparency) as a 0/255 ``L`` mask."""
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    uses_alpha = convention == "alpha" or (
        convention == "auto" and alpha is not None and int(np.asarray(alpha).min()) < 255
    )
    if uses_alpha:
        if alpha is None:
            raise InvalidInput(
                "the mask needs an alpha channel: its fully transparent pixels mark the area "
                "to edit (OpenAI's convention); this image has no transparency"
            )
        return alpha.point(lambda value: 255 if value == 0 else 0)
    return image.convert("L").point(lambda value: 255 if value >= 128 else 0)
