"""Turns every accepted image input into a fully loaded RGB PIL image, with guards.

Images come from strangers: a path, an http(s) URL, base64, a ``data:`` URL, raw bytes or a
PIL image. Each one is bounded in encoded size and in pixels (checked from the header, before
any pixel is decoded), and every failure becomes an :class:`~limner.errors.InvalidInput` that
names the input, never a bare Pillow or httpx exception. Only formats whose decoded size is
known from the header are opened (``ACCEPTED_FORMATS``): containers such as ICO decode an
inner image while Pillow opens them, before any size could be checked.

What each input is comes from ``_image_kinds``; fetching URLs is ``_image_fetch``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import sys
import urllib.parse
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from limner._inputs._kinds import (
    ACCEPTED_FORMATS,
    ACCEPTED_NAMES,
    BASE64_TEXT,
    InputKind,
    input_kind,
    sniff_format,
    without_whitespace,
)
from limner.errors import InvalidInput

__all__ = [
    "DEFAULT_LIMITS",
    "ImageLimits",
    "check_image_file",
    "decode_image",
    "decode_with_alpha",
    "encoded_bytes",
]


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """Bounds on image inputs, so a hostile input costs little before it is refused."""

    max_bytes: int = 50 * 1024 * 1024
    """Encoded size, for files, base64, bytes and downloads."""
    max_pixels: int = 64_000_000
    """Width times height, checked from the header before decoding (decompression bombs)."""
    fetch_timeout: float = 10.0
    """Total seconds for one URL fetch, redirects included."""
    max_redirects: int = 5
    max_concurrent_decodes: int = 4
    """Images one embedding call decodes at once: its decoding memory peaks near this times
    ``max_pixels`` times 4 bytes (more for WebP), however many images it holds."""

    def __post_init__(self) -> None:
        for field in ("max_bytes", "max_pixels", "fetch_timeout"):
            if not getattr(self, field) > 0:
                raise InvalidInput(f"must be positive, got {getattr(self, field)!r}", field=field)
        decodes = self.max_concurrent_decodes
        if isinstance(decodes, bool) or not isinstance(decodes, int) or decodes < 1:
            raise InvalidInput(
                f"must be a positive integer, got {decodes!r}", field="max_concurrent_decodes"
            )
        if self.max_redirects < 0:
            raise InvalidInput(
                f"must be zero or more, got {self.max_redirects!r}", field="max_redirects"
            )


DEFAULT_LIMITS = ImageLimits()

# -- decoding ---------------------------------------------------------------------------------


def decode_image(
    source: object,
    *,
    kind: InputKind | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    draft_size: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode any non-URL input into a new, fully loaded RGB image.

    ``draft_size`` lets JPEGs decode at a reduced scale whose sides stay at least that many
    pixels, which is most of the decoding time for a model that resizes anyway. ``name`` (the
    URL the bytes came from, say) stands for the input in error messages. Blocking: run it in a
    worker thread from async code.
    """
    return _decode(
        source, kind=kind, limits=limits, draft_size=draft_size, name=name, keep_alpha=False
    )


def decode_with_alpha(
    source: object,
    *,
    kind: InputKind | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    name: str | None = None,
) -> Image.Image:
    """As :func:`decode_image`, within the same limits, but an image with transparency (an
    alpha channel, or a palette's transparent colour) comes back as RGBA rather than
    composited over white: what a mask is read from. Others are RGB."""
    return _decode(source, kind=kind, limits=limits, draft_size=None, name=name, keep_alpha=True)


def _decode(
    source: object,
    *,
    kind: InputKind | None,
    limits: ImageLimits,
    draft_size: int | None,
    name: str | None,
    keep_alpha: bool,
) -> Image.Image:
    if kind is None:
        kind = input_kind(source)
    if draft_size is not None and draft_size < 1:
        raise InvalidInput(f"must be at least 1, got {draft_size!r}", field="draft_size")
    label: object = name if name is not None else _label(source)
    if kind is InputKind.URL:
        raise InvalidInput(
            "decode_image does not fetch; URLs are fetched with fetch_image_bytes, and the "
            "bytes then decoded",
            input=label,
        )
    if kind is InputKind.TEXT:
        raise InvalidInput("text is not an image", input=label)
    if kind is InputKind.PIL:
        if not isinstance(source, Image.Image):
            raise _wrong_type(kind, source, label)
        return _from_pil(source, limits=limits, label=label, keep_alpha=keep_alpha)
    if kind is InputKind.PATH:
        if not isinstance(source, (str, os.PathLike)):
            raise _wrong_type(kind, source, label)
        data = _read_file(source, limits=limits, label=label)
    elif kind in (InputKind.DATA_URL, InputKind.BASE64):
        data = encoded_bytes(_as_text(source, kind, label), kind=kind, limits=limits, name=label)
    else:
        if not isinstance(source, (bytes, bytearray, memoryview)):
            raise _wrong_type(kind, source, label)
        data = bytes(source)
    return _decode_bytes(
        data, limits=limits, draft_size=draft_size, label=label, keep_alpha=keep_alpha
    )


