"""Editing through the text-to-image front: the inputs decoded and checked before any load,
the masks of both conventions, and what crosses the runtime seam (data, which pickles)."""

from __future__ import annotations

import base64
import inspect
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

import limner
from limner import (
    GenerationChunk,
    GenerationResult,
    ImageGenerationConfig,
    InvalidInput,
    Pool,
    Progress,
    Registry,
)
from limner.inputs import ImageLimits, decode_mask
from limner.plugin import TextToImageBackend
from limner.runtime import StreamCall
from limner.testing import (
    FakeClock,
    FakeMemory,
    FakeTextToImageBackend,
    MockRuntime,
    fake_generation_spec,
)

if TYPE_CHECKING:
    from tests.conftest import LocalHTTPServer

pytestmark = pytest.mark.anyio


class GenerateOnly(FakeTextToImageBackend):
    """The fake generator without editing, like a plugin that does not declare it."""

    edit = TextToImageBackend.edit


def registry_of(backend: type[TextToImageBackend] = FakeTextToImageBackend) -> Registry:
    registry = Registry(entry_points=False)
    spec = fake_generation_spec("fake/gen")
    registry.register(spec if backend is FakeTextToImageBackend else _with(spec, backend))
    return registry


def _with(spec: limner.ModelSpec, backend: type[TextToImageBackend]) -> limner.ModelSpec:
    import dataclasses

    return dataclasses.replace(spec, factory=backend)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def source(width: int = 32, height: int = 16) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def white_mask(width: int = 32, height: int = 16) -> Image.Image:
    """White on the left half: repaint it; keep the right."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


def openai_mask(width: int = 32, height: int = 16) -> Image.Image:
    """The same area as OpenAI marks it: fully transparent on the left half, opaque black
    elsewhere (an opaque colour that luminance alone would read as 'keep' everywhere)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((255, 255, 255, 0), (0, 0, width // 2, height))
    return mask


class Recorder:
    """A MockRuntime ``stream`` handler that records the call and answers with a result."""

    def __init__(self) -> None:
        self.calls: list[StreamCall] = []

    def __call__(self, key: str, call: StreamCall) -> Iterable[GenerationChunk]:
        self.calls.append(call)
        prompt, config = call.args[:2]
        image = Image.new("RGB", (config.width, config.height))
        yield Progress(step=1, total=1, elapsed=0.0)
        yield GenerationResult(model=key, prompt=prompt, images=(image,), seed=1, config=config)


# -- what the front sends ---------------------------------------------------------------------


async def test_an_edit_crosses_the_seam_as_arrays_and_a_resolved_config() -> None:
    recorder = Recorder()
    runtime = MockRuntime(stream=recorder)
    model = registry_of().generator("fake/gen").using(runtime)
    config = ImageGenerationConfig(seed=3, steps=2, strength=0.25)
    result = await model.generate("a fox", config, image=png(source()), mask=white_mask())
    (call,) = recorder.calls  # pickled and unpickled on the way, as to another process
    assert call.method == "edit"
    prompt, resolved, image, mask = call.args
    assert prompt == "a fox"
    assert (resolved.width, resolved.height) == (32, 16)  # the source's size: none was given
    assert (resolved.seed, resolved.steps, resolved.strength) == (3, 2, 0.25)
    assert image.dtype == np.uint8 and image.shape == (16, 32, 3)
    assert np.array_equal(image, np.asarray(source()))
    assert mask.dtype == np.uint8 and mask.shape == (16, 32)
    assert set(np.unique(mask)) == {0, 255}
    assert (mask[:, :16] == 255).all() and (mask[:, 16:] == 0).all()
    assert result.images[0].size == (32, 16)
    plain = await model.generate("a fox", ImageGenerationConfig(seed=3))
    assert recorder.calls[-1].method == "generate" and plain.seed == 1


async def test_a_size_given_for_an_edit_is_kept() -> None:
    recorder = Recorder()
    model = registry_of().generator("fake/gen").using(MockRuntime(stream=recorder))
    await model.generate("p", ImageGenerationConfig(width=64, height=64), image=source())
    assert (recorder.calls[0].args[1].width, recorder.calls[0].args[1].height) == (64, 64)


@pytest.mark.parametrize("form", ["path", "bytes", "base64", "data URL", "PIL", "URL"])
async def test_every_input_form_embed_images_takes(
    form: str, tmp_path: Path, http_server: LocalHTTPServer
) -> None:
    data = png(source())
    mask_data = png(openai_mask())
    forms: dict[str, tuple[Any, Any]] = {
        "path": (tmp_path / "in.png", tmp_path / "mask.png"),
        "bytes": (data, mask_data),
        "base64": (base64.b64encode(data).decode(), base64.b64encode(mask_data).decode()),
        "data URL": (
            "data:image/png;base64," + base64.b64encode(data).decode(),
            "data:image/png;base64," + base64.b64encode(mask_data).decode(),
        ),
        "PIL": (source(), openai_mask()),
        "URL": (
            http_server.route("/edit-in.png", body=data, content_type="image/png"),
            http_server.route("/edit-mask.png", body=mask_data, content_type="image/png"),
        ),
    }
    (tmp_path / "in.png").write_bytes(data)
    (tmp_path / "mask.png").write_bytes(mask_data)
    recorder = Recorder()
    model = registry_of().generator("fake/gen").using(MockRuntime(stream=recorder))
    image, mask = forms[form]
    await model.generate("p", image=image, mask=mask)
    _, _, sent_image, sent_mask = recorder.calls[0].args
    assert np.array_equal(sent_image, np.asarray(source()))
    assert (sent_mask[:, :16] == 255).all() and (sent_mask[:, 16:] == 0).all()


# -- refused before any load ------------------------------------------------------------------


async def test_a_model_that_cannot_edit_says_so_before_loading() -> None:
    registry = registry_of(GenerateOnly)
    model = registry.generator("fake/gen")
    assert not model.supports_editing and not model.blocking().supports_editing
    runtime = MockRuntime()  # no handlers: a call that reached it would fail differently
    with pytest.raises(InvalidInput, match="model fake/gen cannot edit images") as caught:
        await model.using(runtime).generate("p", image=source())
    assert caught.value.field == "image"
    assert runtime.calls == []
    assert registry_of().generator("fake/gen").supports_editing


@pytest.mark.parametrize(
    ("inputs", "config", "field"),
    [
        ({"image": b"not an image"}, None, "image"),
        ({"image": "/no/such/file.png"}, None, "image"),
        ({"image": 42}, None, "image"),
        ({"image": "source", "mask": b"not an image"}, None, "mask"),
        ({"image": "source", "mask": "small"}, None, "mask"),
        ({"mask": "mask"}, None, "mask"),
        ({}, ImageGenerationConfig(strength=0.5), "strength"),
        ({"image": "source"}, ImageGenerationConfig(strength=1.01), "strength"),
        ({"image": "source"}, ImageGenerationConfig(strength=-0.5), "strength"),
        ({"image": "source"}, ImageGenerationConfig(strength=math.nan), "strength"),
        ({"image": "source"}, ImageGenerationConfig(strength="0.5"), "strength"),  # type: ignore[arg-type]
        ({"image": "source"}, ImageGenerationConfig(strength=True), "strength"),
        ({"image": "source"}, ImageGenerationConfig(width=12), "width"),
        ({"image": "big"}, None, "image"),
    ],
)
async def test_bad_edits_are_typed_errors_naming_the_field_before_any_load(
    inputs: dict[str, Any], config: ImageGenerationConfig | None, field: str
) -> None:
    values = {
        "source": source(),
        "mask": white_mask(),
        "small": white_mask(8, 8),
        "big": Image.new("RGB", (100, 100)),  # over this model's pixel limit below
    }
    arguments = {name: values.get(value, value) for name, value in inputs.items()}
    runtime = MockRuntime()
    generator = registry_of().generator("fake/gen").with_limits(ImageLimits(max_pixels=5000))
    with pytest.raises(InvalidInput) as caught:
        await generator.using(runtime).generate("p", config, **arguments)
    assert caught.value.field == field, caught.value
    assert runtime.calls == []


async def test_a_runtime_without_run_stream_cannot_edit() -> None:
    class OldRuntime:  # implements only the deprecated generate
        def generate(self, backend: Any, prompt: str, config: Any) -> Any:
            raise AssertionError("not reached")

    model = registry_of().generator("fake/gen").using(OldRuntime())  # type: ignore[arg-type]
    with pytest.raises(limner.LimnerError, match="cannot run 'edit'"):
        await model.generate("p", image=source())


# -- masks ------------------------------------------------------------------------------------


def test_masks_of_both_conventions_mean_the_same_area() -> None:
    expected = np.asarray(white_mask())
    palette = openai_mask().convert("RGB").convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))  # the left half's colour
    cases = [
        (white_mask(), "auto"),
        (white_mask(), "white"),
        (white_mask().convert("RGB"), "auto"),
        (openai_mask(), "auto"),
        (openai_mask(), "alpha"),
        (openai_mask().convert("LA"), "alpha"),
        (palette, "alpha"),
    ]
    for image, convention in cases:
        mask = decode_mask(png(image), convention=convention)  # type: ignore[arg-type]
        assert mask.mode == "L", (image.mode, convention)
        assert np.array_equal(np.asarray(mask), expected), (image.mode, convention)


