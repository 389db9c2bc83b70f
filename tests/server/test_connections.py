"""The connection layer under a real uvicorn, driven with raw sockets: deadlines on slow
headers and bodies, the cap on open connections, the header size limit and the lingering
close that lets an early answer reach a client still sending.

Deadlines are set small through the settings; every bound asserted is the deadline plus
seconds of slack, so a busy machine does not fail them.
"""

from __future__ import annotations

import base64
import io
import json
import re
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from limner.server._connections import MAX_HEADER_BYTES
from limner.testing import fake_embedding_spec

if TYPE_CHECKING:
    from tests.server.conftest import Served, ServerFactory, WaitFor

SLACK = 5.0  # seconds a loaded machine may add to any deadline


def port_of(served: Served) -> int:
    return int(served.url.rsplit(":", 1)[1])


def connect(served: Served, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port_of(served)), timeout=30)
    if data:
        sock.sendall(data)
    return sock


def read_to_end(sock: socket.socket, *, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes its side, and how long that took."""
    started = time.monotonic()
    sock.settimeout(timeout)
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return received, time.monotonic() - started
        received += chunk


def parse(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and JSON body of one raw HTTP answer, which must be whole."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, raw
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body), raw  # the whole body arrived
    return status, headers, json.loads(body)


def metric(served: Served, pattern: str) -> float:
    with served.client() as client:
        text = client.get("/metrics").text
    match = re.search(rf"^{pattern} (\S+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


SLOW_HEADERS = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
SLOW_BODY = (
    b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 1000\r\n\r\n{"model": '
)


def test_slow_headers_and_bodies_get_408_and_are_closed(make_server: ServerFactory) -> None:
    served = make_server(fake_embedding_spec("fake/e"), header_timeout=1.0, body_timeout=1.0)
    slow_headers = connect(served, SLOW_HEADERS)
    slow_body = connect(served, SLOW_BODY)
    silent = connect(served)
    for sock, code in ((slow_headers, "header_timeout"), (slow_body, "body_timeout")):
        raw, took = read_to_end(sock, timeout=1.0 + SLACK)
        status, headers, body = parse(raw)
        assert status == 408
        assert headers["connection"] == "close"
        assert body["error"]["code"] == code
        assert code in body["error"]["message"]
        assert took < 1.0 + SLACK
    raw, _ = read_to_end(silent, timeout=1.0 + SLACK)
    assert raw == b""  # connected and said nothing: closed without an answer
    for sock in (slow_headers, slow_body, silent):
        sock.close()
    assert metric(served, r'limner_http_connections_closed_total\{reason="header_timeout"\}') >= 2
    assert metric(served, r'limner_http_connections_closed_total\{reason="body_timeout"\}') == 1
    # The app was reading the body when the deadline passed: counted with the 408 it got.
    route = 'method="POST",route="/v1/embeddings",status="408"'
    assert metric(served, rf"limner_http_requests_total\{{{route}\}}") == 1


def test_a_trickle_does_not_extend_the_deadline(make_server: ServerFactory) -> None:
    """A byte every 0.2 s keeps an idle timer from firing; the deadline is for the whole."""
    served = make_server(fake_embedding_spec("fake/e"), header_timeout=1.0)
    sock = connect(served, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    started = time.monotonic()
    sock.settimeout(0.2)
    received = b""
    try:
        while time.monotonic() - started < 1.0 + SLACK:
            try:
                sock.sendall(b"a")
            except OSError:
                break  # the server is gone: what it sent is read below
            try:
                received += sock.recv(65536)
            except TimeoutError:
                continue
            if received.endswith(b"}"):
                break
    finally:
        sock.close()
    assert time.monotonic() - started < 1.0 + SLACK
    assert parse(received)[0] == 408


def test_two_hundred_slow_clients_leave_probes_and_requests_answering(
    make_server: ServerFactory, wait_for: WaitFor
) -> None:
    """100 slow-header and 100 slow-body clients against a cap of 100 connections: a probe
    and a real request still answer within 1 s, and every slow client is answered (408 at
    its deadline, or 503 when a newer connection needed its place) and closed."""
    deadline = 3.0
    served = make_server(
        fake_embedding_spec("fake/e"),
        header_timeout=deadline,
        body_timeout=deadline,
        max_connections=100,
    )
    with served.client() as client:  # loaded first: the request timed below is not a load
        warm = client.post("/v1/embeddings", json={"model": "fake/e", "input": "warm"})
        assert warm.status_code == 200
    opened = time.monotonic()
    slow = [connect(served, SLOW_HEADERS if i % 2 else SLOW_BODY) for i in range(200)]
    try:
        with served.client() as client:
            started = time.monotonic()
            probe = client.get("/healthz")
            probe_took = time.monotonic() - started
            started = time.monotonic()
            real = client.post("/v1/embeddings", json={"model": "fake/e", "input": "hello"})
            real_took = time.monotonic() - started
        assert probe.status_code == 200 and probe_took < 1.0
        assert real.status_code == 200 and real_took < 1.0
        assert len(real.json()["data"]) == 1

        answers: dict[socket.socket, bytes] = {sock: b"" for sock in slow}
        closed_at: dict[socket.socket, float] = {}
        selector = selectors.DefaultSelector()
        for sock in slow:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while len(closed_at) < len(slow) and time.monotonic() - opened < deadline + SLACK:
            for key, _ in selector.select(timeout=0.5):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                chunk = ready.recv(65536)
                if chunk:
                    answers[ready] += chunk
                else:
                    closed_at[ready] = time.monotonic() - opened
                    selector.unregister(ready)
        selector.close()
    finally:
        for sock in slow:
            sock.close()
    assert len(closed_at) == len(slow), f"{len(slow) - len(closed_at)} slow clients still open"
    assert max(closed_at.values()) < deadline + SLACK
    statuses = [parse(raw)[0] for raw in answers.values()]
    assert set(statuses) <= {408, 503}
    assert statuses.count(408) >= 1  # the last ones in kept their place to their deadline
    assert statuses.count(503) >= 100  # a cap of 100: at least the first 100 made room
    wait_for(
        lambda: metric(served, "limner_http_connections_open") <= 2,
        timeout=deadline + SLACK,
        what="the slow connections to close on the server",
    )


def test_when_every_connection_is_served_a_new_one_gets_503(
    make_server: ServerFactory, wait_for: WaitFor
) -> None:
    gate = threading.Event()  # holds every batch while clear
    gate.set()
    served = make_server(
        fake_embedding_spec("fake/held", options={"gate": gate}), max_connections=2
    )
    with served.client() as client:  # loaded first
        assert client.post("/v1/embeddings", json={"model": "fake/held", "input": "x"}).is_success
    registry: CollectorRegistry = served.app.state.limner_metrics.registry
    gate.clear()
    results: list[int] = []
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def held() -> None:  # an image's batch waits for the gate (a text's does not)
        with served.client() as client:
            answer = client.post("/v1/embeddings", json={"model": "fake/held", "input": image})
            results.append(answer.status_code)

    def count(name: str) -> float | None:
        return registry.get_sample_value(name)

    wait_for(lambda: count("limner_http_connections_open") == 0, what="the first one to close")
    threads = [threading.Thread(target=held) for _ in range(2)]
    try:
        for served_already, thread in enumerate(threads, start=1):
            thread.start()  # one at a time: a connection still sending could make room
            wait_for(
                lambda n=served_already: count("limner_http_requests_in_progress") == n,
                timeout=30,
                what="the request to be in the app",
            )
        # A hang guard, not a speed check: the server answers at once, and a loop slowed by
        # a busy machine (the app's threads are held at the gate) may take a while to.
        status, headers, body = parse(read_to_end(connect(served), timeout=30)[0])
        assert status == 503
        assert headers["retry-after"] == "1"
        assert body["error"]["code"] == "too_many_connections"
    finally:
        gate.set()
        for thread in threads:
            thread.join(timeout=30)
    assert results == [200, 200]  # the requests being served were never closed for it


def test_headers_over_the_limit_are_431(make_server: ServerFactory) -> None:
    served = make_server(fake_embedding_spec("fake/e"))
    sock = connect(served)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        for _ in range(MAX_HEADER_BYTES // 1000 + 10):
            sock.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
    except OSError:
        pass  # the server answered and shut its side: what it sent is read below
    status, _, body = parse(read_to_end(sock, timeout=SLACK)[0])
    sock.close()
    assert status == 431
    assert body["error"]["code"] == "headers_too_large"


def test_an_early_413_reaches_an_httpx_client_whole_every_time(main: Served) -> None:
    """A small request, then a 60 MiB upload on the same kept-alive connection, 20 times:
    each upload gets the whole 413, never a reset."""
    upload = b"x" * (60 * 1024 * 1024)
    with main.client(timeout=60) as client:
        for attempt in range(20):
            assert client.get("/healthz").status_code == 200
            answer = client.post(
                "/v1/embeddings", content=upload, headers={"Content-Type": "application/json"}
            )
            assert answer.status_code == 413, attempt
            assert answer.json()["error"]["code"] == "body_too_large", attempt


def test_a_client_still_sending_after_a_413_is_read_not_reset(main: Served) -> None:
    """The server answers from Content-Length, then reads and discards the rest of the body:
    the client's writes all succeed, and it reads the whole answer, then the server's close."""
    declared = 8 * 1024 * 1024
    sock = connect(
        main,
        b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (64 * 1024 * 1024),
    )
    chunk = b"x" * (256 * 1024)
    for _ in range(declared // len(chunk)):
        sock.sendall(chunk)  # a reset would make one of these fail
        time.sleep(0.005)
    sock.shutdown(socket.SHUT_WR)  # done sending: the server's lingering ends on it
    status, headers, body = parse(read_to_end(sock, timeout=SLACK)[0])
    sock.close()
    assert status == 413
    assert headers["connection"] == "close"
    assert body["error"]["code"] == "body_too_large"


def test_a_lingering_close_ends_when_the_client_falls_silent(
    make_server: ServerFactory, wait_for: WaitFor
) -> None:
    served = make_server(fake_embedding_spec("fake/e"), body_timeout=1.0, max_body_bytes=1024)
    baseline = metric(served, "limner_http_connections_open")
    sock = connect(
        served,
        b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999\r\n\r\n",
    )
    try:
        status = parse(read_to_end(sock, timeout=SLACK)[0])[0]
        assert status == 413
        # The client neither sends nor closes: the server's side closes at body_timeout.
        wait_for(
            lambda: metric(served, "limner_http_connections_open") <= baseline,
            timeout=1.0 + SLACK,
            what="the lingering connection to close",
        )
    finally:
        sock.close()


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/models", "/metrics", "/"])
def test_head_answers_as_get_without_a_body(main: Served, path: str) -> None:
    with main.client() as client:
        got = client.get(path)
        head = client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


def test_head_on_a_post_route_is_405(main: Served) -> None:
    with main.client() as client:
        assert client.head("/v1/embeddings").status_code == 405


def test_settings_refuse_bad_connection_limits() -> None:
    from limner.server import ServerSettings

    bad: tuple[tuple[str, Any], ...] = (
        ("header_timeout", 0),
        ("body_timeout", float("inf")),
        ("body_timeout", True),
        ("max_connections", 0),
    )
    for field, value in bad:
        with pytest.raises(ValueError, match=field):
            ServerSettings(**{field: value})


def test_an_app_not_made_by_create_app_has_no_protocol() -> None:
    from fastapi import FastAPI

    from limner.server import http_protocol

    with pytest.raises(TypeError, match="create_app"):
        http_protocol(FastAPI())


def test_a_websocket_upgrade_is_refused_and_leaves_no_connection_counted(
    make_server: ServerFactory, wait_for: WaitFor
) -> None:
    served = make_server(fake_embedding_spec("fake/e"), header_timeout=1.0, body_timeout=1.0)
    sock = connect(
        served,
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
    )
    raw, _ = read_to_end(sock, timeout=SLACK)
    sock.close()
    assert raw.startswith(b"HTTP/1.1 403 ")  # the app serves no WebSocket
    assert b"408" not in raw  # no deadline of the HTTP connection fired on it
    wait_for(
        lambda: metric(served, "limner_http_connections_open") == 1,  # the scrape's own
        what="the upgraded connection to leave the count",
    )
