"""Streamed calls' groups and what loaded models take on and drop while they serve, in the
pool, against a recording fake: calls of different groups never share a model, a group keeps
it only for a while, and parts models can drop (LoRA adapters) go before any model does."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any

import anyio
import pytest
from PIL import Image

import limner
from limner import (
    GenerationResult,
    ImageGenerationConfig,
    MemoryExhausted,
    ModelSettings,
    ModelSpec,
    Pool,
    Progress,
)
from limner.plugin import CachedPart, ModelInfo, StepCallback, TextToImageBackend, reserve_memory
from limner.runtime import StreamCall
from limner.testing import FakeClock, FakeMemory

pytestmark = pytest.mark.anyio


class Recorder(TextToImageBackend):
    """Generates ``GROUP:NAME`` prompts, recording which groups run at once and the order
    calls start. Options: ``gates`` (prompt -> ``threading.Event`` its call waits for),
    ``grow`` (prompt -> MB its call takes on, asking ``reserve_memory`` first: a part the
    model can drop later), ``step_seconds``."""

    def __init__(self, spec: ModelSpec, settings: ModelSettings) -> None:
        super().__init__(spec, settings)
        self.lock = threading.Lock()
        self.active: list[str] = []
        self.seen: list[list[str]] = []  # what ran, at each step of each call
        self.started: list[str] = []
        self.parts: dict[str, tuple[float, float]] = {}  # name -> (MB, last used)
        self.dropped: list[str] = []
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False
        self.parts.clear()

    def resolve_config(self, config: ImageGenerationConfig) -> ImageGenerationConfig:
        return config

    def generate(
        self, prompt: str, config: ImageGenerationConfig, *, on_step: StepCallback
    ) -> GenerationResult:
        group = prompt.partition(":")[0]
        options = self.settings.options
        with self.lock:
            self.active.append(group)
            self.started.append(prompt)
        try:
            grow = options.get("grow", {}).get(prompt)
            if grow is not None:
                reserve_memory(grow, what=f"part {prompt!r}")
                self.parts[prompt] = (grow, time.monotonic())
            gate = options.get("gates", {}).get(prompt)
            if gate is not None:
                assert gate.wait(30)
            for step in range(1, 4):
                time.sleep(options.get("step_seconds", 0.0))
                with self.lock:
                    self.seen.append(list(self.active))
                on_step(Progress(step=step, total=3, elapsed=0.0))
        finally:
            with self.lock:
                self.active.remove(group)
        image = Image.new("RGB", (8, 8))
        return GenerationResult(
            model=self.spec.key, prompt=prompt, images=(image,), seed=0, config=config
        )

    def memory_mb(self) -> float | None:
        if not self.loaded:
            return None
        return self.spec.info.memory_mb + sum(mb for mb, _ in self.parts.values())

    def caches(self) -> Sequence[CachedPart]:
        if self.active:
            return []  # a call runs: nothing can go now
        return [CachedPart(name, mb, used) for name, (mb, used) in self.parts.items()]

    def drop_caches(self, names: Sequence[str]) -> None:
        for name in names:
            if self.parts.pop(name, None) is not None:
                self.dropped.append(name)


def recorder(key: str = "fake/recorder", memory_mb: float = 100.0, **options: Any) -> Recorder:
    spec = ModelSpec(
        key=key,
        factory=Recorder,
        capability=limner.Capability.TEXT_TO_IMAGE,
        info=ModelInfo(memory_mb=memory_mb, worker_overhead_mb=0.0, max_batch_size=1),
    )
    return Recorder(spec, ModelSettings(weights=key, options=options))


async def generate(pool: Pool, backend: Recorder, prompt: str, group: Hashable) -> str:
    call = StreamCall("generate", (prompt, ImageGenerationConfig()), group=group)
    result = None
    async for chunk in pool.run_stream(backend, call):
        if isinstance(chunk, GenerationResult):
            result = chunk
    assert result is not None
    return result.prompt


async def wait_until(condition: Any, *, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await anyio.sleep(0.002)


# -- groups ----------------------------------------------------------------------------------


async def test_calls_of_different_groups_never_share_the_model() -> None:
    """24 calls of three groups at once, on two workers: each step sees one group only,
    calls of one group run two at a time, and each group's calls run together (a long
    patience: the calls of the group running go ahead of the others')."""
    backend = recorder(step_seconds=0.005)
    prompts = [f"{'abc'[i % 3]}:{i}" for i in range(24)]
    done: list[str] = []
    async with Pool(memory=FakeMemory(total_mb=10_000), max_workers=2, max_wait=600) as pool:

        async def one(prompt: str) -> None:
            done.append(await generate(pool, backend, prompt, group=prompt[0]))

        async with anyio.create_task_group() as tasks:
            for prompt in prompts:
                tasks.start_soon(one, prompt)
    assert sorted(done) == sorted(prompts)
    assert all(len(set(running)) == 1 for running in backend.seen)
    assert max(len(running) for running in backend.seen) == 2
    groups = [prompt[0] for prompt in backend.started]
    switches = sum(1 for before, after in itertools.pairwise(groups) if before != after)
    assert switches == 2, groups


