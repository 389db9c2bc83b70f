"""The runtime seam: fronts hand a runtime only data, and any runtime can serve them."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from PIL import Image

import limner
from limner import GenerationResult, ImageGenerationConfig, Pool, PoolBusy, Progress, Registry
from limner.testing import (
    FakeMemory,
    MockRuntime,
    fake_embedding_spec,
    fake_generation_spec,
)

pytestmark = pytest.mark.anyio


def registry() -> Registry:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/embedder", dimension=4))
    registry.register(fake_generation_spec("fake/generator"))
    return registry


def test_the_pool_and_the_shipped_double_are_runtimes() -> None:
    assert isinstance(Pool(), limner.Runtime)
    assert isinstance(MockRuntime(), limner.Runtime)


async def test_a_front_sends_a_runtime_prepared_arrays_and_gets_rows() -> None:
    received: list[tuple[str, str, list[Any]]] = []

    def embed(key: str, kind: str, items: list[Any]) -> np.ndarray:
        received.append((key, kind, items))
        return np.eye(4, dtype=np.float32)[: len(items)]

    runtime = MockRuntime(embed=embed)
    model = registry().embedder("fake/embedder").using(runtime)
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    vectors = await model.embed_images(images)
    texts = await model.embed_text(["a fox", "a dog"])
    assert vectors.shape == (3, 4)
    assert texts.shape == (2, 4)
    assert [(key, kind, len(items)) for key, kind, items in received] == [
        ("fake/embedder", "image", 3),
        ("fake/embedder", "text", 2),
    ]
    assert all(isinstance(item, np.ndarray) for item in received[0][2])  # decoded here
    assert received[1][2] == ["a fox", "a dog"]
    assert runtime.calls[0] == ("embed", "fake/embedder", "image", 3)


async def test_a_runtime_s_typed_error_reaches_the_caller_as_itself() -> None:
    def busy(key: str, kind: str, items: list[Any]) -> np.ndarray:
        raise PoolBusy(key, queue_size=7, retry_after=2.5)

    model = registry().embedder("fake/embedder").using(MockRuntime(embed=busy))
    with pytest.raises(PoolBusy) as caught:
        await model.embed_text("a fox")
    assert (caught.value.key, caught.value.queue_size, caught.value.retry_after) == (
        "fake/embedder",
        7,
        2.5,
    )


async def test_a_generation_streams_through_any_runtime() -> None:
    def generate(key: str, prompt: str, config: ImageGenerationConfig) -> list[Any]:
        assert config.steps == 3  # resolved by the front, before the runtime
        image = Image.new("RGB", (16, 16), (1, 2, 3))
        progress = [Progress(step=s, total=3, elapsed=0.0) for s in (1, 2, 3)]
        result = GenerationResult(
            model=key, prompt=prompt, images=(image,), seed=config.seed or 0, config=config
        )
        return [*progress, result]

    model = registry().generator("fake/generator").using(MockRuntime(generate=generate))
    chunks = [c async for c in model.generate_image("a fox", ImageGenerationConfig(steps=3))]
    assert [type(c).__name__ for c in chunks] == ["Progress"] * 3 + ["GenerationResult"]
    final = chunks[-1]
    assert isinstance(final, GenerationResult)
    assert final.prompt == "a fox"


async def test_load_stats_and_evict_go_through_the_runtime() -> None:
    runtime = MockRuntime()
    model = registry().embedder("fake/embedder").using(runtime)
    await model.load()
    assert list(runtime.stats()) == ["fake/embedder"]
    assert await runtime.evict("fake/embedder")
    assert not await runtime.evict("fake/embedder")


@pytest.mark.parametrize(
    "error",
    [
        limner.PoolBusy("k", queue_size=3, retry_after=0.5),
        limner.MemoryExhausted("k", need_mb=500, available_mb=20),
        limner.UnknownModelError("x", suggestions=["y"], plugins=["clip"]),
        limner.InvalidInput("too large", input="data:...", index=2, field="input"),
        limner.FetchError("HTTP 404", input="http://h/x.png"),
        limner.ModelError("boom"),
        limner.ModelLoadError("no weights"),
        limner.Cancelled("stopped"),
        limner.PluginError("bad hook"),
    ],
)
def test_every_error_pickles_with_its_fields(error: limner.LimnerError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__


async def test_the_pool_serves_a_front_through_the_same_seam() -> None:
    model = registry().embedder("fake/embedder")
    async with Pool(memory=FakeMemory(total_mb=1000)) as pool:
        vectors = await model.using(pool).embed_text(["a", "b"])
        assert vectors.shape == (2, 4)
        assert pool.stats()["fake/embedder"].batches == 1
