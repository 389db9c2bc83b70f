"""The Ray runtime on a local cluster: the same answers and guarantees as the pool, and the
HTTP API through it: in a process of its own over the runtime, and as a Serve ingress
deployment behind Serve's proxy on 127.0.0.1."""

from __future__ import annotations

import functools
import io
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

import limner
from limner import (
    GenerationResult,
    ImageGenerationConfig,
    KeyStats,
    MemoryExhausted,
    ModelError,
    Pool,
    Progress,
    Registry,
)
from limner.ray import NoRoomInCluster, RayKeyOptions, RayRuntime, http_ingress
from limner.ray._usage import BOARD_NAME, BOARD_NAMESPACE
from limner.testing import fake_embedding_spec, fake_generation_spec

from .conftest import FAKE_OPTIONS, check_embeddings_over_http, fake_registry, import_ray

pytestmark = [
    pytest.mark.ray,  # one local Ray cluster for the module
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


SOURCE = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))
MASK = Image.new("L", (64, 48), 0)
MASK.paste(255, (16, 8, 48, 40))  # white: repaint the middle


async def collect_edit(model: limner.ImageGenerator, **config: Any) -> list[Any]:
    """The chunks of an edit of SOURCE inside MASK: arrays and a config cross to Ray."""
    stream = model.generate_image(
        "a red hat", ImageGenerationConfig(**config), image=SOURCE, mask=MASK
    )
    return [chunk async for chunk in stream]


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
        local_edit = await collect_edit(generator.using(pool), steps=4, seed=3, strength=0.5)
    remote_images = await embedder.using(runtime).embed_images(IMAGES)
    remote_texts = await embedder.using(runtime).embed_text(["a fox", "a lighthouse"])
    remote_chunks = await collect(generator.using(runtime), "a fox", steps=3, seed=11)
    remote_edit = await collect_edit(generator.using(runtime), steps=4, seed=3, strength=0.5)

    np.testing.assert_array_equal(remote_images, local_images)
    np.testing.assert_array_equal(remote_texts, local_texts)
    assert remote_images.dtype == np.float32 and remote_images.flags.writeable
    assert [chunk.step for chunk in remote_chunks[:-1]] == [1, 2, 3]
    local, remote = local_chunks[-1], remote_chunks[-1]
    assert isinstance(remote, GenerationResult) and isinstance(local, GenerationResult)
    assert [png(image) for image in remote.images] == [png(image) for image in local.images]
    assert (remote.seed, remote.config) == (local.seed, local.config)
    assert [chunk.step for chunk in remote_edit[:-1]] == [1, 2]  # ceil(4 x 0.5)
    local, remote = local_edit[-1], remote_edit[-1]
    assert [png(image) for image in remote.images] == [png(image) for image in local.images]
    assert remote.config == local.config and remote.config.strength == 0.5
    stats = (await runtime.refresh())["fake/embedder"]
    assert (stats.state, stats.workers, stats.in_flight, stats.loads) == ("ready", 1, 0, 1)


