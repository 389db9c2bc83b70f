"""The parts of :class:`limner.diffusion.testing.DiffusionFamilyContract`: the family's
facts and fixtures, and the tests of its tiny model generating through the real pipeline."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import anyio.to_thread
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

import limner
from limner import (
    GenerationResult,
    ImageGenerationConfig,
    Pool,
    Progress,
)
from limner.plugin import hf_cache_dir
from limner.plugin.testing import BAD_FIELDS, TextToImageContract, run_in_threads
from limner.testing import FakeClock, FakeMemory

from ._backend import DiffusersBackend
from ._checkpoint import Checkpoint
from ._config import MAX_NUM_IMAGES, MAX_SEED
from ._generation import latent_rgb

__all__ = ["USER_CACHE", "BackendMaker", "FamilyFixtures", "GenerationTests", "pixels", "run"]

#: The user's own Hugging Face cache, read when this module is imported, before any test
#: redirects the cache: the real-weights test looks for the weights there.
USER_CACHE = hf_cache_dir()

BackendMaker = Callable[..., DiffusersBackend[Any]]
"""``make_backend(key, **configure)``: a backend as the core builds it, not loaded."""


def run(
    backend: DiffusersBackend[Any], prompt: str = "a lighthouse at dusk", **fields: Any
) -> tuple[list[Progress], GenerationResult]:
    """Generate with ``backend`` (loaded): each step's progress, then the result."""
    steps: list[Progress] = []
    config = backend.resolve_config(ImageGenerationConfig(**fields))
    result = backend.generate(prompt, config, on_step=steps.append)
    return steps, result


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """A list that grows by one whenever ``owner.name`` is called, for the test's duration."""
    calls: list[int] = []
    real = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def pixels(image: Image.Image) -> npt.NDArray[np.uint8]:
    return np.asarray(image, dtype=np.uint8)


#: ``(field, value)`` every diffusion checkpoint refuses besides the conformance suite's
#: ``BAD_FIELDS``: the types and bounds ``resolve_config`` holds every family to.
DIFFUSION_BAD_FIELDS: tuple[tuple[str, object], ...] = (
    ("height", 512.0),  # a whole number, but not an int
    ("steps", 2.0),
    ("width", False),
    ("guidance", "3.5"),
    ("negative_prompt", 3),
    ("negative_prompt", ["blurry"]),
    ("max_sequence_length", 0),
    ("num_images", MAX_NUM_IMAGES + 1),
    ("seed", MAX_SEED + 1),
    ("output_format", "bmp"),
    ("preview", 1),
)


