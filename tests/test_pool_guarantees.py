"""What the pool promises whatever happens around it: every caller is answered, only typed
errors reach callers, plugins' output is checked, and eviction frees what a load took."""

from __future__ import annotations

import dataclasses
import gc
import random
import threading
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import anyio
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

import limner
from limner import ModelError, Pool, PoolBusy, Registry
from limner.plugin import ImageEmbeddingBackend
from limner.testing import (
    FakeClock,
    FakeEmbeddingBackend,
    FakeMemory,
    fake_embedding_spec,
    fake_generation_spec,
)

pytestmark = pytest.mark.anyio

#: A hang detector, not a speed check: a caller left waiting forever fails the test instead of
#: hanging it. Generous, since every eviction runs a full gc.collect() in this (large) test
#: process, which a busy machine can stretch to seconds.
CALL_BOUND_S = 60.0


def colour(index: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (index % 256, (index * 7) % 256, (index * 13) % 256))


def shared_weights_spec(key: str, memory: FakeMemory, **options: Any) -> limner.ModelSpec:
    """A fake model of 100 MB whose second worker costs 10 MB, charged to ``memory``."""
    spec = fake_embedding_spec(key, max_batch_size=8, options={"memory": memory, **options})
    return dataclasses.replace(spec, info=dataclasses.replace(spec.info, worker_overhead_mb=10))


def registry_of(*specs: limner.ModelSpec) -> Registry:
    registry = Registry(entry_points=False)
    for spec in specs:
        registry.register(spec)
    return registry


def assert_typed(error: BaseException) -> None:
    assert type(error).__name__ not in {"ExceptionGroup", "BaseExceptionGroup"}, error
    assert isinstance(error, limner.LimnerError), f"untyped error: {error!r}"


# -- every request taken off a queue is answered --------------------------------------------------


@pytest.mark.slow  # thousands of calls while the models take turns: tens of seconds
async def test_callers_are_answered_while_two_models_evict_each_other() -> None:
    """The reproduction of the hang: each cold start evicts the other model, 24 callers."""
    memory = FakeMemory(total_mb=1000)
    registry = registry_of(
        shared_weights_spec("fake/a", memory), shared_weights_spec("fake/b", memory)
    )
    answered = rounds = 0
    async with Pool(memory=memory, memory_budget_mb=150) as pool:

        async def caller(index: int) -> None:
            nonlocal answered
            key = ("fake/a", "fake/b")[index % 2]
            pauses = random.Random(index * 100 + rounds)
            for attempt in range(15):
                await anyio.sleep(pauses.random() * 0.004)  # lets a model fall idle now and then
                with anyio.fail_after(CALL_BOUND_S):
                    try:
                        vectors = await registry.embedder(key).embed_images([colour(attempt)])
                        assert vectors.shape == (1, 8)
                    except limner.LimnerError as error:
                        assert_typed(error)
                answered += 1

        def evictions() -> int:
            return sum(stats.evictions for stats in pool.stats().values())

        # Rounds until the models have evicted each other (how soon depends on timing);
        # every call of every round must be answered.
        while rounds < 20 and (rounds == 0 or evictions() == 0):
            rounds += 1
            async with anyio.create_task_group() as group:
                for index in range(24):
                    group.start_soon(caller, index)
        assert evictions() > 0
    assert answered == 24 * 15 * rounds


