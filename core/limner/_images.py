"""Turns every accepted image input into a fully loaded RGB PIL image, with guards.

Images come from strangers: a path, an http(s) URL, base64, a ``data:`` URL, raw bytes or a
PIL image. Each one is bounded in encoded size and in pixels (checked from the header, before
any pixel is decoded), and every failure becomes an :class:`~limner.errors.InvalidInput` that
names the input, never a bare Pillow or httpx exception. Only formats whose decoded size is
known from the header are opened (``ACCEPTED_FORMATS``): containers such as ICO decode an
inner image while Pillow opens them, before any size could be checked.

One classifier, :func:`classify_input`, tells the kinds apart for the Python API (where a
string may name a file) and for the HTTP server (where a string never does, and one that is no
image is text).
"""

from __future__ import annotations

import base64
import binascii
import enum
import io
import os
import re
import stat
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from .errors import FetchError, InvalidInput

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_LIMITS",
    "ImageLimits",
    "InputKind",
    "classify_input",
    "decode_image",
    "encoded_bytes",
    "fetch_image_bytes",
    "input_kind",
]


class InputKind(enum.Enum):
    """What an image input is, which decides how it is read."""

    PATH = "path"
    URL = "URL"
    DATA_URL = "data URL"
    BASE64 = "base64"
    BYTES = "bytes"
    PIL = "PIL image"
    TEXT = "text"
    """Not an image: what :func:`classify_input` makes of other strings when texts are
    allowed."""


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

# -- telling inputs apart ---------------------------------------------------------------------

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_FETCHED_SCHEMES = frozenset({"http", "https"})
# A data URL's header (media type and parameters) has no whitespace, and a comma ends it.
_DATA_URL = re.compile(r"data:[^\s,]*,", re.IGNORECASE)
# One alphabet or the other, never a mix, then at most two padding characters.
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]+|[A-Za-z0-9_-]+)={0,2}")
# The smallest real image files are a few dozen bytes; shorter strings are far likelier to be
# (misspelt) file names or words than base64, and "no such file" (or text) is the more useful
# answer for them.
_MIN_BASE64_CHARS = 32
# Base64 characters decoded to tell an image from text: 18 bytes, more than any signature
# needs, and never into the padding (at most the last two of at least _MIN_BASE64_CHARS).
_SNIFFED_BASE64_CHARS = 24
# Longer strings cannot be paths on any common file system; skip the stat call for them.
_MAX_PATH_CHARS = 4096
_WHITESPACE = re.compile(r"\s+")


def classify_input(source: object, *, allow_paths: bool, texts: bool) -> InputKind:
    """Classify an input without reading it: no file is opened, no URL fetched, and of base64
    only the first few bytes are decoded.

    ``allow_paths`` says whether a string may name a file: yes for the Python API; never for a
    server, where every string comes from a client. ``texts`` says whether a string that is no
    image is text (an embeddings request mixes texts and images in one list), in which case
    only strings with an image's shape are taken for images.

    Strings are ambiguous, so the order matters (whitespace around a URL, data URL or base64
    is ignored; a path is taken as it is):

    1. ``scheme://``: an http(s) URL; any other scheme is refused;
    2. a ``data:`` URL: with ``texts``, only one whose header has no whitespace and ends at a
       comma ("data: 3 apples, 2 pears" is text); without, anything starting ``data:``, so
       that a malformed one is reported as such;
    3. with ``allow_paths``, an existing file;
    4. base64: one alphabet (standard or URL-safe), at most two ``=`` at the end, at least 32
       characters. With ``texts``, only when its first bytes are the signature of an image
       format limner knows (accepted or refused by name); its length and padding are checked
       strictly when it is decoded;
    5. anything else: text with ``texts``; otherwise a path with ``allow_paths``, so that a
       missing file is reported as one; otherwise refused.
    """
    if isinstance(source, Image.Image):
        return InputKind.PIL
    if isinstance(source, (bytes, bytearray, memoryview)):
        return InputKind.BYTES
    if isinstance(source, os.PathLike):
        if allow_paths:
            return InputKind.PATH
        raise InvalidInput(
            "a file path is not accepted here; pass "
            + _what_to_pass(allow_paths=False, texts=texts),
            input=source,
        )
    if not isinstance(source, str):
        raise InvalidInput(
            f"unsupported image input type {type(source).__name__}; pass "
            + _what_to_pass(allow_paths=allow_paths, texts=texts),
            input=source,
        )
    trimmed = source.strip()
    scheme = _SCHEME.match(trimmed)
    if scheme is not None:
        if scheme.group(1).lower() in _FETCHED_SCHEMES:
            return InputKind.URL
        raise InvalidInput(
            f"unsupported URL scheme {scheme.group(1)!r}; only http and https URLs are fetched",
            input=source,
        )
    if _DATA_URL.match(trimmed) if texts else trimmed[:5].lower() == "data:":
        return InputKind.DATA_URL
    if allow_paths and _is_existing_path(source):
        return InputKind.PATH
    compact = _as_base64(source)
    if compact is not None and (not texts or _base64_is_image(compact)):
        return InputKind.BASE64
    if texts:
        return InputKind.TEXT
    if allow_paths:
        return InputKind.PATH
    raise InvalidInput(
        "not an image: pass " + _what_to_pass(allow_paths=False, texts=False), input=source
    )


