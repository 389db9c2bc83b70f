"""The pool, against fake models, injected memory readings and a fake clock (no sleeps)."""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from typing import Any

import anyio
import numpy as np
import pytest
from PIL import Image

import limner
from limner import (
    GenerationResult,
    ImageGenerationConfig,
    MemoryExhausted,
    ModelError,
    ModelLoadError,
    Pool,
    PoolBusy,
    Progress,
    Registry,
)
from limner._pool import _serving as serving
from limner.runtime import BatchCall
from limner.testing import (
    FakeClock,
    FakeEmbeddingBackend,
    FakeMemory,
    FakeTextToImageBackend,
    fake_embedding_spec,
    fake_generation_spec,
)

pytestmark = pytest.mark.anyio


def colour(index: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (index % 256, (index * 7) % 256, (index * 13) % 256))


def fake_backend(model: limner.ImageEmbedder) -> FakeEmbeddingBackend:
    assert isinstance(model.backend, FakeEmbeddingBackend)
    return model.backend


def reference(images: list[Image.Image]) -> np.ndarray:
    """What an unpooled fake backend makes of these images (its projection is seeded)."""
    backend = FakeEmbeddingBackend(fake_embedding_spec(), limner.ModelSettings(weights="fake"))
    backend.load()
    return backend.embed_prepared([backend.prepare(image) for image in images])


def make_registry(*specs: limner.ModelSpec) -> Registry:
    registry = Registry(entry_points=False)
    for spec in specs:
        registry.register(spec)
    return registry


async def wait_until(condition: Any, *, timeout: float = 5.0) -> None:
    """Yield to the loop until ``condition()`` holds (event-driven tests need no fixed sleeps).

    A condition that reads the stats of a key the pool has not seen yet is simply false.
    """
    with anyio.fail_after(timeout):
        while True:
            try:
                if condition():
                    return
            except KeyError:
                pass
            await anyio.sleep(0.001)


# -- cold start: the 2 / 1 / MemoryExhausted rule ----------------------------------------------


def one_copy_spec(key: str, memory_mb: float, memory: FakeMemory) -> limner.ModelSpec:
    """A fake model of ``memory_mb`` charged to ``memory``, whose second worker is free."""
    spec = fake_embedding_spec(key, memory_mb=memory_mb, options={"memory": memory})
    return dataclasses.replace(spec, info=dataclasses.replace(spec.info, worker_overhead_mb=0))


@pytest.mark.parametrize(("held_mb", "expected_workers"), [(0, 2), (600, 2), (601, 1), (800, 1)])
async def test_cold_start_spawns_as_many_workers_as_fit_in_the_budget(
    held_mb: float, expected_workers: int
) -> None:
    # The budget counts the pool's models: another one holds held_mb of 1000 MB; a worker
    # of fake/a is 200 MB, so 2 fit while held <= 600. The machine has plenty available.
    memory = FakeMemory(total_mb=100_000)
    registry = make_registry(
        one_copy_spec("fake/other", held_mb or 1, memory),
        fake_embedding_spec("fake/a", memory_mb=200),
    )
    async with Pool(memory=memory, clock=FakeClock(), memory_budget_mb=1000) as pool:
        if held_mb:
            await registry.embedder("fake/other").load()
        await registry.embedder("fake/a").embed_images([colour(1)])
        stats = pool.stats()["fake/a"]
    assert stats.workers == expected_workers
    assert stats.memory_mb == 200 * expected_workers


@pytest.mark.parametrize(
    ("used_mb", "expected_workers"), [(0, 2), (9_100, 2), (9_101, 1), (9_300, 1)]
)
async def test_memory_the_rest_of_the_machine_uses_counts_against_the_floor(
    used_mb: float, expected_workers: int
) -> None:
    # Others use used_mb of 10 GB; 500 MB must stay available: 2 workers (400 MB) fit
    # while 10_000 - used - 400 >= 500, whatever the (larger) budget says.
    memory = FakeMemory(total_mb=10_000, used_mb=used_mb)
    registry = make_registry(fake_embedding_spec("fake/a", memory_mb=200))
    async with Pool(
        memory=memory, clock=FakeClock(), memory_budget_mb=5_000, memory_floor_mb=500
    ) as pool:
        await registry.embedder("fake/a").embed_images([colour(1)])
        stats = pool.stats()["fake/a"]
    assert stats.workers == expected_workers