@pytest.mark.slow
async def test_the_tiny_models_give_the_in_process_vectors_and_image(ray_cluster: None) -> None:
    """Real plugins: each replica builds its backend from the plugin on its node, loading the
    random-weight tiny models the in-process pool wrote to the cluster's cache."""
    limner_clip = pytest.importorskip("limner_clip", reason="embeds with the CLIP plugin")
    limner_flux = pytest.importorskip("limner_flux", reason="generates with the FLUX plugin")
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_clip)
    registry.register_plugin(limner_flux)
    clip, flux = registry.embedder("limner/tiny-clip"), registry.generator("limner/tiny-flux")
    photo = Image.new("RGB", (64, 48), (30, 140, 200))
    config = {"steps": 2, "seed": 5, "width": 64, "height": 64}
    async with Pool() as pool:
        expected = await clip.using(pool).embed_images([photo, IMAGES[1]])
        expected_text = await clip.using(pool).embed_text("a red fox")
        expected_image = (await collect(flux.using(pool), "a lighthouse", **config))[-1]
        expected_edit = (await collect_edit(flux.using(pool), steps=2, seed=5, strength=0.8))[-1]
    async with RayRuntime(options=FAKE_OPTIONS) as runtime:
        got = await clip.using(runtime).embed_images([photo, IMAGES[1]])
        got_text = await clip.using(runtime).embed_text("a red fox")
        got_image = (await collect(flux.using(runtime), "a lighthouse", **config))[-1]
        got_edit = (await collect_edit(flux.using(runtime), steps=2, seed=5, strength=0.8))[-1]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_text, expected_text)
    assert isinstance(got_image, GenerationResult) and isinstance(expected_image, GenerationResult)
    assert [png(image) for image in got_image.images] == [png(i) for i in expected_image.images]
    # An edit: the same pixels as in process, and the source's outside the mask.
    assert [png(image) for image in got_edit.images] == [png(i) for i in expected_edit.images]
    edited, original = np.asarray(got_edit.images[0]), np.asarray(SOURCE)
    outside = np.asarray(MASK) == 0
    assert np.array_equal(edited[outside], original[outside])
    assert not np.array_equal(edited[~outside], original[~outside])


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

    from limner.ray._calls import typed_error

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


async def test_an_idle_key_scales_to_zero_and_back_and_the_cluster_s_lru_gives_room_up(
    ray_cluster: None,
) -> None:
    """Two runtimes on the session's 2 cores, keys of one core each: a runtime that needs
    room scales to zero the least recently used idle key of the cluster, even another
    runtime's, and that runtime deploys its key again on its next call."""
    ray = import_ray()
    registry = Registry(entry_points=False)
    for key in ("fake/held", "fake/first", "fake/recent", "fake/second"):
        registry.register(fake_embedding_spec(key))
    one_core = RayKeyOptions(num_cpus=1, keep_alive=600)
    per_key = {"fake/first": RayKeyOptions(num_cpus=1, keep_alive=1.0, upscale_delay_s=0.0)}
    mine = RayRuntime(options=one_core, options_per_key=per_key)
    async with mine, RayRuntime(options=one_core) as other:
        held = registry.embedder("fake/held").using(mine)
        expected = await held.embed_images(IMAGES[:1])
        first = registry.embedder("fake/first").using(mine)
        await first.embed_images(IMAGES[:2])
        idle = time.monotonic()
        with anyio.fail_after(30):  # Serve's autoscaler scales the idle key to zero
            await mine.wait_for_replicas("fake/first", 0)
        to_zero = time.monotonic() - idle
        started = time.monotonic()
        await first.embed_images(IMAGES[:2])
        from_zero = time.monotonic() - started
        print(f"idle to zero replicas {to_zero:.1f} s, from zero to an answer {from_zero:.1f} s")
        assert mine.stats()["fake/first"].evictions == 0  # Serve's doing, not a retirement
        assert await mine.evict("fake/first")
        with anyio.fail_after(30):  # until Ray counts the core free again
            while True:
                if ray.available_resources().get("CPU", 0) >= 1:
                    break
                await anyio.sleep(0.1)

        # The other runtime fills the second core, then needs a third: the cluster's least
        # recently used idle key, the first runtime's held, gives its core up.
        await registry.embedder("fake/recent").using(other).embed_images(IMAGES[:1])
        await registry.embedder("fake/second").using(other).embed_images(IMAGES[:1])
        assert (await mine.refresh())["fake/held"].state == "cold"
        stats = await other.refresh()
        assert (stats["fake/recent"].state, stats["fake/second"].state) == ("ready", "ready")

        # Held's runtime deploys it again on its next call, and the other runtime's least
        # recently used key makes room for it.
        np.testing.assert_array_equal(await held.embed_images(IMAGES[:1]), expected)
        stats = await mine.refresh()
        assert (stats["fake/held"].state, stats["fake/held"].loads) == ("ready", 2)
        stats = await other.refresh()
        assert (stats["fake/recent"].state, stats["fake/second"].state) == ("cold", "ready")


