"""limner's CLIP embeddings against the plain transformers pipeline on the same files.

The reference is what a transformers user writes: ``Image.open(p).convert("RGB")``,
``CLIPImageProcessor``, ``get_image_features`` in fp32, L2-normalised. limner differs on
purpose in three places: JPEGs are decoded at a reduced scale (draft mode), resize and crop
are one PIL call, and the default dtype may be bf16.

Random weights map every image close to one common direction (raw cosines between
*different* images are ~0.99), so a raw cosine of 0.995 alone would not tell images apart.
Each test also checks agreement after removing the reference set's mean embedding
("centred"), and that every limner vector is nearest to the reference of its own image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image

import limner
from limner_clip._backend import CLIP_MEAN, CLIP_STD, ClipBackend
from limner_clip._tiny import TINY_KEY, ensure_tiny_clip

Vectors = npt.NDArray[np.float32]

#: Minimum centred cosine per dtype: fp32 differs from the reference only by the reduced
#: JPEG decode; bf16 adds its own rounding, as large as transformers' own bf16 path; int8
#: rounds the encoders' products about as much (real-size model: 0.9951 measured in int8,
#: 0.9945 in bf16).
CENTRED_MIN = {"float32": 0.995, "bfloat16": 0.98, "float16": 0.98, "int8": 0.98}


def weights_mb(dtype: str, parameters: int, int8_weights: int, int8_channels: int) -> float:
    """The weights as loaded: every parameter in the dtype; in int8, the encoders' Linear
    weights at one byte, and 20 bytes per output channel (its bias, weight sum, scale, zero
    point and column sum)."""
    if dtype == "int8":
        floats = parameters - int8_weights - int8_channels
        return (4 * floats + int8_weights + 20 * int8_channels) / 2**20
    return parameters * {"bfloat16": 2, "float32": 4}[dtype] / 2**20


def reference(weights: Path, paths: list[Path]) -> Vectors:
    from transformers import CLIPImageProcessor, CLIPModel

    processor = CLIPImageProcessor.from_pretrained(weights)
    model = CLIPModel.from_pretrained(weights, dtype=torch.float32)
    images = [Image.open(path).convert("RGB") for path in paths]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        output = model.get_image_features(pixel_values=pixels)
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        vectors: Vectors = torch.nn.functional.normalize(features, dim=-1).numpy()
    return vectors


def check_parity(ours: Vectors, expected: Vectors, dtype: str) -> tuple[float, float]:
    """Assert raw and centred agreement and nearest-neighbour identity; the two minima."""
    raw = np.sum(ours * expected, axis=1)
    mean = expected.mean(axis=0)
    a, b = ours - mean, expected - mean
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    centred = a @ b.T
    assert raw.min() >= 0.995, f"raw cosines {np.round(raw, 5)}"
    assert np.diag(centred).min() >= CENTRED_MIN[dtype], f"centred {np.round(np.diag(centred), 4)}"
    assert (centred.argmax(axis=1) == np.arange(len(ours))).all(), np.round(centred, 3)
    return float(raw.min()), float(np.diag(centred).min())


def _backend(model: limner.ImageEmbedder) -> ClipBackend:
    backend = model.backend
    assert isinstance(backend, ClipBackend)
    return backend


def test_prepare_gives_the_image_processor_pixels(varied_images: list[Path]) -> None:
    """Resize-and-crop as one PIL call equals CLIPImageProcessor's resize, then crop."""
    from transformers import CLIPImageProcessor

    snapshot = ensure_tiny_clip()
    processor = CLIPImageProcessor.from_pretrained(snapshot)
    registry = limner.Registry(entry_points=False)
    import limner_clip

    registry.register_plugin(limner_clip)
    backend = _backend(registry.embedder(TINY_KEY))
    for path in varied_images:
        image = Image.open(path).convert("RGB")
        pixels = processor(images=[image], return_tensors="np")["pixel_values"][0]
        expected = (pixels.transpose(1, 2, 0) * CLIP_STD + CLIP_MEAN) * 255
        ours = backend.prepare(image)
        assert ours.shape == (224, 224, 3)
        assert ours.dtype == np.uint8
        difference = np.abs(ours.astype(np.float64) - expected)
        # Pillow picks the order of its two 1-D passes from the sizes, so the crop box and
        # the whole image may round their intermediate uint8 image differently: a few grey
        # levels at most, a fraction of one on average (a bilinear filter would be ~1).
        assert difference.max() <= 4.01, path.name
        assert difference.mean() < 0.3, path.name


@pytest.fixture(scope="module")
def random_vit_b32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-size ViT-B/32 (``CLIPConfig()``'s defaults) with seeded random weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = tmp_path_factory.mktemp("clip-vit-b-32-random")
    torch.manual_seed(1234)
    CLIPModel(CLIPConfig()).save_pretrained(directory)
    CLIPImageProcessor().save_pretrained(directory)
    return directory


@pytest.mark.anyio
@pytest.mark.parametrize("dtype", ["float32", "auto"])
async def test_tiny_matches_transformers(
    registry: limner.Registry, varied_images: list[Path], dtype: str
) -> None:
    registry.configure(TINY_KEY, dtype=dtype)
    model = registry.embedder(TINY_KEY)
    ours = await model.batch_embed_images(varied_images)
    backend = _backend(model)
    check_parity(ours, reference(ensure_tiny_clip(), varied_images), str(backend.dtype))


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("dtype", ["float32", "auto", "int8"])
async def test_real_size_vit_b32_matches_transformers(
    registry: limner.Registry, varied_images: list[Path], random_vit_b32: Path, dtype: str
) -> None:
    registry.configure("clip-vit-b-32", local_dir=random_vit_b32, dtype=dtype)
    model = registry.embedder("clip-vit-b-32")
    ours = await model.batch_embed_images(varied_images)
    backend = _backend(model)
    assert ours.shape == (len(varied_images), 512)
    check_parity(ours, reference(random_vit_b32, varied_images), str(backend.dtype))
    # footprint: 151,277,313 parameters in the weights' dtype (in int8: 122,683,392 of them
    # in the encoders' 138,240 output channels at one byte), plus the working memory of a
    # full batch: the declared per-worker overhead (16-bit), up to twice that in fp32
    weights = weights_mb(str(backend.dtype), 151_277_313, 122_683_392, 138_240)
    overhead = registry.spec("clip-vit-b-32").info.worker_overhead_mb
    assert overhead is not None
    assert overhead - 1 <= (backend.memory_mb() or 0) - weights <= 2 * overhead + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.anyio
async def test_tiny_on_cuda_defaults_to_fp16(
    registry: limner.Registry, varied_images: list[Path]
) -> None:
    model = registry.embedder(TINY_KEY)
    backend = _backend(model)
    assert backend.memory_device() == f"cuda:{torch.cuda.current_device()}"
    ours = await model.batch_embed_images(varied_images)
    assert backend.dtype == "float16"
    check_parity(ours, reference(ensure_tiny_clip(), varied_images), "float16")
