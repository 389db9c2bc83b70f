"""The tiny model end to end: generated into the HF cache, loaded lazily, every input kind."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import limner
from limner_clip._backend import ClipBackend
from limner_clip._tiny import TINY_KEY, TINY_REVISION, write_tiny_clip

Photo = Callable[[int, int, int], Image.Image]


def _snapshot(cache: Path) -> Path:
    return cache / "models--limner--tiny-clip" / "snapshots" / TINY_REVISION


def _backend(model: limner.ImageEmbedder) -> ClipBackend:
    backend = model.backend
    assert isinstance(backend, ClipBackend)
    return backend


def _unit_rows(vectors: np.ndarray, count: int, dimension: int = 64) -> None:
    assert vectors.shape == (count, dimension)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.anyio
async def test_lazy_first_embed_writes_the_snapshot_and_loads(
    registry: limner.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo: Photo
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = registry.embedder(TINY_KEY)
    backend = _backend(model)
    assert backend.memory_mb() is None
    assert backend.device is None
    assert not _snapshot(tmp_path).exists(), "get() must not load or write weights"

    jpeg = tmp_path / "photo.jpg"
    photo(640, 480, 1).save(jpeg, quality=90)
    rgba = photo(200, 300, 2).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((200, 300)))
    png_alpha = tmp_path / "alpha.png"
    rgba.save(png_alpha)
    pil = photo(320, 240, 3)
    buffer = io.BytesIO()
    pil.save(buffer, "PNG")

    vectors = await model.embed_images([jpeg, str(png_alpha), pil, buffer.getvalue()])
    _unit_rows(vectors, 4)
    # The same pixels as a PIL image and as lossless PNG bytes embed identically ...
    np.testing.assert_allclose(vectors[2], vectors[3], atol=1e-6)
    # ... while different images do not.
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-2
    assert backend.device == "cpu"
    # 157,313 parameters in the weights' dtype (in int8, 32,768 of them in 896 output
    # channels at one byte, with 20 bytes a channel) and 127 int64 position ids, plus the
    # working memory of a full batch: the declared per-worker overhead (16-bit), up to twice
    # in fp32
    if backend.dtype == "int8":
        weight_bytes = 4 * (157_313 - 32_768 - 896) + 32_768 + 20 * 896
    else:
        weight_bytes = 157_313 * {"bfloat16": 2, "float32": 4}[str(backend.dtype)]
    weights = (weight_bytes + 127 * 8) / 2**20
    overhead = registry.spec(TINY_KEY).info.worker_overhead_mb
    assert overhead is not None
    assert overhead - 1 <= (backend.memory_mb() or 0) - weights <= 2 * overhead + 1
    assert (_snapshot(tmp_path) / "model.safetensors").is_file()


@pytest.mark.anyio
async def test_snapshot_lands_in_the_hf_cache_layout(
    registry: limner.Registry, isolated_hf_cache: Path
) -> None:
    await registry.embedder(TINY_KEY).embed_text("warm up")
    snapshot = _snapshot(isolated_hf_cache)
    names = {path.name for path in snapshot.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    refs = isolated_hf_cache / "models--limner--tiny-clip" / "refs" / "main"
    assert refs.read_text() == TINY_REVISION
    # what transformers' own image processor reads back from the snapshot is CLIP's
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(snapshot)
    assert processor.crop_size["height"] == processor.size["shortest_edge"] == 224
    assert processor.resample == 3


@pytest.mark.subprocess
def test_a_second_process_reuses_the_snapshot(
    registry: limner.Registry, isolated_hf_cache: Path
) -> None:
    backend = _backend(registry.embedder(TINY_KEY))
    backend.load()
    (vector,) = backend.embed_texts(["reuse me"])
    weights = _snapshot(isolated_hf_cache) / "model.safetensors"
    written = weights.stat().st_mtime_ns
    code = """
import anyio, limner, limner_clip
import limner_clip._tiny as tiny
def refuse(directory):
    raise AssertionError("the tiny model was written again")
tiny.write_tiny_clip = refuse
registry = limner.Registry(entry_points=False)
registry.register_plugin(limner_clip)
model = registry.embedder("limner/tiny-clip")
vector = anyio.run(model.embed_text, "reuse me")
print(" ".join(f"{x:.6f}" for x in vector))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert result.returncode == 0, result.stderr
    other = np.array([float(x) for x in result.stdout.split()], dtype=np.float32)
    np.testing.assert_allclose(other, vector, atol=1e-5)
    assert weights.stat().st_mtime_ns == written


