"""``limner serve --runtime ray``; a runtime that starts Ray and leaves nothing behind; a
cluster of two nodes. Each cluster here runs in a process of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from click.testing import CliRunner

from limner.ray import RayRuntime

from .conftest import import_ray, ray_environment

pytestmark = pytest.mark.ray  # clusters of their own, in processes of their own


def test_serve_takes_the_ray_runtime_and_its_address(served_apps: list[Any]) -> None:
    import_ray()
    pytest.importorskip("fastapi", reason="`limner serve` needs the server extra")
    from limner import _cli

    pytest.importorskip("limner_clip", reason="preloads the CLIP plugin's tiny model")
    arguments = ["serve", "--port", "0", "--runtime", "ray", "--address", "ray://head:10001"]
    arguments += ["--no-ui", "--memory-budget", "10MB"]
    result = CliRunner().invoke(_cli.cli, [*arguments, "--preload", "limner/tiny-clip"])
    assert result.exit_code == 0, result.output
    [app] = served_apps
    runtime = app.state.limner.settings.runtime()
    assert isinstance(runtime, RayRuntime) and runtime.address == "ray://head:10001"
    # A preloaded key keeps a replica, as the pool keeps it loaded.
    kept = runtime.options_per_key["limner/tiny-clip"]
    assert kept.min_replicas == 1
    # The budget is each replica's pool's, every key's.
    assert runtime.options.pool_options == kept.pool_options == {"memory_budget_mb": 10.0}
    assert runtime.on_control_plane_lost is not None
    refused = CliRunner().invoke(_cli.cli, ["serve", "--address", "auto"])
    assert refused.exit_code == 2 and "--address needs --runtime ray" in refused.output


def test_a_runtime_that_started_ray_leaves_no_ray_process_behind(
    tmp_path: Path, ray_temp_dir: str
) -> None:
    """In a process of its own: `async with RayRuntime()` starts a local cluster, serves a
    call, and on leaving the block (not at the process's exit) ends every process Ray
    started."""
    import_ray()
    script = """
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
    lines = run_script(script, tmp_path, ray_temp_dir)
    rows = next(line for line in lines if line.startswith("rows"))
    assert rows.startswith("rows (1, 8) children ")
    assert int(rows.split()[-1]) >= 3  # the GCS, the raylet, the replica, Serve's controller
    assert "alive []" in lines, lines


def test_a_model_that_fits_only_the_second_node_goes_there(
    tmp_path: Path, ray_temp_dir: str
) -> None:
    """Two nodes of one core: the head with 400 MB for models, the second with 2000 MB. A
    1000 MB model lands on the second; one of 3000 MB fits neither, and says so."""
    import_ray()
    script = """
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
    lines = run_script(script, tmp_path, ray_temp_dir)
    assert "second" in lines, lines
    assert (
        "refused: Cannot place a replica of fake/3000 on the cluster: it needs 3,000 MB of "
        "memory, the largest node has 2,000 MB. Add a node that large, or lower the key's "
        "RayKeyOptions."
    ) in lines, lines


def run_script(script: str, home: Path, temp_dir: str) -> list[str]:
    """Run ``script`` in a Python process of its own, with a Ray home and temp dir of its
    own and no cluster to join; it must succeed. Its output, line by line."""
    environment = {**os.environ, **ray_environment(home, temp_dir)}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        environment.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


@pytest.mark.parametrize("process", ["gcs_server", pytest.param("raylet", marks=pytest.mark.slow)])
def test_serve_says_when_its_cluster_s_control_plane_is_gone_and_exits(
    process: str, tmp_path: Path, ray_temp_dir: str
) -> None:
    """`limner serve --runtime ray` starts a local cluster, and its --memory-budget reaches
    the replicas' pools (tiny-clip's 41 MB do not fit 10 MB). The test then kills that
    cluster's GCS (or raylet) by PID, as a machine-wide `ray stop` would: /readyz answers 503
    naming the control plane at once, and the server says why and exits with status 1
    after `control_plane_timeout` (10 s) and its shutdown (30 s at most), before Ray would
    end it (60 s, silently)."""
    import_ray()
    pytest.importorskip("fastapi", reason="`limner serve` needs the server extra")
    pytest.importorskip("limner_clip", reason="serves the CLIP plugin's tiny model")
    environment = {**os.environ, **ray_environment(tmp_path, ray_temp_dir), "HF_HUB_OFFLINE": "1"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        environment.pop(name, None)
    command = [sys.executable, "-m", "limner", "serve", "--runtime", "ray", "--port", "0"]
    command += ["--no-ui", "--models", "limner/tiny-clip", "--memory-budget", "10MB"]
    server = subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(server.stderr.readline, "")))  # type: ignore[union-attr]
    reader.start()
    cluster: list[psutil.Process] = []
    try:
        url = wait_for_line(lines, r"running on (http://\S+)", server)
        cluster = psutil.Process(server.pid).children(recursive=True)
        with httpx.Client(base_url=url, timeout=120) as client:
            assert client.get("/readyz").status_code == 200
            refused = client.post(
                "/v1/embeddings", json={"model": "limner/tiny-clip", "input": "a fox"}
            )
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "memory_exhausted" and "place a replica" not in error["message"]

            [target] = [p for p in cluster if p.name() == process]
            target.kill()
            killed = time.monotonic()
            while True:
                ready = client.get("/readyz")
                if ready.status_code == 503:
                    break
                assert server.poll() is None and time.monotonic() - killed < 60, ready.text
                time.sleep(0.1)
            not_ready = time.monotonic() - killed
            assert server.poll() is None  # said while it still served
            error = ready.json()["error"]
            assert error["code"] == "runtime_unavailable" and "control plane" in error["message"]
        status = server.wait(timeout=120)
        exited = time.monotonic() - killed
        reader.join(timeout=10)
        print(f"{process} killed: not ready after {not_ready:.1f} s, exited after {exited:.1f} s")
        log = "".join(lines)
        assert status == 1, log[-3000:]
        assert "lost the Ray cluster's control plane" in log, log[-3000:]
        stopped = "Error: the server stopped: lost the Ray cluster's control plane" in log
        assert stopped or "exiting now" in log, log[-3000:]  # or: shutting down took 30 s
        assert exited < 55, log[-3000:]  # limner's exit, not Ray's own after 60 s
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for leftover in cluster:  # what remains of the cluster this test had started
            if leftover.is_running():
                leftover.kill()


def wait_for_line(lines: list[str], pattern: str, process: subprocess.Popen[str]) -> str:
    """The first group of the first line of ``lines`` matching ``pattern``, once it came."""
    deadline = time.monotonic() + 180
    while True:
        for line in list(lines):
            found = re.search(pattern, line)
            if found:
                return found.group(1)
        assert process.poll() is None, "".join(lines)[-3000:]
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.1)
