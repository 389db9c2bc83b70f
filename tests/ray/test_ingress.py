"""limner's HTTP API as a Serve ingress deployment, over real HTTP through Serve's proxy on
127.0.0.1: decoding and the URL guard on the ingress replica, the model in its own app.
A module of its own, as Serve's proxy must start before any runtime starts Serve without."""

from __future__ import annotations

import functools
import socket
import sys
from collections.abc import Iterator

import httpx
import pytest

from limner.ray import RayRuntime, http_ingress

from .conftest import FAKE_OPTIONS, check_embeddings_over_http, fake_registry, import_ray

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s`:DeprecationWarning"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def ingress(ray_cluster: None) -> Iterator[str]:
    """The ingress app on one quarter-core replica, behind Serve's proxy on a free port."""
    pytest.importorskip("fastapi", reason="the ingress serves the server extra's app")
    ray = import_ray()
    from ray import serve

    from limner.server import ServerSettings

    # The replica unpickles the registry's factory: this module's conftest is no package
    # a worker could import, so it travels by value.
    conftest = sys.modules[fake_registry.__module__]
    ray.cloudpickle.register_pickle_by_value(conftest)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = http_ingress(
        settings=ServerSettings(ui=False),
        registry=fake_registry,
        runtime=functools.partial(RayRuntime, options=FAKE_OPTIONS),
        num_cpus=0.25,
    )
    try:
        serve.run(app, name="limner-http", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        ray.cloudpickle.unregister_pickle_by_value(conftest)
        serve.delete("limner-http")  # its runtime deletes the model's app as it stops
        assert not [name for name in serve.status().applications if name.startswith("limner:")]


async def test_the_http_api_answers_from_an_ingress_replica(ingress: str) -> None:
    async with httpx.AsyncClient(base_url=ingress, timeout=60) as client:
        await check_embeddings_over_http(client)
        # The URL guard runs on the ingress replica, before anything reaches the model.
        refused = await client.post(
            "/v1/embeddings",
            json={"model": "fake/embedder", "input": ["http://127.0.0.1:1/cat.png"]},
        )
        assert refused.status_code == 400 and "loopback" in refused.json()["error"]["message"]
        pool = (await client.get("/v1/pool")).json()["models"]
    assert [(model["key"], model["device"]) for model in pool] == [("fake/embedder", "ray")]
