"""Turns between models under one budget, in the real pool: fake models, fake memory, gates
instead of sleeps. Calls that do not fit wait (bounded) instead of failing; a model under
steady load yields its memory after its turn; nobody waiting is lost."""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import numpy as np
import pytest
from anyio.abc import TaskGroup
from PIL import Image

import limner
from limner import (
    GenerationResult,
    ImageGenerationConfig,
    InvalidInput,
    Pool,
    PoolBusy,
    PoolOptions,
    Registry,
    WaitTimeout,
)
from limner.testing import (
    FakeClock,
    FakeEmbeddingBackend,
    FakeMemory,
    FakeTextToImageBackend,
    fake_embedding_spec,
    fake_generation_spec,
)

pytestmark = pytest.mark.anyio

#: A hang detector, not a speed check.
BOUND_S = 30.0


def colour(index: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (index % 256, (index * 7) % 256, (index * 13) % 256))


def registry_of(*specs: limner.ModelSpec) -> Registry:
    registry = Registry(entry_points=False)
    for spec in specs:
        registry.register(spec)
    return registry


def one_at_a_time(memory: FakeMemory, *keys: str, **options: Any) -> Registry:
    """Fake models of 600 MB each, charged to ``memory``: one fits a 1000 MB budget."""
    return registry_of(
        *(
            fake_embedding_spec(key, memory_mb=600, options={"memory": memory, **options})
            for key in keys
        )
    )


def backend_of(registry: Registry, key: str) -> FakeEmbeddingBackend:
    backend = registry.embedder(key).backend
    assert isinstance(backend, FakeEmbeddingBackend)
    return backend


async def wait_until(condition: Any, *, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                if condition():
                    return
            except KeyError:  # a key the pool has not seen yet
                pass
            await anyio.sleep(0.002)


@contextlib.asynccontextmanager
async def while_a_is_busy(**options: Any) -> AsyncIterator[tuple[Pool, Registry, TaskGroup]]:
    """fake/a loaded and running a batch held at a gate, far from the end of its turn (unless
    ``options`` say otherwise); fake/b, which fits only in its place, cold: what a caller of
    fake/b meets. The gate opens when the block ends."""
    memory, gate = FakeMemory(total_mb=100_000), threading.Event()
    registry = one_at_a_time(memory, "fake/a", "fake/b", gate=gate)
    gate.set()
    settings: dict[str, Any] = {"memory_budget_mb": 1000, "min_turn": 60, "max_workers": 1}
    async with Pool(memory=memory, **{**settings, **options}) as pool:
        await registry.embedder("fake/a").embed_images([colour(1)])
        gate.clear()
        async with anyio.create_task_group() as group:
            group.start_soon(registry.embedder("fake/a").embed_images, [colour(2)])
            await wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
            try:
                yield pool, registry, group
            finally:
                gate.set()


# -- the options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_budget_mb", 0),
        ("memory_budget_mb", -5),
        ("memory_budget_mb", float("nan")),
        ("memory_budget_fraction", 0),
        ("memory_budget_fraction", 1.5),
        ("memory_floor_mb", -1),
        ("max_wait", 0),
        ("min_turn", -1),
        ("max_queue", 0),
        ("max_workers", 1.5),
        ("keep_alive", -1),
        ("load_retry_backoff", (1.0,)),
    ],
)
def test_bad_options_are_typed_errors_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        PoolOptions(**{field: value})  # type: ignore[arg-type]
    assert caught.value.field == field
    with pytest.raises(InvalidInput) as again:  # the pool's keywords are checked the same way
        Pool(**{field: value})  # type: ignore[arg-type]
    assert again.value.field == field


def test_one_options_object_or_the_keywords() -> None:
    options = PoolOptions(memory_budget_mb=2048, max_wait=5, keep_alive_per_key={"a": 1})
    pool = Pool(options=options)
    assert pool.options is options
    assert pool.memory_budget_mb == 2048
    assert Pool(**options.keywords()).options == options
    assert Pool(max_wait=5).options == PoolOptions(max_wait=5)
    with pytest.raises(TypeError, match="not both"):
        Pool(options=options, max_queue=3)
    with pytest.raises(TypeError):
        options.keep_alive_per_key["b"] = 2  # type: ignore[index]


