"""The runtime seam: fronts hand a runtime only data, and any runtime can serve them."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from PIL import Image

import limner
from limner import GenerationResult, ImageGenerationConfig, Pool, PoolBusy, Progress, Registry
from limner.runtime import BatchCall, StreamCall, backend_method
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


# -- two call shapes for every capability ------------------------------------------------------


async def test_the_fronts_send_batched_and_streamed_calls_naming_backend_methods() -> None:
    seen: list[tuple[str, Any]] = []

    def batch(key: str, call: BatchCall) -> np.ndarray:
        seen.append((key, call))
        return np.eye(4, dtype=np.float32)[: len(call.items)]

    def stream(key: str, call: StreamCall) -> Any:
        seen.append((key, call))
        prompt, config = call.args
        yield Progress(step=1, total=1, elapsed=0.0)
        image = Image.new("RGB", (8, 8))
        yield GenerationResult(model=key, prompt=prompt, images=(image,), seed=1, config=config)

    runtime = MockRuntime(batch=batch, stream=stream)
    models = registry()
    await models.embedder("fake/embedder").using(runtime).embed_text("a fox")
    result = await models.generator("fake/generator").using(runtime).generate("a fox")
    assert [(key, call.method) for key, call in seen] == [
        ("fake/embedder", "embed_texts"),
        ("fake/generator", "generate"),
    ]
    assert result.prompt == "a fox"
    assert runtime.calls == [
        ("batch", "fake/embedder", "embed_texts", 1),
        ("stream", "fake/generator", "generate"),
    ]


async def test_a_runtime_runs_only_the_methods_a_capability_offers() -> None:
    models = registry()
    embedder, generator = models.embedder("fake/embedder"), models.generator("fake/generator")
    with pytest.raises(limner.LimnerError, match="offers no batched method 'load'"):
        backend_method(embedder.backend, BatchCall("load", []))
    with pytest.raises(limner.LimnerError, match="offers no streamed method 'embed_texts'"):
        backend_method(embedder.backend, StreamCall("embed_texts"))
    with pytest.raises(limner.LimnerError, match="its capability's are: edit, generate"):
        backend_method(generator.backend, StreamCall("unload"))
    assert backend_method(generator.backend, StreamCall("generate")) == generator.backend.generate
    async with Pool(memory=FakeMemory(total_mb=10_000)) as pool:
        with pytest.raises(limner.LimnerError, match="offers no batched method"):
            await pool.run_batch(embedder.backend, BatchCall("unload", [1]))
        assert pool.stats() == {}  # refused before anything queued or loaded


async def test_the_calls_runtimes_carried_before_still_work_and_warn() -> None:
    models = registry()
    backend = models.embedder("fake/embedder").backend
    prepared = backend.prepare(Image.new("RGB", (8, 8), (9, 0, 0)))
    config = models.generator("fake/generator").resolve_config(
        ImageGenerationConfig(steps=2, seed=3)
    )
    async with Pool(memory=FakeMemory(total_mb=10_000)) as pool:
        with pytest.warns(DeprecationWarning, match=r"Pool\.embed is deprecated.*run_batch"):
            rows = await pool.embed(backend, "image", [prepared])
        expected = await pool.run_batch(backend, BatchCall("embed_prepared", [prepared]))
        np.testing.assert_array_equal(rows, expected)
        generator = models.generator("fake/generator").backend
        with pytest.warns(DeprecationWarning, match=r"Pool\.generate is deprecated"):
            chunks = [chunk async for chunk in pool.generate(generator, "a fox", config)]
        assert isinstance(chunks[-1], GenerationResult) and chunks[-1].seed == 3
        with pytest.warns(DeprecationWarning, match=r"Pool\.decoding is deprecated"):
            with pool.decoding(backend, 1):
                pass


class RuntimeOfLastRelease:
    """A runtime written against limner 0.1: embed and generate, no run_batch/run_stream."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def embed(self, backend: Any, kind: str, items: Any) -> Any:
        method = "embed_prepared" if kind == "image" else "embed_texts"
        return await self.pool.run_batch(backend, BatchCall(method, items))

    def generate(self, backend: Any, prompt: str, config: Any) -> Any:
        return self.pool.run_stream(backend, StreamCall("generate", (prompt, config)))


async def test_a_runtime_of_the_last_release_still_serves_the_fronts_and_warns() -> None:
    models = registry()
    async with Pool(memory=FakeMemory(total_mb=10_000)) as pool:
        old = RuntimeOfLastRelease(pool)
        embedder = models.embedder("fake/embedder").using(old)  # type: ignore[arg-type]
        generator = models.generator("fake/generator").using(old)  # type: ignore[arg-type]
        with pytest.warns(DeprecationWarning, match="without run_batch"):
            vectors = await embedder.embed_text(["a fox", "a dog"])
        with pytest.warns(DeprecationWarning, match="without run_stream"):
            result = await generator.generate("a fox", ImageGenerationConfig(seed=4))
    assert vectors.shape == (2, 4)
    assert result.seed == 4