def input_kind(source: object) -> InputKind:
    """Classify an input as the Python API takes it: strings may name files, and are never
    text (:func:`classify_input` with ``allow_paths=True, texts=False``)."""
    return classify_input(source, allow_paths=True, texts=False)


def _what_to_pass(*, allow_paths: bool, texts: bool) -> str:
    kinds = ["a path"] if allow_paths else []
    kinds += ["an http(s) URL", "base64", "a data: URL", "bytes", "a PIL image"]
    if texts:
        kinds.append("text")
    return ", ".join(kinds[:-1]) + " or " + kinds[-1]


def _is_existing_path(text: str) -> bool:
    if len(text) > _MAX_PATH_CHARS or "\0" in text:
        return False
    return os.path.exists(text)


def _as_base64(text: str) -> str | None:
    """``text`` without whitespace if it passes for base64, else None."""
    compact = _WHITESPACE.sub("", text)
    if len(compact) < _MIN_BASE64_CHARS or _BASE64.fullmatch(compact) is None:
        return None
    return compact


def _base64_is_image(compact: str) -> bool:
    """Whether base64 (as :func:`_as_base64` returns it) starts with an image's signature."""
    head = compact[:_SNIFFED_BASE64_CHARS]
    altchars = b"-_" if ("-" in head or "_" in head) else None
    return _sniff_format(base64.b64decode(head, altchars=altchars, validate=True)) is not None


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
        return _from_pil(source, limits=limits, label=label)
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
    return _decode_bytes(data, limits=limits, draft_size=draft_size, label=label)


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


def _too_many_bytes(size: int, limits: ImageLimits, what: str = "image") -> str:
    return (
        f"{what} is {size} bytes, over the limit of {limits.max_bytes} bytes "
        "(ImageLimits.max_bytes)"
    )


def _read_file(source: str | os.PathLike[str], *, limits: ImageLimits, label: object) -> bytes:
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
        raise InvalidInput(_too_many_bytes(info.st_size, limits, "file"), input=label)
    try:
        with open(source, "rb") as file:
            data = file.read(limits.max_bytes + 1)
    except PermissionError:
        raise InvalidInput("permission denied reading the file", input=label) from None
    except OSError as error:
        raise InvalidInput(f"cannot read the file: {error.strerror}", input=label) from None
    if len(data) > limits.max_bytes:  # it grew after the stat
        raise InvalidInput(_too_many_bytes(len(data), limits, "file"), input=label)
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