def test_wait_timeout_pickles_with_its_fields() -> None:
    error = WaitTimeout("fake/a", waited=2.5, max_wait=2.0, retry_after=3.0)
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, WaitTimeout)
    assert (copy.key, copy.waited, copy.max_wait, copy.retry_after) == ("fake/a", 2.5, 2.0, 3.0)
    assert str(copy) == str(error)


def test_a_per_call_max_wait_must_be_positive() -> None:
    with pytest.raises(InvalidInput) as caught, limner.max_wait(0):
        pass
    assert caught.value.field == "max_wait"


# -- a call that does not fit waits for its turn ------------------------------------------------


async def test_a_model_under_steady_load_yields_to_a_waiting_one_after_its_turn() -> None:
    """The starvation: callers of A never stop, so A was never idle and B was refused for
    as long as they went on. Now A's turn ends, B loads and serves, and A's own queued
    callers wait for A's next turn: every caller is answered."""
    memory = FakeMemory(total_mb=100_000)
    registry = one_at_a_time(memory, "fake/a", "fake/b", batch_seconds=0.01)
    answered: dict[str, int] = {"fake/a": 0, "fake/b": 0}
    stop = anyio.Event()
    async with Pool(
        memory=memory, memory_budget_mb=1000, min_turn=0.05, max_workers=1, max_wait=BOUND_S
    ) as pool:

        async def steady(key: str, index: int) -> None:
            while not stop.is_set():
                await registry.embedder(key).embed_images([colour(index)])
                answered[key] += 1

        with anyio.fail_after(BOUND_S):
            async with anyio.create_task_group() as group:
                for index in range(4):
                    group.start_soon(steady, "fake/a", index)
                await wait_until(lambda: answered["fake/a"] >= 8)
                await registry.embedder("fake/b").embed_images([colour(99)])
                answered["fake/b"] += 1
                # B loaded as soon as A's turn was over: A, drained with its callers still
                # queued (more than B's one), did not take the room back first.
                assert backend_of(registry, "fake/a").loads == 1
                # ... and A's callers, still waiting, get A back after B's turn.
                served_before = answered["fake/a"]
                await wait_until(lambda: answered["fake/a"] > served_before + 4)
                stop.set()
        stats = pool.stats()
    assert stats["fake/a"].swaps >= 1  # A made room for B
    assert stats["fake/b"].swaps >= 1  # ... and B (idle, its caller gone) for A again
    assert stats["fake/a"].wait_timeouts == stats["fake/b"].wait_timeouts == 0


async def test_a_model_keeps_its_memory_for_its_minimum_turn() -> None:
    """Anti-thrash: a busy model is not drained before its turn is over, however long the
    other model's caller has waited; it is drained once it is."""
    memory, clock, gate = FakeMemory(total_mb=100_000), FakeClock(), threading.Event()
    registry = one_at_a_time(memory, "fake/a", "fake/b", gate=gate)
    gate.set()
    async with Pool(
        memory=memory, clock=clock, memory_budget_mb=1000, min_turn=30, max_workers=1
    ) as pool:
        await registry.embedder("fake/a").load()
        await registry.embedder("fake/a").embed_images([colour(1)])  # served once this turn
        gate.clear()
        async with anyio.create_task_group() as group:
            group.start_soon(registry.embedder("fake/a").embed_images, [colour(2)])
            await wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
            group.start_soon(registry.embedder("fake/b").embed_images, [colour(4)])
            await wait_until(lambda: pool.stats()["fake/b"].waiting == 1)
            clock.advance(29)
            await anyio.sleep(0.2)  # the scheduler has looked (it does on every arrival)
            assert not pool.stats()["fake/a"].draining  # 29 s into a 30 s turn
            clock.advance(2)  # the turn is over: the scheduler sees it within a second
            await wait_until(lambda: pool.stats()["fake/a"].draining)
            assert pool.stats()["fake/a"].in_flight == 1  # it finishes what it runs
            assert pool.stats()["fake/b"].state == "cold"
            gate.set()
        stats = pool.stats()
    assert stats["fake/a"].swaps == 1
    assert stats["fake/b"].state == "ready"
    assert backend_of(registry, "fake/a").events[:2] == ["load", "unload"]