ONE_CORE = RayKeyOptions(num_cpus=1, keep_alive=600)


async def cores_free(count: float) -> None:
    """Until the module's cluster has ``count`` cores free (an earlier test's replicas
    going)."""
    ray = import_ray()
    with anyio.fail_after(60):
        while True:
            if ray.available_resources().get("CPU", 0) >= count:
                return
            await anyio.sleep(0.1)


class Generations:
    """Generations run in the background of a task group, each noted once its first chunk
    came (its key is busy then) and with its chunks once it ends."""

    def __init__(self, group: anyio.abc.TaskGroup) -> None:
        self.group = group
        self.running: dict[str, anyio.Event] = {}
        self.chunks: dict[str, list[Any]] = {}

    async def start(self, name: str, model: limner.ImageGenerator, steps: int) -> None:
        self.running[name] = anyio.Event()
        self.group.start_soon(self._run, name, model, steps)
        with anyio.fail_after(60):
            await self.running[name].wait()

    async def _run(self, name: str, model: limner.ImageGenerator, steps: int) -> None:
        chunks = []
        async for chunk in model.generate_image("a fox", ImageGenerationConfig(steps=steps)):
            chunks.append(chunk)
            self.running[name].set()
        self.chunks[name] = chunks


async def a_third_key_while_both_generate(
    runtime: RayRuntime, registry: Registry, **steps: int
) -> dict[str, list[Any]]:
    """Two generators (``fake/NAME``, deployed in this order) each generating ``steps[NAME]``
    steps, and meanwhile a call to fake/third, which needs one of their cores; the
    generations' chunks, once every one ended."""
    models = {name: registry.generator(f"fake/{name}").using(runtime) for name in steps}
    for model in models.values():
        await collect(model, "warm", steps=1)
    async with anyio.create_task_group() as group:
        running = Generations(group)
        for name, model in models.items():
            await running.start(name, model, steps[name])
        rows = await registry.embedder("fake/third").using(runtime).embed_text(["a fox"])
    assert rows.shape[0] == 1
    return running.chunks


def generators(**step_seconds: float) -> Registry:
    """Fake generators ``fake/NAME`` taking that long a step, and the embedder fake/third."""
    registry = Registry(entry_points=False)
    for name, seconds in step_seconds.items():
        registry.register(fake_generation_spec(f"fake/{name}", options={"step_seconds": seconds}))
    registry.register(fake_embedding_spec("fake/third"))
    return registry


async def test_a_key_that_turns_idle_while_a_caller_waits_for_room_gives_its_room_up(
    ray_cluster: None,
) -> None:
    """Both cores are busy when a third key needs one, and busy keys keep their room
    (``min_hold``): the first look finds nothing to scale to zero. The caller looks again
    until the short generation's key turns idle, and that key gives its room up; it is not
    failed after ``room_timeout`` for a choice made once."""
    registry = generators(short=0.1, long=0.2)
    await cores_free(2)
    async with RayRuntime(options=ONE_CORE, room_timeout=120, min_hold=600) as runtime:
        chunks = await a_third_key_while_both_generate(runtime, registry, short=15, long=50)
        stats = await runtime.refresh()
    assert (stats["fake/short"].evictions, stats["fake/short"].state) == (1, "cold")
    assert (stats["fake/long"].evictions, stats["fake/long"].state) == (0, "ready")
    assert isinstance(chunks["short"][-1], GenerationResult)
    assert isinstance(chunks["long"][-1], GenerationResult)


async def test_with_every_key_busy_the_one_holding_its_room_longest_goes_after_min_hold(
    ray_cluster: None,
) -> None:
    """Nobody is idle: once ``min_hold`` has passed, the key that has held its core longest
    stops taking calls and is scaled to zero for the waiting key; the generation it runs
    ends as it would have."""
    registry = generators(older=0.1, newer=0.1)
    await cores_free(2)
    async with RayRuntime(options=ONE_CORE, room_timeout=120, min_hold=1.0) as runtime:
        chunks = await a_third_key_while_both_generate(runtime, registry, older=30, newer=30)
        stats = await runtime.refresh()
    assert (stats["fake/older"].evictions, stats["fake/newer"].evictions) == (1, 0)
    for name in ("older", "newer"):
        *steps, last = chunks[name]
        assert isinstance(last, GenerationResult) and len(steps) == 30, name


