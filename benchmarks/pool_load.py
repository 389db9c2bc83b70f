"""The pool under load: a real-size ViT-B/32 (random weights) on this machine's CPU.

Three measurements, side by side in one process, on the same loaded weights, the runs of
each interleaved (a slow spell on a shared machine hits every path alike):

1. Throughput: ``--requests`` concurrent single-image requests through the pool, against
   the same images as one offline batch of direct backend calls (decode and preprocess each,
   then ``embed_prepared`` in batches of the key's max batch size), and against the same
   requests run one by one as direct calls.
2. Latency at concurrency 1: p50 of one request through the pool against p50 of the same
   direct call.
3. Event-loop lag while saturated: how late a 1 ms ticker wakes up, p99, during ``--repeats``
   more bursts of (1), run apart from the timed ones.

    python benchmarks/pool_load.py --requests 32 --repeats 5 [--dtype auto] [--malloc-arenas 2]

glibc gives each thread that allocates its own malloc arena. The pool runs the forward pass
on one of anyio's worker threads, and the one it gets changes from call to call, so its
activations can land in a cold arena each time: on 2 cores that made the same forward pass
about 15% slower in the pool than on the main thread. ``limner serve`` caps the arenas at 2;
``--malloc-arenas 2`` (or ``MALLOC_ARENA_MAX=2``) measures the pool as it runs there.

Goals, ratios that hold on any machine: pool >= 0.95x the offline batch, p50 <= 1.05x,
lag p99 <= 5 ms. (Against one-by-one calls the gain is whatever batching gains on the CPU.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import numpy as np
from clip_e2e import machine, write_images, write_model  # benchmarks/ is on sys.path

import limner_clip
from limner import ImageEmbedder, Pool, Registry
from limner.inputs import decode_image
from limner.plugin import ImageEmbeddingBackend
from limner.server._heap import limit_malloc_arenas

KEY = "openai/clip-vit-base-patch32"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def direct_call(backend: ImageEmbeddingBackend, path: Path) -> np.ndarray:
    """One request without a pool: decode, preprocess, embed, in the calling thread."""
    image = decode_image(path, draft_size=backend.image_size)
    return backend.embed_prepared([backend.prepare(image)])


def offline_batch(backend: ImageEmbeddingBackend, paths: list[Path], batch: int) -> None:
    """What a script does with the same images: decode and preprocess each, then embed them
    in batches of ``batch``, all in the calling thread."""
    prepared = [backend.prepare(decode_image(p, draft_size=backend.image_size)) for p in paths]
    for start in range(0, len(prepared), batch):
        backend.embed_prepared(prepared[start : start + batch])


async def burst(model: ImageEmbedder, paths: list[Path], *, lags: list[float] | None) -> float:
    """Seconds for one concurrent single-image request per path. With ``lags``, a 1 ms
    ticker runs on the loop meanwhile and records how late it wakes: it is kept out of the
    throughput runs, as its thousand wake-ups a second take turns from the model's threads."""
    done = anyio.Event()

    async def ticker(lags: list[float]) -> None:
        while not done.is_set():
            before = time.perf_counter()
            await anyio.sleep(0.001)
            lags.append(time.perf_counter() - before - 0.001)

    async with anyio.create_task_group() as group:
        if lags is not None:
            group.start_soon(ticker, lags)
        started = time.perf_counter()
        async with anyio.create_task_group() as requests:
            for path in paths:
                requests.start_soon(model.embed_image, path)
        elapsed = time.perf_counter() - started
        done.set()
    return elapsed