def test_only_fully_transparent_pixels_are_repainted_under_openais_convention() -> None:
    almost = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    almost.putpixel((0, 0), (0, 0, 0, 0))
    almost.putpixel((1, 0), (0, 0, 0, 1))  # nearly transparent: kept
    mask = np.asarray(decode_mask(png(almost), convention="alpha"))
    assert mask[0, 0] == 255 and mask.sum() == 255


def test_an_openai_mask_without_transparency_is_refused() -> None:
    for image in (white_mask(), white_mask().convert("RGB")):
        with pytest.raises(InvalidInput, match="needs an alpha channel"):
            decode_mask(png(image), convention="alpha")
    opaque = openai_mask()  # white where it was transparent, black elsewhere
    opaque.putalpha(255)  # an alpha channel, every pixel opaque: "auto" reads the white
    assert np.array_equal(np.asarray(decode_mask(png(opaque))), np.asarray(white_mask()))
    with pytest.raises(InvalidInput) as caught:
        decode_mask(png(opaque), convention="sideways")  # type: ignore[arg-type]
    assert caught.value.field == "convention"


def test_a_mask_decodes_within_the_same_limits() -> None:
    with pytest.raises(InvalidInput, match="max_pixels"):
        decode_mask(png(white_mask(100, 100)), limits=ImageLimits(max_pixels=5000))


