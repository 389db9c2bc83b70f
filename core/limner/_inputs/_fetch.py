"""Downloading an image input's bytes over http(s), within limits, every hop checked."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import httpx

from limner._inputs._decode import DEFAULT_LIMITS, ImageLimits, reason_of, too_many_bytes
from limner._inputs._kinds import FETCHED_SCHEMES
from limner.errors import FetchError, InvalidInput

__all__ = ["fetch_image_bytes"]

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
        if current.scheme not in FETCHED_SCHEMES:
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
            raise FetchError(f"could not connect{where}: {reason_of(error)}", input=url) from None
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise FetchError(f"request failed{where}: {reason_of(error)}", input=url) from None
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
        raise FetchError(too_many_bytes(int(declared), limits, "Content-Length") + where, input=url)
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
            f"connection failed while reading the body{where}: {reason_of(error)}", input=url
        ) from None
    if not body:
        raise FetchError(f"server sent an empty body{where}", input=url)
    return bytes(body)
