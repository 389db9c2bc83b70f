"""Shared fixtures: the anyio backend, a real local HTTP server with scripted routes, and the
apps `limner serve` would serve."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

RED = (255, 0, 0)


def png_bytes(size: tuple[int, int] = (8, 6), colour: tuple[int, int, int] = RED) -> bytes:
    """A small solid PNG, the body of the server's image routes."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass(frozen=True, kw_only=True)
class Route:
    """What the server answers on one path."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before answering (cut short when the server stops)."""
    location: str | None = None
    """Sent as the Location header (pair it with a 3xx status)."""
    content_length: bool = True
    """False sends the body chunked, with no Content-Length."""
    chunk_size: int = 16 * 1024
    chunk_delay: float = 0.0
    """Seconds between chunks of a chunked body: a slow drip."""
    repeat: int = 1
    """Send the body this many times, chunked: a large stream without a large fixture."""


@dataclass(frozen=True)
class Hit:
    """One request the server received."""

    path: str
    headers: dict[str, str]


class LocalHTTPServer:
    """A real HTTP/1.1 server on 127.0.0.1 whose routes tests register."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: list[Hit] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def route(
        self,
        path: str,
        *,
        status: int = 200,
        body: bytes = b"",
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        location: str | None = None,
        content_length: bool = True,
        chunk_size: int = 16 * 1024,
        chunk_delay: float = 0.0,
        repeat: int = 1,
    ) -> str:
        """Register (or replace) what ``path`` answers; returns its full URL."""
        all_headers = dict(headers or {})
        if content_type is not None:
            all_headers["Content-Type"] = content_type
        with self._lock:
            self.routes[path] = Route(
                status=status,
                body=body,
                headers=all_headers,
                delay=delay,
                location=location,
                content_length=content_length,
                chunk_size=chunk_size,
                chunk_delay=chunk_delay,
                repeat=repeat,
            )
        return self.url(path)

    def hits_for(self, prefix: str) -> list[str]:
        """Paths requested so far that start with ``prefix``, in order."""
        with self._lock:
            return [hit.path for hit in self.hits if hit.path.startswith(prefix)]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()  # wakes handlers sleeping in a delay
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _lookup(self, path: str, headers: dict[str, str]) -> Route | None:
        with self._lock:
            self.hits.append(Hit(path, headers))
            return self.routes.get(path.split("?", 1)[0])


def _handler_for(server: LocalHTTPServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle(self) -> None:
            try:
                super().handle()
            except ConnectionError:
                # The client went away mid-answer or between kept-alive requests (a timeout or
                # size limit under test): nothing is left to answer.
                self.close_connection = True

        def do_GET(self) -> None:
            route = server._lookup(self.path, dict(self.headers.items()))
            if route is None:
                route = Route(status=404, body=b"not found", headers={"Content-Type": "text/plain"})
            self._answer(route)

        def _answer(self, route: Route) -> None:
            if route.delay and server.stopping.wait(route.delay):
                self.close_connection = True
                return
            self.send_response(route.status)
            for name, value in route.headers.items():
                self.send_header(name, value)
            if route.location is not None:
                self.send_header("Location", route.location)
            if route.content_length and route.repeat == 1:
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(route.repeat):
                for start in range(0, len(route.body), route.chunk_size):
                    chunk = route.body[start : start + route.chunk_size]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    if route.chunk_delay and server.stopping.wait(route.chunk_delay):
                        self.close_connection = True
                        return
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, format: str, *args: object) -> None:
            """Silenced: requests are recorded in ``server.hits`` instead of stderr."""

    return Handler


@pytest.fixture(scope="session", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The core runs on anyio: every async core test runs on asyncio and on trio."""
    backend: str = request.param
    return backend


