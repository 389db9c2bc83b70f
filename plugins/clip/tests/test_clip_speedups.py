"""The same CLIP, faster: quick_gelu folded into one SiLU pass (fp32 and int8), and bf16
Linear layers on weights packed once for oneDNN (CPUs with native bf16).

Both must leave the model the same function: the fold to within fp32 rounding, packing to
within bf16's (on the Xeon with AMX it was measured on, bit for bit: the same oneDNN kernels
on the same numbers; other CPUs may sum in another order). The speed-ups themselves are
measured in benchmarks/, not here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import limner
from limner.plugin import pooled_features
from limner_clip import _backend, _packed
from limner_clip._backend import BF16_FLAGS, ClipBackend, cpu_flags
from limner_clip._fold import fold_quick_gelu
from limner_clip._packed import PackedLinear, pack_encoders, packing_available
from limner_clip._tiny import TINY_KEY

NATIVE_BF16 = packing_available(cpu_flags(), BF16_FLAGS)
needs_native_bf16 = pytest.mark.skipif(
    not NATIVE_BF16,
    reason="needs a CPU with native bf16 (avx512_bf16 or amx_bf16) and torch's oneDNN linear",
)


def small_clip(hidden_act: str = "quick_gelu") -> Any:
    """A seeded two-layer CLIP, both towers, in fp32 (a ``CLIPModel``)."""
    from transformers import CLIPConfig, CLIPModel

    tower = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_act": hidden_act,
    }
    config = CLIPConfig(
        text_config=tower,
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model: Any = CLIPModel(config)
    return model.eval()


def features(model: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Image and text features of fixed inputs, side by side, in fp32."""
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=generator).to(dtype)
    tokens = torch.randint(0, 99, (3, 9), generator=generator)
    with torch.inference_mode():
        images = model.get_image_features(pixel_values=pixels)
        texts = model.get_text_features(input_ids=tokens)
    return torch.cat([pooled_features(images), pooled_features(texts)], dim=1).float()


# -- the fold -----------------------------------------------------------------------------------


def test_folded_mlps_compute_the_same_function() -> None:
    model = small_clip()
    folded = copy.deepcopy(model)
    assert fold_quick_gelu(folded) == 4  # 2 layers in each tower
    activations = [m.activation_fn for m in folded.modules() if hasattr(m, "activation_fn")]
    assert activations and all(isinstance(a, torch.nn.SiLU) for a in activations)
    expected = features(model)
    assert not torch.equal(
        folded.vision_model.encoder.layers[0].mlp.fc1.weight,
        model.vision_model.encoder.layers[0].mlp.fc1.weight,
    )
    torch.testing.assert_close(features(folded), expected, rtol=1e-5, atol=1e-6)


def test_other_activations_are_left_alone() -> None:
    model = small_clip(hidden_act="gelu")
    before = features(model)
    assert fold_quick_gelu(model) == 0
    assert torch.equal(features(model), before)


@pytest.mark.anyio
@pytest.mark.parametrize("dtype", ["float32", "int8"])
async def test_fp32_and_int8_load_folded(
    registry: limner.Registry, dtype: str, varied_images: list[Path]
) -> None:
    registry.configure(TINY_KEY, dtype=dtype, device="cpu")
    model = registry.embedder(TINY_KEY)
    await model.embed_image(varied_images[0])
    backend = model.backend
    assert isinstance(backend, ClipBackend)
    silu = [m for m in backend._require_loaded().model.modules() if isinstance(m, torch.nn.SiLU)]
    assert len(silu) == 4  # the tiny model's 2 + 2 layers


# -- packed bf16 --------------------------------------------------------------------------------


@needs_native_bf16
@pytest.mark.parametrize("rows", [1, 7, 50, 77, 1_600, 3_000])
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_is_the_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 96).to(torch.bfloat16)
    with torch.inference_mode():
        # tokens of a batch: any leading shape, and an input that is not contiguous
        batch = torch.randn(3, rows, 96).to(torch.bfloat16)
        wide = torch.randn(rows, 192).to(torch.bfloat16)[:, ::2]
        for inputs in (x, batch, wide):
            torch.testing.assert_close(PackedLinear(linear)(inputs), linear(inputs))


@needs_native_bf16
def test_packing_covers_the_encoders_only_and_keeps_the_function() -> None:
    model = small_clip().to(torch.bfloat16)
    packed = copy.deepcopy(model)
    assert pack_encoders(packed) == 24  # 6 Linear layers (q, k, v, out, fc1, fc2) x 4
    assert isinstance(packed.visual_projection, torch.nn.Linear)
    assert isinstance(packed.text_projection, torch.nn.Linear)
    torch.testing.assert_close(
        features(packed, torch.bfloat16), features(model, torch.bfloat16), rtol=0.02, atol=2e-3
    )


@needs_native_bf16
@pytest.mark.anyio
async def test_bf16_on_a_native_bf16_cpu_loads_packed(
    registry: limner.Registry, monkeypatch: pytest.MonkeyPatch, varied_images: list[Path]
) -> None:
    plain = limner.Registry(entry_points=False)
    plain.register_plugin(__import__("limner_clip"))
    for each in (registry, plain):
        each.configure(TINY_KEY, dtype="bfloat16", device="cpu")
    ours = await registry.embedder(TINY_KEY).batch_embed_images(varied_images)
    texts = await registry.embedder(TINY_KEY).embed_text(["a cat", "a lighthouse at dusk"])
    backend = registry.embedder(TINY_KEY).backend
    assert isinstance(backend, ClipBackend)
    loaded = backend._require_loaded()
    layers = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 24
    # the packed weights are counted: the 24 layers' bf16 weights, 2 bytes each
    assert loaded.packed_mb == pytest.approx(sum(2 * m._packed.numel() for m in layers) / 2**20)

    monkeypatch.setattr(_packed, "packing_available", lambda *_: False)
    reference = plain.embedder(TINY_KEY)
    # within bf16's tolerance for two passes (the conformance suite's)
    plain_texts = await reference.embed_text(["a cat", "a lighthouse at dusk"])
    np.testing.assert_allclose(ours, await reference.batch_embed_images(varied_images), atol=2e-3)
    np.testing.assert_allclose(texts, plain_texts, atol=2e-3)
    unpacked = reference.backend
    assert isinstance(unpacked, ClipBackend)
    assert unpacked._require_loaded().packed_mb == 0
    assert unpacked.memory_mb() == pytest.approx(backend.memory_mb())


@pytest.mark.anyio
async def test_no_packing_without_native_bf16(
    registry: limner.Registry, monkeypatch: pytest.MonkeyPatch, varied_images: list[Path]
) -> None:
    monkeypatch.setattr(_backend, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    registry.configure(TINY_KEY, dtype="bfloat16", device="cpu")
    model = registry.embedder(TINY_KEY)
    await model.embed_image(varied_images[0])
    backend = model.backend
    assert isinstance(backend, ClipBackend)
    modules = list(backend._require_loaded().model.modules())
    assert not any(isinstance(m, PackedLinear) for m in modules)
    assert backend._require_loaded().packed_mb == 0
