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
from limner.plugin.testing._contract import PluginContract, param_ids, photo_like
from limner.testing import FakeClock, FakeMemory, MockRuntime

__all__ = ["BAD_FIELDS", "BAD_STRENGTHS", "TextToImageContract"]

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

#: What ``resolve_config`` of a generator that edits refuses, naming ``strength``.
BAD_STRENGTHS: tuple[tuple[str, object], ...] = (
    ("strength", -0.1),
    ("strength", 1.5),
    ("strength", math.nan),
    ("strength", "0.5"),
    ("strength", True),
)


class TextToImageContract(PluginContract):
    """The conformance suite of a text-to-image plugin; subclass it as ``Test<Plugin>``."""

    capability = Capability.TEXT_TO_IMAGE
    #: ``(key, field, value)``: more config values a key refuses, naming the field.
    bad_fields: ClassVar[Sequence[tuple[str, str, Any]]] = ()
    #: Steps the suite's generations run: few, on the tiny model.
    steps: ClassVar[int] = 2
    #: How far (0 to 255) a pixel outside an edit's mask may stray from the source: 0 for a
    #: backend that keeps it exactly, as ``limner.diffusion.DiffusersBackend`` does.
    mask_tolerance: ClassVar[int] = 0

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        super().pytest_generate_tests(metafunc)
        if "bad_field" in metafunc.fixturenames:
            fields = self.refused_fields()
            metafunc.parametrize("bad_field", fields, ids=param_ids(fields))

    def refused_fields(self) -> list[tuple[str, str, Any]]:
        """``(key, field, value)`` that ``resolve_config`` must refuse, naming the field: the
        suite's ``BAD_FIELDS`` on the tiny key, and the class's ``bad_fields``."""
        fields = [(self.key, field, value) for field, value in BAD_FIELDS]
        if self.edits():
            fields += [(self.key, field, value) for field, value in BAD_STRENGTHS]
        return fields + list(self.bad_fields)

    @classmethod
    def edits(cls) -> bool:
        """Whether the plugin's backend for the key edits images (built, not loaded)."""
        return bool(cls.build_backend(cls.new_registry()).supports_editing)

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

    # -- editing: what a generator that declares it does ------------------------------------

    def edit(
        self,
        backend: TextToImageBackend,
        image: Any,
        mask: Any = None,
        prompt: str = "a lighthouse at dusk",
        **fields: Any,
    ) -> tuple[list[Progress], GenerationResult]:
        """Edit with a loaded backend directly: each step's progress, then the result."""
        steps: list[Progress] = []
        height, width = np.asarray(image).shape[:2]
        config = backend.resolve_config(
            ImageGenerationConfig(
                **{"steps": self.steps, "width": width, "height": height, **fields}
            )
        )
        return steps, backend.edit(prompt, config, image, mask, on_step=steps.append)

    @staticmethod
    def edit_inputs(backend: TextToImageBackend) -> tuple[np.ndarray, np.ndarray]:
        """A photo-like source of the model's default size and a mask over its middle."""
        resolved = backend.resolve_config(ImageGenerationConfig(seed=0))
        width, height = resolved.width or 64, resolved.height or 64
        source = np.asarray(photo_like(width, height, seed=5), dtype=np.uint8)
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[height // 4 : height * 3 // 4, width // 4 : width * 3 // 4] = 255
        return source, mask

    @pytest.fixture
    def editor(self, loaded: TextToImageBackend) -> TextToImageBackend:
        if not loaded.supports_editing:
            pytest.skip(f"{self.key} does not edit images")
        return loaded

    @pytest.mark.anyio
    async def test_edits_are_checked_before_loading(self, registry: Registry) -> None:
        """A model that cannot edit says so; one that can refuses bad inputs, each naming
        its field: before any weights load, so the runtime never hears of them."""
        model: ImageGenerator = registry.generator(self.key)
        runtime = MockRuntime()  # no handler: a call that reached it would fail otherwise
        bound = model.using(runtime)
        if not model.supports_editing:
            with pytest.raises(InvalidInput) as refused:
                await bound.generate("a fox", image=photo_like(32, 32, seed=1))
            assert refused.value.field == "image"
            assert f"model {self.key} cannot edit images" in str(refused.value)
            assert runtime.calls == []
            return
        source, mask = self.edit_inputs(model.backend)
        square = photo_like(32, 32, seed=2)
        cases: list[tuple[dict[str, Any], ImageGenerationConfig | None, str]] = [
            ({"image": source_image(source), "mask": square}, None, "mask"),
            ({"image": b"not an image"}, None, "image"),
            ({"image": source_image(source), "mask": b"not a mask"}, None, "mask"),
            ({"mask": mask_image(mask)}, None, "mask"),
            ({"image": source_image(source)}, ImageGenerationConfig(strength=1.5), "strength"),
            ({"image": source_image(source)}, ImageGenerationConfig(strength=-1), "strength"),
            ({}, ImageGenerationConfig(strength=0.5), "strength"),
        ]
        for inputs, config, field in cases:
            with pytest.raises(InvalidInput) as caught:
                await bound.generate("a fox", config, **inputs)
            assert caught.value.field == field, (inputs, config, caught.value)
        assert runtime.calls == [], "a bad edit reached the runtime"

    def test_edit_is_deterministic_by_seed(self, editor: TextToImageBackend) -> None:
        source, mask = self.edit_inputs(editor)
        for area in (None, mask):
            _, one = self.edit(editor, source, area, seed=1234, strength=0.8)
            _, same = self.edit(editor, source, area, seed=1234, strength=0.8)
            _, other = self.edit(editor, source, area, seed=1235, strength=0.8)
            first = np.asarray(one.images[0])
            assert first.shape == source.shape
            assert np.array_equal(first, np.asarray(same.images[0])), "one seed, two images"
            assert not np.array_equal(first, np.asarray(other.images[0])), "two seeds, one image"
            assert not np.array_equal(first, source), "the edit changed nothing"
            assert one.seed == 1234 and one.config.strength == 0.8

    def test_edit_keeps_the_source_outside_the_mask(self, editor: TextToImageBackend) -> None:
        source, mask = self.edit_inputs(editor)
        _, result = self.edit(editor, source, mask, seed=3, strength=1.0, num_images=2)
        outside, inside = mask == 0, mask == 255
        for image in result.images:
            out = np.asarray(image).astype(int)
            stray = np.abs(out - source)[outside].max()
            assert stray <= self.mask_tolerance, f"outside the mask, a pixel moved by {stray}"
            assert np.abs(out - source)[inside].mean() > 0, "inside the mask nothing changed"

    def test_edit_at_strength_zero_returns_the_source(self, editor: TextToImageBackend) -> None:
        source, mask = self.edit_inputs(editor)
        for area in (None, mask):
            steps, result = self.edit(editor, source, area, seed=4, strength=0.0, num_images=2)
            assert steps == [], "strength 0 ran steps"
            for image in result.images:
                assert np.array_equal(np.asarray(image), source)

    def test_edit_runs_the_steps_its_strength_asks_for(self, editor: TextToImageBackend) -> None:
        source, _ = self.edit_inputs(editor)
        full, _ = self.edit(editor, source, steps=4, seed=5, strength=1.0)
        half, result = self.edit(editor, source, steps=4, seed=5, strength=0.5)
        for steps in (full, half):
            assert [p.step for p in steps] == list(range(1, len(steps) + 1))
            assert {p.total for p in steps} == {len(steps)}
        assert 0 < len(half) < len(full)
        assert result.config.steps == 4 and result.config.strength == 0.5

    @pytest.mark.anyio
    async def test_an_edit_through_the_pool_is_the_direct_one(
        self, registry: Registry, editor: TextToImageBackend
    ) -> None:
        model: ImageGenerator = registry.generator(self.key)
        source, mask = self.edit_inputs(editor)
        height, width = source.shape[:2]
        config = ImageGenerationConfig(steps=self.steps, seed=21, num_images=2, strength=0.7)
        async with Pool(memory=FakeMemory(total_mb=1_000_000), clock=FakeClock()) as pool:
            served = await model.using(pool).generate(
                "a red fox", config, image=source_image(source), mask=mask_image(mask)
            )
        _, direct = self.edit(
            editor, source, mask, "a red fox", seed=21, num_images=2, strength=0.7
        )
        assert [image.size for image in served.images] == [(width, height)] * 2
        for one, other in zip(served.images, direct.images):
            assert np.array_equal(np.asarray(one), np.asarray(other)), "the pool changed it"


def source_image(pixels: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(pixels)


def mask_image(mask: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(mask)
