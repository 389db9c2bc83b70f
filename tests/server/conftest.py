"""Real uvicorn servers on ephemeral loopback ports, and the registries they serve.

Each server runs in its own thread with its own event loop, on a socket bound here to port 0,
and tests talk to it with a real HTTP client. ``main`` is shared by the session: the tiny CLIP
(preloaded), fake models, and URL inputs trusted from 127.0.0.1 (the local test server).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi", reason="the server tests need the server extra")

import uvicorn  # after the skip, so that a missing extra skips cleanly
from fastapi import FastAPI

from limner import ModelSpec, Registry
from limner.plugin import ImageEmbeddingBackend
from limner.server import ServerSettings, create_app, http_protocol
from limner.testing import (
    FakeEmbeddingBackend,
    fake_embedding_spec,
    fake_generation_spec,
)

TINY_CLIP = "limner/tiny-clip"


class ImageOnlyBackend(FakeEmbeddingBackend):
    """The fake embedder without a text tower, like an image-only model."""

    embed_texts = ImageEmbeddingBackend.embed_texts


def image_only_spec(key: str = "fake/images-only") -> ModelSpec:
    return dataclasses.replace(fake_embedding_spec(key), factory=ImageOnlyBackend)


@dataclass
class Served:
    """A running server: its base URL, the app, and the registry behind it."""

    url: str
    app: FastAPI
    registry: Registry
    server: uvicorn.Server

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30.0), **kwargs)

    def pool(self, key: str) -> dict[str, Any]:
        """The pool's stats for ``key``, as the server reports them (``{}`` before first use)."""
        with self.client(headers=self.auth) as client:
            models = client.get("/v1/pool").json()["models"]
        found: dict[str, Any] = next((m for m in models if m["key"] == key), {})
        return found

    @property
    def auth(self) -> dict[str, str]:
        key = self.app.state.limner.settings.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


def wait_for(condition: Callable[[], bool], *, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.01)


@contextmanager
def serve(app: FastAPI, registry: Registry) -> Iterator[Served]:
    """Run ``app`` under uvicorn on 127.0.0.1:<ephemeral> until the block ends, with limner's
    connection layer (``http_protocol``), as ``limner serve`` runs it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http=http_protocol(app),
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=5,
        access_log=False,
        # Longer than any pause in a test, so the server never closes a pooled keep-alive
        # connection just as the client reuses it (a ReadError on a loaded machine).
        timeout_keep_alive=60,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), what="uvicorn to start")
        if not server.started:
            raise RuntimeError("the server failed to start; see the log above")
        yield Served(url=f"http://127.0.0.1:{port}", app=app, registry=registry, server=server)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


ServerFactory = Callable[..., Served]
Serve = Callable[[FastAPI, Registry], AbstractContextManager[Served]]


@pytest.fixture(name="serve", scope="session")
def serve_fixture() -> Serve:
    """``with serve(app, registry) as served:`` for fixtures of a wider scope."""
    return serve


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """``make_server(*specs, **settings)``: a fresh registry of ``specs``, served; stopped
    after the test."""
    with contextlib.ExitStack() as stack:

        def make(*specs: ModelSpec, registry: Registry | None = None, **settings: Any) -> Served:
            if registry is None:
                registry = Registry(entry_points=False)
                for spec in specs:
                    registry.register(spec)
            app = create_app(registry=registry, settings=ServerSettings(**settings))
            return stack.enter_context(serve(app, registry))

        yield make


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh, offline Hugging Face cache: the tiny models are written there on first load."""
    cache = tmp_path_factory.mktemp("hf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        for name in ("LIMNER_MODELS_DIR", "LIMNER_DEVICE", "LIMNER_DTYPE"):
            patch.delenv(name, raising=False)
        yield cache


MAIN_SPECS = (
    fake_embedding_spec("fake/embedder", dimension=8),
    image_only_spec(),
    fake_generation_spec("fake/generator"),
    fake_generation_spec("fake/failing", options={"fail_at_step": 2}),
)


@pytest.fixture(scope="session")
def main(hf_cache: Path) -> Iterator[Served]:
    """The shared server: tiny CLIP preloaded, fakes, 127.0.0.1 trusted for URL inputs."""
    limner_clip = pytest.importorskip("limner_clip")
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_clip)
    for spec in MAIN_SPECS:
        registry.register(spec)
    registry.register(fake_embedding_spec("fake/hidden"))  # registered, not served
    settings = ServerSettings(
        models=[TINY_CLIP, *(spec.key for spec in MAIN_SPECS)],
        preload=[TINY_CLIP],
        trusted_hosts=["127.0.0.1"],
        max_inputs=64,
    )
    with serve(create_app(registry=registry, settings=settings), registry) as served:
        with served.client() as client:
            wait_for(
                lambda: client.get("/readyz").status_code == 200,
                timeout=120,
                what="the tiny CLIP to preload",
            )
        yield served


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI error object of an error answer; fails if the body is not that shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


ErrorOf = Callable[[httpx.Response], dict[str, Any]]
WaitFor = Callable[..., None]


@pytest.fixture(name="wait_for", scope="session")
def wait_for_fixture() -> WaitFor:
    """``wait_for(condition, timeout=10, what="")``: poll until true, else fail."""
    return wait_for


@pytest.fixture(name="error_of", scope="session")
def error_of_fixture() -> ErrorOf:
    return error_of