async def test_no_group_is_a_group_of_its_own() -> None:
    """A call without a group (None) never runs beside a grouped one either."""
    backend = recorder(step_seconds=0.005)
    async with Pool(memory=FakeMemory(total_mb=10_000), max_workers=2) as pool:
        async with anyio.create_task_group() as tasks:
            for index in range(6):
                group = None if index % 2 else ("ink",)
                tasks.start_soon(generate, pool, backend, f"{'xy'[index % 2]}:{index}", group)
    assert all(len(set(running)) == 1 for running in backend.seen)


@pytest.mark.parametrize("waited", [1.0, 5.0])
async def test_a_group_keeps_the_model_from_another_only_for_a_while(waited: float) -> None:
    """An ``a`` call runs; a ``b`` call waits; another ``a`` call comes ``waited`` seconds
    later. Within the patience (60 s x 0.05 = 3 s) it joins the running one; past it, it
    waits until the ``b`` call has run."""
    gates = {"a:1": threading.Event()}
    backend = recorder(gates=gates)
    clock = FakeClock()
    async with (
        Pool(memory=FakeMemory(total_mb=10_000), clock=clock, max_workers=2, max_wait=60) as pool,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(generate, pool, backend, "a:1", "a")
        await wait_until(lambda: backend.started == ["a:1"])
        tasks.start_soon(generate, pool, backend, "b:1", "b")
        await wait_until(lambda: pool.stats()["fake/recorder"].waiting == 1)
        clock.advance(waited)
        tasks.start_soon(generate, pool, backend, "a:2", "a")
        if waited < 3:
            await wait_until(lambda: len(backend.started) == 2)
            assert backend.started == ["a:1", "a:2"]
        else:
            await wait_until(lambda: pool.stats()["fake/recorder"].waiting == 2)
            await anyio.sleep(0.05)
            assert backend.started == ["a:1"]  # a slot is free, and still it waits
        gates["a:1"].set()
    expected = ["a:1", "a:2", "b:1"] if waited < 3 else ["a:1", "b:1", "a:2"]
    assert backend.started == expected


# -- what loaded models take on and drop -------------------------------------------------------


async def test_parts_go_before_any_model() -> None:
    """Model a took on two parts of 10 MB (``a:1`` first). Model b needs 8 MB more than is
    free: a's least recently used part goes, a stays loaded, b loads."""
    a = recorder("fake/a", grow={"a:1": 10.0, "a:2": 10.0})
    b = recorder("fake/b")
    async with Pool(
        memory=FakeMemory(total_mb=10_000), memory_budget_mb=212, max_workers=1
    ) as pool:
        await generate(pool, a, "a:1", None)
        await generate(pool, a, "a:2", None)
        assert pool.stats()["fake/a"].memory_mb == pytest.approx(120)
        await generate(pool, b, "b:1", None)
        stats = pool.stats()
    assert a.dropped == ["a:1"]
    assert stats["fake/a"].state == "ready" and stats["fake/a"].evictions == 0
    assert stats["fake/a"].memory_mb == pytest.approx(110)
    assert stats["fake/b"].state == "ready"


async def test_a_model_goes_when_all_its_parts_would_not_make_the_room() -> None:
    a = recorder("fake/a", grow={"a:1": 10.0, "a:2": 10.0})
    b = recorder("fake/b")
    async with Pool(
        memory=FakeMemory(total_mb=10_000), memory_budget_mb=195, max_workers=1
    ) as pool:
        await generate(pool, a, "a:1", None)
        await generate(pool, a, "a:2", None)
        await generate(pool, b, "b:1", None)
        stats = pool.stats()
    assert a.dropped == []  # they went with their model
    assert stats["fake/a"].state == "cold" and stats["fake/a"].evictions == 1


async def test_a_growing_call_takes_the_room_of_another_models_parts() -> None:
    a = recorder("fake/a", grow={"a:1": 10.0, "a:2": 10.0})
    b = recorder("fake/b", grow={"b:1": 15.0})
    async with Pool(
        memory=FakeMemory(total_mb=10_000), memory_budget_mb=228, max_workers=1
    ) as pool:
        await generate(pool, a, "a:1", None)
        await generate(pool, a, "a:2", None)
        await generate(pool, b, "b:0", None)
        await generate(pool, b, "b:1", None)
        stats = pool.stats()
    assert a.dropped == ["a:1"]
    assert stats["fake/a"].memory_mb == pytest.approx(110)
    assert stats["fake/b"].memory_mb == pytest.approx(115)


async def test_a_part_that_can_never_fit_is_memory_exhausted_and_the_model_serves_on() -> None:
    b = recorder("fake/b", grow={"b:huge": 60.0})
    async with Pool(
        memory=FakeMemory(total_mb=10_000), memory_budget_mb=150, max_workers=1
    ) as pool:
        with pytest.raises(MemoryExhausted, match=r"Cannot load part 'b:huge' in fake/b") as error:
            await generate(pool, b, "b:huge", None)
        assert error.value.need_mb == 60 and error.value.available_mb == pytest.approx(50)
        assert await generate(pool, b, "b:1", None) == "b:1"
        assert pool.stats()["fake/b"].memory_mb == pytest.approx(100)
