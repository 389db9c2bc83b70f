"""Fixtures for the CLIP plugin's tests: an isolated offline HF cache, images, registries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import limner
import limner_clip
from limner.plugin import hf_cache_dir

#: The user's Hugging Face cache as it was before the tests redirected it; only the
#: real-weights test reads it, and nothing writes to it.
USER_HF_CACHE = hf_cache_dir()


@pytest.fixture(scope="session", autouse=True)
def isolated_hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and subprocess) uses a fresh offline HF cache, never the user's."""
    cache = tmp_path_factory.mktemp("hf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("LIMNER_MODELS_DIR", raising=False)
        patch.delenv("LIMNER_DEVICE", raising=False)
        patch.delenv("LIMNER_DTYPE", raising=False)
        yield cache


@pytest.fixture(scope="session")
def user_hf_cache() -> Path:
    """The user's own HF cache, for tests that may read (never write) downloaded weights."""
    return USER_HF_CACHE


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def registry() -> limner.Registry:
    """A registry that knows only this plugin (installed or not)."""
    registry = limner.Registry(entry_points=False)
    registry.register_plugin(limner_clip)
    return registry


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A seeded image with structure at several scales (smooth colour fields plus grain), so
    resizing and JPEG coding behave as on photos and embeddings differ between images."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 40, 2), max(width // 40, 2), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.normal(0.0, 10.0, field.shape)
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def photo() -> Callable[[int, int, int], Image.Image]:
    """``photo(width, height, seed)``: a seeded photo-like RGB image."""
    return photo_like


#: (width, height, format): landscape JPEGs large enough for draft decoding, a portrait, a
#: panorama, images at and below the input size, odd sizes that exercise the crop rounding.
VARIED_IMAGES = [
    (640, 480, "JPEG"),
    (480, 640, "JPEG"),
    (1000, 333, "JPEG"),
    (1024, 768, "JPEG"),
    (224, 224, "PNG"),
    (150, 100, "PNG"),
    (301, 299, "PNG"),
    (97, 400, "PNG"),
]


@pytest.fixture(scope="session")
def varied_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("images")
    paths = []
    for index, (width, height, kind) in enumerate(VARIED_IMAGES):
        path = directory / f"image-{index}-{width}x{height}.{kind.lower()}"
        photo_like(width, height, seed=index).save(
            path, kind, **({"quality": 90} if kind == "JPEG" else {})
        )
        paths.append(path)
    return paths