async def test_a_dead_board_is_made_again_and_room_is_still_made(ray_cluster: None) -> None:
    """The cluster's board actor dies: a runtime that needs room makes it again, makes room
    from what it knows of its own keys meanwhile (no ModelError, no 500), and the replicas
    report to the new board."""
    ray = import_ray()
    registry = Registry(entry_points=False)
    for key in ("fake/first", "fake/second", "fake/third"):
        registry.register(fake_embedding_spec(key))
    await cores_free(2)
    async with RayRuntime(options=ONE_CORE) as runtime:
        await registry.embedder("fake/first").using(runtime).embed_text("a fox")
        await registry.embedder("fake/second").using(runtime).embed_text("a fox")
        board = ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
        ray.kill(board)
        third = registry.embedder("fake/third")
        async with Pool() as pool:
            expected = await third.using(pool).embed_text("a fox")
        np.testing.assert_array_equal(await third.using(runtime).embed_text("a fox"), expected)
        stats = runtime.stats()
        assert (stats["fake/first"].evictions, stats["fake/second"].evictions) == (1, 0)
        again = ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
        assert again._actor_id != board._actor_id
        with anyio.fail_after(30):  # the replicas find the new board within a period or two
            while True:
                if (await runtime.refresh())["fake/third"].batches == 1:
                    break
                await anyio.sleep(0.2)


async def test_stats_sum_the_batches_of_every_replica(
    ray_cluster: None, registry: Registry
) -> None:
    two = RayKeyOptions(num_cpus=0.25, min_replicas=2, max_replicas=2)
    async with RayRuntime(options=two) as runtime:
        model = registry.embedder("fake/embedder").using(runtime)
        for text in ("a", "b", "c", "d", "e", "f"):
            await model.embed_text(text)
        with anyio.fail_after(20):  # the replicas report within a second or so
            while True:
                stats = (await runtime.refresh())["fake/embedder"]
                if stats.batches == 6:
                    break
                await anyio.sleep(0.1)
    assert (stats.workers, stats.mean_batch_size, stats.in_flight) == (2, 1.0, 0)


async def test_a_key_another_runtime_deleted_is_deployed_again_on_its_next_call(
    runtime: RayRuntime, registry: Registry
) -> None:
    """The handle this runtime holds is stale until its next refresh: the call redeploys."""
    from ray import serve

    embedder, generator = registry.embedder("fake/embedder"), registry.generator("fake/generator")
    rows = await embedder.using(runtime).embed_text("a fox")
    await collect(generator.using(runtime), "a fox", steps=1)
    for app in ("limner:fake/embedder", "limner:fake/generator"):
        await anyio.to_thread.run_sync(serve.delete, app)
    np.testing.assert_array_equal(await embedder.using(runtime).embed_text("a fox"), rows)
    chunks = await collect(generator.using(runtime), "a fox", steps=1)
    assert isinstance(chunks[-1], GenerationResult)
    assert {key: s.loads for key, s in runtime.stats().items()} == {
        "fake/embedder": 2,
        "fake/generator": 2,
    }


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


async def test_the_http_api_answers_through_the_cluster(served: str) -> None:
    async with httpx.AsyncClient(base_url=served, timeout=60) as client:
        await check_embeddings_over_http(client)
        image = await client.post(
            "/v1/images/generations",
            json={"model": "fake/generator", "prompt": "a fox", "size": "16x16"},
        )
        assert image.status_code == 200, image.text
        assert image.json()["data"][0]["b64_json"]
        pool = (await client.get("/v1/pool")).json()["models"]
    assert {model["key"]: model["device"] for model in pool} == {
        "fake/embedder": "ray",
        "fake/generator": "ray",
    }


