"""A bounded soak of `limner serve` as a hostile and a normal client would use it.

Starts `limner serve` (a real process, 127.0.0.1, the tiny CLIP and tiny FLUX models), then
sends a mix of good and bad requests from concurrent clients for ``--seconds``: texts,
images as data URLs, oversized and zero-sized images, an ICO hiding a large PNG, texts over
the limit, malformed bodies, streamed generations that the client abandons midway. Every
request must be answered (a status, never a lost connection) and no answer may be a 500.

Prints: requests by status, lost requests, the server's RSS after warm-up and at the end,
and its thread count before and after.

    HF_HUB_OFFLINE=1 python benchmarks/http_soak.py --seconds 60 --clients 16
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import psutil
from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def data_url(image: Image.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg"}[kind]
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def ico_bomb(side: int = 6000) -> str:
    """An ICO whose directory says 16x16 but whose entry is a ``side`` x ``side`` PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (5, 5, 5)).save(buffer, "PNG", compress_level=9)
    png = buffer.getvalue()
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return "data:image/x-icon;base64," + base64.b64encode(header + entry + png).decode("ascii")


def requests_mix(rng: random.Random) -> list[tuple[str, str, dict[str, object]]]:
    good_image = data_url(Image.new("RGB", (320, 240), (rng.randrange(256), 40, 90)), "JPEG")
    return [
        ("embed text", "/v1/embeddings", {"model": "limner/tiny-clip", "input": "a red fox"}),
        ("embed image", "/v1/embeddings", {"model": "limner/tiny-clip", "input": [good_image]}),
        (
            "embed batch",
            "/v1/embeddings",
            {"model": "limner/tiny-clip", "input": [good_image] * 40 + ["a dog"] * 40},
        ),
        (
            "truncated image",
            "/v1/embeddings",
            {"model": "limner/tiny-clip", "input": [data_url(Image.new("RGB", (1, 1)))[:40]]},
        ),
        ("ico bomb", "/v1/embeddings", {"model": "limner/tiny-clip", "input": [BOMB]}),
        (
            "text too long",
            "/v1/embeddings",
            {"model": "limner/tiny-clip", "input": ["x" * 20_000]},
        ),
        (
            "stream as string",
            "/v1/images/generations",
            {"model": "limner/tiny-flux", "prompt": "a", "stream": "no"},
        ),
        (
            "generate",
            "/v1/images/generations",
            {"model": "limner/tiny-flux", "prompt": "a lighthouse", "size": "64x64", "steps": 2},
        ),
        ("unknown model", "/v1/embeddings", {"model": "nope/nope", "input": "x"}),
    ]


BOMB = ico_bomb()


def client_loop(
    url: str, deadline: float, seed: int, statuses: collections.Counter[str], lost: list[str]
) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120.0) as client:
        while time.monotonic() < deadline:
            name, path, body = rng.choice(requests_mix(rng))
            try:
                if rng.random() < 0.1:  # a streamed generation the client leaves after one event
                    stream_body = {
                        "model": "limner/tiny-flux",
                        "prompt": "x",
                        "steps": 20,
                        "stream": True,
                        "stream_format": "limner",  # an event per step: left after the first
                    }
                    with client.stream(
                        "POST", "/v1/images/generations", json=stream_body
                    ) as response:
                        next(response.iter_lines())
                        statuses[f"{response.status_code} abandoned stream"] += 1
                    continue
                if rng.random() < 0.05:
                    response = client.post(
                        path, content=b"{not json", headers={"Content-Type": "application/json"}
                    )
                    name = "malformed body"
                else:
                    response = client.post(path, json=body)
                statuses[f"{response.status_code} {name}"] += 1
            except httpx.HTTPError as error:
                lost.append(f"{name}: {error!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=10.0)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": os.environ.get("HF_HOME", tempfile.mkdtemp()),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "limner",
            "serve",
            "--port",
            str(port),
            "--models",
            "limner/tiny-clip,limner/tiny-flux",
            "--preload",
            "limner/tiny-clip,limner/tiny-flux",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        process = psutil.Process(server.pid)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("the server never became ready")
        threads_before = process.num_threads()

        statuses: collections.Counter[str] = collections.Counter()
        lost: list[str] = []

        def run(seconds: float, seed: int) -> None:
            end = time.monotonic() + seconds
            workers = [
                threading.Thread(target=client_loop, args=(url, end, seed + i, statuses, lost))
                for i in range(args.clients)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()

        run(args.warmup, 1000)
        rss_warm = process.memory_info().rss / 2**20
        statuses.clear()
        samples: list[float] = []
        sampling = threading.Event()

        def sample() -> None:  # RSS every 10 s: a leak climbs, a warm heap levels off
            while not sampling.wait(10.0):
                samples.append(process.memory_info().rss / 2**20)

        sampler = threading.Thread(target=sample)
        sampler.start()
        run(args.seconds, 0)
        sampling.set()
        sampler.join()
        time.sleep(1.0)
        rss_end = process.memory_info().rss / 2**20
        threads_after = process.num_threads()

        total = sum(statuses.values())
        print(f"requests: {total} in {args.seconds:.0f} s from {args.clients} clients")
        for status, count in sorted(statuses.items()):
            print(f"  {count:6d}  {status}")
        print(f"lost (no answer): {len(lost)}")
        for item in lost[:10]:
            print("   ", item)
        print(
            f"server RSS after warm-up {rss_warm:.0f} MB, at the end {rss_end:.0f} MB "
            f"(growth {rss_end - rss_warm:+.0f} MB)"
        )
        print("server RSS every 10 s:", " ".join(f"{mb:.0f}" for mb in samples), "MB")
        print(f"server threads before {threads_before}, after {threads_after}")
        if lost or any(status.startswith("500") for status in statuses):
            raise SystemExit(1)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
