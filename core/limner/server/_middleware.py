"""Plain ASGI middleware: body size, API key, Host check, HEAD, request metrics.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which would wrap ``receive`` and
hide the client's disconnect from the routes that cancel work on it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
from collections.abc import Callable, Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._connections import CONNECTION_ANSWER
from ._errors import error_body
from ._metrics import Metrics
from ._ui import UI_PATHS

__all__ = [
    "APIKeyMiddleware",
    "BodyLimitMiddleware",
    "HeadMiddleware",
    "HostCheckMiddleware",
    "MetricsMiddleware",
    "is_authorized",
]

OPEN_PATHS = frozenset({"/healthz", "/readyz"}) | UI_PATHS
"""Probes and the playground's static files answer without a key: they reveal nothing (a
probe says ready or not ready; why not is for the key's holders and the log)."""

_AUTHORIZED = "limner.authorized"


async def send_error(
    send: Send,
    status: int,
    message: str,
    *,
    type: str,
    code: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    body = json.dumps(
        error_body(message, type=type, param=param, code=code), separators=(",", ":")
    ).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


class BodyLimitMiddleware:
    """Reads the body up to ``max_bytes`` before the app parses anything; 413 past it.

    A declared Content-Length over the limit is refused without reading a byte; a chunked
    body is counted as it arrives and refused the moment it passes the limit.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Send) -> None:
        await send_error(
            send,
            413,
            f"the request body is over the limit of {self.max_bytes} bytes (max_body_bytes)",
            type="invalid_request_error",
            code="body_too_large",
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before the body arrived: nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def is_authorized(scope: Scope) -> bool:
    """Whether the request may see everything: it carries the key, or the server has none."""
    return bool(scope.get("state", {}).get(_AUTHORIZED, True))


class APIKeyMiddleware:
    """``Authorization: Bearer KEY`` on every route but the probes; constant-time compare.

    An open path answers without the key; whether the request had it is noted in the scope's
    state (:func:`is_authorized`), so a probe can keep its details to those who do.
    """

    def __init__(self, app: ASGIApp, *, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization")
        if header is None:
            return False
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(token.strip(), self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorized = self._authorized(scope)
        scope.setdefault("state", {})[_AUTHORIZED] = authorized
        if authorized or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        has_header = _header(scope, b"authorization") is not None
        await send_error(
            send,
            401,
            "invalid API key" if has_header else "missing API key: send Authorization: Bearer KEY",
            type="invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: never leaves the host
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: bytes) -> str | None:
    """The name in a ``Host`` header, lower case, without its port or a trailing dot; None
    when it is not a host name at all."""
    try:
        text = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):  # an IPv6 literal: [::1]:8000
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        name, colon, port = text.rpartition(":")
        if not colon:
            name = text
        elif not port.isdigit() or ":" in name:
            return None
    name = name.removesuffix(".")
    return name or None


def host_allowed(header: bytes | None, allowed: Sequence[str]) -> bool:
    """Whether a request's ``Host`` is loopback or one of ``allowed`` (``"*"``: any). No header
    (HTTP/1.0) passes: a browser always sends one."""
    if header is None or "*" in allowed:
        return True
    name = host_name(header)
    return name is not None and (_loopback(name) or name in allowed)


class HostCheckMiddleware:
    """Refuses a request whose ``Host`` is not loopback or an allowed name (400).

    Against DNS rebinding: a web page whose own domain comes to resolve to 127.0.0.1 can make
    the browser send it requests and read the answers, but the browser still names the page's
    domain in ``Host``. So a server without a key answers only requests that name it.
    """

    def __init__(self, app: ASGIApp, *, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = _header(scope, b"host")
        if scope["type"] != "http" or host_allowed(header, self.allowed_hosts):
            await self.app(scope, receive, send)
            return
        shown = (header or b"").decode("ascii", "replace")[:200]
        names = ", ".join(("localhost", "127.0.0.1", "[::1]", *self.allowed_hosts))
        await send_error(
            send,
            400,
            f"Host {shown!r} is not a name this server answers to ({names}); start it with "
            "--allowed-host NAME (allowed_hosts) to answer to another",
            type="invalid_request_error",
            code="invalid_host",
        )


class HeadMiddleware:
    """``HEAD`` answers as ``GET`` would, without the body: every ``GET`` route, probes
    included, takes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


class MetricsMiddleware:
    """Counts every answer by route and status and times it, refused ones included.

    A request whose client left before its answer was complete is counted as 499, a stream
    abandoned half-way included; one the connection answered itself (a 408 while the body
    was being read), with that status.
    """

    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, routes: Callable[[], list[BaseRoute]]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route(self, scope: Scope) -> str:
        partial = None
        for route in self.routes():
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", "other"))
            if match is Match.PARTIAL and partial is None:  # the path, with another method
                partial = str(getattr(route, "path", "other"))
        return partial or "unmatched"  # one label for every unknown path: bounded cardinality

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        method = scope["method"]
        status: int | None = None
        complete = left = False
        started = time.perf_counter()

        async def record_status(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        async def record_leaving() -> Message:
            nonlocal left
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                left = True
            return message

        self.metrics.in_progress.inc()
        failed = True
        try:
            await self.app(scope, record_leaving, record_status)
            failed = False
        finally:
            self.metrics.in_progress.dec()
            answered = scope.get(CONNECTION_ANSWER)
            if answered is not None:
                label = str(answered)
            elif status is None:  # no answer and no error: the client left first (nginx's 499)
                label = "500" if failed else "499"
            else:
                label = "499" if left else str(status)
            self.metrics.requests.labels(method, route, label).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