async def run_stress(seed: int, *, seconds: float) -> dict[str, int]:
    """Callers of random sizes, random cancellations, random evictions, injected failures."""
    rng = random.Random(seed)
    memory = FakeMemory(total_mb=1000)
    registry = registry_of(
        shared_weights_spec("fake/a", memory),
        shared_weights_spec("fake/b", memory, fail_on_batch_size=7),
        shared_weights_spec("fake/c", memory, oom_above=12),
    )
    keys = ("fake/a", "fake/b", "fake/c")
    outcomes = {"vectors": 0, "typed errors": 0, "cancelled by caller": 0, "evictions": 0}
    stop = anyio.Event()

    async with Pool(
        memory=memory, memory_budget_mb=rng.choice([150, 250, 1000]), max_queue=64
    ) as pool:

        async def caller(number: int) -> None:
            caller_rng = random.Random(seed * 1000 + number)
            while not stop.is_set():
                key = caller_rng.choice(keys)
                size = caller_rng.choice([1, 1, 1, 2, 5, 20])
                images = [colour(caller_rng.randrange(256)) for _ in range(size)]
                with anyio.fail_after(CALL_BOUND_S):
                    with anyio.CancelScope() as scope:
                        if caller_rng.random() < 0.2:
                            scope.deadline = anyio.current_time() + caller_rng.random() * 0.01
                        try:
                            vectors = await registry.embedder(key).embed_images(images)
                        except limner.LimnerError as error:
                            assert_typed(error)
                            outcomes["typed errors"] += 1
                        else:
                            assert vectors.shape == (size, 8)
                            outcomes["vectors"] += 1
                    if scope.cancelled_caught:
                        outcomes["cancelled by caller"] += 1

        async def evictor() -> None:
            while not stop.is_set():
                await anyio.sleep(rng.random() * 0.005)
                if await pool.evict(rng.choice(keys)):
                    outcomes["evictions"] += 1

        async with anyio.create_task_group() as group:
            for number in range(16):
                group.start_soon(caller, number)
            group.start_soon(evictor)
            await anyio.sleep(seconds)
            stop.set()
    return outcomes


@pytest.mark.slow  # many seeded rounds of evictions and cancellations: tens of seconds
async def test_randomized_evictions_and_cancellations_never_strand_a_caller() -> None:
    """Many short seeded runs; any caller left waiting fails its ``fail_after`` bound."""
    totals: dict[str, int] = {}
    for seed in range(12):
        for name, count in (await run_stress(seed, seconds=0.6)).items():
            totals[name] = totals.get(name, 0) + count
    # The run exercised what it claims to: answers of each kind, and real evictions.
    assert totals["vectors"] > 0
    assert totals["typed errors"] > 0
    assert totals["cancelled by caller"] > 0
    assert totals["evictions"] > 0


async def test_a_model_whose_worker_fills_a_batch_is_not_idle() -> None:
    """The hang's cause: a worker topping up a batch held requests nobody counted, so the
    model looked idle, was evicted, and the worker was cancelled with them."""
    gate = threading.Event()
    registry = registry_of(fake_embedding_spec("fake/a", options={"gate": gate}))
    model = registry.embedder("fake/a")
    async with Pool(
        memory=FakeMemory(total_mb=10_000), clock=FakeClock(), max_batch_wait=1.0
    ) as pool:
        gate.set()
        await model.load()
        gate.clear()
        first: list[npt.NDArray[np.float32]] = []
        second: list[npt.NDArray[np.float32]] = []
        async with anyio.create_task_group() as group:
            group.start_soon(_append, first, model, 1)  # runs, held by the gate
            await _wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
            group.start_soon(_append, second, model, 2)  # taken, waits to fill up
            await _wait_until(lambda: pool.stats()["fake/a"].in_flight == 2)
            gate.set()
            await _wait_until(lambda: len(first) == 1)
            assert not await pool.evict("fake/a")
        assert len(second) == 1


async def _append(results: list[npt.NDArray[np.float32]], model: Any, index: int) -> None:
    results.append(await model.embed_images([colour(index)]))


async def _wait_until(condition: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - polling pool stats, which fire no event
            await anyio.sleep(0.001)


# -- only typed errors reach callers --------------------------------------------------------------


async def test_a_split_request_meets_a_full_queue_as_pool_busy() -> None:
    gate = threading.Event()
    registry = registry_of(fake_embedding_spec("fake/a", max_batch_size=4, options={"gate": gate}))
    model = registry.embedder("fake/a")
    texts = [f"text {i}" for i in range(40)]  # ten chunks
    async with Pool(memory=FakeMemory(total_mb=10_000), max_queue=4, max_workers=1) as pool:
        gate.set()
        await model.load()
        gate.clear()
        async with anyio.create_task_group() as group:
            group.start_soon(_append, [], model, 0)  # runs, held by the gate
            await _wait_until(lambda: pool.stats()["fake/a"].in_flight == 1)
            for index in range(1, 5):  # fill the queue
                group.start_soon(_append, [], model, index)
            await _wait_until(lambda: pool.stats()["fake/a"].queue_depth == 4)
            with pytest.raises(PoolBusy) as caught:
                await model.embed_text(texts)
            assert_typed(caught.value)
            gate.set()
        # With room in the queue, the same large call is admitted whole and answered.
        assert (await model.embed_text(texts)).shape == (40, 8)


async def test_one_failing_chunk_of_a_split_request_is_a_model_error() -> None:
    registry = registry_of(
        fake_embedding_spec("fake/a", max_batch_size=4, options={"fail_on_batch_size": 2})
    )
    model = registry.embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000), max_workers=1):
        with pytest.raises(ModelError, match="batch of 2") as caught:
            await model.embed_images([colour(i) for i in range(10)])  # 4 + 4 + 2
    assert_typed(caught.value)


