"""Reading images from strangers, the way limner's own HTTP server does.

For host applications that take inputs over a network and hand limner already-decoded
bytes: what a client's string is (:func:`classify_input`: with ``allow_paths=False`` no
string is ever read as a file), the bytes inside base64 or a ``data:`` URL
(:func:`encoded_bytes`), an http(s) URL fetched within :class:`~limner.ImageLimits`
(:func:`fetch_image_bytes`, with a ``check_url`` hook to refuse private addresses), and a
decoded RGB image within the same limits (:func:`decode_image`), and an edit's mask, from
either convention (:func:`decode_mask`). The Python API's
``embed_images`` does all of this for you; host code that only calls it needs none of them.
"""

from __future__ import annotations

from limner._exports import present_as_public
from limner._inputs._decode import DEFAULT_LIMITS, ImageLimits, decode_image, encoded_bytes
from limner._inputs._fetch import fetch_image_bytes
from limner._inputs._kinds import InputKind, classify_input
from limner._inputs._masks import MaskConvention, decode_mask

__all__ = [
    "DEFAULT_LIMITS",
    "ImageLimits",
    "InputKind",
    "MaskConvention",
    "classify_input",
    "decode_image",
    "decode_mask",
    "encoded_bytes",
    "fetch_image_bytes",
]

present_as_public(__name__, globals(), __all__)
