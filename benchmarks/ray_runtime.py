"""The Ray runtime against the in-process pool, on a local cluster in this process.

1. Overhead per call: the median of ``--calls`` one-text embeds of the fake embedder (no
   model work) through ``Pool`` and through ``RayRuntime``; the difference is what the hop
   to a replica and back costs.
2. One tiny-clip image embed, end to end (decode here, embed in the replica), warm: median
   of ``--calls`` / 4 through each, and whether the vectors agree.
3. Scale to zero and back: a key with keep-alive 1 s, its time to zero replicas once idle,
   and the time from zero replicas to an answer.
4. With ``--throughput``: a real-size ViT-B/32 (random weights, written to a temp dir),
   ``--images`` concurrent single-image requests against 1 replica and 2 replicas of one
   core each.

    HF_HUB_OFFLINE=1 python benchmarks/ray_runtime.py --calls 200 [--throughput]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from PIL import Image

import limner
from limner import Pool, Registry
from limner.ray import RayKeyOptions, RayRuntime
from limner.testing import fake_embedding_spec

TINY = "limner/tiny-clip"
CLIP = "openai/clip-vit-base-patch32"


async def median_ms(call: Callable[[], Awaitable[Any]], count: int) -> float:
    await call()  # warm: deployed, loaded
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def overhead(calls: int) -> None:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/embedder"))
    model = registry.embedder("fake/embedder")
    async with Pool() as pool:
        local = await median_ms(lambda: model.using(pool).embed_text("a fox"), calls)
    async with RayRuntime(options=RayKeyOptions(num_cpus=0.5)) as runtime:
        remote = await median_ms(lambda: model.using(runtime).embed_text("a fox"), calls)
    print(
        f"1. overhead per call (fake embedder, one text, median of {calls}): pool "
        f"{local:.2f} ms, Ray {remote:.2f} ms: {remote - local:.2f} ms per call"
    )


async def tiny_clip(calls: int) -> None:
    image = Image.new("RGB", (640, 480), (200, 30, 40))
    model = limner.embedder(TINY)
    async with Pool() as pool:
        local = await median_ms(lambda: model.using(pool).embed_images([image]), calls)
        expected = await model.using(pool).embed_images([image])
    async with RayRuntime() as runtime:
        remote = await median_ms(lambda: model.using(runtime).embed_images([image]), calls)
        got = await model.using(runtime).embed_images([image])
    print(
        f"2. tiny-clip, one 640x480 image end to end (median of {calls}): pool {local:.1f} ms, "
        f"Ray {remote:.1f} ms; max |difference| {float(np.max(np.abs(got - expected))):.1e}"
    )


async def scale_from_zero() -> None:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/idle"))
    options = RayKeyOptions(num_cpus=1, keep_alive=1.0, upscale_delay_s=0.0)
    async with RayRuntime(options=options, refresh_interval=0.1) as runtime:
        model = registry.embedder("fake/idle").using(runtime)
        started = time.perf_counter()
        await model.embed_text("a fox")
        deployed = time.perf_counter() - started
        idle = time.perf_counter()
        while True:
            if not runtime.stats()["fake/idle"].workers:
                break
            await anyio.sleep(0.1)
        to_zero = time.perf_counter() - idle
        started = time.perf_counter()
        await model.embed_text("a fox")
        from_zero = time.perf_counter() - started
    print(
        f"3. a new key deployed and answered in {deployed:.1f} s; idle to zero replicas in "
        f"{to_zero:.1f} s (keep-alive 1 s); from zero replicas to an answer in {from_zero:.1f} s"
    )


async def throughput(images: int, repeats: int) -> None:
    from clip_e2e import write_images, write_model  # benchmarks/ is on sys.path when run

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_model(root / "model")
        paths = write_images(root, images)
        registry = Registry()
        registry.configure(CLIP, local_dir=root / "model")
        model = registry.embedder(CLIP)
        results = {}
        for replicas in (1, 2):
            options = RayKeyOptions(num_cpus=1, min_replicas=replicas, max_replicas=replicas)
            async with RayRuntime(options=options) as runtime:
                bound = model.using(runtime)
                await bound.embed_image(paths[0])
                await runtime.refresh()
                assert runtime.stats()[CLIP].workers == replicas
                runs = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    async with anyio.create_task_group() as group:
                        for path in paths:
                            group.start_soon(bound.embed_image, path)
                    runs.append(images / (time.perf_counter() - started))
                results[replicas] = statistics.median(runs)
    print(
        f"4. ViT-B/32 (random weights), {images} concurrent one-image requests, median of "
        f"{repeats}: 1 replica {results[1]:.1f} img/s, 2 replicas {results[2]:.1f} img/s "
        f"({results[2] / results[1]:.2f}x), one core each"
    )


async def main(args: argparse.Namespace) -> None:
    await overhead(args.calls)
    await tiny_clip(max(10, args.calls // 4))
    await scale_from_zero()
    if args.throughput:
        await throughput(args.images, args.repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        anyio.run(main, arguments)
    finally:
        ray.shutdown()