# -- the fake backend, the pool and the blocking facade ---------------------------------------


async def test_an_edit_runs_in_the_pool_and_keeps_the_source_outside_the_mask() -> None:
    model = registry_of().generator("fake/gen")
    config = ImageGenerationConfig(seed=5, steps=4, strength=0.5, num_images=2)
    async with Pool(memory=FakeMemory(total_mb=1000), clock=FakeClock()) as pool:
        chunks = [
            chunk
            async for chunk in model.using(pool).generate_image(
                "p", config, image=source(), mask=openai_mask()
            )
        ]
    *progress, result = chunks
    assert isinstance(result, GenerationResult)
    assert [p.step for p in progress if isinstance(p, Progress)] == [1, 2]  # ceil(4 x 0.5)
    assert result.config.strength == 0.5
    original = np.asarray(source())
    for image in result.images:
        pixels = np.asarray(image)
        assert np.array_equal(pixels[:, 16:], original[:, 16:])
        assert not np.array_equal(pixels[:, :16], original[:, :16])


def test_the_blocking_facade_edits(tmp_path: Path) -> None:
    (tmp_path / "in.png").write_bytes(png(source()))
    model = registry_of().generator("fake/gen").blocking()
    result = model.generate(
        "p", ImageGenerationConfig(seed=1, strength=0.0), image=tmp_path / "in.png"
    )
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(source()))
    parameters = inspect.signature(model.generate).parameters
    assert parameters["image"].kind is parameters["mask"].kind is inspect.Parameter.KEYWORD_ONLY
