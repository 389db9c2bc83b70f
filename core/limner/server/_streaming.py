"""Running work for a client that may go away, and streaming server-sent events to it.

A client that disconnects cancels its work: the ASGI server reports ``http.disconnect`` on
``receive``, and a watcher task cancels the scope the work runs in. For a generation that
cancellation reaches the pool, which stops the pipeline at its next step.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._errors import APIError, ClientGone, to_api_error

__all__ = ["EventStream", "run_for_client", "sse_event"]

T = TypeVar("T")

log = logging.getLogger("limner.server")

_MISSING: Any = object()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def run_for_client(
    receive: Receive, work: Callable[[], Awaitable[T]], *, deadline: float
) -> T:
    """``await work()``, cancelled if the client disconnects (``ClientGone``) or the deadline
    passes (a 504). Call it only once the request body has been read."""
    result: T = _MISSING
    error: Exception | None = None
    with anyio.CancelScope(deadline=deadline) as timer:
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
            try:
                result = await work()
            except Exception as raised:  # re-raised below, outside the task group
                error = raised
            group.cancel_scope.cancel()
    if error is not None:
        raise error
    if timer.cancelled_caught:
        raise timed_out()
    if result is _MISSING:
        raise ClientGone()
    return result


def timed_out() -> APIError:
    return APIError(
        504,
        "the request took longer than the server's request_timeout",
        type="server_error",
        code="request_timeout",
    )


def sse_event(event: str, data: Any) -> bytes:
    """One server-sent event; ``data`` as compact JSON (a string is sent as it is)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines = "".join(f"data: {line}\n" for line in text.splitlines() or [""])
    return f"event: {event}\n{lines}\n".encode()


class EventStream(Response):
    """A ``text/event-stream`` answer fed by ``events``, an async generator of encoded events.

    The generator is always closed, and closed promptly: on a disconnect, on the deadline, or
    at its end, so whatever it holds (a pool generation) is released. A failure inside it
    becomes a final ``error`` event; the deadline, an ``error`` event with code 504.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], *, deadline: float) -> None:
        super().__init__(
            status_code=200,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            media_type=self.media_type,
        )
        # Response counts an empty body as Content-Length: 0; a stream has no length.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.events = events
        self.deadline = deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        failure: APIError | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            with anyio.CancelScope(deadline=self.deadline) as timer:
                async with anyio.create_task_group() as group:
                    group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
                    try:
                        async for chunk in self.events:
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                    except OSError:
                        log.info("the client went away mid-stream")
                    except Exception as error:
                        failure = to_api_error(error)
                    group.cancel_scope.cancel()
            if timer.cancelled_caught:
                failure = timed_out()
            if failure is not None:
                await send(
                    {
                        "type": "http.response.body",
                        "body": sse_event("error", failure.body() | {"status": failure.status}),
                        "more_body": True,
                    }
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            log.info("the client went away mid-stream")
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()
