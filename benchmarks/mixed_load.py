"""Several models under one memory budget, under the load a host application sends.

Tiny CLIP under several keys (the same weights, loaded separately, as different models
would be), with a budget set from their measured footprint so that they fit one at a time
(or, with ``--fit all``, all together). ``--clients`` closed-loop clients for ``--seconds``
in two patterns:

- ``cycle``: each client asks the models in turn (client i starts at model i), one request
  after the other;
- ``together``: every client asks the same model, all switching to the next every
  ``--switch`` seconds.

A refused request (429-like ``PoolBusy``, 503-like ``WaitTimeout``) is retried after its
``retry_after``. Then the same requests, as many per model as the mixed run answered, run
grouped by model one after another through the same budget (each model loaded once): the
ideal a scheduler can reach. Printed: each model's throughput and the total as a ratio of
the grouped run; p50/p99 of the wait (from a request to the start of the batch that answered
it) and of the time to the answer; swaps per minute; the share of refusals; and one model's
load time and one burst of ``--clients`` requests, for the goal.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/mixed_load.py --seconds 60 --clients 30 \
        [--images 1] [--models 3 --fit one|all] [--pattern both] [--repeats 1]

Goals: total >= 0.7x the grouped ideal; p99 wait <= 2x one model's load plus one batch.
The functions here (``drive``, ``tiny_clip_models``, ``budget_for``) are also what
tests/test_pool_mixed_load.py runs.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import numpy as np
from PIL import Image

from limner import ImageEmbedder, Pool, PoolBusy, PoolOptions, Registry, WaitTimeout

Pattern = Literal["cycle", "together"]
Status = Literal["ok", "busy", "timeout", "error"]

TINY_CLIP = "limner/tiny-clip"


@dataclass(frozen=True)
class Outcome:
    """One request: which model, when it was sent and answered (``perf_counter``), how."""

    key: str
    sent: float
    answered: float
    status: Status
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.answered - self.sent


Batches = list[tuple[str, float, float]]
"""Each batch a model ran: its key, when it started and ended (``perf_counter``)."""


def tiny_clip_models(count: int, batches: Batches | None = None) -> list[ImageEmbedder]:
    """``count`` models with the tiny CLIP's weights under keys of their own, so the pool
    loads, counts and swaps each as a model. With ``batches``, each batch run is logged
    there: a request's wait is from its sending to the start of the batch that answered it.
    """
    import limner_clip
    from limner_clip._backend import ClipBackend

    class LoggedClip(ClipBackend):
        def embed_prepared(self, items: Sequence[Any]) -> Any:
            began = time.perf_counter()
            try:
                return super().embed_prepared(items)
            finally:
                if batches is not None:
                    batches.append((self.spec.key, began, time.perf_counter()))

    registry = Registry(entry_points=False)
    registry.register_plugin(limner_clip)
    tiny = registry.spec(TINY_CLIP)
    keys = [f"mixed/tiny-clip-{chr(ord('a') + index)}" for index in range(count)]
    for key in keys:
        registry.register(dataclasses.replace(tiny, key=key, aliases=(), factory=LoggedClip))
    return [registry.embedder(key) for key in keys]


def waits(outcomes: Sequence[Outcome], batches: Batches) -> list[float]:
    """Seconds each answered request waited for the pool to start on it: to the start of
    the last batch of its model that ended before its answer."""
    ends: dict[str, list[tuple[float, float]]] = {}
    for key, began, ended in sorted(batches, key=lambda batch: batch[2]):
        ends.setdefault(key, []).append((ended, began))
    found = []
    for outcome in outcomes:
        if outcome.status != "ok" or outcome.key not in ends:
            continue
        runs = ends[outcome.key]
        index = bisect.bisect_right(runs, (outcome.answered, float("inf"))) - 1
        if index >= 0:
            found.append(max(0.0, runs[index][1] - outcome.sent))
    return found


async def footprint_mb(model: ImageEmbedder) -> tuple[float, float]:
    """What ``model`` holds once loaded (as the pool accounts it, all its workers) and what
    one worker needs: loaded once in a pool of its own with room to spare."""
    async with Pool(memory_budget_mb=100_000, memory_floor_mb=0) as pool:
        await model.using(pool).load()
        held = pool.stats()[model.key].memory_mb
        workers = pool.stats()[model.key].workers
    info = model.spec.info
    one = held - (workers - 1) * (info.worker_overhead_mb or held / workers)
    return held, one


def budget_for(held_mb: float, one_worker_mb: float, *, together: int) -> float:
    """A budget that holds ``together`` such models with all their workers and no more:
    half a worker short of one more."""
    return together * held_mb + one_worker_mb / 2


def _images(index: int, count: int) -> list[Image.Image]:
    return [
        Image.new("RGB", (64, 64), ((index * 37 + n) % 256, (index * 11) % 256, n % 256))
        for n in range(count)
    ]


async def drive(
    models: Sequence[ImageEmbedder],
    *,
    pattern: Pattern,
    clients: int,
    seconds: float,
    images: int = 1,
    switch_every: float = 5.0,
) -> list[Outcome]:
    """Closed-loop clients on ``models`` (bound to the pool to load) for ``seconds``; every
    request's outcome, the refused ones included (they are retried after ``retry_after``)."""
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    stop_at = started + seconds

    async def client(index: int) -> None:
        inputs, turn = _images(index, images), 0
        while (now := time.perf_counter()) < stop_at:
            if pattern == "cycle":
                model = models[(index + turn) % len(models)]
            else:
                model = models[int((now - started) / switch_every) % len(models)]
            pause = 0.0
            try:
                await model.embed_images(inputs)
                status: Status = "ok"
                detail = ""
                turn += 1
            except (PoolBusy, WaitTimeout) as refused:
                status = "busy" if isinstance(refused, PoolBusy) else "timeout"
                detail, pause = str(refused), refused.retry_after
            except Exception as error:  # counted, never fatal to the run
                status, detail = "error", repr(error)
            outcomes.append(Outcome(model.key, now, time.perf_counter(), status, detail))
            if pause:
                await anyio.sleep(min(pause, max(0.0, stop_at - time.perf_counter())))

    async with anyio.create_task_group() as group:
        for index in range(clients):
            group.start_soon(client, index)
    return outcomes