def _decode_base64(text: str, *, limits: ImageLimits, label: object) -> bytes:
    compact = _WHITESPACE.sub("", text)
    # Refuse before allocating the decoded copy: four characters carry three bytes.
    if len(compact) // 4 * 3 > limits.max_bytes:
        raise InvalidInput(
            _too_many_bytes(len(compact) // 4 * 3, limits, "decoded base64"), input=label
        )
    if not compact:
        raise InvalidInput("not valid base64: there is nothing to decode", input=label)
    if _BASE64.fullmatch(compact) is None:
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


ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
"""Pillow's names of the formats decoded. Each states its decoded size in a header that Pillow
reads without decoding pixels, so the pixel limit is checked first; multi-frame files (GIF,
APNG, animated WebP, multi-page TIFF, MPO) decode their first frame only. Containers (ICO,
ICNS, ...) are refused: Pillow decodes their inner image while opening them."""

# Magic numbers of the image formats limner knows, accepted or refused: they tell "a broken
# PNG" and "an ICO, which is refused" from "not an image", and base64 of an image from text.
# Each is what Pillow itself checks before opening that format (a WebP is RIFF, WEBP and a VP8
# chunk; an AVIF or HEIF file's ftyp box names an image brand, not just any ISO media file),
# so that no file Pillow would open is mistaken for text, and no text for a file.
_TIFF_PREFIXES = (b"MM\x00*", b"II*\x00", b"MM*\x00", b"II\x00*", b"MM\x00+", b"II+\x00")
_SIGNATURES: tuple[tuple[str, tuple[tuple[int, bytes], ...]], ...] = (
    ("PNG", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ("JPEG", ((0, b"\xff\xd8\xff"),)),
    ("GIF", ((0, b"GIF87a"),)),
    ("GIF", ((0, b"GIF89a"),)),
    ("BMP", ((0, b"BM"),)),
    *(("TIFF", ((0, prefix),)) for prefix in _TIFF_PREFIXES),
    *(("WebP", ((0, b"RIFF"), (8, b"WEBP" + chunk))) for chunk in (b"VP8 ", b"VP8L", b"VP8X")),
    ("ICO", ((0, b"\x00\x00\x01\x00"),)),
    ("CUR", ((0, b"\x00\x00\x02\x00"),)),
    ("ICNS", ((0, b"icns"),)),
    ("PSD", ((0, b"8BPS"),)),
    ("DDS", ((0, b"DDS "),)),
    ("QOI", ((0, b"qoif"),)),
    ("JPEG 2000", ((0, b"\x00\x00\x00\x0cjP  \r\n\x87\n"),)),
    ("JPEG 2000", ((0, b"\xffO\xffQ"),)),
    *(("AVIF", ((4, b"ftyp" + brand),)) for brand in (b"avif", b"avis")),
    *(("HEIF", ((4, b"ftyp" + brand),)) for brand in (b"mif1", b"msf1")),
    *(
        ("HEIC", ((4, b"ftyp" + brand),))
        for brand in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx")
    ),
)
_ACCEPTED_NAMES = ", ".join(ACCEPTED_FORMATS[:-1]) + " and " + ACCEPTED_FORMATS[-1]


def _sniff_format(data: bytes) -> str | None:
    """The image format ``data``'s magic number names, if it is one limner knows."""
    for name, parts in _SIGNATURES:
        if all(data[offset : offset + len(magic)] == magic for offset, magic in parts):
            return name
    return None


def _unreadable(data: bytes) -> str:
    """Why Pillow could not open ``data`` with any of the accepted formats."""
    known = _sniff_format(data)
    if known is None:
        return (
            f"not an image, or not an accepted format ({_ACCEPTED_NAMES}); starts with {data[:8]!r}"
        )
    if known.upper() in ACCEPTED_FORMATS:
        return f"corrupt {known} header: Pillow cannot read it"
    return (
        f"{known} images are not accepted: only {_ACCEPTED_NAMES}, whose size is checked "
        "before any pixel is decoded"
    )


def _decode_bytes(
    data: bytes, *, limits: ImageLimits, draft_size: int | None, label: object
) -> Image.Image:
    if not data:
        raise InvalidInput("empty: 0 bytes is not an image", input=label)
    if len(data) > limits.max_bytes:
        raise InvalidInput(_too_many_bytes(len(data), limits), input=label)
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
        raise InvalidInput(f"corrupt image header: {_reason(error)}", input=label) from error
    _check_pixels(image, limits=limits, label=label)
    _check_tiles(image, limits=limits, label=label)
    try:
        if draft_size and image.format in ("JPEG", "MPO"):
            # The fast path: libjpeg decodes at 1/2, 1/4 or 1/8 scale, keeping both sides at
            # least draft_size.
            image.draft("RGB", (draft_size, draft_size))
        image.load()  # the first frame only, for animations and multi-page files
        return _to_rgb(_apply_orientation(image), owned=True)
    except MemoryError:
        raise
    except Exception as error:  # as above: anything a decoder raises means bad data
        raise InvalidInput(
            f"corrupt or truncated image data: {_reason(error)}", input=label
        ) from error


def _from_pil(image: Image.Image, *, limits: ImageLimits, label: object) -> Image.Image:
    _check_pixels(image, limits=limits, label=label)
    try:
        image.load()
        oriented = _apply_orientation(image)
        return _to_rgb(oriented, owned=oriented is not image)
    except MemoryError:
        raise
    except Exception as error:  # a lazily opened image may still hold bad data
        raise InvalidInput(
            f"cannot read the PIL image's pixels: {_reason(error)}", input=label
        ) from error


def _reason(error: BaseException) -> str:
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


def _to_rgb(image: Image.Image, *, owned: bool) -> Image.Image:
    """Convert to 8-bit RGB; ``owned`` says ``image`` is ours and may be returned as is."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image if owned else image.copy()
    if mode in _WIDE_MODES:
        return Image.fromarray(_to_8_bits(image), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert(_PREMULTIPLIED.get(mode, mode)).convert("RGBA")
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


# -- fetching ---------------------------------------------------------------------------------

_ACCEPT = "image/*, application/octet-stream;q=0.5"
_ALLOWED_CONTENT_TYPES = ("image/", "application/octet-stream")


async def fetch_image_bytes(
    url: str,
    *,
    limits: ImageLimits = DEFAULT_LIMITS,
    client: httpx.AsyncClient | None = None,
    check_url: Callable[[httpx.URL], Awaitable[None]] | None = None,
) -> bytes:
    """Download an image's encoded bytes from an http(s) URL, within ``limits``.

    Redirects are followed here, not by httpx, so that every hop gets the scheme check and
    ``check_url`` (which may refuse, say, private addresses by raising). The whole fetch,
    redirects included, is bounded by ``limits.fetch_timeout``. Every failure is a
    :class:`~limner.errors.FetchError` naming the URL.
    """
    if not isinstance(url, str):
        raise InvalidInput(f"a URL must be a string, not {type(url).__name__}", input=url)
    if client is None:
        timeout = httpx.Timeout(limits.fetch_timeout)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as own_client:
            return await _fetch_within_time(url, own_client, limits=limits, check_url=check_url)
    return await _fetch_within_time(url, client, limits=limits, check_url=check_url)


async def _fetch_within_time(
    url: str,
    client: httpx.AsyncClient,
    *,
    limits: ImageLimits,
    check_url: Callable[[httpx.URL], Awaitable[None]] | None,
) -> bytes:
    started = anyio.current_time()
    try:
        with anyio.fail_after(limits.fetch_timeout):
            return await _follow(url, client, limits=limits, check_url=check_url)
    except (TimeoutError, httpx.TimeoutException):
        elapsed = anyio.current_time() - started
        raise FetchError(
            f"timed out after {elapsed:.1f} s (ImageLimits.fetch_timeout is "
            f"{limits.fetch_timeout:g} s)",
            input=url,
        ) from None


async def _follow(
    url: str,
    client: httpx.AsyncClient,
    *,
    limits: ImageLimits,
    check_url: Callable[[httpx.URL], Awaitable[None]] | None,
) -> bytes:
    try:
        current = httpx.URL(url.strip())  # whitespace around a URL is no part of it
    except httpx.InvalidURL as error:
        raise FetchError(f"not a valid URL: {error}", input=url) from None
    for hop in range(limits.max_redirects + 1):
        where = "" if hop == 0 else f" (after {hop} redirect(s), at {current})"
        if current.scheme not in _FETCHED_SCHEMES:
            raise FetchError(
                f"unsupported URL scheme {current.scheme!r}{where}; only http and https URLs "
                "are fetched",
                input=url,
            )
        if not current.host:
            raise FetchError(f"URL has no host{where}", input=url)
        if check_url is not None:
            try:
                await check_url(current)
            except InvalidInput as refused:
                if refused.input is None:  # name the caller's URL, as every other error does
                    raise FetchError(f"{refused.reason}{where}", input=url) from refused
                raise
        try:
            request = client.build_request("GET", current, headers={"Accept": _ACCEPT})
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.TimeoutException:
            raise  # reported with the elapsed time by the caller
        except httpx.ConnectError as error:
            raise FetchError(f"could not connect{where}: {_reason(error)}", input=url) from None
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise FetchError(f"request failed{where}: {_reason(error)}", input=url) from None
        try:
            if response.is_redirect:
                location = response.headers["location"]
                try:
                    current = current.join(location)
                except httpx.InvalidURL as error:
                    raise FetchError(
                        f"redirected{where} to an invalid URL {location!r}: {error}", input=url
                    ) from None
                continue
            return await _read_body(response, limits=limits, url=url, where=where)
        finally:
            # Shielded so that a timeout cannot leave the connection half-closed.
            with anyio.CancelScope(shield=True):
                await response.aclose()
    raise FetchError(
        f"too many redirects: more than {limits.max_redirects} (ImageLimits.max_redirects), "
        f"last to {current}",
        input=url,
    )


async def _read_body(
    response: httpx.Response, *, limits: ImageLimits, url: str, where: str
) -> bytes:
    if not response.is_success:
        raise FetchError(f"HTTP {response.status_code} {response.reason_phrase}{where}", input=url)
    content_type = response.headers.get("content-type")
    if content_type is not None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if not media_type.startswith(_ALLOWED_CONTENT_TYPES):
            raise FetchError(
                f"server sent Content-Type {media_type!r}{where}, not an image", input=url
            )
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise FetchError(
            _too_many_bytes(int(declared), limits, "Content-Length") + where, input=url
        )
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > limits.max_bytes:
                raise FetchError(
                    f"response body exceeds the limit of {limits.max_bytes} bytes "
                    f"(ImageLimits.max_bytes){where}",
                    input=url,
                )
    except httpx.TimeoutException:
        raise
    except httpx.HTTPError as error:
        raise FetchError(
            f"connection failed while reading the body{where}: {_reason(error)}", input=url
        ) from None
    if not body:
        raise FetchError(f"server sent an empty body{where}", input=url)
    return bytes(body)