def test_tiny_weights_are_reproducible(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    write_tiny_clip(tmp_path / "a")
    write_tiny_clip(tmp_path / "b")
    first = load_file(tmp_path / "a" / "model.safetensors")
    second = load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        np.testing.assert_array_equal(tensor, second[name], err_msg=name)


def test_oversized_batches_are_chunked(registry: limner.Registry, photo: Photo) -> None:
    backend = _backend(registry.embedder(TINY_KEY))
    backend.load()
    limit = backend.spec.info.max_batch_size
    items = [backend.prepare(photo(64, 48, i % 5)) for i in range(limit + 3)]
    vectors = backend.embed_prepared(items)
    _unit_rows(vectors, limit + 3)
    np.testing.assert_allclose(vectors[limit], vectors[limit % 5], atol=2e-3)
    assert np.abs(vectors[limit] - vectors[(limit + 1) % 5]).max() > 1e-2


def test_unload_drops_the_weights_and_load_restores_them(
    registry: limner.Registry, photo: Photo
) -> None:
    backend = _backend(registry.embedder(TINY_KEY))
    backend.load()
    item = backend.prepare(photo(300, 200, 9))
    before = backend.embed_prepared([item])
    assert backend.memory_mb() is not None
    backend.unload()
    assert backend.memory_mb() is None
    with pytest.raises(limner.ModelError, match="not loaded"):
        backend.embed_prepared([item])
    backend.load()
    np.testing.assert_allclose(backend.embed_prepared([item]), before, atol=1e-6)


@pytest.mark.anyio
async def test_missing_real_weights_offline_say_how_to_get_them(
    registry: limner.Registry, photo: Photo
) -> None:
    model = registry.embedder("clip-vit-b-32")
    with pytest.raises(limner.ModelLoadError) as caught:
        await model.embed_images([photo(64, 64, 0)])
    message = str(caught.value)
    assert "HF_HUB_OFFLINE" in message
    assert "hf download openai/clip-vit-base-patch32" in message
    assert "LIMNER_MODELS_DIR" in message


@pytest.mark.anyio
async def test_missing_pinned_revision_says_how_to_download_it(
    registry: limner.Registry,
) -> None:
    registry.configure("clip-vit-l-14", revision="v1.0")
    with pytest.raises(limner.ModelLoadError) as caught:
        await registry.embedder("clip-vit-l-14").embed_text("hello")
    assert "openai/clip-vit-large-patch14@v1.0 is not in the Hugging Face cache" in str(
        caught.value
    )
    assert "hf download openai/clip-vit-large-patch14 --revision v1.0" in str(caught.value)


@pytest.mark.anyio
async def test_empty_local_dir_is_a_load_error(registry: limner.Registry, tmp_path: Path) -> None:
    registry.configure("clip-vit-b-32", local_dir=tmp_path)
    with pytest.raises(limner.ModelLoadError, match=r"no config\.json"):
        await registry.embedder("clip-vit-b-32").embed_text("hello")


@pytest.mark.anyio
async def test_tiny_at_an_unknown_revision_is_a_load_error(registry: limner.Registry) -> None:
    registry.configure(TINY_KEY, revision="0" * 40)
    with pytest.raises(limner.ModelLoadError, match="leave the revision unset"):
        await registry.embedder(TINY_KEY).embed_text("hello")


def test_tiny_with_the_revision_unset_loads_the_one_limner_writes(
    registry: limner.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing written yet
    backend = ClipBackend(registry.spec(TINY_KEY), limner.ModelSettings(weights=TINY_KEY))
    backend.load()
    try:
        _unit_rows(backend.embed_texts(["a red fox"]), 1)
    finally:
        backend.unload()
    assert _snapshot(tmp_path).is_dir()


@pytest.mark.anyio
async def test_local_dir_with_other_input_size_is_refused(
    registry: limner.Registry, isolated_hf_cache: Path
) -> None:
    from limner_clip._tiny import ensure_tiny_clip

    snapshot = ensure_tiny_clip(isolated_hf_cache)
    registry.configure("clip-vit-l-14-336", local_dir=snapshot)
    with pytest.raises(limner.ModelLoadError, match="image_size=224"):
        await registry.embedder("clip-vit-l-14-336").embed_text("hello")


@pytest.mark.anyio
async def test_local_dir_with_other_dimension_is_refused(
    registry: limner.Registry, isolated_hf_cache: Path
) -> None:
    from limner_clip._tiny import ensure_tiny_clip

    registry.configure("clip-vit-b-32", local_dir=ensure_tiny_clip(isolated_hf_cache))
    with pytest.raises(limner.ModelLoadError, match=r"64-d embeddings, but .* serves 512-d"):
        await registry.embedder("clip-vit-b-32").embed_text("hello")
