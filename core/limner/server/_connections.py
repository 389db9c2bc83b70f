"""The HTTP connections under the app: how long a client may take to send a request, how
many connections may be open at once, and how the server closes one.

uvicorn times nothing between a connection's first byte and the end of a request's body (its
``timeout_keep_alive`` runs only between requests), so a client that sends its headers or its
body a byte at a time holds a connection, and a file descriptor, for as long as it likes. The
protocol here is uvicorn's httptools protocol with three additions, all at the connection:

- **Deadlines.** ``header_timeout`` from the connection (or, on a kept-alive connection, from
  the next request's first byte) to the end of the headers; ``body_timeout`` from there to the
  end of the body. Past either: 408 and close. Headers are also capped at
  :data:`MAX_HEADER_BYTES` (431), so the wait cannot fill memory either.
- **A cap on open connections.** Past ``max_connections`` (or half the open-file limit, if
  lower) a new connection closes the one that has waited longest on its client: one closing
  first, then one idle or still sending its request (told 503). A connection whose request
  the app is serving is never closed for another, so a probe always gets in while slow
  clients fill the cap; when every connection is being served, the new one gets 503.
- **A lingering close.** When the server closes a connection whose request it has not read to
  the end (a 413 answered from ``Content-Length``, a 408), closing at once would make the
  kernel reset the connection, and a reset destroys the answer in the client's buffers. So the
  server sends its answer, shuts down its side, and reads and discards what the client still
  sends until the client closes, for ``body_timeout`` at most (and 5 s of silence).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ._errors import error_body

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ._metrics import Metrics

__all__ = ["CONNECTION_ANSWER", "MAX_HEADER_BYTES", "connection_cap", "http_protocol"]

log = logging.getLogger("limner.server")

MAX_HEADER_BYTES = 64 * 1024
"""Most bytes of request line and headers one request may send (431 past it)."""

CONNECTION_ANSWER = "limner.connection_answer"
"""Scope key the connection sets to the status it answered for the app (a 408 while the app
read the body), so the request is counted with that status, not as a client that left."""

_LINGER_SILENCE = 5.0
"""Seconds of silence from the client that end a lingering close before its deadline."""

_REASONS = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def connection_cap(max_connections: int) -> int:
    """``max_connections``, or half the process's open-file limit if that is lower: the server
    keeps descriptors for its own files (weights, fetches, logs)."""
    try:
        import resource
    except ImportError:  # not on POSIX: no limit to read
        return max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft // 2))


def http_protocol(app: FastAPI) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with ``app``'s connection limits (its
    :class:`~limner.server.ServerSettings`' ``header_timeout``, ``body_timeout`` and
    ``max_connections``) and a lingering close, counted in its ``/metrics``. Pass it to
    uvicorn as ``http=``; ``limner serve`` does."""
    service = getattr(app.state, "limner", None)
    if service is None:
        raise TypeError("http_protocol needs an app made by limner.server.create_app")
    settings = service.settings
    cap = connection_cap(settings.max_connections)
    if cap < settings.max_connections:
        log.warning(
            "at most %d open connections, not max_connections=%d: half the open-file limit "
            "(raise it with ulimit -n)",
            cap,
            settings.max_connections,
        )

    class Protocol(LimnerHTTPProtocol):
        header_timeout = settings.header_timeout
        body_timeout = settings.body_timeout
        max_connections = cap
        metrics = app.state.limner_metrics

    return Protocol


class LimnerHTTPProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines, a connection cap and a lingering close;
    made for an app by :func:`http_protocol`, which sets the class attributes."""

    header_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 60.0
    max_connections: ClassVar[int] = 512
    metrics: ClassVar[Metrics | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._socket: asyncio.Transport | None = None  # the real transport
        self._deadline: asyncio.TimerHandle | None = None  # headers, body or lingering: one
        self._in_message = False  # from a request's first byte to the end of its body
        self._headers_done = False
        self._header_bytes = 0
        self._waiting_since = self.loop.time()  # since when the server waits on the client
        self._refused = False  # answered by the connection: nothing more reaches the app
        self._lingering = False
        self._linger_ends = 0.0
        self._last_data = 0.0
        self._closed = False  # closed by the server: no longer counted as open
        self._shutting_down = False

    # -- the connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._socket = transport
        super().connection_made(_ServerSide(transport, self))
        if self.metrics is not None:
            self.metrics.connections_open.inc()
        self._arm(self.header_timeout, self._headers_late)
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._closed = True
        self._lingering = False
        if self.metrics is not None:
            self.metrics.connections_open.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._last_data = self.loop.time()
            return  # discarded: the answer is out, only the client's close is awaited
        if self._closed or self._refused:
            return
        super().data_received(data)

    def eof_received(self) -> None:
        if self._lingering:
            self._close_now()
            return
        super().eof_received()

    def handle_websocket_upgrade(self) -> None:
        """The connection becomes a WebSocket's (the app refuses it: it serves none). Its
        deadlines and its place among the open HTTP connections end here."""
        self._cancel_deadline()
        self._in_message = False  # the WebSocket's close is a plain one
        self._refused = True  # and the parser's callbacks are no longer this protocol's
        if self.metrics is not None:
            self.metrics.connections_open.dec()
        super().handle_websocket_upgrade()

    def shutdown(self) -> None:
        """The server stops: lingering ends at once, and the rest as uvicorn closes it."""
        self._shutting_down = True
        if self._lingering:
            self._close_now()
            return
        super().shutdown()

    # -- the parser's callbacks: where a request's phases begin and end ------------------

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._in_message = True
        self._headers_done = False
        self._header_bytes = 0
        self._waiting_since = self.loop.time()
        if self._deadline is None:  # the first request's runs from the connection
            self._arm(self.header_timeout, self._headers_late)
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._refused and self._count_header_bytes(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused and self._count_header_bytes(len(name) + len(value)):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._headers_done = True
        self._cancel_deadline()
        super().on_headers_complete()
        self._waiting_since = self.loop.time()
        self._arm(self.body_timeout, self._body_late)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_message = False
        self._cancel_deadline()
        self._waiting_since = self.loop.time()
        super().on_message_complete()

    # -- deadlines ---------------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, callback)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_closed.labels(reason).inc()

    def _count_header_bytes(self, size: int) -> bool:
        self._header_bytes += size
        if self._header_bytes <= MAX_HEADER_BYTES:
            return True
        self._count("headers_too_large")
        self._refuse(
            431,
            f"the request line and headers are over {MAX_HEADER_BYTES} bytes",
            code="headers_too_large",
        )
        return False

    def _headers_late(self) -> None:
        self._deadline = None
        self._count("header_timeout")
        if not self._in_message:
            self._close_now()  # connected and said nothing: there is nothing to answer
            return
        self._refuse(
            408,
            f"the request's headers took longer than header_timeout ({self.header_timeout:g} s)",
            code="header_timeout",
        )

    def _body_late(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.flow.read_paused and cycle is not None and not cycle.response_complete:
            # The server stopped reading (the app has not taken the body yet, or a request
            # ahead of this one is being served): not the client's delay.
            self._arm(1.0, self._body_late)
            return
        self._count("body_timeout")
        self._refuse(
            408,
            f"the request's body took longer than body_timeout ({self.body_timeout:g} s)",
            code="body_timeout",
        )

    # -- the cap on open connections ---------------------------------------------------

    def _make_room(self) -> None:
        """Close the connection that has waited longest on its client if this one is over
        the cap; refuse this one if every other is being served."""
        others = [
            connection
            for connection in self.connections
            if isinstance(connection, LimnerHTTPProtocol)
            and connection is not self
            and not connection._closed
        ]
        if len(others) < self.max_connections:
            return
        self._count("over_capacity")
        waiting = [connection for connection in others if connection._waiting_on_client()]
        if not waiting:
            self._refuse(503, "the server is at its limit of open connections", linger=False)
            return
        oldest = min(waiting, key=lambda c: (not c._lingering, c._waiting_since))
        if oldest._lingering or not oldest._in_message:
            oldest._close_now()
        else:
            oldest._refuse(
                503,
                "the server is at its limit of open connections, and this one waited longest",
                linger=False,
            )

    def _waiting_on_client(self) -> bool:
        """Whether the server only waits on the client here: lingering, idle, or reading a
        request the app has not answered or begun to answer."""
        if self._lingering:
            return True
        if self.pipeline:
            return False  # a request is being served, another queued behind it
        cycle = self.cycle
        answered = cycle is None or cycle.response_complete
        if not (self._in_message and self._headers_done):
            return answered
        return answered or not cycle.response_started

    # -- answering and closing ---------------------------------------------------------

    def _refuse(
        self,
        status: int,
        message: str,
        *,
        code: str = "too_many_connections",
        linger: bool = True,
    ) -> None:
        """Answer ``status`` for the request under way, if it still may be, and close. An app
        reading the body is told the client left; the request is counted with ``status``."""
        self._refused = True
        self._cancel_deadline()
        cycle = self.cycle
        this_request = self._in_message and self._headers_done and cycle is not None
        if this_request and cycle.response_complete:
            self._close_now()  # answered already; the rest of its body was being discarded
            return
        if this_request and cycle.response_started:
            self._close_now()  # the app is answering: too late for another answer
            return
        if this_request:
            cycle.disconnected = True
            cast(dict[str, Any], cycle.scope)[CONNECTION_ANSWER] = status
            cycle.message_event.set()
        headers = [(b"retry-after", b"1")] if status == 503 else []
        self._write_answer(status, message, code, headers)
        if linger:
            self._close_lingering()
        else:
            self._close_now()

    def _write_answer(
        self, status: int, message: str, code: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> None:
        if self._socket is None or self._socket.is_closing():
            return
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body = json.dumps(error_body(message, type=kind, code=code), separators=(",", ":"))
        lines = [b"HTTP/1.1 %d %s" % (status, _REASONS[status])]
        all_headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *headers,
        ]
        lines.extend(name + b": " + value for name, value in all_headers)
        self._socket.write(b"\r\n".join(lines) + b"\r\n\r\n" + body.encode())

    def _server_closes(self) -> None:
        """uvicorn closes the connection: lingering if the request was not read to its end."""
        if self._in_message:
            self._close_lingering()
        else:
            self._close_now()

    def _close_lingering(self) -> None:
        socket = self._socket
        if self._closed or self._lingering or socket is None:
            return
        if self._shutting_down or socket.is_closing() or not socket.can_write_eof():
            self._close_now()
            return
        self._cancel_deadline()
        try:
            socket.write_eof()  # the answer goes out, then our FIN; the client may still send
        except (OSError, RuntimeError):
            self._close_now()
            return
        self._lingering = True
        socket.resume_reading()
        now = self.loop.time()
        self._waiting_since = self._last_data = now
        self._linger_ends = now + self.body_timeout
        self._arm(min(_LINGER_SILENCE, self.body_timeout), self._linger_check)

    def _linger_check(self) -> None:
        self._deadline = None
        now = self.loop.time()
        ends = min(self._linger_ends, self._last_data + _LINGER_SILENCE)
        if now >= ends:
            self._close_now()
        else:
            self._arm(ends - now, self._linger_check)

    def _close_now(self) -> None:
        self._cancel_deadline()
        self._lingering = False
        if self._closed:
            return
        self._closed = True
        if self._socket is not None:
            self._socket.close()


class _ServerSide(asyncio.Transport):
    """The transport uvicorn is given: closing it closes as the protocol decides (lingering
    when the request was not read to its end), and nothing more is written once the
    connection is closing."""

    def __init__(self, socket: asyncio.Transport, protocol: LimnerHTTPProtocol) -> None:
        super().__init__()
        self._socket = socket
        self._protocol = protocol

    def _writable(self) -> bool:
        return not (self._protocol._lingering or self._protocol._closed)

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        if self._writable():
            self._socket.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview[Any]]) -> None:
        if self._writable():
            self._socket.writelines(list_of_data)

    def close(self) -> None:
        self._protocol._server_closes()

    def abort(self) -> None:
        self._protocol._closed = True
        self._socket.abort()

    def is_closing(self) -> bool:
        return not self._writable() or self._socket.is_closing()

    def write_eof(self) -> None:
        self._socket.write_eof()

    def can_write_eof(self) -> bool:
        return self._socket.can_write_eof()

    def pause_reading(self) -> None:
        if not self._protocol._lingering:
            self._socket.pause_reading()

    def resume_reading(self) -> None:
        self._socket.resume_reading()

    def is_reading(self) -> bool:
        return self._socket.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._socket.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._socket.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._socket.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._socket.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._socket.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._socket.set_write_buffer_limits(high, low)