@pytest.mark.parametrize(
    ("max_wait", "expected"),
    [
        (60.0, ["fake/a", "fake/b", "fake/c"]),  # the most callers first
        (8.0, ["fake/a", "fake/c", "fake/b"]),  # c's caller waited a quarter of max_wait
    ],
)
async def test_the_model_most_callers_wait_for_loads_next_unless_one_waited_too_long(
    max_wait: float, expected: list[str]
) -> None:
    memory, clock, gate = FakeMemory(total_mb=100_000), FakeClock(), threading.Event()
    registry = one_at_a_time(memory, "fake/a", "fake/b", "fake/c", gate=gate)
    loaded: list[str] = []
    async with Pool(
        memory=memory,
        clock=clock,
        memory_budget_mb=1000,
        min_turn=0,
        max_workers=1,
        max_wait=max_wait,
    ) as pool:
        gate.set()
        await registry.embedder("fake/a").load()
        gate.clear()

        async def call(key: str) -> None:
            await registry.embedder(key).embed_images([colour(1)])
            if key not in loaded:
                loaded.append(key)

        async with anyio.create_task_group() as group:
            group.start_soon(call, "fake/a")
            await wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
            group.start_soon(call, "fake/c")  # one caller, the first to wait
            await wait_until(lambda: pool.stats()["fake/c"].waiting == 1)
            clock.advance(1)
            for _ in range(3):
                group.start_soon(call, "fake/b")
            await wait_until(lambda: pool.stats()["fake/b"].waiting == 3)
            clock.advance(1)
            assert pool.stats()["fake/c"].oldest_wait_seconds == 2.0
            assert pool.stats()["fake/b"].oldest_wait_seconds == 1.0
            gate.set()
    assert loaded == expected


async def test_two_models_that_fit_together_never_swap() -> None:
    memory = FakeMemory(total_mb=100_000)
    registry = registry_of(
        *(fake_embedding_spec(key, memory_mb=400) for key in ("fake/a", "fake/b"))
    )
    async with Pool(memory=memory, memory_budget_mb=1000, max_workers=1) as pool:
        with anyio.fail_after(BOUND_S):
            async with anyio.create_task_group() as group:
                for index in range(40):
                    key = ("fake/a", "fake/b")[index % 2]
                    group.start_soon(registry.embedder(key).embed_images, [colour(index)])
        stats = pool.stats()
    assert [stats[key].loads for key in ("fake/a", "fake/b")] == [1, 1]
    assert stats["fake/a"].swaps == stats["fake/b"].swaps == 0


# -- bounded waits ------------------------------------------------------------------------------


async def test_a_call_that_waits_past_max_wait_is_a_wait_timeout_and_leaves_the_queue() -> None:
    async with while_a_is_busy(max_wait=0.3) as (pool, registry, _):
        with anyio.fail_after(BOUND_S), pytest.raises(WaitTimeout) as caught:
            await registry.embedder("fake/b").embed_images([colour(3)])
        stats = pool.stats()["fake/b"]
    error = caught.value
    assert error.key == "fake/b" and error.max_wait == 0.3
    assert error.waited >= 0.3 and error.retry_after >= 1.0
    assert (stats.waiting, stats.queue_depth, stats.wait_timeouts) == (0, 0, 1)
    assert backend_of(registry, "fake/b").loads == 0


async def test_max_wait_per_call() -> None:
    async with while_a_is_busy() as (_, registry, _):
        with limner.max_wait(0.1), anyio.fail_after(BOUND_S):
            with pytest.raises(WaitTimeout) as caught:
                await registry.embedder("fake/b").embed_images([colour(3)])
            with pytest.raises(WaitTimeout):
                await registry.embedder("fake/b").load()
    assert caught.value.max_wait == 0.1


