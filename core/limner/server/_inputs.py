"""Turning the strings of an embeddings request into image bytes or texts.

Each item is classified by the library's one classifier with ``allow_paths=False`` (a client's
string is never a file path) and ``texts=True`` (a string with no image's shape is text). Data
URLs and base64 are decoded by the library's decoders, URLs fetched through the guarded
client, at most ``max_concurrent_fetches`` at once server-wide; only bytes (or texts) reach
the model.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import httpx

from limner.errors import FetchError, InvalidInput
from limner.inputs import ImageLimits, InputKind, classify_input, encoded_bytes, fetch_image_bytes

__all__ = ["SplitInputs", "split_inputs"]

CheckURL = Callable[[httpx.URL], Awaitable[None]]


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

    Data URLs, http(s) URLs and base64 of a known image format are images; any other string
    is text for a model that embeds text, and an error otherwise.
    """
    if sum(map(len, items)) <= _INLINE_CHARS:
        split, urls = _classify(items, supports_text, model, limits)
    else:  # decoding megabytes of base64 is CPU work: off the event loop, like any decoding
        split, urls = await anyio.to_thread.run_sync(_classify, items, supports_text, model, limits)
    if urls:
        fetched = await _fetch_all(
            urls, limits=limits, check_url=check_url, client=client, slots=fetch_slots
        )
        split.images.extend(fetched)
        split.images.sort()
    return split


# Requests up to this many characters are classified and their base64 decoded on the event
# loop (a few ms at most, about 4 ms a MB): base64 decoding holds the GIL, so a worker thread
# would keep the loop waiting all the same, after a hop to it and back (about 70 us) on top.
_INLINE_CHARS = 512 * 1024


def _classify(
    items: list[str], supports_text: bool, model: str, limits: ImageLimits
) -> tuple[SplitInputs, list[tuple[int, str]]]:
    """Images decoded to bytes and texts, plus the URLs still to fetch. Blocking."""
    split = SplitInputs()
    urls: list[tuple[int, str]] = []
    for index, item in enumerate(items):
        try:
            kind = classify_input(item, allow_paths=False, texts=True)
            if kind is InputKind.URL:
                urls.append((index, item.strip()))
            elif kind is InputKind.TEXT:
                if not item.strip():
                    raise InvalidInput("is empty", input=item)
                if not supports_text:
                    raise InvalidInput(
                        f"is neither an image (a data: URL, an http(s) URL, or base64 of an "
                        f"image file) nor text that {model} can embed: it embeds images only",
                        input=item,
                    )
                split.texts.append((index, item))
            else:  # a data URL or base64: without allow_paths, never a path
                split.images.append((index, encoded_bytes(item, kind=kind, limits=limits)))
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