async def run(args: argparse.Namespace, paths: list[Path], model_dir: Path) -> None:
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_clip)
    registry.configure(KEY, local_dir=model_dir, dtype=args.dtype)
    max_batch = registry.spec(KEY).info.max_batch_size
    async with Pool() as pool:
        model = registry.embedder(KEY).using(pool)
        backend = model.backend
        await model.embed_image(paths[0])  # cold start, outside every timing
        stats = pool.stats()[KEY]
        print(
            f"model: {KEY} architecture, RANDOM weights, {stats.device}, "
            f"{stats.workers} worker(s), {stats.memory_mb:.0f} MB, loaded in "
            f"{stats.load_seconds:.1f} s"
        )
        print(machine(str(getattr(backend, "dtype", None))))
        arenas = os.environ.get("MALLOC_ARENA_MAX") or args.malloc_arenas or "glibc's default"
        print(f"malloc arenas: {arenas}")
        offline_batch(backend, paths, max_batch)  # warm the batch size up too

        sequential, offline, concurrent = [], [], []
        lags: list[float] = []
        batches_per_run = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for path in paths:
                direct_call(backend, path)
            sequential.append(time.perf_counter() - started)

            started = time.perf_counter()
            offline_batch(backend, paths, max_batch)
            offline.append(time.perf_counter() - started)

            batches_before = pool.stats()[KEY].batches
            concurrent.append(await burst(model, paths, lags=None))
            batches_per_run.append(pool.stats()[KEY].batches - batches_before)
        for _ in range(args.repeats):  # the loop's lag under the same load, measured apart
            await burst(model, paths, lags=lags)

        direct_latency, pool_latency = [], []
        for index in range(args.latency_samples):
            path = paths[index % len(paths)]
            started = time.perf_counter()
            direct_call(backend, path)
            direct_latency.append(time.perf_counter() - started)
            started = time.perf_counter()
            await model.embed_image(path)
            pool_latency.append(time.perf_counter() - started)
        stats = pool.stats()[KEY]

    n = len(paths)
    seq, con = statistics.median(sequential), statistics.median(concurrent)
    off = statistics.median(offline)
    print(f"throughput, {n} single-image requests (median of {args.repeats}):")
    print(f"  one by one, direct calls:  {n / seq:7.1f} img/s")
    print(f"  offline batch, direct:     {n / off:7.1f} img/s   (batches of {max_batch})")
    print(
        f"  concurrent, through pool:  {n / con:7.1f} img/s   {off / con:.2f}x the offline "
        f"batch (goal >= 0.95x), {seq / con:.2f}x one by one; forward batches a run: "
        f"{', '.join(map(str, batches_per_run))}"
    )
    per_run = ", ".join(f"{o / c:.2f}" for o, c in zip(offline, concurrent, strict=True))
    print(f"  pool / offline batch, run by run: {per_run}")
    p50_direct, p50_pool = percentile(direct_latency, 50), percentile(pool_latency, 50)
    print(f"latency at concurrency 1, p50 of {args.latency_samples}:")
    print(f"  direct call: {p50_direct * 1000:6.1f} ms")
    print(
        f"  via pool:    {p50_pool * 1000:6.1f} ms   ratio {p50_pool / p50_direct:.3f}x "
        f"(goal <= 1.05x)"
    )
    print(
        f"event-loop lag while saturated: p50 {percentile(lags, 50) * 1000:.2f} ms, "
        f"p99 {percentile(lags, 99) * 1000:.2f} ms, max {max(lags) * 1000:.2f} ms "
        f"over {len(lags)} ticks (goal p99 <= 5 ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-samples", type=int, default=30)
    parser.add_argument("--dtype", default="auto", help="auto (default), float32, int8, ...")
    parser.add_argument(
        "--malloc-arenas",
        type=int,
        default=0,
        help="cap glibc's malloc arenas, as `limner serve` does with 2 (default: glibc's own)",
    )
    args = parser.parse_args()
    if args.malloc_arenas:
        limit_malloc_arenas(args.malloc_arenas)  # before any thread allocates
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        paths = write_images(root, args.requests)
        model_dir = root / "vit-b-32-random"
        write_model(model_dir)
        anyio.run(run, args, paths, model_dir)


if __name__ == "__main__":
    main()
