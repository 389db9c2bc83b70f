"""Turning the strings of an embeddings request into image bytes or texts.

The server never hands a client's string to the library's input detection, which would read
a file path: it decides per item, decodes data URLs and base64 itself, fetches URLs through
the guard, and passes only bytes (or texts) to the model.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import httpx

from limner import ImageLimits, fetch_image_bytes
from limner.errors import FetchError, InvalidInput

__all__ = ["SplitInputs", "split_inputs"]

_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://")
# A data URL's header has no spaces: "data: 3 apples, 2 pears" is text.
_DATA_URL = re.compile(r"\s*data:[^\s,]*,", re.IGNORECASE)
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}|[A-Za-z0-9_-]+={0,2}")
_WHITESPACE = re.compile(r"\s+")
# Below this a string is far likelier to be a word than an image: the smallest PNG is ~90
# base64 characters.
_MIN_BASE64_CHARS = 32
# File signatures of the formats a base64 item is taken for. A string that is valid base64
# but does not start with one of these is text.
_SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (0, b"\x89PNG\r\n\x1a\n"),
    (0, b"\xff\xd8\xff"),
    (0, b"GIF87a"),
    (0, b"GIF89a"),
    (0, b"BM"),
    (0, b"II*\x00"),
    (0, b"MM\x00*"),
    (0, b"\x00\x00\x01\x00"),
    (4, b"ftyp"),  # AVIF, HEIC
)

CheckURL = Callable[[httpx.URL], Awaitable[None]]


def _is_image(data: bytes) -> bool:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return any(data[offset : offset + len(sig)] == sig for offset, sig in _SIGNATURES)


def _decode_base64(text: str, *, limits: ImageLimits, label: str) -> bytes | None:
    """The bytes ``text`` encodes, or None when it is not base64; too large raises."""
    compact = _WHITESPACE.sub("", text)
    if len(compact) < _MIN_BASE64_CHARS or not _BASE64.fullmatch(compact):
        return None
    if len(compact) * 3 // 4 > limits.max_bytes:
        raise InvalidInput(
            f"base64 image is over the limit of {limits.max_bytes} bytes", input=label
        )
    if "-" in compact or "_" in compact:
        compact = compact.translate(str.maketrans("-_", "+/"))
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _decode_data_url(text: str, *, limits: ImageLimits) -> bytes:
    header, comma, payload = text.strip()[5:].partition(",")
    if not comma:
        raise InvalidInput("malformed data URL: no ',' before the payload", input=text)
    params = [part.strip().lower() for part in header.split(";")]
    if params[0] and not params[0].startswith("image/"):
        raise InvalidInput(f"data URL media type is {params[0]!r}, not image/*", input=text)
    if "base64" not in params[1:]:
        raise InvalidInput("data URL is not base64; use data:image/...;base64,...", input=text)
    data = _decode_base64(payload, limits=limits, label=text) if payload.strip() else None
    if data is None:
        raise InvalidInput("data URL payload is not valid base64", input=text)
    return data


@dataclass
class SplitInputs:
    """The items of one request, by kind, each with its position in the request."""

    images: list[tuple[int, bytes]] = field(default_factory=list)
    texts: list[tuple[int, str]] = field(default_factory=list)


async def split_inputs(
    items: list[str],
    *,
    supports_text: bool,
    model: str,
    limits: ImageLimits,
    check_url: CheckURL,
    client: httpx.AsyncClient,
    fetch_slots: anyio.CapacityLimiter,
) -> SplitInputs:
    """Classify every item and fetch the URLs; the first bad item raises, with its index.

    Data URLs, http(s) URLs and base64 that decodes to a known image format are images; any
    other string is text for a model that embeds text, and an error otherwise.
    """
    # Decoding megabytes of base64 is CPU work: off the event loop, like any decoding.
    split, urls = await anyio.to_thread.run_sync(_classify, items, supports_text, model, limits)
    if urls:
        fetched = await _fetch_all(
            urls, limits=limits, check_url=check_url, client=client, slots=fetch_slots
        )
        split.images.extend(fetched)
        split.images.sort()
    return split


def _classify(
    items: list[str], supports_text: bool, model: str, limits: ImageLimits
) -> tuple[SplitInputs, list[tuple[int, str]]]:
    """Images decoded to bytes and texts, plus the URLs still to fetch. Blocking."""
    split = SplitInputs()
    urls: list[tuple[int, str]] = []
    for index, item in enumerate(items):
        try:
            scheme = _SCHEME.match(item)
            if scheme is not None:
                if scheme.group(1).lower() not in ("http", "https"):
                    raise InvalidInput(
                        f"unsupported URL scheme {scheme.group(1)!r}; only http and https URLs "
                        "are fetched",
                        input=item,
                    )
                urls.append((index, item.strip()))
                continue
            if _DATA_URL.match(item):
                split.images.append((index, _decode_data_url(item, limits=limits)))
                continue
            data = _decode_base64(item, limits=limits, label=item)
            if data is not None and _is_image(data):
                split.images.append((index, data))
                continue
            if not item.strip():
                raise InvalidInput("is empty", input=item)
            if not supports_text:
                raise InvalidInput(
                    f"is neither an image (a data: URL, an http(s) URL, or base64 of an image "
                    f"file) nor text that {model} can embed: it embeds images only",
                    input=item,
                )
            split.texts.append((index, item))
        except InvalidInput as error:
            raise error.at_index(index) from None
    return split, urls


async def _fetch_all(
    urls: list[tuple[int, str]],
    *,
    limits: ImageLimits,
    check_url: CheckURL,
    client: httpx.AsyncClient,
    slots: anyio.CapacityLimiter,
) -> list[tuple[int, bytes]]:
    results: dict[int, bytes] = {}
    errors: dict[int, InvalidInput] = {}

    async def fetch(index: int, url: str) -> None:
        async with slots:
            try:
                results[index] = await fetch_image_bytes(
                    url, limits=limits, client=client, check_url=check_url
                )
            except InvalidInput as error:
                if error.input is None:  # the guard's errors name the hop, not the input
                    error = FetchError(error.reason, input=url)
                errors[index] = error

    async with anyio.create_task_group() as group:
        for index, url in urls:
            group.start_soon(fetch, index, url)
    if errors:
        first = min(errors)
        raise errors[first].at_index(first)
    return sorted(results.items())