def encoded_bytes(
    text: str, *, kind: InputKind, limits: ImageLimits = DEFAULT_LIMITS, name: object = None
) -> bytes:
    """The image file a ``data:`` URL or base64 string carries, as bytes, within
    ``limits.max_bytes``; no pixel is decoded, and nothing is read from anywhere else.

    ``kind`` is :attr:`InputKind.DATA_URL` or :attr:`InputKind.BASE64`, as
    :func:`classify_input` found; base64 is decoded strictly (one alphabet, padding absent or
    exactly right). ``name`` stands for the input in error messages.
    """
    label = text if name is None else name
    if kind is InputKind.DATA_URL:
        return _decode_data_url(text, limits=limits, label=label)
    if kind is InputKind.BASE64:
        return _decode_base64(text, limits=limits, label=label)
    raise ValueError(f"encoded_bytes takes a data URL or base64, not a {kind.value}")


def _label(source: object) -> object:
    """What names the input in an error: a path's text rather than ``PosixPath('...')``."""
    if isinstance(source, os.PathLike):
        path = os.fspath(source)
        return path if isinstance(path, str) else os.fsdecode(path)
    return source


def _wrong_type(kind: InputKind, source: object, label: object) -> InvalidInput:
    return InvalidInput(f"a {kind.value} input cannot be a {type(source).__name__}", input=label)


def _as_text(source: object, kind: InputKind, label: object) -> str:
    if isinstance(source, str):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            return bytes(source).decode("ascii")
        except UnicodeDecodeError:
            raise InvalidInput(f"{kind.value} input is not ASCII text", input=label) from None
    raise _wrong_type(kind, source, label)


def too_many_bytes(size: int, limits: ImageLimits, what: str = "image") -> str:
    return (
        f"{what} is {size} bytes, over the limit of {limits.max_bytes} bytes "
        "(ImageLimits.max_bytes)"
    )


def check_image_file(
    source: str | os.PathLike[str], *, limits: ImageLimits = DEFAULT_LIMITS
) -> None:
    """Raise the ``InvalidInput`` that decoding ``source`` would raise about the file itself
    (missing, a directory, not a regular file, over ``limits.max_bytes``) without reading
    it: a command checks its files this way before any model loads."""
    _stat_file(source, limits=limits, label=_label(source))


def _stat_file(source: str | os.PathLike[str], *, limits: ImageLimits, label: object) -> None:
    try:
        info = os.stat(source)
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidInput("no such file", input=label) from None
    except PermissionError:
        raise InvalidInput("permission denied reading the file", input=label) from None
    except ValueError as error:  # an embedded NUL, for one
        raise InvalidInput(f"not a valid file path: {error}", input=label) from None
    except OSError as error:
        raise InvalidInput(f"cannot read the file: {error.strerror}", input=label) from None
    if stat.S_ISDIR(info.st_mode):
        raise InvalidInput("is a directory, not an image file", input=label)
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise InvalidInput("not a regular file", input=label)
    if info.st_size > limits.max_bytes:
        raise InvalidInput(too_many_bytes(info.st_size, limits, "file"), input=label)


def _read_file(source: str | os.PathLike[str], *, limits: ImageLimits, label: object) -> bytes:
    _stat_file(source, limits=limits, label=label)
    try:
        with open(source, "rb") as file:
            data = file.read(limits.max_bytes + 1)
    except PermissionError:
        raise InvalidInput("permission denied reading the file", input=label) from None
    except OSError as error:
        raise InvalidInput(f"cannot read the file: {error.strerror}", input=label) from None
    if len(data) > limits.max_bytes:  # it grew after the stat
        raise InvalidInput(too_many_bytes(len(data), limits, "file"), input=label)
    return data


def _decode_data_url(text: str, *, limits: ImageLimits, label: object) -> bytes:
    header, comma, payload = text.lstrip()[5:].partition(",")
    if not comma:
        raise InvalidInput("malformed data URL: no ',' before the payload", input=label)
    params = [part.strip().lower() for part in header.split(";")]
    media_type = params[0]
    if media_type and not media_type.startswith("image/"):
        raise InvalidInput(
            f"data URL media type is {media_type!r}, not an image (not image/*)", input=label
        )
    if "base64" not in params[1:]:
        raise InvalidInput(
            "data URL payload is not base64; use data:image/...;base64,...", input=label
        )
    if "%" in payload:  # base64 characters may arrive percent-encoded in a URL
        payload = urllib.parse.unquote(payload)
    return _decode_base64(payload, limits=limits, label=label)


