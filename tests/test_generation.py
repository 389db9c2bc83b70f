"""Generation results: saving images with the metadata needed to make them again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from limner import GenerationResult, ImageGenerationConfig, InvalidInput, Pool, Registry
from limner.testing import FakeClock, FakeMemory, fake_generation_spec

pytestmark = pytest.mark.anyio


async def make_result(seed: int = 5) -> GenerationResult:
    registry = Registry(entry_points=False)
    registry.register(fake_generation_spec("fake/gen"))
    async with Pool(memory=FakeMemory(total_mb=1000), clock=FakeClock()):
        return await registry.generator("fake/gen").generate(
            "a lighthouse", ImageGenerationConfig(steps=2, seed=seed, num_images=2)
        )


async def test_png_carries_prompt_seed_model_and_settings(tmp_path: Path) -> None:
    result = await make_result(seed=5)
    target = result.save(tmp_path / "out.png", index=1)
    with Image.open(target) as image:
        assert isinstance(image, PngImagePlugin.PngImageFile)
        text = dict(image.text)
        assert image.size == (16, 16)
        assert image.getpixel((0, 0)) == result.images[1].getpixel((0, 0))
    assert text["prompt"] == "a lighthouse"
    assert text["seed"] == "5"
    assert text["model"] == "fake/gen"
    settings = json.loads(text["limner"])
    assert settings["steps"] == 2
    assert settings["num_images"] == 2
    assert settings["width"] == 16


async def test_other_formats_follow_the_suffix(tmp_path: Path) -> None:
    result = await make_result()
    with Image.open(result.save(tmp_path / "out.jpg", index=0)) as image:
        assert image.format == "JPEG"


async def test_save_never_writes_one_of_several_images_silently(tmp_path: Path) -> None:
    result = await make_result()
    with pytest.raises(InvalidInput, match=r"holds 2 images.*save_all"):
        result.save(tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


async def test_save_all_writes_every_image_named_as_the_cli_names_them(tmp_path: Path) -> None:
    result = await make_result(seed=5)
    written = result.save_all(tmp_path / "out.png")
    assert written == [tmp_path / "out-1.png", tmp_path / "out-2.png"]
    for index, path in enumerate(written):
        with Image.open(path) as image:
            assert image.tobytes() == result.images[index].tobytes()


def test_save_of_a_single_image_needs_no_index(tmp_path: Path) -> None:
    result = GenerationResult(
        model="fake/gen",
        prompt="one",
        images=(Image.new("RGB", (8, 8), "red"),),
        seed=3,
        config=ImageGenerationConfig(seed=3),
    )
    assert result.save(tmp_path / "one.png") == tmp_path / "one.png"
    assert result.save_all(tmp_path / "all.png") == [tmp_path / "all.png"]


async def test_same_seed_same_image_different_seed_different() -> None:
    first, again, other = await make_result(1), await make_result(1), await make_result(2)
    assert first.images[0].tobytes() == again.images[0].tobytes()
    assert first.images[0].tobytes() != other.images[0].tobytes()


async def test_a_drawn_seed_is_reported() -> None:
    registry = Registry(entry_points=False)
    registry.register(fake_generation_spec("fake/gen"))
    model = registry.generator("fake/gen")
    resolved = model.resolve_config()
    assert resolved.seed is not None
    async with Pool(memory=FakeMemory(total_mb=1000), clock=FakeClock()):
        result = await model.generate("x", resolved)
    assert result.seed == resolved.seed


def test_each_saved_image_records_its_own_seed(tmp_path: Path) -> None:
    images = (Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue"))
    result = GenerationResult(
        model="fake/gen",
        prompt="two",
        images=images,
        seed=10,
        config=ImageGenerationConfig(seed=10, num_images=2),
        metadata={"seeds": [10, 11]},
    )
    with Image.open(result.save(tmp_path / "second.png", index=1)) as image:
        assert isinstance(image, PngImagePlugin.PngImageFile)
        assert image.text["seed"] == "11"
    assert result.seed_of(0) == 10