async def test_a_small_budget_on_a_busy_machine_still_serves() -> None:
    # The reproduction: `--memory-budget 90MB` on a machine whose other programs use 2.7 GB
    # was compared with the machine's used memory, and every request was refused.
    memory = FakeMemory(total_mb=16_000, used_mb=2_700)
    registry = make_registry(fake_embedding_spec("fake/a", memory_mb=40))
    async with Pool(memory=memory, clock=FakeClock(), memory_budget_mb=90) as pool:
        vectors = await registry.embedder("fake/a").embed_images([colour(1)])
        assert pool.stats()["fake/a"].workers == 2
    assert vectors.shape == (1, 8)


@pytest.mark.parametrize(
    ("used_mb", "options", "available"),
    [
        (0, {"memory_budget_mb": 150}, 150),  # larger than the budget itself
        (1100, {"memory_floor_mb": 100, "memory_budget_mb": 1000}, 50),  # others use the rest
    ],
)
async def test_memory_exhausted_at_once_when_it_could_never_fit(
    used_mb: float, options: dict[str, Any], available: float
) -> None:
    memory = FakeMemory(total_mb=1250, used_mb=used_mb)
    registry = make_registry(fake_embedding_spec("fake/big", memory_mb=200))
    async with Pool(memory=memory, clock=FakeClock(), max_wait=30, **options):
        with anyio.fail_after(10), pytest.raises(MemoryExhausted) as caught:
            await registry.embedder("fake/big").embed_images([colour(1)])
    assert str(caught.value).startswith(
        f"Cannot spawn workers for fake/big. Need 200 MB, only {available} MB available"
    )
    assert fake_backend(registry.embedder("fake/big")).loads == 0


async def test_shared_weights_make_a_second_worker_cheap() -> None:
    spec = fake_embedding_spec("fake/shared", memory_mb=400)
    spec = limner.ModelSpec(
        key=spec.key,
        capability=spec.capability,
        factory=spec.factory,
        info=limner.ModelInfo(memory_mb=400, worker_overhead_mb=50, embedding_dimension=8),
    )
    memory = FakeMemory(total_mb=1000, used_mb=300)  # room: 500 MB
    registry = make_registry(spec)
    async with Pool(memory=memory, clock=FakeClock()) as pool:
        await registry.embedder("fake/shared").embed_images([colour(1)])
        stats = pool.stats()["fake/shared"]
    assert stats.workers == 2  # 400 + 50 fits where 2 x 400 would not
    assert stats.memory_mb == 450


async def test_concurrent_cold_start_loads_once() -> None:
    gate = threading.Event()
    registry = make_registry(fake_embedding_spec("fake/a", options={"gate": gate}))
    model = registry.embedder("fake/a")
    results: dict[int, np.ndarray] = {}

    async def request(index: int) -> None:
        results[index] = await model.embed_images([colour(index)])

    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock()) as pool:
        async with anyio.create_task_group() as group:
            for index in range(50):
                group.start_soon(request, index)
            await wait_until(lambda: pool.stats()["fake/a"].state == "loading")
            gate.set()
    assert fake_backend(model).loads == 1
    assert len(results) == 50