async def test_a_full_waiting_queue_for_a_cold_model_is_pool_busy() -> None:
    memory, gate = FakeMemory(total_mb=100_000), threading.Event()
    registry = one_at_a_time(memory, "fake/a", "fake/b", gate=gate)
    gate.set()
    outcomes: list[object] = []

    async def call(key: str, index: int) -> None:
        try:
            outcomes.append(await registry.embedder(key).embed_images([colour(index)]))
        except PoolBusy as error:
            outcomes.append(error)

    async with Pool(
        memory=memory, memory_budget_mb=1000, max_workers=1, max_queue=3, min_turn=0
    ) as pool:
        await registry.embedder("fake/a").embed_images([colour(1)])
        gate.clear()
        with anyio.fail_after(BOUND_S):
            async with anyio.create_task_group() as group:
                group.start_soon(call, "fake/a", 0)
                await wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
                for index in range(5):
                    group.start_soon(call, "fake/b", index)
                await wait_until(lambda: len(outcomes) == 2)  # two refused at once
                assert pool.stats()["fake/b"].waiting == 3
                gate.set()
    busy = [outcome for outcome in outcomes if isinstance(outcome, PoolBusy)]
    assert len(busy) == 2 and len(outcomes) == 6
    assert all(error.retry_after >= 1.0 for error in busy)


async def test_callers_waiting_at_shutdown_are_cancelled_not_stranded() -> None:
    memory, gate = FakeMemory(total_mb=100_000), threading.Event()
    registry = one_at_a_time(memory, "fake/a", "fake/b", gate=gate)
    gate.set()
    outcomes: list[BaseException] = []

    async def call(key: str) -> None:
        try:
            await registry.embedder(key).embed_images([colour(1)])
        except limner.LimnerError as error:
            outcomes.append(error)

    with anyio.fail_after(BOUND_S):
        async with anyio.create_task_group() as group:
            async with Pool(
                memory=memory, memory_budget_mb=1000, max_workers=1, min_turn=60, drain_timeout=0.2
            ) as pool:
                await registry.embedder("fake/a").embed_images([colour(1)])
                gate.clear()
                group.start_soon(call, "fake/a")
                await wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
                group.start_soon(call, "fake/b")
                await wait_until(lambda: pool.stats()["fake/b"].waiting == 1)
                threading.Timer(0.5, gate.set).start()
    assert [type(error) for error in outcomes] == [limner.Cancelled]


# -- generations take turns too -----------------------------------------------------------------


async def test_a_running_generation_finishes_before_its_model_makes_room() -> None:
    memory = FakeMemory(total_mb=100_000)
    gate = threading.Event()
    registry = registry_of(
        fake_generation_spec("fake/gen", memory_mb=600, options={"memory": memory, "gate": gate}),
        fake_embedding_spec("fake/emb", memory_mb=600, options={"memory": memory}),
    )
    generator = registry.generator("fake/gen")
    results: list[GenerationResult] = []
    vectors: list[np.ndarray] = []
    async with Pool(memory=memory, memory_budget_mb=1000, max_workers=1, min_turn=0) as pool:
        gate.set()
        await generator.generate("warm", ImageGenerationConfig(steps=1, seed=1))
        gate.clear()

        async def generate(seed: int) -> None:
            results.append(await generator.generate("x", ImageGenerationConfig(steps=3, seed=seed)))

        async def embed() -> None:
            vectors.append(await registry.embedder("fake/emb").embed_images([colour(1)]))

        with anyio.fail_after(BOUND_S):
            async with anyio.create_task_group() as group:
                group.start_soon(generate, 1)
                await wait_until(lambda: pool.stats()["fake/gen"].in_flight == 1)
                group.start_soon(embed)
                await wait_until(lambda: pool.stats()["fake/gen"].draining)
                group.start_soon(generate, 2)  # waits for the generator's next turn
                await wait_until(lambda: pool.stats()["fake/gen"].waiting == 1)
                assert pool.stats()["fake/emb"].state == "cold"  # not beside the generation
                gate.set()
        stats = pool.stats()
    assert sorted(result.seed for result in results) == [1, 2]  # both ran to their end
    assert len(vectors) == 1
    assert stats["fake/gen"].swaps >= 1 and stats["fake/gen"].loads == 2
    backend = generator.backend
    assert isinstance(backend, FakeTextToImageBackend)
    assert backend.steps_run == 1 + 3 + 3  # nothing was cut short


