"""``limner serve --runtime ray``; a runtime that starts Ray and leaves nothing behind; a
cluster of two nodes. Each cluster here runs in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from limner.ray import RayRuntime

from .conftest import import_ray, ray_environment


def test_serve_takes_the_ray_runtime_and_its_address(monkeypatch: pytest.MonkeyPatch) -> None:
    import_ray()
    pytest.importorskip("fastapi", reason="`limner serve` needs the server extra")
    import uvicorn

    from limner import _cli

    apps: list[Any] = []

    def run(server: uvicorn.Server, sockets: Any = None) -> None:  # serves nothing
        apps.append(server.config.app)
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    pytest.importorskip("limner_clip", reason="preloads the CLIP plugin's tiny model")
    arguments = ["serve", "--port", "0", "--runtime", "ray", "--address", "ray://head:10001"]
    arguments.append("--no-ui")
    result = CliRunner().invoke(_cli.cli, [*arguments, "--preload", "limner/tiny-clip"])
    assert result.exit_code == 0, result.output
    [app] = apps
    runtime = app.state.limner.settings.runtime()
    assert isinstance(runtime, RayRuntime) and runtime.address == "ray://head:10001"
    # A preloaded key keeps a replica, as the pool keeps it loaded.
    assert runtime.options_per_key["limner/tiny-clip"].min_replicas == 1
    refused = CliRunner().invoke(_cli.cli, ["serve", "--address", "auto"])
    assert refused.exit_code == 2 and "--address needs --runtime ray" in refused.output


def test_a_runtime_that_started_ray_leaves_no_ray_process_behind(
    tmp_path: Path, ray_temp_dir: str
) -> None:
    """In a process of its own: `async with RayRuntime()` starts a local cluster, serves a
    call, and on leaving the block (not at the process's exit) ends every process Ray
    started."""
    import_ray()
    script = textwrap.dedent(
        """
        import time
        import anyio, psutil
        from PIL import Image
        from limner import Registry
        from limner.ray import RayKeyOptions, RayRuntime
        from limner.testing import fake_embedding_spec

        registry = Registry(entry_points=False)
        registry.register(fake_embedding_spec("fake/embedder"))

        async def main():
            init = {"num_cpus": 1, "include_dashboard": False, "log_to_driver": False,
                    "object_store_memory": 80 * 1024 * 1024}
            runtime = RayRuntime(init_options=init, options=RayKeyOptions(num_cpus=0.5))
            async with runtime:
                model = registry.embedder("fake/embedder").using(runtime)
                rows = await model.embed_images([Image.new("RGB", (8, 8))])
                children = psutil.Process().children(recursive=True)
            print("rows", rows.shape, "children", len(children))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                alive = [c for c in children if c.is_running() and c.status() != "zombie"]
                if not alive:
                    break
                time.sleep(0.2)
            print("alive", [" ".join(c.cmdline()[:2]) for c in alive])

        anyio.run(main)
        """
    )
    environment = {**os.environ, **ray_environment(tmp_path, ray_temp_dir)}
    environment.pop("RAY_ADDRESS", None)
    environment.pop("RAY_AUTH_MODE", None)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    rows = next(line for line in lines if line.startswith("rows"))
    assert rows.startswith("rows (1, 8) children ")
    assert int(rows.split()[-1]) >= 3  # the GCS, the raylet, the replica, Serve's controller
    assert "alive []" in lines, done.stdout


def test_a_model_that_fits_only_the_second_node_goes_there(
    tmp_path: Path, ray_temp_dir: str
) -> None:
    """Two nodes of one core: the head with 400 MB for models, the second with 2000 MB. A
    1000 MB model lands on the second; one of 3000 MB fits neither, and says so."""
    import_ray()
    script = textwrap.dedent(
        """
        import anyio, ray
        from ray.cluster_utils import Cluster
        from limner import MemoryExhausted, Registry
        from limner.ray import RayKeyOptions, RayRuntime
        from limner.testing import fake_embedding_spec

        MB = 1024 * 1024
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "memory": 400 * MB, "object_store_memory": 80 * MB,
            "include_dashboard": False})
        second = cluster.add_node(num_cpus=1, memory=2000 * MB, object_store_memory=80 * MB)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        registry = Registry(entry_points=False)
        registry.register(fake_embedding_spec("fake/1000", memory_mb=1000))
        registry.register(fake_embedding_spec("fake/3000", memory_mb=3000))

        async def main():
            async with RayRuntime(options=RayKeyOptions(num_cpus=0.5)) as runtime:
                await registry.embedder("fake/1000").using(runtime).embed_text("a fox")
                node = await runtime.replica_node("fake/1000")
                print("second" if node == second.node_id else f"elsewhere {node}")
                try:
                    await registry.embedder("fake/3000").using(runtime).embed_text("a fox")
                except MemoryExhausted as error:
                    print("refused:", error)

        try:
            anyio.run(main)
        finally:
            ray.shutdown()
            cluster.shutdown()
        """
    )
    environment = {**os.environ, **ray_environment(tmp_path, ray_temp_dir)}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        environment.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "second" in lines, done.stdout
    assert (
        "refused: Cannot place a replica of fake/3000 on the cluster: it needs 3,000 MB of "
        "memory, the largest node has 2,000 MB. Add a node that large, or lower the key's "
        "RayKeyOptions."
    ) in lines, done.stdout