class Overlap:
    """Records how many loads were inside at once: each waits a moment for another to join."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_at_once = 0
        self.changed = threading.Condition()

    def enter(self) -> None:
        with self.changed:
            self.inside += 1
            self.most_at_once = max(self.most_at_once, self.inside)
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.inside > 1, timeout=0.5)
            self.inside -= 1


class OverlappingLoads(FakeEmbeddingBackend):
    def load(self) -> None:
        self._option("overlap", None).enter()
        super().load()


async def test_one_load_at_a_time_in_the_process() -> None:
    # transformers' and diffusers' from_pretrained swap torch's process-wide default dtype
    # while they build a model: two loads at once could leave every later model in bf16.
    overlap = Overlap()
    specs = [
        dataclasses.replace(
            fake_embedding_spec(f"fake/{n}", options={"overlap": overlap}),
            factory=OverlappingLoads,
        )
        for n in "abc"
    ]
    registry = make_registry(*specs)

    async def load(key: str, pool: Pool) -> None:
        await registry.embedder(key).using(pool).embed_images([colour(1)])

    memory = FakeMemory(total_mb=10_000)
    async with Pool(memory=memory, clock=FakeClock()) as first:
        async with Pool(memory=memory, clock=FakeClock()) as second:
            async with anyio.create_task_group() as group:
                group.start_soon(load, "fake/a", first)
                group.start_soon(load, "fake/b", first)
                group.start_soon(load, "fake/c", second)
    assert overlap.most_at_once == 1


async def test_load_failure_reaches_every_waiter_then_retries_after_backoff() -> None:
    gate = threading.Event()
    clock = FakeClock()
    registry = make_registry(
        fake_embedding_spec("fake/flaky", options={"fail_loads": 1, "gate": gate})
    )
    model = registry.embedder("fake/flaky")
    errors: list[BaseException] = []

    async def request() -> None:
        try:
            await model.embed_images([colour(1)])
        except ModelLoadError as error:
            errors.append(error)

    async with Pool(memory=FakeMemory(total_mb=10_000), clock=clock) as pool:
        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(request)
            await wait_until(lambda: pool.stats()["fake/flaky"].state == "loading")
            gate.set()
        assert len(errors) == 5
        assert all("injected load failure #1" in str(error) for error in errors)
        with pytest.raises(ModelLoadError, match=r"next try in 1\.0 s"):
            await model.embed_images([colour(1)])  # within the backoff: no new load
        assert fake_backend(model).loads == 1
        clock.advance(1.5)
        vector = await model.embed_images([colour(1)])
    assert vector.shape == (1, 8)
    assert fake_backend(model).loads == 2


async def test_lru_idle_model_is_evicted_to_make_room() -> None:
    memory = FakeMemory(total_mb=1000, used_mb=0)  # budget 800 MB
    clock = FakeClock()
    specs = [
        fake_embedding_spec(f"fake/{name}", memory_mb=300, options={"memory": memory})
        for name in ("old", "recent", "new")
    ]
    registry = make_registry(*specs)
    async with Pool(memory=memory, clock=clock, max_workers=1) as pool:
        await registry.embedder("fake/old").embed_images([colour(1)])
        clock.advance(10)
        await registry.embedder("fake/recent").embed_images([colour(2)])
        clock.advance(10)
        assert memory.used == 600
        await registry.embedder("fake/new").embed_images([colour(3)])
        stats = pool.stats()
        assert memory.used == 600
    assert stats["fake/old"].state == "cold"
    assert stats["fake/old"].evictions == 1
    assert stats["fake/recent"].state == "ready"
    assert stats["fake/new"].state == "ready"
    assert memory.used == 0  # the pool unloaded everything on exit


async def test_a_busy_model_finishes_its_batch_before_it_makes_room() -> None:
    # Was: the second model's caller got MemoryExhausted at once while the first was busy.
    # Now it waits; the busy model is never cut short, and goes once its work is done.
    memory = FakeMemory(total_mb=1000, used_mb=0)
    gate = threading.Event()
    registry = make_registry(
        fake_embedding_spec("fake/busy", memory_mb=500, options={"memory": memory, "gate": gate}),
        fake_embedding_spec("fake/new", memory_mb=500, options={"memory": memory}),
    )
    async with Pool(memory=memory, clock=FakeClock(), max_workers=1) as pool:
        gate.set()
        await registry.embedder("fake/busy").embed_images([colour(1)])
        gate.clear()
        busy: list[np.ndarray] = []
        new: list[np.ndarray] = []

        async def call(key: str, into: list[np.ndarray]) -> None:
            into.append(await registry.embedder(key).embed_images([colour(2)]))

        async with anyio.create_task_group() as group:
            group.start_soon(call, "fake/busy", busy)
            await wait_until(lambda: pool.stats()["fake/busy"].in_flight == 1)
            group.start_soon(call, "fake/new", new)
            await wait_until(lambda: pool.stats()["fake/new"].waiting == 1)
            await anyio.sleep(0.05)
            assert pool.stats()["fake/busy"].evictions == 0  # not while it runs
            assert pool.stats()["fake/new"].state == "cold"
            gate.set()
        stats = pool.stats()
    assert len(busy) == 1 and len(new) == 1  # both answered, none refused
    assert stats["fake/busy"].evictions == 1 and stats["fake/busy"].swaps == 1
    assert stats["fake/new"].state == "ready"


async def test_idle_models_are_evicted_after_their_keep_alive() -> None:
    memory = FakeMemory(total_mb=10_000)
    clock = FakeClock()
    registry = make_registry(
        fake_embedding_spec("fake/short", options={"memory": memory}),
        fake_embedding_spec("fake/long", options={"memory": memory}),
    )
    async with Pool(
        memory=memory, clock=clock, keep_alive=60, keep_alive_per_key={"fake/long": 600}
    ) as pool:
        await registry.embedder("fake/short").embed_images([colour(1)])
        await registry.embedder("fake/long").embed_images([colour(1)])
        clock.advance(59)
        assert await pool.evict_idle() == []
        clock.advance(2)
        assert await pool.evict_idle() == ["fake/short"]
        assert fake_backend(registry.embedder("fake/short")).unloads == 1
        assert memory.used == 100
        clock.advance(600)
        assert await pool.evict_idle() == ["fake/long"]
        assert memory.used == 0
        # an evicted model cold-starts again on the next request
        await registry.embedder("fake/short").embed_images([colour(1)])
        assert fake_backend(registry.embedder("fake/short")).loads == 2


async def test_a_request_during_an_eviction_reloads_only_after_the_unload() -> None:
    unload_gate = threading.Event()
    clock = FakeClock()
    registry = make_registry(fake_embedding_spec("fake/a", options={"unload_gate": unload_gate}))
    model = registry.embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=clock, keep_alive=60) as pool:
        await model.embed_images([colour(1)])
        clock.advance(61)
        async with anyio.create_task_group() as group:
            group.start_soon(pool.evict_idle)  # held inside backend.unload by the gate
            await wait_until(lambda: pool.stats()["fake/a"].state == "cold")
            group.start_soon(model.embed_images, [colour(2)])
            await wait_until(lambda: pool.stats()["fake/a"].state == "loading")
            unload_gate.set()
        assert fake_backend(model).loaded  # the reload came after the unload, not before
        assert (await model.embed_images([colour(3)])).shape == (1, 8)
    assert fake_backend(model).events == ["load", "unload", "load", "unload"]


# -- batching -----------------------------------------------------------------------------------


async def test_concurrent_requests_are_merged_into_batches() -> None:
    gate = threading.Event()
    registry = make_registry(
        fake_embedding_spec("fake/a", max_batch_size=8, options={"gate": gate})
    )
    model = registry.embedder("fake/a")
    results: dict[int, np.ndarray] = {}

    async def request(index: int) -> None:
        results[index] = await model.embed_images([colour(index)])

    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=1) as pool:
        gate.set()
        await model.embed_images([colour(0)])  # warm: loaded, one worker
        gate.clear()
        async with anyio.create_task_group() as group:
            group.start_soon(request, 100)  # occupies the worker, held at the gate
            await wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
            for index in range(20):
                group.start_soon(request, index)
            await wait_until(lambda: pool.stats()["fake/a"].queue_depth == 20)
            gate.set()
    assert fake_backend(model).batch_sizes == [1, 1, 8, 8, 4]
    expected = reference([colour(index) for index in range(20)])
    for index in range(20):  # every caller got the vector of its own image
        assert np.allclose(results[index], expected[index], atol=1e-6)


async def test_a_one_call_at_a_time_model_batches_what_queued_while_it_ran() -> None:
    gate = threading.Event()
    registry = make_registry(
        fake_embedding_spec(
            "fake/a", max_batch_size=8, options={"gate": gate, "concurrent_calls": 1}
        )
    )
    model = registry.embedder("fake/a")

    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=2) as pool:
        gate.set()
        await model.embed_images([colour(0)])
        gate.clear()
        assert pool.stats()["fake/a"].workers == 2
        async with anyio.create_task_group() as group:
            group.start_soon(model.embed_images, [colour(100)])
            await wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
            for index in range(12):
                group.start_soon(model.embed_images, [colour(index)])
            await wait_until(lambda: pool.stats()["fake/a"].queue_depth == 12)
            gate.set()
    # the idle second worker did not grab a batch of 1 while the first one ran
    assert fake_backend(model).batch_sizes == [1, 1, 8, 4]


async def test_a_lone_request_is_not_delayed() -> None:
    registry = make_registry(fake_embedding_spec("fake/a"))
    model = registry.embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_batch_wait=30):
        await model.embed_images([colour(0)])
        with anyio.fail_after(2):  # max_batch_wait is 30 s: waiting for company would time out
            await model.embed_images([colour(1)])
    assert fake_backend(model).batch_sizes == [1, 1]


class PrepareWaits(FakeEmbeddingBackend):
    """Decoding held at a gate per image (by its red value), counting the callers inside."""

    def prepare(self, image: Image.Image) -> Any:
        options = self.settings.options
        red = image.getpixel((0, 0))[0]  # type: ignore[index]
        with options["lock"]:
            options["entered"].append(red)
        options["gates"][red].wait()
        return super().prepare(image)


async def test_a_burst_decoded_together_runs_as_one_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A burst of single-image callers: the first to finish decoding must not run alone while
    # the rest are still decoding. A long wait makes the test about order, not speed.
    monkeypatch.setattr(serving, "DECODE_WAIT", 30.0)
    gates = {index: threading.Event() for index in range(7)}
    entered: list[int] = []
    spec = fake_embedding_spec(
        "fake/a",
        max_batch_size=8,
        options={"gates": gates, "entered": entered, "lock": threading.Lock()},
    )
    model = make_registry(dataclasses.replace(spec, factory=PrepareWaits)).embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=1) as pool:
        gates[6].set()
        await model.embed_images([colour(6)])  # warm; a lone caller never waits for others
        with anyio.fail_after(20):  # a hang detector; the order is what is checked
            async with anyio.create_task_group() as group:
                for index in range(6):
                    group.start_soon(model.embed_images, [colour(index)])
                await wait_until(lambda: len(entered) == 7)
                gates[0].set()  # one caller's image is ready; five are still decoding
                stats = pool.stats
                await wait_until(
                    lambda: (
                        stats()["fake/a"].in_flight + stats()["fake/a"].queue_depth > 0
                        or len(fake_backend(model).batch_sizes) > 1
                    )
                )
                for index in range(1, 6):
                    gates[index].set()
    assert fake_backend(model).batch_sizes == [1, 6]


class RecordsItsThread(FakeEmbeddingBackend):
    def embed_prepared(self, items: Any) -> Any:
        self.settings.options["threads"].add(threading.current_thread().name)
        return super().embed_prepared(items)


async def test_batches_run_on_the_pool_s_own_steady_threads() -> None:
    # Not on whichever anyio worker thread last decoded an image: each thread allocates in
    # its own malloc arena, and a forward pass in a cold one each call ran slower.
    threads: set[str] = set()
    spec = fake_embedding_spec("fake/a", max_batch_size=4, options={"threads": threads})
    model = make_registry(dataclasses.replace(spec, factory=RecordsItsThread)).embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_threads=2):
        for _ in range(3):
            async with anyio.create_task_group() as group:
                for index in range(12):
                    group.start_soon(model.embed_images, [colour(index)])
    assert threads and all(name.startswith("limner-batch") for name in threads), threads
    assert len(threads) <= 2  # max_threads


async def test_large_requests_are_split_at_the_max_batch() -> None:
    registry = make_registry(fake_embedding_spec("fake/a", max_batch_size=4))
    model = registry.embedder("fake/a")
    images = [colour(i) for i in range(10)]
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=1):
        vectors = await model.embed_images(images)
    assert sorted(fake_backend(model).batch_sizes) == [2, 4, 4]
    assert np.allclose(vectors, reference(images), atol=1e-6)


async def test_a_bad_input_fails_only_its_own_caller() -> None:
    gate = threading.Event()
    registry = make_registry(fake_embedding_spec("fake/a", options={"gate": gate}))
    model = registry.embedder("fake/a")
    outcomes: dict[str, object] = {}

    async def request(name: str, source: object) -> None:
        try:
            outcomes[name] = await model.embed_images([source])  # type: ignore[list-item]
        except limner.InvalidInput as error:
            outcomes[name] = error

    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=1) as pool:
        gate.set()
        await model.embed_images([colour(0)])
        gate.clear()
        async with anyio.create_task_group() as group:
            group.start_soon(request, "first", colour(1))
            await wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
            group.start_soon(request, "good", colour(2))
            group.start_soon(request, "bad", b"\x89PNG\r\n\x1a\n broken")
            group.start_soon(request, "good2", colour(3))
            await wait_until(lambda: pool.stats()["fake/a"].queue_depth == 2)
            gate.set()
    assert isinstance(outcomes["bad"], limner.InvalidInput)
    for name in ("first", "good", "good2"):
        assert isinstance(outcomes[name], np.ndarray)
    assert fake_backend(model).batch_sizes[-1] == 2  # the good ones still shared a batch


# -- faults -------------------------------------------------------------------------------------


async def test_an_exception_in_a_batch_reaches_its_callers_and_the_worker_stays() -> None:
    registry = make_registry(fake_embedding_spec("fake/a", options={"fail_on_batch_size": 3}))
    model = registry.embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=1) as pool:
        with pytest.raises(ModelError) as caught:
            await model.embed_images([colour(1), colour(2), colour(3)])
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert (await model.embed_images([colour(1)])).shape == (1, 8)
        assert pool.stats()["fake/a"].workers == 1
    assert fake_backend(model).loads == 1


async def test_out_of_memory_batch_is_retried_at_half_size() -> None:
    registry = make_registry(fake_embedding_spec("fake/a", options={"oom_above": 4}))
    model = registry.embedder("fake/a")
    images = [colour(i) for i in range(8)]
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=1):
        vectors = await model.embed_images(images)
    assert vectors.shape == (8, 8)
    assert fake_backend(model).batch_sizes == [8, 4, 4]


async def test_a_dead_worker_is_replaced_on_the_next_request() -> None:
    registry = make_registry(fake_embedding_spec("fake/a", options={"oom_above": 0}))
    model = registry.embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=1) as pool:
        with pytest.raises(ModelError, match="MemoryError"):
            await model.embed_images([colour(1)])
        await wait_until(lambda: fake_backend(model).unloads == 1)
        assert pool.stats()["fake/a"].workers == 0
        with pytest.raises(ModelError):
            await model.embed_images([colour(1)])
    assert fake_backend(model).loads == 2  # the second request started a fresh worker


# -- load and backpressure ----------------------------------------------------------------------


async def test_pool_busy_when_the_queue_is_full() -> None:
    gate = threading.Event()
    registry = make_registry(fake_embedding_spec("fake/a", options={"gate": gate}))
    model = registry.embedder("fake/a")
    outcomes: list[object] = []

    async def request(index: int) -> None:
        try:
            outcomes.append(await model.embed_images([colour(index)]))
        except PoolBusy as error:
            outcomes.append(error)

    async with Pool(
        memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=1, max_queue=5
    ) as pool:
        gate.set()
        await model.embed_images([colour(0)])
        gate.clear()
        async with anyio.create_task_group() as group:
            group.start_soon(request, 0)
            await wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
            for index in range(1, 11):
                group.start_soon(request, index)
            await wait_until(lambda: len(outcomes) == 5)  # five refused at once
            gate.set()
    busy = [o for o in outcomes if isinstance(o, PoolBusy)]
    assert len(busy) == 5
    assert "Retry in" in str(busy[0])
    assert len(outcomes) == 11


def thread_names() -> set[str]:
    return {t.name for t in threading.enumerate() if t.is_alive()}


def test_two_thousand_requests_with_cancellations_leak_nothing() -> None:
    """Each surviving request gets its own vector; cancelled ones vanish; no leaks."""
    before_threads = thread_names()
    registry = make_registry(fake_embedding_spec("fake/a", max_batch_size=64))
    model = registry.embedder("fake/a")
    rng = np.random.default_rng(7)
    cancel_at = {int(i) for i in rng.choice(2000, size=600, replace=False)}
    results: dict[int, np.ndarray] = {}
    cancelled: set[int] = set()

    async def main() -> None:
        async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_queue=4000):

            async def request(index: int) -> None:
                with anyio.CancelScope() as scope:
                    if index in cancel_at:
                        scope.cancel()  # cancelled mid-flight, at its first checkpoint
                    results[index] = await model.embed_images([colour(index)])
                if scope.cancelled_caught:
                    cancelled.add(index)

            async with anyio.create_task_group() as group:
                for index in range(2000):
                    group.start_soon(request, index)

    anyio.run(main)
    assert cancelled == cancel_at
    assert set(results) == set(range(2000)) - cancel_at
    survivors = sorted(results)
    expected = reference([colour(index) for index in survivors])
    for row, index in enumerate(survivors):  # each caller got its own image's vector
        assert np.allclose(results[index], expected[row], atol=1e-6)
    gc.collect()
    deadline = 50
    while thread_names() - before_threads and deadline:
        threading.Event().wait(0.1)
        deadline -= 1
    assert thread_names() - before_threads == set()


async def test_graceful_shutdown_drains_in_flight_work() -> None:
    registry = make_registry(fake_embedding_spec("fake/a", options={"batch_seconds": 0.05}))
    model = registry.embedder("fake/a")
    results: list[np.ndarray] = []
    started = time.monotonic()
    async with anyio.create_task_group() as group:
        pool = Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), drain_timeout=120)
        async with pool:

            async def request(index: int) -> None:
                results.append(await model.using(pool).embed_images([colour(index)]))

            for index in range(10):
                group.start_soon(request, index)

            def all_submitted() -> bool:  # decoding done: every request queued, running or done
                stats = pool.stats()["fake/a"]
                return stats.queue_depth + stats.in_flight + len(results) == 10

            await wait_until(all_submitted)
        assert len(results) == 10  # all finished before the pool closed
    # The drain ended with the work (half a second of batches), not at its timeout: one
    # that missed the work's end would sit out all 120 s.
    assert time.monotonic() - started < 60
    assert fake_backend(model).unloads == 1
    with pytest.raises(limner.LimnerError, match="not running"):
        await model.using(pool).embed_images([colour(1)])


async def test_shutdown_after_the_drain_timeout_cancels_queued_work() -> None:
    gate = threading.Event()
    registry = make_registry(fake_embedding_spec("fake/a", options={"gate": gate}))
    model = registry.embedder("fake/a")
    outcomes: list[object] = []

    async def request(pool: Pool, index: int) -> None:
        try:
            outcomes.append(await model.using(pool).embed_images([colour(index)]))
        except limner.Cancelled as error:
            outcomes.append(error)

    async with (
        anyio.create_task_group() as group,
        Pool(
            memory=FakeMemory(total_mb=10_000),
            clock=FakeClock(),
            max_workers=1,
            drain_timeout=0.2,
        ) as pool,
    ):
        gate.set()
        await model.embed_images([colour(0)])
        gate.clear()
        group.start_soon(request, pool, 1)
        await wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
        group.start_soon(request, pool, 2)
        await wait_until(lambda: pool.stats()["fake/a"].queue_depth == 1)
        threading.Timer(0.5, gate.set).start()  # the running batch ends after the drain
    assert any(isinstance(o, limner.Cancelled) for o in outcomes)


class WatchedGate(threading.Event):
    """A gate that tells when a thread first waits on it (a load has really started)."""

    def __init__(self) -> None:
        super().__init__()
        self.waited_on = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waited_on.set()
        return super().wait(timeout)


async def test_shutdown_during_a_load_fails_its_waiters_instead_of_hanging() -> None:
    gate = WatchedGate()
    registry = make_registry(fake_embedding_spec("fake/a", options={"gate": gate}))
    model = registry.embedder("fake/a")
    outcomes: list[BaseException] = []

    prepared = model.backend.prepare(colour(1))

    async def request(pool: Pool) -> None:
        try:  # straight to the pool: no decoding thread that could still run at shutdown
            await pool.run_batch(model.backend, BatchCall("embed_prepared", [prepared]))
        except limner.LimnerError as error:
            outcomes.append(error)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            async with Pool(
                memory=FakeMemory(total_mb=10_000), clock=FakeClock(), drain_timeout=0.1
            ) as pool:
                for _ in range(3):
                    group.start_soon(request, pool)
                await wait_until(gate.waited_on.is_set)  # the load is running in its thread
                threading.Timer(0.3, gate.set).start()  # the load ends after the drain
    assert len(outcomes) == 3
    assert all(isinstance(error, limner.Cancelled) for error in outcomes), outcomes
    assert fake_backend(model).unloads == 1  # loaded after all, and unloaded on exit


async def test_stats_are_frozen_snapshots() -> None:
    registry = make_registry(fake_embedding_spec("fake/a", max_batch_size=8))
    model = registry.embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=1) as pool:
        await model.embed_images([colour(i) for i in range(6)])
        await model.embed_images([colour(i) for i in range(2)])
        stats = pool.stats()["fake/a"]
    assert (stats.batches, stats.mean_batch_size, stats.loads) == (2, 4.0, 1)
    assert (stats.queue_depth, stats.in_flight, stats.device) == (0, 0, "cpu")
    with pytest.raises(AttributeError):
        stats.batches = 3  # type: ignore[misc]


async def test_one_backend_belongs_to_one_pool() -> None:
    registry = make_registry(fake_embedding_spec("fake/a"))
    model = registry.embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000)) as first:
        await model.using(first).embed_images([colour(1)])
        async with Pool(memory=FakeMemory(total_mb=10_000)) as second:
            with pytest.raises(limner.LimnerError, match="another pool"):
                await model.using(second).embed_images([colour(1)])
    async with Pool(memory=FakeMemory(total_mb=10_000)) as third:  # released at exit
        assert (await model.using(third).embed_images([colour(1)])).shape == (1, 8)


# -- text-to-image through the pool -------------------------------------------------------------


async def test_generation_streams_progress_then_the_result() -> None:
    registry = make_registry(fake_generation_spec("fake/gen"))
    model = registry.generator("fake/gen")
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock()):
        chunks = [
            chunk
            async for chunk in model.generate_image("a fox", ImageGenerationConfig(steps=5, seed=3))
        ]
    assert [c.step for c in chunks if isinstance(c, Progress)] == [1, 2, 3, 4, 5]
    result = chunks[-1]
    assert isinstance(result, GenerationResult)
    assert result.seed == 3
    assert result.images[0].size == (16, 16)


async def test_generation_config_errors_name_the_field() -> None:
    registry = make_registry(fake_generation_spec("fake/gen"))
    model = registry.generator("fake/gen")
    with pytest.raises(limner.InvalidInput) as caught:
        async for _ in model.generate_image("x", ImageGenerationConfig(width=13)):
            pass
    assert caught.value.field == "width"
    with pytest.raises(limner.InvalidInput, match="prompt"):
        async for _ in model.generate_image("  "):
            pass


async def test_a_consumer_that_stops_stops_the_steps_and_frees_the_worker() -> None:
    registry = make_registry(fake_generation_spec("fake/gen", options={"step_seconds": 0.01}))
    model = registry.generator("fake/gen")
    backend = model.backend
    assert isinstance(backend, FakeTextToImageBackend)
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=1) as pool:
        stream = model.generate_image("a fox", ImageGenerationConfig(steps=50, seed=1))
        async for chunk in stream:
            assert isinstance(chunk, Progress)
            if chunk.step == 3:
                break
        await stream.aclose()
        await wait_until(lambda: pool.stats()["fake/gen"].in_flight == 0)
        assert backend.steps_run <= 5  # stopped within a couple of steps, not 50
        result = await model.generate("again", ImageGenerationConfig(steps=2, seed=1))
    assert result.seed == 1


async def test_cancelling_the_consumer_task_stops_the_generation() -> None:
    registry = make_registry(fake_generation_spec("fake/gen", options={"step_seconds": 0.01}))
    model = registry.generator("fake/gen")
    backend = model.backend
    assert isinstance(backend, FakeTextToImageBackend)
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock()) as pool:
        with anyio.CancelScope() as scope:

            def cancel_at_step_two(chunk: object) -> None:
                if isinstance(chunk, Progress) and chunk.step == 2:
                    scope.cancel()

            await model.generate(
                "slow", ImageGenerationConfig(steps=50, seed=1), cancel_at_step_two
            )
        assert scope.cancelled_caught
        await wait_until(lambda: pool.stats()["fake/gen"].in_flight == 0)
    assert 2 <= backend.steps_run <= 5  # stopped within a step or two of the cancel


async def test_generation_errors_end_the_stream_typed() -> None:
    registry = make_registry(fake_generation_spec("fake/gen", options={"fail_at_step": 2}))
    model = registry.generator("fake/gen")
    seen: list[object] = []
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock()):
        with pytest.raises(ModelError, match="injected failure at step 2"):
            async for chunk in model.generate_image("x", ImageGenerationConfig(steps=4, seed=1)):
                seen.append(chunk)
    assert len(seen) == 1


async def test_one_generation_per_worker_at_a_time() -> None:
    gate = threading.Event()
    registry = make_registry(fake_generation_spec("fake/gen", options={"gate": gate}))
    model = registry.generator("fake/gen")
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_workers=1) as pool:
        async with anyio.create_task_group() as group:
            for seed in range(3):
                group.start_soon(model.generate, "x", ImageGenerationConfig(steps=2, seed=seed))
            await wait_until(lambda: pool.stats()["fake/gen"].in_flight == 1)
            await anyio.sleep(0.05)
            assert pool.stats()["fake/gen"].in_flight == 1  # the others wait for the worker
            gate.set()
