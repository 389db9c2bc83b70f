"""`limner serve` against infinity_emb over HTTP: same model directory, same images, same client.

Writes a real-size random-weight ViT-B/32 (``clip_e2e.write_model``, plus the tiny CLIP's
tokenizer files, which both servers' loaders want) and seeded JPEGs, then starts both
servers on 127.0.0.1, each on its defaults (limner: ``dtype=auto``; infinity_emb: its torch
engine on the CPU), and sends each, alternately, the same requests as data URLs:

1. ``--requests`` concurrent single-image requests: throughput, median of ``--repeats``;
2. one request at a time: p50 latency of ``--latency-samples``.

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

import httpx
from clip_e2e import machine, write_images, write_model  # benchmarks/ is on sys.path

from limner_clip._tiny import ensure_tiny_clip

KEY = "openai/clip-vit-base-patch32"
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


async def one(client: httpx.AsyncClient, url: str, body: Body) -> None:
    response = await client.post(url, json=body, timeout=300)
    response.raise_for_status()
    assert len(response.json()["data"]) == 1


async def burst(url: str, bodies: Sequence[Body]) -> float:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, url, body) for body in bodies))
        return time.perf_counter() - started


async def latency(url: str, bodies: Sequence[Body], samples: int) -> list[float]:
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
                    [{"model": KEY, "input": [url]} for url in urls],
                ),
                "infinity_emb": (
                    f"http://127.0.0.1:{peer_port}/embeddings",
                    [{"model": KEY, "input": [url], "modality": "image"} for url in urls],
                ),
            }
            for url, bodies in routes.values():  # warm-up: first loads, first batches
                asyncio.run(burst(url, bodies))
            bursts: dict[str, list[float]] = {name: [] for name in routes}
            waits: dict[str, list[float]] = {name: [] for name in routes}
            for _ in range(args.repeats):  # alternating runs
                for name, (url, bodies) in routes.items():
                    bursts[name].append(asyncio.run(burst(url, bodies)))
            for _ in range(args.latency_samples // 5):  # alternating runs of 5 requests
                for name, (url, bodies) in routes.items():
                    waits[name] += asyncio.run(latency(url, bodies, 5))
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(timeout=30)

    print(machine(f"limner {args.dtype}, infinity_emb {args.peer_dtype}"))
    n = args.requests
    rate = {name: n / statistics.median(times) for name, times in bursts.items()}
    p50 = {name: statistics.median(times) for name, times in waits.items()}
    for name in routes:
        print(
            f"{name:13s} {rate[name]:6.1f} img/s at {n} concurrent singles (median of "
            f"{args.repeats}); p50 {1000 * p50[name]:6.1f} ms at concurrency 1"
        )
    print(
        f"limner / infinity_emb: throughput {rate['limner'] / rate['infinity_emb']:.2f}x, "
        f"p50 latency {p50['limner'] / p50['infinity_emb']:.2f}x"
    )


if __name__ == "__main__":
    main()