async def test_a_generation_that_waits_past_max_wait_is_a_wait_timeout() -> None:
    memory, gate = FakeMemory(total_mb=100_000), threading.Event()
    registry = registry_of(
        fake_embedding_spec("fake/emb", memory_mb=600, options={"memory": memory, "gate": gate}),
        fake_generation_spec("fake/gen", memory_mb=600, options={"memory": memory}),
    )
    gate.set()
    async with Pool(
        memory=memory, memory_budget_mb=1000, max_workers=1, min_turn=60, max_wait=0.2
    ) as pool:
        await registry.embedder("fake/emb").embed_images([colour(1)])
        gate.clear()
        async with anyio.create_task_group() as group:
            group.start_soon(registry.embedder("fake/emb").embed_images, [colour(2)])
            await wait_until(lambda: pool.stats()["fake/emb"].in_flight == 1)
            with anyio.fail_after(BOUND_S), pytest.raises(WaitTimeout):
                await registry.generator("fake/gen").generate("x")
            assert pool.stats()["fake/gen"].waiting == 0
            gate.set()


async def test_a_caller_cancelled_while_it_waits_leaves_the_queue() -> None:
    async with while_a_is_busy() as (pool, registry, group):
        scope = anyio.CancelScope()

        async def call_b() -> None:
            with scope:
                await registry.embedder("fake/b").embed_images([colour(3)])

        group.start_soon(call_b)
        await wait_until(lambda: pool.stats()["fake/b"].waiting == 1)
        scope.cancel()
        await wait_until(lambda: pool.stats()["fake/b"].waiting == 0)
        stats = pool.stats()["fake/b"]
    assert scope.cancelled_caught
    assert (stats.queue_depth, stats.loads, stats.wait_timeouts) == (0, 0, 0)


async def test_a_model_kept_out_by_the_floor_loads_once_the_machine_frees_memory() -> None:
    # Others use 9 of 10 GB and 500 MB must stay free: fake/b waits (evicting the busy
    # fake/a would make room, so it is no MemoryExhausted), and loads beside fake/a as soon
    # as the machine's memory frees, with nobody telling the pool.
    memory, gate = FakeMemory(total_mb=10_000, used_mb=9_000), threading.Event()
    registry = registry_of(
        *(
            fake_embedding_spec(key, memory_mb=400, options={"memory": memory, "gate": gate})
            for key in ("fake/a", "fake/b")
        )
    )
    gate.set()
    async with Pool(
        memory=memory, memory_budget_mb=5_000, memory_floor_mb=500, min_turn=60, max_workers=1
    ) as pool:
        await registry.embedder("fake/a").embed_images([colour(1)])
        gate.clear()
        answered: list[np.ndarray] = []

        async def call_b() -> None:
            answered.append(await registry.embedder("fake/b").embed_images([colour(2)]))

        with anyio.fail_after(BOUND_S):
            async with anyio.create_task_group() as group:
                group.start_soon(registry.embedder("fake/a").embed_images, [colour(3)])
                await wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
                group.start_soon(call_b)
                await wait_until(lambda: pool.stats()["fake/b"].waiting == 1)
                await anyio.sleep(0.2)
                assert pool.stats()["fake/b"].state == "cold"
                memory.free(1_000)
                await wait_until(lambda: pool.stats()["fake/b"].state == "loading")
                gate.set()
        stats = pool.stats()
    assert len(answered) == 1
    assert stats["fake/a"].evictions == 0 and stats["fake/b"].state == "ready"


class NoDevice(FakeEmbeddingBackend):
    def memory_device(self) -> str:
        raise RuntimeError("no such device here")


async def test_a_device_that_cannot_be_told_is_a_model_load_error_for_its_caller() -> None:
    spec = dataclasses.replace(fake_embedding_spec("fake/nowhere"), factory=NoDevice)
    async with Pool(memory=FakeMemory(total_mb=100_000)) as pool:
        with pytest.raises(limner.ModelLoadError, match="no such device here"):
            await registry_of(spec).embedder("fake/nowhere").embed_images([colour(1)])
        assert pool.stats()["fake/nowhere"].waiting == 0
