"""The replica deployment class in Serve's local testing mode: the same handle calls as on a
cluster, run in this process, so embed, the generation stream and the typed errors are
checked in seconds without one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from limner import GenerationResult, ImageGenerationConfig, ModelError, Pool, Progress
from limner.ray._calls import next_chunk, result
from limner.ray._replica import LimnerReplica
from limner.runtime import BatchCall, StreamCall

from .conftest import fake_registry, import_ray

pytestmark = [pytest.mark.anyio, pytest.mark.ray]  # Serve's local testing mode imports Ray

IMAGES = [Image.new("RGB", (8, 8), (i * 40, 90, 7)) for i in range(3)]


def local_handle(key: str) -> Any:
    """A handle to one in-process replica of ``key``, as the runtime deploys it."""
    import_ray()
    from ray import serve

    registry = fake_registry()
    spec, settings = registry.spec(key), registry.settings(key)
    deployment = serve.deployment(LimnerReplica).options(name="LimnerReplica")
    return serve.run(
        deployment.bind(spec, settings, {}),
        name=f"limner:{key}",
        route_prefix=None,
        _local_testing_mode=True,
    )


async def test_embed_answers_the_rows_of_the_in_process_pool() -> None:
    registry = fake_registry()
    backend = registry.embedder("fake/embedder").backend
    prepared = [backend.prepare(image) for image in IMAGES]
    async with Pool() as pool:
        expected = await pool.run_batch(backend, BatchCall("embed_prepared", prepared))
        expected_text = await pool.run_batch(backend, BatchCall("embed_texts", ["a fox"]))
    handle = local_handle("fake/embedder")
    rows = await result(
        handle.run_batch.remote(BatchCall("embed_prepared", prepared)), "fake/embedder"
    )
    np.testing.assert_array_equal(rows, expected)
    text = await result(
        handle.run_batch.remote(BatchCall("embed_texts", ["a fox"])), "fake/embedder"
    )
    np.testing.assert_array_equal(text, expected_text)
    stats = await handle.stats.remote()
    assert (stats.key, stats.batches, stats.in_flight) == ("fake/embedder", 2, 0)


async def stream(handle: Any, key: str, steps: int) -> list[Any]:
    config = ImageGenerationConfig(steps=steps, seed=3, width=16, height=16)
    call = StreamCall("generate", ("a fox", config))
    response = handle.options(stream=True).run_stream.remote(call, "s", None, 0)
    chunks = []
    while True:
        try:
            chunks.append(await next_chunk(response, key))
        except StopAsyncIteration:
            return chunks


async def test_a_generation_streams_its_progress_then_its_image() -> None:
    chunks = await stream(local_handle("fake/generator"), "fake/generator", steps=3)
    assert [type(chunk) for chunk in chunks] == [Progress] * 3 + [GenerationResult]
    assert [chunk.step for chunk in chunks[:3]] == [1, 2, 3]
    assert chunks[-1].seed == 3


async def test_a_replica_s_failures_come_back_as_limner_s_typed_errors() -> None:
    failing = local_handle("fake/failing-batch")
    backend = fake_registry().embedder("fake/failing-batch").backend
    prepared = [backend.prepare(image) for image in IMAGES]
    with pytest.raises(ModelError, match="injected failure on a batch of 3") as caught:
        await result(
            failing.run_batch.remote(BatchCall("embed_prepared", prepared)), "fake/failing-batch"
        )
    assert type(caught.value) is ModelError
    two = failing.run_batch.remote(BatchCall("embed_prepared", prepared[:2]))
    assert len(await result(two, "x")) == 2
    with pytest.raises(ModelError, match="injected failure at step 2") as failed:
        await stream(local_handle("fake/failing"), "fake/failing", steps=4)
    assert type(failed.value) is ModelError