# The ASCII characters str.split() takes for whitespace, as bytes.translate deletes them.
_ASCII_WHITESPACE = bytes(c for c in range(128) if chr(c).isspace())
_URL_SAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def _decode_base64(text: str, *, limits: ImageLimits, label: object) -> bytes:
    decoded = _decode_plain_base64(text, limits=limits)
    return decoded if decoded is not None else _decode_base64_exactly(text, limits, label)


def _decode_plain_base64(text: str, *, limits: ImageLimits) -> bytes | None:
    """The common case, ASCII base64 in one alphabet with its padding, decoded in C: no
    regex, no copies as text (half the time of :func:`_decode_base64_exactly` on 100 KB).
    None for anything else (no padding, a stray character, over the limit), which that
    function decides with the reason. With a whole number of 4-character groups and at most
    two '=', Python 3.11's strict decoding accepts no input the exact path refuses, and
    decodes the rest to the same bytes (tests/test_images.py compares the two)."""
    if sys.version_info < (3, 11) or not text.isascii():
        return None
    data = text.encode("ascii").translate(None, _ASCII_WHITESPACE)
    if not data or len(data) % 4 or len(data) // 4 * 3 > limits.max_bytes:
        return None  # strict decoding would take "AAAA==": '=' where none is due
    if len(data) - len(data.rstrip(b"=")) > 2:
        return None
    if b"-" in data or b"_" in data:  # the URL-safe alphabet, unless the two are mixed
        if b"+" in data or b"/" in data:
            return None
        data = data.translate(_URL_SAFE_TO_STANDARD)
    try:
        return binascii.a2b_base64(data, strict_mode=True)  # type: ignore[call-arg,unused-ignore]
    except binascii.Error:
        return None