async def drive_grouped(
    models: Sequence[ImageEmbedder], counts: Counter[str], *, clients: int, images: int
) -> dict[str, float]:
    """The same number of requests per model, grouped: each model's requests by ``clients``
    closed-loop clients, one model after another. Seconds per model (its load included)."""
    took: dict[str, float] = {}
    for model in models:
        left = counts[model.key]
        began = time.perf_counter()

        async def client(index: int, model: ImageEmbedder = model) -> None:
            nonlocal left
            inputs = _images(index, images)
            while left > 0:
                left -= 1
                await model.embed_images(inputs)

        async with anyio.create_task_group() as group:
            for index in range(clients):
                group.start_soon(client, index)
        took[model.key] = time.perf_counter() - began
    return took


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def measure_one(model: ImageEmbedder, *, clients: int, images: int) -> tuple[float, float]:
    """One model's cold load and one full burst of ``clients`` requests on it, warm: median
    seconds of three."""
    loads, bursts = [], []
    for _ in range(3):
        async with Pool(memory_budget_mb=100_000, memory_floor_mb=0) as pool:
            bound = model.using(pool)
            began = time.perf_counter()
            await bound.load()
            loads.append(time.perf_counter() - began)
            await bound.embed_images(_images(0, images))
            began = time.perf_counter()
            async with anyio.create_task_group() as group:
                for index in range(clients):
                    group.start_soon(bound.embed_images, _images(index, images))
            bursts.append(time.perf_counter() - began)
    return statistics.median(loads), statistics.median(bursts)