class PrepareFails(FakeEmbeddingBackend):
    def prepare(self, image: Image.Image) -> npt.NDArray[np.float32]:
        raise self.settings.options["error"]


@pytest.mark.parametrize("error", [RuntimeError("broken plugin"), MemoryError()])
async def test_an_exception_in_prepare_is_a_model_error_naming_the_plugin(
    error: Exception,
) -> None:
    spec = dataclasses.replace(
        fake_embedding_spec("fake/a", options={"error": error}), factory=PrepareFails
    )
    model = registry_of(spec).embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000)):
        with pytest.raises(ModelError, match="PrepareFails") as caught:
            await model.embed_images([colour(1), colour(2)])
    assert_typed(caught.value)
    assert caught.value.__cause__ is error


async def test_an_exception_in_a_pool_block_propagates_as_itself() -> None:
    with pytest.raises(limner.InvalidInput, match="mine"):
        async with Pool():
            raise limner.InvalidInput("mine")
    with pytest.raises(KeyError):
        async with Pool(memory=FakeMemory(total_mb=10_000)):
            await registry_of(fake_embedding_spec("fake/a")).embedder("fake/a").load()
            raise KeyError("the caller's own")


# -- plugin output is checked -----------------------------------------------------------------


class ReturnsWhatItIsTold(FakeEmbeddingBackend):
    def embed_prepared(self, items: Sequence[Any]) -> npt.NDArray[np.float32]:
        make = self.settings.options["output"]
        output: npt.NDArray[np.float32] = make(len(items))
        return output


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (lambda n: np.ones((n, 5), dtype=np.float64), "5-dimensional rows"),
        (lambda n: np.ones((n + 1, 4), dtype=np.float32), r"shape \(3, 4\) for 2 inputs"),
        (lambda n: np.ones((n,), dtype=np.float32), r"shape \(2,\)"),
        (lambda n: np.full((n, 4), np.nan, dtype=np.float32), "NaN"),
        (lambda n: np.zeros((n, 4), dtype=np.float32), "all-zero row"),
        (lambda n: np.ones((n, 4), dtype=np.int64), "int64"),
    ],
)
async def test_bad_plugin_output_is_a_model_error_naming_the_plugin(
    output: Any, message: str
) -> None:
    spec = dataclasses.replace(
        fake_embedding_spec("fake/a", dimension=4, options={"output": output}),
        factory=ReturnsWhatItIsTold,
    )
    model = registry_of(spec).embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000)):
        with pytest.raises(ModelError, match=message) as caught:
            await model.embed_images([colour(1), colour(2)])
        assert "ReturnsWhatItIsTold" in str(caught.value)
        assert_typed(caught.value)


async def test_plugin_rows_of_another_precision_or_length_reach_callers_as_unit_float32() -> None:
    spec = dataclasses.replace(
        fake_embedding_spec(
            "fake/a",
            dimension=4,
            options={"output": lambda n: np.arange(1, 4 * n + 1, dtype=np.float64).reshape(n, 4)},
        ),
        factory=ReturnsWhatItIsTold,
    )
    model = registry_of(spec).embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000)):
        vectors = await model.embed_images([colour(1), colour(2)])
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert np.allclose(vectors[0], np.array([1, 2, 3, 4]) / np.sqrt(30), atol=1e-6)


# -- eviction frees what a load took; ownership follows the weights ----------------------------


class Weights:
    """Stands for a model object; a weakref to it tells whether anything still holds it."""


class DocsStylePlugin(ImageEmbeddingBackend):
    """Written as docs/plugins.md shows: ``load`` sets ``self.model``, no ``unload``."""

    image_size = 8
    created: ClassVar[list[weakref.ref[Weights]]] = []

    def load(self) -> None:
        self.model = Weights()
        DocsStylePlugin.created.append(weakref.ref(self.model))

    def embed_prepared(self, items: Sequence[Any]) -> npt.NDArray[np.float32]:
        assert isinstance(self.model, Weights)
        return np.tile(np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32), (len(items), 1))