def _decode_base64_exactly(text: str, limits: ImageLimits, label: object) -> bytes:
    """Any base64 the API takes (whitespace anywhere, padding left out), or the reason it is
    not base64."""
    compact = without_whitespace(text)
    # Refuse before allocating the decoded copy: four characters carry three bytes.
    if len(compact) // 4 * 3 > limits.max_bytes:
        raise InvalidInput(
            too_many_bytes(len(compact) // 4 * 3, limits, "decoded base64"), input=label
        )
    if not compact:
        raise InvalidInput("not valid base64: there is nothing to decode", input=label)
    if BASE64_TEXT.fullmatch(compact) is None:
        raise InvalidInput(
            "not valid base64: characters outside the base64 alphabet, a mix of the standard "
            "and URL-safe alphabets, or misplaced '=' padding",
            input=label,
        )
    body = compact.rstrip("=")
    padding = len(compact) - len(body)
    missing = -len(body) % 4
    if len(body) % 4 == 1 or (padding and padding != missing):
        raise InvalidInput("not valid base64: wrong length or padding", input=label)
    altchars = b"-_" if ("-" in body or "_" in body) else None
    try:
        return base64.b64decode(body + "=" * missing, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInput(f"not valid base64: {error}", input=label) from None


def _unreadable(data: bytes) -> str:
    """Why Pillow could not open ``data`` with any of the accepted formats."""
    known = sniff_format(data)
    if known is None:
        return (
            f"not an image, or not an accepted format ({ACCEPTED_NAMES}); starts with {data[:8]!r}"
        )
    if known.upper() in ACCEPTED_FORMATS:
        return f"corrupt {known} header: Pillow cannot read it"
    return (
        f"{known} images are not accepted: only {ACCEPTED_NAMES}, whose size is checked "
        "before any pixel is decoded"
    )


def _decode_bytes(
    data: bytes,
    *,
    limits: ImageLimits,
    draft_size: int | None,
    label: object,
    keep_alpha: bool = False,
) -> Image.Image:
    if not data:
        raise InvalidInput("empty: 0 bytes is not an image", input=label)
    if len(data) > limits.max_bytes:
        raise InvalidInput(too_many_bytes(len(data), limits), input=label)
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInput(_unreadable(data), input=label) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Over Pillow's own process-wide limit, which it checks while opening.
        raise InvalidInput(
            f"image is too large to decode safely: {error} (PIL.Image.MAX_IMAGE_PIXELS)",
            input=label,
        ) from None
    except MemoryError:
        raise
    except Exception as error:  # a format plugin may raise anything on hostile bytes
        raise InvalidInput(f"corrupt image header: {reason_of(error)}", input=label) from error
    _check_pixels(image, limits=limits, label=label)
    _check_tiles(image, limits=limits, label=label)
    try:
        if draft_size and image.format in ("JPEG", "MPO"):
            # The fast path: libjpeg decodes at 1/2, 1/4 or 1/8 scale, keeping both sides at
            # least draft_size.
            image.draft("RGB", (draft_size, draft_size))
        image.load()  # the first frame only, for animations and multi-page files
        return _to_rgb(_apply_orientation(image), owned=True, keep_alpha=keep_alpha)
    except MemoryError:
        raise
    except Exception as error:  # as above: anything a decoder raises means bad data
        raise InvalidInput(
            f"corrupt or truncated image data: {reason_of(error)}", input=label
        ) from error


def _from_pil(
    image: Image.Image, *, limits: ImageLimits, label: object, keep_alpha: bool = False
) -> Image.Image:
    _check_pixels(image, limits=limits, label=label)
    try:
        image.load()
        oriented = _apply_orientation(image)
        return _to_rgb(oriented, owned=oriented is not image, keep_alpha=keep_alpha)
    except MemoryError:
        raise
    except Exception as error:  # a lazily opened image may still hold bad data
        raise InvalidInput(
            f"cannot read the PIL image's pixels: {reason_of(error)}", input=label
        ) from error


def reason_of(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _check_pixels(image: Image.Image, *, limits: ImageLimits, label: object) -> None:
    problem = _pixel_size_problem(image.width, image.height, limits)
    if problem is not None:
        raise InvalidInput(problem, input=label)


def _pixel_size_problem(width: int, height: int, limits: ImageLimits) -> str | None:
    """Why an image of ``width`` x ``height`` may not be decoded, or None when it may.

    The one size check for every input kind: a side of zero (or less) has no pixels to embed
    and would divide by zero in a resize, and too many pixels cost too much memory.
    """
    if width < 1 or height < 1:
        return f"{width} x {height} has no pixels: both sides must be at least 1"
    if width * height > limits.max_pixels:
        return (
            f"{width} x {height} = {width * height} pixels is over the limit of "
            f"{limits.max_pixels} (ImageLimits.max_pixels)"
        )
    return None


_TILE_WIDTH, _TILE_LENGTH = 322, 323


def _check_tiles(image: Image.Image, *, limits: ImageLimits, label: object) -> None:
    """Refuse a tiled TIFF whose tiles are over the pixel limit.

    libtiff decodes a whole tile into a buffer of its own, so a 16 x 16 image with one
    13000 x 13000 tile would otherwise cost a tile's memory, not the image's.
    """
    if not isinstance(image, TiffImagePlugin.TiffImageFile):
        return
    width = image.tag_v2.get(_TILE_WIDTH)
    height = image.tag_v2.get(_TILE_LENGTH)
    if not isinstance(width, int) or not isinstance(height, int):
        return
    if width * height > limits.max_pixels:
        raise InvalidInput(
            f"TIFF tiles of {width} x {height} = {width * height} pixels are over the limit "
            f"of {limits.max_pixels} (ImageLimits.max_pixels)",
            input=label,
        )


_ORIENTATION_TAG = 0x0112


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate as the camera meant; copy only when there is something to do."""
    if image.getexif().get(_ORIENTATION_TAG, 1) in (2, 3, 4, 5, 6, 7, 8):
        transposed = ImageOps.exif_transpose(image)
        if transposed is not None:
            return transposed
    return image


_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_PREMULTIPLIED = {"RGBa": "RGBA", "La": "LA"}
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_WHITE = (255, 255, 255)


def _to_rgb(image: Image.Image, *, owned: bool, keep_alpha: bool = False) -> Image.Image:
    """Convert to 8-bit RGB; ``owned`` says ``image`` is ours and may be returned as is.
    With ``keep_alpha``, an image with transparency becomes RGBA instead."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image if owned else image.copy()
    if mode in _WIDE_MODES:
        return Image.fromarray(_to_8_bits(image), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert(_PREMULTIPLIED.get(mode, mode)).convert("RGBA")
        if keep_alpha:
            return rgba
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))  # transparent shows as white
        return background
    return image.convert("RGB")


def _to_8_bits(image: Image.Image) -> npt.NDArray[np.uint8]:
    """Scale a 16/32-bit or float single-band image into 0..255 rather than clipping it.

    16-bit modes map 0..65535 onto 0..255. Mode ``I`` is what Pillow uses for 16-bit data, so
    values within 0..65535 are read as 16-bit too, and float images within 0..1 as the usual
    unit range; anything wider has no convention and is stretched from its own min to max.
    """
    values: npt.NDArray[Any] = np.asarray(image)
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = values.min(), values.max()
    if image.mode != "F" and low >= 0 and high <= 65535:
        # Integer arithmetic, rounded: exact, and a quarter of float64's memory.
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    floats = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = floats.min(), floats.max()
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = floats * 255.0
    elif high > low:
        scaled = (floats - low) * (255.0 / (float(high) - float(low)))
    else:
        scaled = floats
    result: npt.NDArray[np.uint8] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return result