def past_the_limits(checkpoint: Checkpoint) -> list[tuple[str, object]]:
    """``(field, value)`` just past each of ``checkpoint``'s own limits, which it refuses."""
    fields: list[tuple[str, object]] = [
        ("width", checkpoint.min_size // 2),
        ("height", checkpoint.max_size * 2),
        ("width", checkpoint.default_size + checkpoint.size_multiple // 2),  # not a multiple
        ("steps", checkpoint.max_steps + 1),
        ("guidance", checkpoint.max_guidance + 1),
        ("max_sequence_length", checkpoint.max_prompt_tokens + 1),
    ]
    if checkpoint.guidance_distilled_away:
        fields.append(("guidance", 3.5))
    if checkpoint.negative_prompt_refusal is not None or checkpoint.default_guidance <= 1:
        fields.append(("negative_prompt", "blurry"))  # no guidance for it to act through
    return fields


class FamilyFixtures(TextToImageContract):
    """What a family's tests say about it, and the fixtures the tests use: the conformance
    suite's (:class:`limner.plugin.testing.TextToImageContract`) and the family's."""

    backend_class: ClassVar[type[DiffusersBackend[Any]]]
    #: How the tiny model's description names the family: "TINY random-weight <name> ...".
    family_name: ClassVar[str]
    #: A real key: its defaults, its load-error advice, and the real-weights test.
    real_key: ClassVar[str]
    #: Files the tiny model's snapshot holds, besides its weights.
    tiny_files: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        tiny = getattr(cls, "backend_class", None) and cls.backend_class.tiny
        if tiny is not None and "key" not in cls.__dict__:
            cls.key = tiny.key  # the suite runs the family's tiny model

    @classmethod
    def tiny_key(cls) -> str:
        return cls.key

    @classmethod
    def pipeline_steps(cls, requested: int) -> int:
        """How many steps the family's pipeline runs, and reports, for ``requested``:
        the same number for most schedulers. Override it where the scheduler differs:
        Stable Diffusion 1.5's PNDM (PLMS) runs one more than asked."""
        return requested

    def refused_fields(self) -> list[tuple[str, str, Any]]:
        """The suite's, and for each of the family's checkpoints the suite's bad values, the
        ones every diffusion checkpoint refuses, and values just past its own limits."""
        fields = super().refused_fields()
        for checkpoint in self.backend_class.variants:
            if isinstance(checkpoint, Checkpoint):
                bad = (*BAD_FIELDS, *DIFFUSION_BAD_FIELDS, *past_the_limits(checkpoint))
                fields += [(checkpoint.key, field, value) for field, value in bad]
        return fields

    @pytest.fixture(scope="class")
    @classmethod
    def user_cache(cls) -> Path:
        return USER_CACHE

    @pytest.fixture(scope="class")
    @classmethod
    def tiny(cls, loaded: DiffusersBackend[Any]) -> DiffusersBackend[Any]:
        """The tiny model, loaded once and shared: generation never mutates a backend."""
        assert isinstance(loaded, cls.backend_class)
        return loaded


class GenerationTests(FamilyFixtures):
    """The tiny model generating through the real pipeline, directly and through the pool."""

    def test_tiny_model_is_written_in_the_hub_cache_layout(
        self, tiny: DiffusersBackend[Any], hf_cache: Path
    ) -> None:
        revision = tiny.settings.revision
        assert self.backend_class.tiny is not None
        assert revision == self.backend_class.tiny.revision
        repo = hf_cache / ("models--" + self.tiny_key().replace("/", "--"))
        assert (repo / "refs" / "main").read_text() == revision
        snapshot = repo / "snapshots" / revision
        for name in self.tiny_files:
            assert (snapshot / name).is_file()

    def test_steps_then_result(self, tiny: DiffusersBackend[Any]) -> None:
        steps, result = run(tiny, steps=3, num_images=2, width=48, height=32, seed=11)
        runs = self.pipeline_steps(3)
        assert [p.step for p in steps] == list(range(1, runs + 1))
        assert {p.total for p in steps} == {runs}
        elapsed = [p.elapsed for p in steps]
        assert elapsed == sorted(elapsed) and elapsed[0] > 0
        assert all(p.preview is None for p in steps)
        assert len(result.images) == 2
        assert {image.size for image in result.images} == {(48, 32)}
        assert {image.mode for image in result.images} == {"RGB"}
        assert result.model == self.tiny_key() and result.prompt == "a lighthouse at dusk"
        assert result.seed == 11 and result.config.seed == 11
        assert result.config.steps == 3 and result.config.width == 48
        assert result.timings["generate"] >= result.timings["decode"] > 0
        assert result.timings["load"] > 0
        assert result.metadata["seeds"] == [11, 12]
        assert result.metadata["steps"] == 3 and result.metadata["scheduler"]
        assert result.metadata["dtype"] == "float32" and result.metadata["device"] == "cpu"

    def test_each_image_of_a_batch_has_its_own_seed(self, tiny: DiffusersBackend[Any]) -> None:
        """Image k of a batch starts from seed + k, so any one image can be made again alone."""
        _, batch = run(tiny, steps=2, seed=50, num_images=2)
        _, alone = run(tiny, steps=2, seed=51)
        first, second = (pixels(image).astype(int) for image in batch.images)
        assert not np.array_equal(first, second)
        # Same noise, same prompt; only the batched matrix products round differently.
        assert np.abs(second - pixels(alone.images[0]).astype(int)).max() <= 2

    def test_preview_is_a_small_latent_projection(self, tiny: DiffusersBackend[Any]) -> None:
        steps, result = run(tiny, steps=2, width=64, height=48, preview=True, seed=3)
        assert len(steps) == self.pipeline_steps(2)
        for progress in steps:
            assert progress.preview is not None
            assert progress.preview.size == (8, 6)  # one pixel per latent
            assert progress.preview.mode == "RGB"
        first, last = (pixels(p.preview) for p in (steps[0], steps[-1]) if p.preview is not None)
        assert not np.array_equal(first, last)  # it follows the latents
        assert result.images[0].size == (64, 48)

    def test_preview_projection_is_cheap_at_1024px(
        self, tiny: DiffusersBackend[Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A step's preview is one small matrix product per latent pixel, never a VAE decode:
        counted in floating-point operations and decoder calls, not timed, so a busy machine
        cannot fail it."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        loaded = tiny._require_loaded()
        projection = latent_rgb(loaded)
        assert latent_rgb(loaded) is projection  # fitted once per loaded pipeline
        channels = projection.factors.shape[0]
        decodes = _count_calls(monkeypatch, loaded.pipeline.vae, "decode")
        latents = torch.randn(1, channels, 128, 128)  # the (unpacked) latents of 1024 x 1024
        with FlopCounterMode(display=False) as counter:
            image = projection.image(latents)
        assert image.size == (128, 128)  # one pixel per latent
        assert tuple(projection.factors.shape) == (channels, 3)
        assert counter.get_total_flops() <= 2 * channels * 3 * 128 * 128
        assert decodes == []
        # A previewed generation decodes once, at its end, as one without previews does.
        steps, _ = run(tiny, steps=3, width=32, height=32, preview=True, seed=2)
        assert all(progress.preview is not None for progress in steps)
        assert len(decodes) == 1

    def test_cancelled_at_step_two_stops_before_decoding(
        self, tiny: DiffusersBackend[Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        decodes = _count_calls(monkeypatch, tiny._require_loaded().pipeline.vae, "decode")
        seen: list[int] = []

        def on_step(progress: Progress) -> None:
            seen.append(progress.step)
            if progress.step == 2:
                raise limner.Cancelled("consumer went away")

        config = tiny.resolve_config(ImageGenerationConfig(steps=6, seed=1))
        with pytest.raises(limner.Cancelled):
            tiny.generate("a cat", config, on_step=on_step)
        assert seen == [1, 2]
        assert decodes == []
        # The backend is unharmed: the next generation runs all its steps.
        steps, result = run(tiny, steps=3)
        runs = self.pipeline_steps(3)
        assert [p.step for p in steps] == list(range(1, runs + 1)) and len(result.images) == 1
        assert len(decodes) == 1

    def test_concurrent_generations_match_sequential_ones(
        self, tiny: DiffusersBackend[Any]
    ) -> None:
        seeds = (101, 202)
        sequential = {seed: pixels(run(tiny, steps=3, seed=seed)[1].images[0]) for seed in seeds}
        both_started = threading.Barrier(2, timeout=30)
        results: dict[int, GenerationResult] = {}
        errors: list[BaseException] = []

        def worker(seed: int) -> None:
            def on_step(progress: Progress) -> None:
                if progress.step == 1:
                    both_started.wait()  # both calls are inside the denoising loop at once

            try:
                config = tiny.resolve_config(ImageGenerationConfig(steps=3, seed=seed))
                results[seed] = tiny.generate("a lighthouse at dusk", config, on_step=on_step)
            except BaseException as error:
                errors.append(error)

        run_in_threads(worker, seeds, timeout=60)
        assert errors == []
        for seed in seeds:
            assert np.array_equal(pixels(results[seed].images[0]), sequential[seed])
            assert results[seed].config.steps == 3

    def test_many_threads_with_different_prompts_match_sequential_runs(
        self, tiny: DiffusersBackend[Any]
    ) -> None:
        """Prompts and sequence lengths that differ between threads: the tokenizers' padding
        state, set before every encode, must not leak from one call into another."""

        def generate(index: int) -> npt.NDArray[np.uint8]:
            words = "a lighthouse at dusk " * (1 + index % 5)
            length = 8 * (1 + index % 4)
            _, result = run(
                tiny, words, steps=1, seed=index, width=32, height=32, max_sequence_length=length
            )
            return pixels(result.images[0])

        expected = {index: generate(index) for index in range(8)}
        failures: list[str] = []

        def worker(offset: int) -> None:
            for turn in range(8):
                index = (turn + offset) % 8
                try:
                    if not np.array_equal(generate(index), expected[index]):
                        failures.append(f"image {index} differs")
                except Exception as error:
                    failures.append(repr(error))

        run_in_threads(worker, range(4), timeout=120)
        assert failures == []

    @pytest.mark.anyio
    async def test_streamed_by_an_async_consumer_that_leaves_early(
        self, tiny: DiffusersBackend[Any]
    ) -> None:
        """The way the core drives a backend: chunks cross from the worker thread into a
        stream, and once the consumer has gone, ``on_step`` raises ``Cancelled`` and
        generation stops."""
        send, receive = anyio.create_memory_object_stream[Progress](0)  # a hand-over
        gone = threading.Event()
        seen: list[int] = []

        def on_step(progress: Progress) -> None:
            if gone.is_set():
                raise limner.Cancelled("consumer left")
            seen.append(progress.step)
            try:
                anyio.from_thread.run(send.send, progress)
            except anyio.BrokenResourceError:
                raise limner.Cancelled("consumer left") from None

        config = tiny.resolve_config(ImageGenerationConfig(steps=8, seed=5))

        async def consume() -> list[int]:
            received = []
            async for progress in receive:
                received.append(progress.step)
                if len(received) == 2:
                    gone.set()
                    break
            return received

        outcome: dict[str, Any] = {}

        async def produce() -> None:
            try:
                outcome["result"] = await anyio.to_thread.run_sync(
                    lambda: tiny.generate("a cat", config, on_step=on_step)
                )
            except limner.Cancelled as error:
                outcome["error"] = error

        async with anyio.create_task_group() as group:
            group.start_soon(produce)
            received = await consume()
            receive.close()
        assert received == [1, 2]
        assert isinstance(outcome.get("error"), limner.Cancelled)
        assert seen in ([1, 2], [1, 2, 3])  # at most one step past the consumer

    # -- editing: the family's edit pipelines on the loaded weights ------------------------

    def test_edit_pipelines_share_the_loaded_modules(self, tiny: DiffusersBackend[Any]) -> None:
        """Built once per load on the loaded pipeline's components: the same module objects,
        so every tensor is shared and no weight is copied or cast."""
        import torch

        if not tiny.supports_editing:
            pytest.skip(f"{self.backend_class.__name__} names no edit pipelines")
        loaded = tiny._require_loaded()
        base = loaded.pipeline
        assert set(loaded.edit_pipelines) == {"img2img", "inpaint"}
        assert type(loaded.edit_pipelines["img2img"]).__name__ == self.backend_class.img2img_class
        assert type(loaded.edit_pipelines["inpaint"]).__name__ == self.backend_class.inpaint_class
        pointers = {
            tensor.data_ptr()
            for module in base.components.values()
            if isinstance(module, torch.nn.Module)
            for tensor in (*module.parameters(), *module.buffers())
        }
        for edit in loaded.edit_pipelines.values():
            for name, component in edit.components.items():
                assert component is base.components.get(name), f"{name} is not the loaded one"
                if isinstance(component, torch.nn.Module):
                    for tensor in (*component.parameters(), *component.buffers()):
                        assert tensor.data_ptr() in pointers
                        assert tensor.dtype == loaded.dtype or not tensor.is_floating_point()
        before = dict(loaded.edit_pipelines)
        source, mask = self.edit_inputs(tiny)
        self.edit(tiny, source, mask, seed=1)
        self.edit(tiny, source, None, seed=1)
        assert loaded.edit_pipelines == before  # not rebuilt per call

    def test_edit_refuses_arrays_of_another_shape(self, tiny: DiffusersBackend[Any]) -> None:
        if not tiny.supports_editing:
            pytest.skip(f"{self.backend_class.__name__} names no edit pipelines")
        source, mask = self.edit_inputs(tiny)
        bad: list[tuple[Any, Any, str]] = [
            (source.astype(np.float32), None, "image"),
            (source[..., :1], None, "image"),
            (source.tolist(), None, "image"),
            (source, mask[:-16], "mask"),
            (source, mask.astype(np.int64), "mask"),
        ]
        for image, area, field in bad:
            config = tiny.resolve_config(ImageGenerationConfig(steps=1, seed=1))
            with pytest.raises(limner.InvalidInput) as caught:
                tiny.edit("a fox", config, image, area, on_step=lambda progress: None)
            assert caught.value.field == field

    def test_an_edit_of_another_size_resizes_the_source(self, tiny: DiffusersBackend[Any]) -> None:
        """The config's size decides, as a generation's: the source and mask follow it, and
        the kept pixels are the resized source's."""
        if not tiny.supports_editing:
            pytest.skip(f"{self.backend_class.__name__} names no edit pipelines")
        source, mask = self.edit_inputs(tiny)
        config = tiny.resolve_config(ImageGenerationConfig(steps=2, seed=1, width=32, height=32))
        result = tiny.edit("a fox", config, source, mask, on_step=lambda progress: None)
        assert result.images[0].size == (32, 32)
        kept = tiny.edit(
            "a fox",
            dataclasses.replace(config, strength=0.0),
            source,
            None,
            on_step=lambda progress: None,
        )
        assert kept.images[0].size == (32, 32)
        assert result.metadata["edit"] == "inpaint" and kept.metadata["edit"] == "img2img"

    @pytest.mark.anyio
    async def test_served_through_the_core_pool(
        self,
        registry: limner.Registry,
        tiny: DiffusersBackend[Any],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """End to end: registry, pool worker threads, streamed chunks; a consumer that stops
        early stops the pipeline before its VAE decode."""
        model = registry.generator(self.tiny_key())
        config = ImageGenerationConfig(steps=3, seed=21, num_images=2, width=32, height=48)
        async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock()):
            chunks = [chunk async for chunk in model.generate_image("a lighthouse at dusk", config)]
            pipeline = model.backend._require_loaded().pipeline  # type: ignore[attr-defined]
            decodes = _count_calls(monkeypatch, pipeline.vae, "decode")
            stream = model.generate_image("a cat", ImageGenerationConfig(steps=6, seed=1))
            early = []
            async for chunk in stream:
                early.append(chunk)
                if len(early) == 2:
                    break
            await stream.aclose()
        assert decodes == []  # the pool has drained: the stopped run never reached its decode
        runs = self.pipeline_steps(3)
        kinds = [type(chunk) for chunk in chunks]
        assert kinds == [Progress] * runs + [GenerationResult]
        assert [chunk.step for chunk in chunks if isinstance(chunk, Progress)] == list(
            range(1, runs + 1)
        )
        result = chunks[-1]
        assert isinstance(result, GenerationResult)
        assert [image.size for image in result.images] == [(32, 48), (32, 48)]
        _, direct = run(tiny, steps=3, seed=21, num_images=2, width=32, height=48)
        for served, alone in zip(result.images, direct.images):
            assert np.array_equal(pixels(served), pixels(alone))
        assert [chunk.step for chunk in early if isinstance(chunk, Progress)] == [1, 2]
