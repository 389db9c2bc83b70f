"""The Ray runtime on a local cluster: the same answers and guarantees as the pool, and the
HTTP API through it."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from PIL import Image

import limner
from limner import (
    GenerationResult,
    ImageGenerationConfig,
    MemoryExhausted,
    ModelError,
    Pool,
    Progress,
    Registry,
)
from limner.ray import NoRoomInCluster, RayKeyOptions, RayRuntime
from limner.testing import fake_embedding_spec

from .conftest import FAKE_OPTIONS, fake_registry, import_ray

pytestmark = [
    pytest.mark.anyio,
    # limner sets it for a short keep-alive: Serve's replacement is process-wide env vars
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s`:DeprecationWarning"),
]

IMAGES = [Image.new("RGB", (8, 8), (i * 40, 255 - i * 30, 7)) for i in range(5)]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def collect(model: limner.ImageGenerator, prompt: str, **config: Any) -> list[Any]:
    return [chunk async for chunk in model.generate_image(prompt, ImageGenerationConfig(**config))]


def test_the_ray_runtime_is_a_runtime() -> None:
    assert isinstance(RayRuntime(), limner.Runtime)


async def test_vectors_and_images_are_those_of_the_in_process_pool(
    runtime: RayRuntime, registry: Registry
) -> None:
    embedder, generator = registry.embedder("fake/embedder"), registry.generator("fake/generator")
    async with Pool() as pool:
        local_images = await embedder.using(pool).embed_images(IMAGES)
        local_texts = await embedder.using(pool).embed_text(["a fox", "a lighthouse"])
        local_chunks = await collect(generator.using(pool), "a fox", steps=3, seed=11)
    remote_images = await embedder.using(runtime).embed_images(IMAGES)
    remote_texts = await embedder.using(runtime).embed_text(["a fox", "a lighthouse"])
    remote_chunks = await collect(generator.using(runtime), "a fox", steps=3, seed=11)

    np.testing.assert_array_equal(remote_images, local_images)
    np.testing.assert_array_equal(remote_texts, local_texts)
    assert remote_images.dtype == np.float32 and remote_images.flags.writeable
    assert [chunk.step for chunk in remote_chunks[:-1]] == [1, 2, 3]
    local, remote = local_chunks[-1], remote_chunks[-1]
    assert isinstance(remote, GenerationResult) and isinstance(local, GenerationResult)
    assert [png(image) for image in remote.images] == [png(image) for image in local.images]
    assert (remote.seed, remote.config) == (local.seed, local.config)
    stats = (await runtime.refresh())["fake/embedder"]
    assert (stats.state, stats.workers, stats.in_flight, stats.loads) == ("ready", 1, 0, 1)


async def test_tiny_clip_gives_the_in_process_vectors(ray_cluster: None) -> None:
    """A real plugin: the replica builds its backend from the plugin on its node."""
    limner_clip = pytest.importorskip("limner_clip", reason="embeds with the CLIP plugin")
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_clip)
    model = registry.embedder("limner/tiny-clip")
    photo = Image.new("RGB", (64, 48), (30, 140, 200))
    async with Pool() as pool:
        expected = await model.using(pool).embed_images([photo, IMAGES[1]])
        expected_text = await model.using(pool).embed_text("a red fox")
    async with RayRuntime(options=FAKE_OPTIONS) as runtime:
        got = await model.using(runtime).embed_images([photo, IMAGES[1]])
        got_text = await model.using(runtime).embed_text("a red fox")
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_text, expected_text)


async def test_typed_errors_come_back_typed(runtime: RayRuntime, registry: Registry) -> None:
    failing = registry.embedder("fake/failing-batch").using(runtime)
    with pytest.raises(ModelError, match="injected failure on a batch of 3"):
        await failing.embed_images(IMAGES[:3])
    np.testing.assert_array_equal(  # the replica's worker stayed up
        await failing.embed_images(IMAGES[:2]),
        await registry.embedder("fake/failing-batch").using(runtime).embed_images(IMAGES[:2]),
    )
    generator = registry.generator("fake/failing").using(runtime)
    with pytest.raises(ModelError, match="injected failure at step 2") as caught:
        await collect(generator, "a fox", steps=4, seed=1)
    assert type(caught.value) is ModelError  # limner's own, not Ray's wrapper class


async def test_a_replica_s_memory_exhausted_keeps_its_fields(
    ray_cluster: None, registry: Registry
) -> None:
    options = RayKeyOptions(num_cpus=0.25, pool_options={"memory_budget_mb": 10})
    async with RayRuntime(options=options) as runtime:
        with pytest.raises(MemoryExhausted) as caught:
            await registry.embedder("fake/embedder").using(runtime).embed_images(IMAGES[:1])
    assert type(caught.value) is MemoryExhausted
    assert (caught.value.key, caught.value.need_mb) == ("fake/embedder", 100.0)


def test_ray_s_wrappers_are_unwrapped_to_limner_s_errors() -> None:
    ray = import_ray()
    from ray.serve.exceptions import BackPressureError

    from limner.ray._runtime import typed_error

    busy = limner.PoolBusy("fake/embedder", queue_size=7, retry_after=2.5)
    wrapped = ray.exceptions.RayTaskError("embed", "traceback", busy).as_instanceof_cause()
    error = typed_error(wrapped, "fake/embedder")
    assert type(error) is limner.PoolBusy
    assert (error.key, error.queue_size, error.retry_after) == ("fake/embedder", 7, 2.5)
    pressure = typed_error(BackPressureError(9, 8), "fake/embedder")
    assert isinstance(pressure, limner.PoolBusy) and pressure.queue_size == 8
    other = typed_error(RuntimeError("boom"), "fake/embedder")
    assert isinstance(other, ModelError) and "boom" in str(other)


async def test_closing_a_stream_stops_the_remote_generation_early(
    runtime: RayRuntime, registry: Registry
) -> None:
    model = registry.generator("fake/slow").using(runtime)  # 50 steps take 5 s
    stream = model.generate_image("a fox", ImageGenerationConfig(steps=50, seed=1))
    taken = [chunk async for chunk in first_chunks(stream, 2)]
    assert [chunk.step for chunk in taken] == [1, 2]
    closed = time.monotonic()
    while True:  # the replica's pool frees its worker at the next step
        stats = await runtime.replica_stats("fake/slow")
        assert stats is not None
        if stats.in_flight == 0:
            break
        assert time.monotonic() - closed < 2.0, "the generation ran on after its stream closed"
        await anyio.sleep(0.05)


async def first_chunks(stream: Any, count: int) -> Any:
    """The first ``count`` chunks of ``stream``, which is then closed."""
    taken = 0
    try:
        async for chunk in stream:
            yield chunk
            taken += 1
            if taken == count:
                return
    finally:
        await stream.aclose()


async def test_a_slow_consumer_slows_the_remote_generation(
    runtime: RayRuntime, registry: Registry
) -> None:
    assert runtime.stream_window == 4
    model = registry.generator("fake/generator").using(runtime)  # 0.02 s a step
    await collect(model, "warm", steps=1, seed=1)
    stream = model.generate_image("a fox", ImageGenerationConfig(steps=40, seed=1))
    async for chunk in first_chunks(stream, 14):
        await anyio.sleep(0.15)
        last = chunk
    assert isinstance(last, Progress) and last.step == 14
    # Unbounded, step 14 would be done at 0.28 s; the window (4 chunks, plus one in the
    # pool's slot and one in the pipeline) holds the producer near the consumer's pace,
    # 0.15 s a chunk: (14 - 4 - 2) x 0.15 = 1.2 s, less the acknowledgements' latency.
    assert last.elapsed > 0.6, last.elapsed


async def test_a_key_no_node_can_hold_fails_fast_naming_need_and_room(
    ray_cluster: None,
) -> None:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/huge", memory_mb=100_000_000))
    registry.register(fake_embedding_spec("fake/wide"))
    options = {"fake/wide": RayKeyOptions(num_cpus=3)}
    async with RayRuntime(options=FAKE_OPTIONS, options_per_key=options) as runtime:
        started = time.monotonic()
        with pytest.raises(MemoryExhausted) as caught:
            await registry.embedder("fake/huge").using(runtime).embed_images(IMAGES[:1])
        error = caught.value
        assert isinstance(error, NoRoomInCluster)
        assert (error.resource, error.need, error.need_mb) == ("memory", 1e8, 1e8)
        assert 0 < error.largest == error.available_mb < 1e8
        assert "needs 100,000,000 MB of memory, the largest node has" in str(error)
        with pytest.raises(NoRoomInCluster, match="needs 3 CPU, the largest node has 2 CPU"):
            await registry.embedder("fake/wide").using(runtime).embed_images(IMAGES[:1])
        assert time.monotonic() - started < 5
        await runtime.refresh()
        assert {key: s.state for key, s in runtime.stats().items()} == {
            "fake/huge": "cold",
            "fake/wide": "cold",
        }


async def test_an_idle_key_scales_to_zero_and_back_and_the_lru_gives_its_room_up(
    ray_cluster: None,
) -> None:
    registry = Registry(entry_points=False)
    for key in ("fake/held", "fake/first", "fake/second"):
        registry.register(fake_embedding_spec(key))
    per_key = {  # the session's 2 cores hold held and first, or second alone
        "fake/held": RayKeyOptions(num_cpus=1, keep_alive=600),
        "fake/first": RayKeyOptions(num_cpus=1, keep_alive=1.0, upscale_delay_s=0.0),
        "fake/second": RayKeyOptions(num_cpus=2, keep_alive=600),
    }
    async with RayRuntime(options_per_key=per_key, refresh_interval=0.2) as runtime:
        await registry.embedder("fake/held").using(runtime).embed_images(IMAGES[:1])
        first = registry.embedder("fake/first").using(runtime)
        expected = await first.embed_images(IMAGES[:2])
        idle = time.monotonic()
        with anyio.fail_after(30):  # Serve's autoscaler scales the idle key to zero
            while True:
                if not runtime.stats()["fake/first"].workers:
                    break
                await anyio.sleep(0.2)
        to_zero = time.monotonic() - idle
        started = time.monotonic()
        np.testing.assert_array_equal(await first.embed_images(IMAGES[:2]), expected)
        from_zero = time.monotonic() - started
        assert from_zero < 15, from_zero
        print(f"idle to zero replicas {to_zero:.1f} s, from zero to an answer {from_zero:.1f} s")
        assert runtime.stats()["fake/first"].evictions == 0  # Serve's doing, not a retirement

        # No node has room for fake/second: the least recently used idle key goes first.
        await registry.embedder("fake/second").using(runtime).embed_images(IMAGES[:1])
        stats = await runtime.refresh()
        assert (stats["fake/held"].state, stats["fake/held"].evictions) == ("cold", 1)
        assert stats["fake/first"].state == "cold"  # retired, or gone by its keep-alive
        assert stats["fake/second"].state == "ready"


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_the_runtime_serves_trio_callers_too(ray_cluster: None) -> None:
    registry = fake_registry()
    async with Pool() as pool:
        expected = await registry.embedder("fake/embedder").using(pool).embed_images(IMAGES)
    async with RayRuntime(options=FAKE_OPTIONS) as runtime:
        model = registry.embedder("fake/embedder").using(runtime)
        np.testing.assert_array_equal(await model.embed_images(IMAGES), expected)
        chunks = await collect(registry.generator("fake/generator").using(runtime), "x", steps=2)
        assert isinstance(chunks[-1], GenerationResult)


@pytest.fixture
def served(ray_cluster: None) -> Iterator[str]:
    """The app over a RayRuntime, under uvicorn on 127.0.0.1:<ephemeral>, in a thread."""
    pytest.importorskip("fastapi", reason="the server tests need the server extra")
    import uvicorn

    from limner.server import ServerSettings, create_app

    settings = ServerSettings(runtime=lambda: RayRuntime(options=FAKE_OPTIONS), ui=False)
    app = create_app(registry=fake_registry(), settings=settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


def png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 40)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def expected_vectors(inputs: list[Any]) -> Any:
    image = Image.open(io.BytesIO(base64.b64decode(inputs[1].split(",", 1)[1])))
    async with Pool() as pool:
        model = fake_registry().embedder("fake/embedder").using(pool)
        return np.concatenate(
            [await model.embed_text(inputs[:1]), await model.embed_images([image.convert("RGB")])]
        )


async def test_the_http_api_answers_through_the_cluster(served: str) -> None:
    inputs = ["a red fox", png_data_url()]
    async with httpx.AsyncClient(base_url=served, timeout=60) as client:
        response = await client.post(
            "/v1/embeddings", json={"model": "fake/embedder", "input": inputs}
        )
        assert response.status_code == 200, response.text
        rows = np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
        image = await client.post(
            "/v1/images/generations",
            json={"model": "fake/generator", "prompt": "a fox", "size": "16x16"},
        )
        assert image.status_code == 200, image.text
        assert image.json()["data"][0]["b64_json"]
        pool = (await client.get("/v1/pool")).json()["models"]
    np.testing.assert_allclose(rows, await expected_vectors(inputs), atol=1e-6)
    assert {model["key"]: model["device"] for model in pool} == {
        "fake/embedder": "ray",
        "fake/generator": "ray",
    }