def replica_processes(app: str) -> list[psutil.Process]:
    """The Ray workers of the module's cluster (this process's) running a replica of
    ``app``."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:{app}:" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_replica_that_dies_under_a_call_is_a_503_with_retry_after(served: str) -> None:
    """Its worker process is killed mid-generation: the caller gets 503 with Retry-After
    (a RuntimeUnavailable), not a 500; Serve starts another replica, and the retry is
    answered."""
    request = {"model": "fake/slow", "prompt": "a fox", "size": "16x16", "steps": 50}
    with httpx.Client(base_url=served, timeout=120) as client:
        assert client.post("/v1/images/generations", json=request | {"steps": 1}).is_success
        [replica] = replica_processes("limner:fake/slow")
        answers: list[httpx.Response] = []
        calling = threading.Thread(
            target=lambda: answers.append(client.post("/v1/images/generations", json=request))
        )
        calling.start()
        deadline = time.monotonic() + 60
        while not any(m["in_flight"] for m in client.get("/v1/pool").json()["models"]):
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.05)
        time.sleep(0.5)  # a few steps in
        replica.kill()
        calling.join(timeout=120)
        [answer] = answers
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "runtime_unavailable" and "died" in error["message"]
        assert int(answer.headers["Retry-After"]) >= 1
        retried = client.post("/v1/images/generations", json=request | {"steps": 2})
        assert retried.status_code == 200, retried.text


@pytest.fixture
def ingress(serve_url: str) -> Iterator[str]:
    """The ingress app on one quarter-core replica, behind the cluster's Serve proxy."""
    pytest.importorskip("fastapi", reason="the ingress serves the server extra's app")
    ray = import_ray()
    from ray import serve

    from limner.server import ServerSettings

    # The replica unpickles the registry's factory: this module's conftest is no package
    # a worker could import, so it travels by value.
    conftest = sys.modules[fake_registry.__module__]
    ray.cloudpickle.register_pickle_by_value(conftest)
    app = http_ingress(
        settings=ServerSettings(ui=False),
        registry=fake_registry,
        runtime=functools.partial(RayRuntime, options=FAKE_OPTIONS),
        num_cpus=0.25,
    )
    try:
        serve.run(app, name="limner-http", route_prefix="/")
        yield serve_url
    finally:
        ray.cloudpickle.unregister_pickle_by_value(conftest)
        serve.delete("limner-http")  # its runtime deletes the model's app as it stops
        assert "limner:fake/embedder" not in serve.status().applications


async def test_the_http_api_answers_from_an_ingress_replica(ingress: str) -> None:
    async with httpx.AsyncClient(base_url=ingress, timeout=60) as client:
        await check_embeddings_over_http(client)
        # The URL guard runs on the ingress replica, before anything reaches the model.
        refused = await client.post(
            "/v1/embeddings",
            json={"model": "fake/embedder", "input": ["http://127.0.0.1:1/cat.png"]},
        )
        assert refused.status_code == 400 and "loopback" in refused.json()["error"]["message"]
        pool = (await client.get("/v1/pool")).json()["models"]
    assert [(model["key"], model["device"]) for model in pool] == [("fake/embedder", "ray")]


MIXED_SECONDS = 60.0

Pick = Callable[[int, int, float], str]
"""The key a client calls: of its number, its call's number and the seconds since the start."""


