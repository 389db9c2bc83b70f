"""Plain ASGI middleware: body size, API key, request metrics.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which would wrap ``receive`` and
hide the client's disconnect from the routes that cancel work on it.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._errors import error_body
from ._metrics import Metrics
from ._ui import UI_PATHS

__all__ = ["APIKeyMiddleware", "BodyLimitMiddleware", "MetricsMiddleware"]

OPEN_PATHS = frozenset({"/healthz", "/readyz"}) | UI_PATHS
"""Probes and the playground's static files answer without a key: they reveal nothing."""


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


class APIKeyMiddleware:
    """``Authorization: Bearer KEY`` on every route but the probes; constant-time compare."""

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
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
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


class MetricsMiddleware:
    """Counts every answer by route and status and times it, refused ones included."""

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
        started = time.perf_counter()

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_progress.inc()
        failed = True
        try:
            await self.app(scope, receive, record_status)
            failed = False
        finally:
            self.metrics.in_progress.dec()
            # No answer and no error: the client left first (nginx's 499).
            label = str(status) if status is not None else "500" if failed else "499"
            self.metrics.requests.labels(method, route, label).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
