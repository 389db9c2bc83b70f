"""LoRA adapters on a local Ray cluster: the request's adapters and its call's group reach
the replicas as data, the adapter folders are looked up on the replica's node, and the
images are the in-process pool's."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from limner import GenerationResult, ImageGenerationConfig, Pool, Progress, Registry
from limner.ray import RayRuntime
from limner.runtime import StreamCall
from limner.testing import fake_generation_spec

from .conftest import FAKE_OPTIONS

pytestmark = [
    pytest.mark.ray,  # one local Ray cluster for the module
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s`:DeprecationWarning"),
]

SETS = [(), (("ink", 0.8),), (("oil", 1.0),), (("ink", 0.8), ("oil", 1.0))]


async def test_adapters_reach_the_replicas_and_never_mix(ray_cluster: None, lora_dir: Path) -> None:
    """Eight requests at once, four sets of adapters in turn, on a replica of tiny FLUX
    whose pool runs two at a time: each image is the in-process pool's for its set."""
    limner_flux = pytest.importorskip("limner_flux")
    registry = Registry(entry_points=False, lora_dirs=[lora_dir])
    registry.register_plugin(limner_flux)
    model = registry.generator("limner/tiny-flux")

    async def image(runtime: Any, loras: tuple[tuple[str, float], ...]) -> Any:
        config = ImageGenerationConfig(steps=2, width=32, height=32, seed=3, loras=list(loras))
        result = await model.using(runtime).generate("a lighthouse", config)
        assert result.config.loras == loras
        return np.asarray(result.images[0])

    async with Pool() as pool:
        expected = [await image(pool, chosen) for chosen in SETS]
    got: dict[int, Any] = {}
    async with RayRuntime(options=FAKE_OPTIONS) as runtime:

        async def one(index: int) -> None:
            got[index] = await image(runtime, SETS[index % len(SETS)])

        async with anyio.create_task_group() as tasks:
            for index in range(8):
                tasks.start_soon(one, index)
        stats = (await runtime.refresh())["limner/tiny-flux"]
    for index, made in got.items():
        assert np.array_equal(made, expected[index % len(SETS)]), f"request {index}"
    assert stats.loads == 1


async def test_the_group_reaches_the_replica_s_pool(ray_cluster: None) -> None:
    """Two calls at once on a replica that runs two at a time: of one group they overlap;
    of two groups the second starts only once the first has ended."""
    registry = Registry(entry_points=False)
    registry.register(fake_generation_spec("fake/grouped", options={"step_seconds": 0.3}))
    backend: Any = registry.generator("fake/grouped").backend

    async with RayRuntime(options=FAKE_OPTIONS) as runtime:

        async def timeline(groups: tuple[str, str]) -> list[tuple[float, float]]:
            spans: dict[int, tuple[float, float]] = {}

            async def one(index: int) -> None:
                config = backend.resolve_config(ImageGenerationConfig(steps=4, seed=index))
                call = StreamCall("generate", ("a fox", config), group=groups[index])
                first = None
                async for chunk in runtime.run_stream(backend, call):
                    if isinstance(chunk, Progress) and first is None:
                        first = time.monotonic()
                    if isinstance(chunk, GenerationResult):
                        assert first is not None
                        spans[index] = (first, time.monotonic())

            async with anyio.create_task_group() as tasks:
                for index in range(2):
                    tasks.start_soon(one, index)
            return [spans[0], spans[1]]

        await timeline(("a", "a"))  # the replica is up and warm
        together = await timeline(("a", "a"))
        apart = await timeline(("a", "b"))
    (first, second) = sorted(together)
    assert second[0] < first[1]  # the second's first step came before the first's result
    (first, second) = sorted(apart)
    assert second[0] > first[1]  # ... and after it, for another group
