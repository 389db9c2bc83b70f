"""`limner serve` against infinity_emb over HTTP, and against the same pool in process:
same model directory, same images, same client.

Writes a real-size random-weight ViT-B/32 (``clip_e2e.write_model``, plus the tiny CLIP's
tokenizer files, which both servers' loaders want) and seeded JPEGs, then starts both
servers on 127.0.0.1, each on its defaults (limner: ``dtype=auto``; infinity_emb: its torch
engine on the CPU), and sends each, alternately, the same requests as data URLs:

1. ``--requests`` concurrent single-image requests: throughput, median of ``--repeats``;
2. one request at a time: p50 latency of ``--latency-samples``.

Between them, the in-process column: the same requests as ``embed_images([data_url])``
calls on a limner pool in this process (the same model directory, dtype and malloc arenas
as ``limner serve``), what a host application gets without HTTP. Served / in process is what
HTTP costs (goal >= 0.9x at 32 concurrent), each served burst paired with an in-process one
run just before or after it; the servers sit idle while it runs, and it while they do.

infinity_emb is not a dependency of limner: install it in a venv of its own and pass its
``infinity_emb`` script. Without its ``vision`` extra's torchvision (PyPI's build wants CUDA
torch), transformers loads CLIP fine:

    python -m venv /tmp/inf
    /tmp/inf/bin/pip install 'infinity-emb[server,torch,vision]==0.0.78' aiohttp
    /tmp/inf/bin/pip uninstall -y torchvision
    HF_HUB_OFFLINE=1 python benchmarks/peer_http.py --peer /tmp/inf/bin/infinity_emb
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from clip_e2e import machine, write_images, write_model  # benchmarks/ is on sys.path

import limner_clip
from limner import ImageEmbedder, Pool, Registry
from limner.server._heap import limit_malloc_arenas
from limner_clip._tiny import ensure_tiny_clip

KEY = "openai/clip-vit-base-patch32"
IN_PROCESS = "in process"
JSON = {"Content-Type": "application/json"}
Body = Mapping[str, object]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server for {url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s")


async def one(client: httpx.AsyncClient, url: str, body: bytes) -> None:
    response = await client.post(url, content=body, headers=JSON, timeout=300)
    response.raise_for_status()
    assert len(response.json()["data"]) == 1


async def burst(url: str, bodies: Sequence[bytes]) -> float:
    """Seconds for one request per body, all at once, each on a connection of its own."""
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(limits=limits) as client:  # its TLS setup is not timed
        started = time.perf_counter()
        await asyncio.gather(*(one(client, url, body) for body in bodies))
        return time.perf_counter() - started


def encoded(body: Body) -> bytes:
    """A request body as a load generator sends it: serialised once, before any timing, so
    the client's own JSON encoding (about 0.2 ms a 130 KB body here) is not timed."""
    return json.dumps(body).encode()


async def in_process_burst(model: ImageEmbedder, urls: Sequence[str]) -> float:
    """The same single-image requests as calls on the pool in this process."""
    started = time.perf_counter()
    results = await asyncio.gather(*(model.embed_images([url]) for url in urls))
    elapsed = time.perf_counter() - started
    assert all(result.shape[0] == 1 for result in results)
    return elapsed


def served_batches(url: str) -> int:
    """How many forward batches the limner server has run for the model so far."""
    models = httpx.get(f"{url}/v1/pool", timeout=30).json()["models"]
    return int(next(stats["batches"] for stats in models if stats["key"] == KEY))


