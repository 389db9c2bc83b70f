"""A local Ray cluster (2 CPUs, as CI has) per module of tests that need one, so that it
stops when they are done rather than at the end of the whole session.

Ray writes its token-auth file under the home directory, and its sessions (and, for a head
node, the address later `ray.init()` calls join) under /tmp/ray: the clusters here start
with ``HOME`` in a directory of this session's (Ray keeps its token per process) and Ray's
temp dir in one of each cluster's own, so they neither join nor leave behind anything
another process on the machine sees. The environment Ray changes is put
back when it stops. Usage stats are off, there is no dashboard and the replicas' logs stay
in their files.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from limner import Pool, Registry
from limner.ray import RayKeyOptions, RayRuntime
from limner.testing import fake_embedding_spec, fake_generation_spec

SERVE_URL = pytest.StashKey[str]()

NO_RAY = "needs ray[serve] (pip install 'limner[ray]'; the dev extra installs it)"

FAKE_OPTIONS = RayKeyOptions(num_cpus=0.25, min_replicas=1)
"""The fakes compute nothing: a quarter core each leaves the session's 2 for the tests that
place whole-core replicas."""


def import_ray() -> Any:
    with warnings.catch_warnings():  # Ray Serve's models emit pydantic deprecations
        warnings.simplefilter("ignore")
        ray = pytest.importorskip("ray", reason=NO_RAY)
        pytest.importorskip("ray.serve", reason=NO_RAY)
    return ray


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Ray's handles are asyncio's; one test runs the runtime on trio on its own."""
    return "asyncio"


def ray_environment(home: Path, temp_dir: str) -> dict[str, str]:
    """A cluster's home (its token file) and temp dir (its sessions, and the address a head
    node leaves for later `ray.init()` calls) of its own; no usage stats."""
    return {"HOME": str(home), "RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture
def ray_temp_dir() -> Iterator[str]:
    """Ray's temp dir for one cluster: short, since Ray puts Unix sockets in it."""
    path = tempfile.mkdtemp(prefix="limner-ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The home of every cluster this process starts: Ray keeps the auth token it made for
    the first in this process, and a later cluster's GCS must find that token's file."""
    return tmp_path_factory.mktemp("ray-home")


@pytest.fixture(scope="module")
def ray_cluster(
    ray_home: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[None]:
    """``ray.init(num_cpus=2)`` in this process, and Serve with its HTTP proxy on 127.0.0.1
    (:func:`serve_url`; the runtimes join this Serve as it is); shut down after the module."""
    ray = import_ray()
    if ray.is_initialized():
        pytest.skip("this process is already connected to a Ray cluster")
    home = ray_home
    temp_dir = tempfile.mkdtemp(prefix="limner-ray-", dir="/tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_AUTH_MODE", raising=False)  # Ray sets it; put back after
        patch.delenv("RAY_ADDRESS", raising=False)
        for name, value in ray_environment(home, temp_dir).items():
            patch.setenv(name, value)
        # The replicas inherit the cluster's environment: an offline cache of their own,
        # where the tiny models are written on first load, here and in the replicas alike.
        patch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        for name in ("LIMNER_MODELS_DIR", "LIMNER_DEVICE", "LIMNER_DTYPE"):
            patch.delenv(name, raising=False)
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=100 * 1024 * 1024,
            logging_level="WARNING",
        )
        from ray import serve

        try:
            port = free_port()
            serve.start(
                http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": "WARNING"},
            )
            request.config.stash[SERVE_URL] = f"http://127.0.0.1:{port}"
            yield
        finally:
            serve.shutdown()
            ray.shutdown()
            os.environ.pop("RAY_AUTH_MODE", None)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def serve_url(ray_cluster: None, request: pytest.FixtureRequest) -> str:
    """Where the module's cluster's Serve answers HTTP."""
    return request.config.stash[SERVE_URL]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fake_registry() -> Registry:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/embedder", dimension=8))
    registry.register(fake_generation_spec("fake/generator", options={"step_seconds": 0.02}))
    registry.register(fake_generation_spec("fake/slow", options={"step_seconds": 0.1}))
    registry.register(fake_generation_spec("fake/failing", options={"fail_at_step": 2}))
    registry.register(fake_embedding_spec("fake/failing-batch", options={"fail_on_batch_size": 3}))
    return registry


@pytest.fixture(scope="module")
def registry() -> Registry:
    return fake_registry()


@pytest.fixture
async def runtime(ray_cluster: None) -> Any:
    """A runtime over the session's cluster; its applications go when the test ends."""
    async with RayRuntime(options=FAKE_OPTIONS) as runtime:
        yield runtime


def png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 40)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def check_embeddings_over_http(client: httpx.AsyncClient) -> None:
    """A text and a data-URL image through ``/v1/embeddings``: the in-process pool's rows."""
    inputs = ["a red fox", png_data_url()]
    response = await client.post("/v1/embeddings", json={"model": "fake/embedder", "input": inputs})
    assert response.status_code == 200, response.text
    rows = np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
    image = Image.open(io.BytesIO(base64.b64decode(inputs[1].split(",", 1)[1])))
    async with Pool() as pool:
        model = fake_registry().embedder("fake/embedder").using(pool)
        expected = np.concatenate(
            [await model.embed_text(inputs[:1]), await model.embed_images([image.convert("RGB")])]
        )
    np.testing.assert_allclose(rows, expected, atol=1e-6)
