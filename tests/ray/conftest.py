"""One local Ray cluster (2 CPUs, as CI has) for the tests that need one, all in one module,
so that it stops when they are done rather than at the end of the whole session.

Ray writes its token-auth file under the home directory, and its sessions (and, for a head
node, the address later `ray.init()` calls join) under /tmp/ray: each cluster here starts
with ``HOME`` and Ray's temp dir in directories of its own, so it neither joins nor leaves
behind anything another process on the machine sees. The environment Ray changes is put
back when it stops. Usage stats are off, there is no dashboard and the replicas' logs stay
in their files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from limner import Registry
from limner.ray import RayKeyOptions, RayRuntime
from limner.testing import fake_embedding_spec, fake_generation_spec

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


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``ray.init(num_cpus=2)`` in this process, shut down after the module."""
    ray = import_ray()
    if ray.is_initialized():
        pytest.skip("this process is already connected to a Ray cluster")
    home = tmp_path_factory.mktemp("ray-home")
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
        try:
            yield
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
            os.environ.pop("RAY_AUTH_MODE", None)
            shutil.rmtree(temp_dir, ignore_errors=True)


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