@pytest.fixture(scope="session")
def http_server() -> Iterator[LocalHTTPServer]:
    """A real local HTTP server with standard routes; tests may add their own paths.

    Standard routes: ``/image.png`` (8x6 red PNG), ``/image-octet`` (same, served as
    application/octet-stream), ``/image-untyped`` (no Content-Type), ``/page.html`` (text/html),
    ``/missing`` (404), ``/slow`` (answers after 5 s), ``/drip`` (an image body in small chunks
    0.05 s apart, 2 s in all), ``/large`` (2 MB with Content-Length), ``/large-chunked`` (2 MB
    chunked), ``/endless`` (about 1 GB chunked), ``/redirect/N`` (a chain of N redirects ending
    at ``/image.png``, for N up to 10), ``/redirect-relative`` (a relative Location),
    ``/redirect-file`` (to ``file:///etc/passwd``) and ``/redirect-ftp``.
    """
    server = LocalHTTPServer()
    image = png_bytes()
    server.route("/image.png", body=image, content_type="image/png")
    server.route("/image-octet", body=image, content_type="application/octet-stream")
    server.route("/image-untyped", body=image)
    server.route("/page.html", body=b"<html>hello</html>", content_type="text/html; charset=utf-8")
    server.route("/missing", status=404, body=b"gone", content_type="text/plain")
    server.route("/slow", body=image, content_type="image/png", delay=5.0)
    server.route(
        "/drip",
        body=image * 20,
        content_type="image/png",
        content_length=False,
        chunk_size=len(image) * 20 // 40,
        chunk_delay=0.05,
    )
    blob = bytes(range(256)) * 4096  # 1 MiB
    server.route("/large", body=blob * 2, content_type="image/png")
    server.route("/large-chunked", body=blob, content_type="image/png", repeat=2)
    server.route("/endless", body=blob, content_type="image/png", repeat=1024)
    for hops in range(1, 11):
        target = "/image.png" if hops == 1 else f"/redirect/{hops - 1}"
        server.route(f"/redirect/{hops}", status=302, location=target)
    server.route("/redirect-relative", status=301, location="image.png")
    server.route("/redirect-file", status=302, location="file:///etc/passwd")
    server.route("/redirect-ftp", status=307, location="ftp://127.0.0.1/image.png")
    server.start()  # the socket already listens, so no request can race the thread's start
    yield server
    server.stop()


@pytest.fixture
def served_apps(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The apps ``limner serve`` hands uvicorn, in order; uvicorn serves none of them (its
    ``Server.run`` is faked to return at once, as if the server had started and stopped)."""
    uvicorn = pytest.importorskip("uvicorn", reason="`limner serve` needs the server extra")
    apps: list[Any] = []

    def run(server: Any, sockets: Any = None) -> None:
        apps.append(server.config.app)
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    return apps


FLUX_LORAS = ("ink", "oil")
SD35_LORAS = ("tea", "moss")


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of tiny LoRA adapters, made with PEFT on the tiny models and saved as
    diffusers saves them, seeded: for limner/tiny-flux ``ink`` (rank 4, a folder) and ``oil``
    (rank 8, a file); for limner/tiny-sd35 ``tea`` (rank 4, a folder) and ``moss`` (rank 8, a
    file). Both tiny transformers are 32 wide: each family's adapters are the other's
    same-width wrong family."""
    pytest.importorskip("peft", reason="LoRA adapters need peft")
    flux = pytest.importorskip("limner_flux._backend")
    sd35 = pytest.importorskip("limner_sd35._backend")
    from limner.diffusion.testing import write_tiny_lora

    folder = tmp_path_factory.mktemp("loras")
    for seed, tiny, (first, second) in (
        (1, flux.FluxBackend.tiny, FLUX_LORAS),
        (3, sd35.SD35Backend.tiny, SD35_LORAS),
    ):
        write_tiny_lora(tiny, folder / first, rank=4, seed=seed)
        write_tiny_lora(tiny, folder / f"{second}.safetensors", rank=8, seed=seed + 1)
    return folder