async def run(arguments: argparse.Namespace) -> None:
    batches: Batches = []
    models = tiny_clip_models(arguments.models, batches)
    held, one = await footprint_mb(models[0])
    together = arguments.models if arguments.fit == "all" else 1
    budget = budget_for(held, one, together=together)
    load_s, batch_s = await measure_one(
        models[0], clients=arguments.clients, images=arguments.images
    )
    print(
        f"{arguments.models} models of {held:.0f} MB each (one worker {one:.0f} MB), budget "
        f"{budget:.0f} MB: {'all fit' if together > 1 else 'one fits at a time'}; "
        f"{arguments.clients} clients, {arguments.images} image(s) a request, "
        f"{arguments.seconds:g} s a pattern"
    )
    print(
        f"one model: cold load {load_s * 1000:.0f} ms, one burst of {arguments.clients} "
        f"requests {batch_s * 1000:.0f} ms; goal p99 <= 2 loads + one burst = "
        f"{(2 * load_s + batch_s) * 1000:.0f} ms"
    )
    patterns: list[Pattern] = (
        ["cycle", "together"] if arguments.pattern == "both" else [arguments.pattern]
    )
    options = PoolOptions(memory_budget_mb=budget, memory_floor_mb=0)
    goal = 2 * load_s + batch_s
    for pattern in patterns:
        ratios, p99s = [], []
        for repeat in range(arguments.repeats):
            batches.clear()
            ratio, p99 = await one_run(models, pattern, options, arguments, repeat, goal, batches)
            ratios.append(ratio)
            p99s.append(p99)
        if arguments.repeats > 1:
            print(
                f"\npattern {pattern}, median of {arguments.repeats}: ratio "
                f"{statistics.median(ratios):.2f}x (runs {', '.join(f'{r:.2f}' for r in ratios)}); "
                f"p99 wait {statistics.median(p99s) * 1000:.0f} ms = "
                f"{statistics.median(p99s) / goal:.2f}x the goal"
            )


async def one_run(
    models: Sequence[ImageEmbedder],
    pattern: Pattern,
    options: PoolOptions,
    arguments: argparse.Namespace,
    repeat: int,
    goal: float,
    batches: Batches,
) -> tuple[float, float]:
    """The mixed load, then the same requests grouped; prints the figures, returns the
    throughput ratio and the p99 wait (until the pool started on a request)."""
    async with Pool(options=options) as pool:
        outcomes = await drive(
            [model.using(pool) for model in models],
            pattern=pattern,
            clients=arguments.clients,
            seconds=arguments.seconds,
            images=arguments.images,
            switch_every=arguments.switch,
        )
        swaps = sum(stats.swaps for stats in pool.stats().values())
    waited = waits(outcomes, batches)
    answered = [o for o in outcomes if o.status == "ok"]
    counts = Counter(o.key for o in answered)
    mixed_s = max(o.answered for o in outcomes) - min(o.sent for o in outcomes)
    async with Pool(options=options) as pool:
        took = await drive_grouped(
            [model.using(pool) for model in models],
            counts,
            clients=arguments.clients,
            images=arguments.images,
        )
    grouped_s = sum(took.values())
    statuses = Counter(o.status for o in outcomes)
    refused = statuses["busy"] + statuses["timeout"]
    latencies = [o.seconds for o in answered]
    print(f"\npattern {pattern}, run {repeat + 1}:")
    for model in models:
        key = model.key
        print(
            f"  {key}: {counts[key]} answered; mixed {counts[key] / mixed_s:.1f} req/s, "
            f"grouped {counts[key] / took[key]:.1f} req/s over its own {took[key]:.1f} s"
        )
    ratio = (len(answered) / mixed_s) / (len(answered) / grouped_s)
    print(
        f"  total: mixed {len(answered) / mixed_s:.1f} req/s ({mixed_s:.1f} s), grouped "
        f"{len(answered) / grouped_s:.1f} req/s ({grouped_s:.1f} s): ratio {ratio:.2f}x "
        "(goal >= 0.7x)"
    )
    p99 = percentile(waited, 99)
    print(
        f"  wait (until the pool starts on it): p50 {percentile(waited, 50) * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms = {p99 / goal:.2f}x the goal (2 loads + one burst); "
        f"request to answer: p50 {percentile(latencies, 50) * 1000:.0f} ms, p99 "
        f"{percentile(latencies, 99) * 1000:.0f} ms"
    )
    print(
        f"  swaps {swaps} ({swaps / (mixed_s / 60):.1f} a minute); refused {refused} of "
        f"{len(outcomes)} ({refused / max(1, len(outcomes)):.1%}: {statuses['busy']} busy, "
        f"{statuses['timeout']} timed out); errors {statuses['error']}"
    )
    return ratio, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--fit", choices=["one", "all"], default="one")
    parser.add_argument("--pattern", choices=["cycle", "together", "both"], default="both")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--switch", type=float, default=5.0, help="seconds between switches")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each pattern")
    arguments = parser.parse_args()
    from clip_e2e import machine  # benchmarks/ is on sys.path

    print(machine("auto"))
    anyio.run(run, arguments)


if __name__ == "__main__":
    main()