async def measure(
    args: argparse.Namespace,
    routes: Mapping[str, tuple[str, Sequence[bytes]]],
    urls: Sequence[str],
    weights: Path,
    limner_url: str,
) -> dict[str, Any]:
    """Every timed run, alternating: each server's bursts, then the pool in process."""
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_clip)
    registry.configure(KEY, local_dir=weights, dtype=args.dtype)
    async with Pool() as pool:
        model = registry.embedder(KEY).using(pool)
        for url, bodies in routes.values():  # warm-up: first loads, first batches
            await burst(url, bodies)
        await in_process_burst(model, urls)
        await in_process_burst(model, urls)
        bursts: dict[str, list[float]] = {name: [] for name in (*routes, IN_PROCESS)}
        waits: dict[str, list[float]] = {name: [] for name in routes}
        batches: dict[str, list[int]] = {"limner": [], IN_PROCESS: []}

        async def served() -> None:
            url, bodies = routes["limner"]
            before = served_batches(limner_url)
            bursts["limner"].append(await burst(url, bodies))
            batches["limner"].append(served_batches(limner_url) - before)

        async def in_process() -> None:
            before = pool.stats()[KEY].batches
            bursts[IN_PROCESS].append(await in_process_burst(model, urls))
            batches[IN_PROCESS].append(pool.stats()[KEY].batches - before)

        for repeat in range(args.repeats):  # alternating runs
            # limner served and in process back to back, first one then the other, so that
            # each pair meets the same load on a shared machine; then the peer.
            for run in (served, in_process) if repeat % 2 == 0 else (in_process, served):
                await run()
            for name, (url, bodies) in routes.items():
                if name != "limner":
                    bursts[name].append(await burst(url, bodies))
        for _ in range(args.latency_samples // 5):  # alternating runs of 5 requests
            for name, (url, bodies) in routes.items():
                waits[name] += await latency(url, bodies, 5)
        precision = str(getattr(model.backend, "dtype", None))
    return {"bursts": bursts, "waits": waits, "batches": batches, "precision": precision}


async def latency(url: str, bodies: Sequence[bytes], samples: int) -> list[float]:
    times = []
    async with httpx.AsyncClient() as client:
        for index in range(samples):
            started = time.perf_counter()
            await one(client, url, bodies[index % len(bodies)])
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", required=True, help="the peer's infinity_emb script")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-samples", type=int, default=20)
    parser.add_argument("--dtype", default="auto", help="limner's dtype (default auto)")
    parser.add_argument(
        "--peer-dtype", default="auto", help="infinity_emb's --dtype (default auto)"
    )
    args = parser.parse_args()
    limit_malloc_arenas(2)  # as `limner serve` does, before any thread allocates

    with tempfile.TemporaryDirectory(prefix="limner-peer-") as temp:
        root = Path(temp)
        (root / "images").mkdir()
        paths = write_images(root / "images", args.requests)
        models = root / "models"
        weights = models / KEY
        write_model(weights)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            shutil.copy(ensure_tiny_clip() / name, weights / name)
        urls = [
            "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
            for path in paths
        ]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "LIMNER_MODELS_DIR": str(models),
            "LIMNER_DTYPE": args.dtype,
        }
        limner_port, peer_port = free_port(), free_port()
        servers = {
            "limner": subprocess.Popen(
                [
                    *(sys.executable, "-m", "limner", "serve", "--port", str(limner_port)),
                    *("--models", KEY, "--preload", KEY, "--no-ui"),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            "infinity_emb": subprocess.Popen(
                [
                    *(args.peer, "v2", "--model-id", str(weights), "--port", str(peer_port)),
                    *("--device", "cpu", "--served-model-name", KEY, "--dtype", args.peer_dtype),
                ],
                env={**env, "INFINITY_ANONYMOUS_USAGE_STATS": "0"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        }
        try:
            wait_ready(f"http://127.0.0.1:{limner_port}/readyz", servers["limner"], 600)
            wait_ready(f"http://127.0.0.1:{peer_port}/health", servers["infinity_emb"], 600)
            routes = {
                "limner": (
                    f"http://127.0.0.1:{limner_port}/v1/embeddings",
                    [encoded({"model": KEY, "input": [url]}) for url in urls],
                ),
                "infinity_emb": (
                    f"http://127.0.0.1:{peer_port}/embeddings",
                    [encoded({"model": KEY, "input": [url], "modality": "image"}) for url in urls],
                ),
            }
            limner_url = f"http://127.0.0.1:{limner_port}"
            found = asyncio.run(measure(args, routes, urls, weights, limner_url))
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(timeout=30)

    bursts, waits, batches = found["bursts"], found["waits"], found["batches"]
    print(machine(f"limner {args.dtype} ({found['precision']}), infinity_emb {args.peer_dtype}"))
    n = args.requests
    rate = {name: n / statistics.median(times) for name, times in bursts.items()}
    p50 = {name: statistics.median(times) for name, times in waits.items()}
    for name in routes:
        print(
            f"{name:13s} {rate[name]:6.1f} img/s at {n} concurrent singles (median of "
            f"{args.repeats}); p50 {1000 * p50[name]:6.1f} ms at concurrency 1"
        )
    print(
        f"{IN_PROCESS:13s} {rate[IN_PROCESS]:6.1f} img/s at {n} concurrent singles (median "
        f"of {args.repeats}): the same pool, no HTTP"
    )
    print(
        f"limner / infinity_emb: throughput {rate['limner'] / rate['infinity_emb']:.2f}x, "
        f"p50 latency {p50['limner'] / p50['infinity_emb']:.2f}x"
    )
    # Each served burst against the in-process one beside it: a slow spell on a shared
    # machine moves both, so the median of these pairs is the figure to read.
    paired = [p / s for s, p in zip(bursts["limner"], bursts[IN_PROCESS], strict=True)]
    print(
        f"limner served / in process: throughput {statistics.median(paired):.2f}x, the median "
        f"of {len(paired)} runs side by side (goal >= 0.9x; the medians' ratio "
        f"{rate['limner'] / rate[IN_PROCESS]:.2f}x; run by run "
        f"{', '.join(f'{ratio:.2f}' for ratio in paired)})"
    )
    print(
        f"forward batches a run: served {', '.join(map(str, batches['limner']))}; in process "
        f"{', '.join(map(str, batches[IN_PROCESS]))}"
    )


if __name__ == "__main__":
    main()