async def test_eviction_releases_the_weights_of_a_plugin_without_unload() -> None:
    DocsStylePlugin.created.clear()
    spec = dataclasses.replace(
        fake_embedding_spec("fake/docs", dimension=4), factory=DocsStylePlugin
    )
    model = registry_of(spec).embedder("fake/docs")
    async with Pool(memory=FakeMemory(total_mb=10_000)) as pool:
        await model.embed_images([colour(1)])
        assert await pool.evict("fake/docs")
        gc.collect()
        assert [ref() for ref in DocsStylePlugin.created] == [None]
        assert not hasattr(model.backend, "model")
        # A later request loads it again and works.
        assert (await model.embed_images([colour(2)])).shape == (1, 4)
    assert len(DocsStylePlugin.created) == 2


def test_a_key_evicted_from_the_default_pool_can_join_another_pool() -> None:
    registry = registry_of(fake_embedding_spec("fake/default-then-own"))
    model = registry.embedder("fake/default-then-own")
    model.blocking().embed_image_base64(_png_base64())  # served by the default pool
    from limner._fronts._default_pool import run_on_default_loop  # evict on the default pool's loop

    assert run_on_default_loop(limner.default_pool().evict, "fake/default-then-own")

    async def use_own_pool() -> tuple[int, ...]:
        async with Pool(memory=FakeMemory(total_mb=10_000)) as own:
            vectors = await model.using(own).embed_images([colour(3)])
            return vectors.shape

    assert anyio.run(use_own_pool) == (1, 8)


def _png_base64() -> str:
    import base64
    import io

    buffer = io.BytesIO()
    colour(5).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# -- no ExceptionGroup escapes any public API, for every fault above -------------------------


async def _zero_sized_image() -> None:
    model = registry_of(fake_embedding_spec("fake/a")).embedder("fake/a")
    async with Pool(memory=FakeMemory(total_mb=10_000)):
        await model.embed_images([Image.new("RGB", (0, 5)), colour(1)])


async def _split_call_with_a_failing_chunk() -> None:
    spec = fake_embedding_spec("fake/a", max_batch_size=4, options={"fail_on_batch_size": 2})
    async with Pool(memory=FakeMemory(total_mb=10_000), max_workers=1):
        await registry_of(spec).embedder("fake/a").embed_images([colour(i) for i in range(10)])


async def _prepare_raises() -> None:
    spec = dataclasses.replace(
        fake_embedding_spec("fake/a", options={"error": RuntimeError("x")}), factory=PrepareFails
    )
    async with Pool(memory=FakeMemory(total_mb=10_000)):
        await registry_of(spec).embedder("fake/a").embed_images([colour(1), colour(2)])


async def _generation_fails_midway() -> None:
    spec = fake_generation_spec("fake/g", options={"fail_at_step": 2})
    async with Pool(memory=FakeMemory(total_mb=10_000)):
        async for _ in registry_of(spec).generator("fake/g").generate_image("a fox"):
            pass


async def _raised_inside_a_pool_block() -> None:
    async with Pool(memory=FakeMemory(total_mb=10_000)):
        raise limner.InvalidInput("the caller's own", field="x")


async def _too_long_a_text() -> None:
    async with Pool(memory=FakeMemory(total_mb=10_000)):
        model = registry_of(fake_embedding_spec("fake/a")).embedder("fake/a")
        await model.embed_text(["short", "x" * (model.max_text_chars + 1)])


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (_zero_sized_image, limner.InvalidInput),
        (_split_call_with_a_failing_chunk, ModelError),
        (_prepare_raises, ModelError),
        (_generation_fails_midway, ModelError),
        (_raised_inside_a_pool_block, limner.InvalidInput),
        (_too_long_a_text, limner.InvalidInput),
    ],
)
async def test_no_public_call_raises_an_exception_group(
    fault: Any, expected: type[limner.LimnerError]
) -> None:
    with pytest.raises(BaseException) as caught:  # noqa: PT011 - the type is the assertion
        await fault()
    assert_typed(caught.value)
    assert isinstance(caught.value, expected), repr(caught.value)
