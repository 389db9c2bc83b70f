"""The conformance suite of a text-to-image plugin. Public through ``limner.plugin.testing``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

from limner import (
    Capability,
    GenerationResult,
    ImageGenerationConfig,
    ImageGenerator,
    InvalidInput,
    Pool,
    Progress,
    Registry,
)
from limner.errors import Cancelled
from limner.plugin._backends import TextToImageBackend
from limner.plugin.testing._contract import PluginContract, param_ids
from limner.testing import FakeClock, FakeMemory

__all__ = ["BAD_FIELDS", "TextToImageContract"]

BAD_FIELDS: tuple[tuple[str, object], ...] = (
    ("num_images", 0),
    ("num_images", -1),
    ("num_images", 1.5),
    ("num_images", True),
    ("num_images", 10_000),
    ("width", 0),
    ("width", -64),
    ("width", 64.5),
    ("width", "64"),
    ("width", True),
    ("width", 100_000),
    ("height", 0),
    ("height", 100_000),
    ("steps", 0),
    ("steps", -1),
    ("steps", 2.5),
    ("steps", "4"),
    ("steps", 100_000),
    ("guidance", -1.0),
    ("guidance", math.nan),
    ("guidance", math.inf),
    ("guidance", "3"),
    ("seed", -1),
    ("seed", 1.5),
    ("seed", "42"),
    ("output_format", "gif"),
    ("output_format", ""),
    ("output_format", 3),
    ("preview", "yes"),
)


class TextToImageContract(PluginContract):
    """The conformance suite of a text-to-image plugin; subclass it as ``Test<Plugin>``."""

    capability = Capability.TEXT_TO_IMAGE
    #: ``(key, field, value)``: more config values a key refuses, naming the field.
    bad_fields: ClassVar[Sequence[tuple[str, str, Any]]] = ()
    #: Steps the suite's generations run: few, on the tiny model.
    steps: ClassVar[int] = 2

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        super().pytest_generate_tests(metafunc)
        if "bad_field" in metafunc.fixturenames:
            fields = self.refused_fields()
            metafunc.parametrize("bad_field", fields, ids=param_ids(fields))

    def refused_fields(self) -> list[tuple[str, str, Any]]:
        """``(key, field, value)`` that ``resolve_config`` must refuse, naming the field: the
        suite's ``BAD_FIELDS`` on the tiny key, and the class's ``bad_fields``."""
        return [(self.key, field, value) for field, value in BAD_FIELDS] + list(self.bad_fields)

    def run(
        self, backend: TextToImageBackend, prompt: str = "a lighthouse at dusk", **fields: Any
    ) -> tuple[list[Progress], GenerationResult]:
        """Generate with a loaded backend directly: each step's progress, then the result."""
        steps: list[Progress] = []
        config = backend.resolve_config(ImageGenerationConfig(**{"steps": self.steps, **fields}))
        return steps, backend.generate(prompt, config, on_step=steps.append)

    def test_resolve_config_fills_the_defaults_and_is_idempotent(self, make_backend: Any) -> None:
        backend = make_backend()
        resolved = backend.resolve_config(ImageGenerationConfig(seed=7))
        assert None not in (resolved.width, resolved.height, resolved.steps, resolved.guidance)
        assert resolved.seed == 7
        assert backend.resolve_config(resolved) == resolved
        drawn = {backend.resolve_config(ImageGenerationConfig()).seed for _ in range(8)}
        assert None not in drawn and len(drawn) > 1, "a seed is drawn when none is given"
        for output_format in ("png", "jpeg", "webp"):
            config = ImageGenerationConfig(output_format=output_format)
            assert backend.resolve_config(config).output_format == output_format

    def test_resolve_config_refuses_a_bad_field_naming_it(
        self, make_backend: Any, bad_field: tuple[str, str, Any]
    ) -> None:
        key, field, value = bad_field
        config = dataclasses.replace(ImageGenerationConfig(), **{field: value})
        with pytest.raises(InvalidInput) as caught:
            make_backend(key).resolve_config(config)
        assert caught.value.field == field
        assert field in str(caught.value)

    @pytest.mark.anyio
    async def test_streams_progress_then_the_result(
        self, registry: Registry, loaded: TextToImageBackend
    ) -> None:
        model: ImageGenerator = registry.generator(self.key)
        config = ImageGenerationConfig(steps=self.steps, seed=21, num_images=2)
        async with Pool(memory=FakeMemory(total_mb=1_000_000), clock=FakeClock()) as pool:
            chunks = [c async for c in model.using(pool).generate_image("a red fox", config)]
        *progress, result = chunks
        assert isinstance(result, GenerationResult), "the last chunk is the result"
        assert progress and all(isinstance(chunk, Progress) for chunk in progress)
        totals = {chunk.total for chunk in progress if isinstance(chunk, Progress)}
        assert len(totals) == 1, f"progress changed its total: {totals}"
        total = totals.pop()
        assert [c.step for c in progress if isinstance(c, Progress)] == list(range(1, total + 1))
        resolved = model.resolve_config(config)
        assert (result.model, result.prompt, result.seed) == (self.key, "a red fox", 21)
        assert len(result.images) == 2
        for image in result.images:
            assert image.mode == "RGB"
            assert image.size == (resolved.width, resolved.height)
        _, direct = self.run(loaded, "a red fox", seed=21, num_images=2)
        for served, alone in zip(result.images, direct.images):
            assert np.array_equal(np.asarray(served), np.asarray(alone)), "the pool changed it"

    def test_deterministic_by_seed(self, loaded: TextToImageBackend) -> None:
        _, one = self.run(loaded, seed=1234)
        _, same = self.run(loaded, seed=1234)
        _, other = self.run(loaded, seed=1235)
        first = np.asarray(one.images[0])
        assert np.array_equal(first, np.asarray(same.images[0])), "one seed, two images"
        assert not np.array_equal(first, np.asarray(other.images[0])), "two seeds, one image"
        assert first.std() > 0, "a flat image"
        _, drawn = self.run(loaded)
        _, again = self.run(loaded, seed=drawn.seed)
        assert np.array_equal(np.asarray(drawn.images[0]), np.asarray(again.images[0])), (
            "the seed a result reports does not make it again"
        )

    def test_stops_at_the_next_step_when_cancelled(self, loaded: TextToImageBackend) -> None:
        seen: list[int] = []

        def on_step(progress: Progress) -> None:
            seen.append(progress.step)
            raise Cancelled("the consumer went away")

        config = loaded.resolve_config(ImageGenerationConfig(steps=max(self.steps, 3), seed=1))
        with pytest.raises(Cancelled):
            loaded.generate("a cat", config, on_step=on_step)
        assert seen == [1], f"ran on after the first step raised: {seen}"
        steps, result = self.run(loaded)  # unharmed: the next one runs to the end
        assert steps and len(result.images) == 1