@dataclass
class MixedLoad:
    """What 30 clients saw calling fake embedders through one runtime: per answered call its
    key and when it ended, per refusal its error, and the longest call."""

    answered: list[tuple[str, float]] = field(default_factory=list)
    refused: list[BaseException] = field(default_factory=list)
    failed: list[BaseException] = field(default_factory=list)
    longest: float = 0.0

    def windows_without(self, keys: Sequence[str], *, window: float) -> list[tuple[int, str]]:
        """``(window index, key)`` for each window of the run in which the key answered
        nobody."""
        seen = {(int(ended // window), key) for key, ended in self.answered}
        count = int(MIXED_SECONDS // window)
        return [(n, key) for n in range(count) for key in keys if (n, key) not in seen]

    def summary(self, name: str, keys: Sequence[str], stats: Mapping[str, KeyStats]) -> str:
        total = len(self.answered) + len(self.refused)
        answered = {key: sum(1 for k, _ in self.answered if k == key) for key in keys}
        swaps = sum(stats[key].evictions for key in keys)
        return (
            f"{name}: {total} calls, {len(self.refused) / max(total, 1):.0%} refused "
            f"({sorted({type(e).__name__ for e in self.refused})}), answered {answered}, "
            f"{swaps} swaps, longest call {self.longest:.1f} s, "
            f"10-s windows a key answered nobody: {self.windows_without(keys, window=10)}"
        )


async def mixed_load(
    runtime: RayRuntime, registry: Registry, keys: Sequence[str], pick: Pick
) -> MixedLoad:
    """30 clients for ``MIXED_SECONDS``, each call's key ``pick(client, call, elapsed)``;
    a refused caller (a typed error saying to retry) tries again after a short pause."""
    load = MixedLoad()
    models = {key: registry.embedder(key).using(runtime) for key in keys}
    started = time.monotonic()

    async def client(number: int) -> None:
        call = 0
        while (now := time.monotonic() - started) < MIXED_SECONDS:
            key = pick(number, call, now)
            call += 1
            try:
                await models[key].embed_text([f"client {number} call {call}"])
                load.answered.append((key, time.monotonic() - started))
            except (NoRoomInCluster, limner.PoolBusy, limner.RuntimeUnavailable) as refused:
                load.refused.append(refused)
                await anyio.sleep(0.5)
            except Exception as error:
                load.failed.append(error)
            load.longest = max(load.longest, time.monotonic() - started - now)

    async with anyio.create_task_group() as group:
        for number in range(30):
            group.start_soon(client, number)
    return load


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["cycling", "switching together"])
async def test_three_keys_that_fit_one_at_a_time_share_the_cluster_under_load(
    ray_cluster: None, pattern: str
) -> None:
    """Three keys of 1.5 of the cluster's 2 cores, 30 clients for 60 s: each client cycling
    through the keys, or all switching key together every 5 s. Every call is answered or
    refused with a typed error to retry (none fails otherwise, none waits unbounded), and
    every key is answered throughout: busy keys take turns after ``min_hold``."""
    keys = ["fake/a", "fake/b", "fake/c"]
    registry = Registry(entry_points=False)
    for key in keys:
        registry.register(fake_embedding_spec(key))
    options = RayKeyOptions(num_cpus=1.5, keep_alive=600)

    def pick(client: int, call: int, now: float) -> str:
        return keys[(client + call) % 3 if pattern == "cycling" else int(now // 5) % 3]

    await cores_free(2)
    async with RayRuntime(options=options, room_timeout=15, min_hold=3) as runtime:
        load = await mixed_load(runtime, registry, keys, pick)
        stats = await runtime.refresh()
    print(load.summary(pattern, keys, stats))
    assert load.failed == []
    assert load.longest < 15 + 30  # room_timeout, plus a swap
    assert load.windows_without(keys, window=30) == []
    assert sum(stats[key].evictions for key in keys) >= 2


@pytest.mark.slow
async def test_two_keys_that_fit_together_are_never_refused_under_load(ray_cluster: None) -> None:
    keys = ["fake/a", "fake/b"]
    registry = Registry(entry_points=False)
    for key in keys:
        registry.register(fake_embedding_spec(key))
    await cores_free(2)
    async with RayRuntime(options=ONE_CORE) as runtime:
        load = await mixed_load(runtime, registry, keys, lambda client, call, now: keys[call % 2])
        stats = await runtime.refresh()
    print(load.summary("two that fit", keys, stats))
    assert (load.failed, load.refused) == ([], [])
    assert load.windows_without(keys, window=10) == []
    assert sum(stats[key].evictions for key in keys) == 0
