"""The real OpenAI ViT-B/32, when its weights are already in the user's Hugging Face cache.

The tests run with their own empty cache, so this reads the user's cache (never writes it):
it loads the cached snapshot as a local directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import limner

KEY = "openai/clip-vit-base-patch32"


def _cached_snapshot(cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(KEY, "config.json", cache_dir=cache)
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    has_weights = any(
        (snapshot / name).exists() for name in ("model.safetensors", "pytorch_model.bin")
    )
    return snapshot if has_weights else None


@pytest.mark.real_weights
@pytest.mark.anyio
async def test_red_image_is_closer_to_red_text(
    registry: limner.Registry, user_hf_cache: Path
) -> None:
    snapshot = _cached_snapshot(user_hf_cache)
    if snapshot is None:
        pytest.skip(
            f"{KEY} is not in the Hugging Face cache at {user_hf_cache}; "
            f"run `hf download {KEY}` to enable this test"
        )
    registry.configure(KEY, local_dir=snapshot)
    model = registry.embedder(KEY)
    red = Image.new("RGB", (256, 256), (220, 20, 30))
    blue = Image.new("RGB", (256, 256), (20, 40, 220))
    images = await model.embed_images([red, blue])
    texts = await model.embed_text(["a red square", "a blue square"])
    similarity = images @ texts.T
    assert similarity[0, 0] > similarity[0, 1]
    assert similarity[1, 1] > similarity[1, 0]
    assert np.allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
