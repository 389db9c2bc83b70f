"""Machine-aware precision: int8 on CPUs, and what ``dtype="auto"`` picks from the CPU flags.

int8 loads through the same ``from_pretrained`` path as the float dtypes, then rounds the
encoders' Linear layers (``limner_clip._int8``). The policy is a pure function of the flags,
tested here for each kind of CPU; the figures behind it are in the plugin's README.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

import limner
import limner.inputs
from limner_clip import _backend
from limner_clip._backend import (
    ClipBackend,
    clip_precision,
    cpu_precision,
    cpuinfo_flags,
    parse_clip_dtype,
    resolve_precision,
)
from limner_clip._int8 import Int8Linear, quantize_encoders
from limner_clip._tiny import TINY_KEY

Vectors = npt.NDArray[np.float32]

#: The CPUs the policy tells apart, by the flags that matter.
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
ZEN4 = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
CASCADE_LAKE = {"avx2", "avx512f", "avx512_vnni"}
ALDER_LAKE = {"avx2", "avx_vnni"}
SKYLAKE_X = {"avx2", "avx512f"}
HASWELL = {"avx2", "fma"}

#: Minimum centred cosine of the tiny model's int8 vectors to its fp32 ones over
#: ``varied_images``: 0.9972 measured (raw cosine 0.99999); a real-size random-weight
#: ViT-B/32 agrees less, 0.98 (see the README), so the bound leaves room.
TINY_INT8_CENTRED_MIN = 0.99


def centred_cosines(ours: Vectors, reference: Vectors) -> Vectors:
    """Per-row cosine after removing the reference set's mean vector."""
    mean = reference.mean(axis=0)
    a, b = ours - mean, reference - mean
    cosines: Vectors = np.sum(a * b, axis=1) / (
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    )
    return cosines


# -- the policy, from the flags -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (SAPPHIRE_RAPIDS, "bfloat16"),
        (ZEN4, "int8"),
        (CASCADE_LAKE, "int8"),
        ({"avx512f", "avx512_bf16"}, "bfloat16"),
        (ALDER_LAKE, "float32"),
        (SKYLAKE_X, "float32"),
        (HASWELL, "float32"),
        (set(), "float32"),
    ],
)
def test_auto_on_a_cpu_follows_its_flags(flags: set[str], expected: str) -> None:
    assert cpu_precision(flags) == expected
    assert clip_precision(torch.device("cpu"), flags) == expected


def test_auto_on_accelerators_is_fp16_whatever_the_cpu() -> None:
    for flags in (SAPPHIRE_RAPIDS, CASCADE_LAKE, HASWELL):
        assert clip_precision(torch.device("cuda"), flags) == "float16"
        assert clip_precision(torch.device("mps"), flags) == "float16"


def test_cpuinfo_flags_are_the_first_processors() -> None:
    text = (
        "processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\nbugs\t\t: spectre_v1\n"
        "processor\t: 1\nflags\t\t: fpu avx2 avx512_vnni\n"
    )
    assert cpuinfo_flags(text) == {"fpu", "avx2", "avx512_vnni"}
    assert cpuinfo_flags("") == frozenset()


@pytest.mark.parametrize("value", ["int8", "INT8", " qint8 "])
def test_int8_is_a_dtype_setting(value: str) -> None:
    assert parse_clip_dtype(value) == "int8"
    assert parse_clip_dtype("bf16") == "bfloat16"
    assert parse_clip_dtype("auto") is None


@pytest.mark.parametrize("value", ["int4", "uint8", "fp8"])
def test_bad_dtype_lists_int8(value: str) -> None:
    with pytest.raises(limner.InvalidInput, match="'int8'") as caught:
        parse_clip_dtype(value)
    assert caught.value.field == "dtype"


def test_auto_falls_back_to_fp32_without_int8_kernels(
    registry: limner.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_backend, "cpu_flags", lambda: frozenset(CASCADE_LAKE))
    monkeypatch.setattr(_backend, "_int8_available", lambda: False)
    backend = _backend_of(registry.embedder(TINY_KEY))
    backend.load()
    assert backend.dtype == "float32"


def test_explicit_int8_without_int8_kernels_is_a_load_error(
    registry: limner.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.quantized, "engine", "qnnpack")
    registry.configure(TINY_KEY, dtype="int8")
    with pytest.raises(limner.ModelLoadError, match="fbgemm"):
        _backend_of(registry.embedder(TINY_KEY)).load()


def test_int8_is_for_cpus() -> None:
    assert resolve_precision("int8", torch.device("cpu")) == "int8"
    with pytest.raises(limner.ModelLoadError, match="CPUs only"):
        resolve_precision("int8", torch.device("cuda"))


def test_explicit_dtype_wins_over_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_backend, "cpu_flags", lambda: frozenset(CASCADE_LAKE))
    assert resolve_precision(None, torch.device("cpu")) == "int8"
    assert resolve_precision("float32", torch.device("cpu")) == "float32"
    assert resolve_precision("bfloat16", torch.device("cpu")) == "bfloat16"


# -- the int8 layer -----------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "inputs", "outputs"), [(1, 32, 64), (50, 768, 3072), (7, 5, 3)])
def test_int8_linear_is_close_to_the_float_one(rows: int, inputs: int, outputs: int) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(inputs, outputs)
    x = torch.randn(2, rows, inputs) + 0.5  # off-centre rows, like the inputs after a GELU
    with torch.inference_mode():
        expected, got = linear(x), Int8Linear(linear)(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    # int8 steps on both sides: ~0.4% of each operand's range, ~1% relative error measured
    assert float((got - expected).norm() / expected.norm()) < 0.02


def test_int8_linear_without_bias() -> None:
    linear = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        error = (Int8Linear(linear)(x) - linear(x)).norm() / linear(x).norm()
    assert float(error) < 0.02


def test_only_the_encoders_are_rounded() -> None:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
    )
    model = CLIPModel(config)
    # 6 Linear layers a transformer layer (q, k, v, out, fc1, fc2), 3 layers in all
    assert quantize_encoders(model) == 18
    assert isinstance(model.visual_projection, torch.nn.Linear)
    assert isinstance(model.text_projection, torch.nn.Linear)
    names = {name for name, module in model.named_modules() if isinstance(module, Int8Linear)}
    assert all(".encoder." in name for name in names)


# -- the tiny model in int8 ---------------------------------------------------------------------


def _backend_of(model: limner.ImageEmbedder) -> ClipBackend:
    backend = model.backend
    assert isinstance(backend, ClipBackend)
    return backend


@pytest.mark.anyio
async def test_tiny_int8_gives_unit_vectors_close_to_fp32(
    registry: limner.Registry, varied_images: list[Path]
) -> None:
    fp32 = limner.Registry(entry_points=False)
    fp32.register_plugin(__import__("limner_clip"))
    fp32.configure(TINY_KEY, dtype="float32")
    registry.configure(TINY_KEY, dtype="int8")
    model = registry.embedder(TINY_KEY)
    ours = await model.batch_embed_images(varied_images)
    reference = await fp32.embedder(TINY_KEY).batch_embed_images(varied_images)
    backend = _backend_of(model)
    assert backend.dtype == "int8" and backend.device == "cpu"
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert np.sum(ours * reference, axis=1).min() >= 0.999
    centred = centred_cosines(ours, reference)
    assert centred.min() >= TINY_INT8_CENTRED_MIN, np.round(centred, 4)
    # each int8 vector is nearest to the fp32 vector of its own image
    mean = reference.mean(axis=0)
    a, b = ours - mean, reference - mean
    similarity = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
        b / np.linalg.norm(b, axis=1, keepdims=True)
    ).T
    assert (similarity.argmax(axis=1) == np.arange(len(ours))).all()

    texts = ["a photo of a cat", "a dog on a mat", "x"]
    text_ours = await model.embed_text(texts)
    text_reference = await fp32.embedder(TINY_KEY).embed_text(texts)
    np.testing.assert_allclose(np.linalg.norm(text_ours, axis=1), 1.0, atol=1e-5)
    assert np.sum(text_ours * text_reference, axis=1).min() >= 0.99


@pytest.mark.anyio
async def test_auto_resolves_by_the_flags_at_load(
    registry: limner.Registry, monkeypatch: pytest.MonkeyPatch, photo_jpeg: Path
) -> None:
    monkeypatch.setattr(_backend, "cpu_flags", lambda: frozenset(CASCADE_LAKE))
    registry.configure(TINY_KEY, device="cpu")
    model = registry.embedder(TINY_KEY)
    vector = await model.embed_image(photo_jpeg)
    backend = _backend_of(model)
    assert backend.dtype == "int8"
    assert vector.shape == (64,)
    linears = [m for m in backend._require_loaded().model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 24  # 2 + 2 layers of 6 Linear each
    assert not any(linear.reduce_range for linear in linears)  # VNNI: 8 bits exactly


@pytest.fixture
def photo_jpeg(varied_images: list[Path]) -> Path:
    return varied_images[0]


def test_int8_memory_counts_the_rounded_weights(registry: limner.Registry) -> None:
    registry.configure(TINY_KEY, dtype="int8")
    int8 = _backend_of(registry.embedder(TINY_KEY))
    int8.load()
    loaded = int8._require_loaded()
    tensors = [*loaded.model.parameters(), *loaded.model.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    # the int8 weights live in fbgemm's packed matrices, outside parameters and buffers:
    # 32,768 of them at one byte, plus 12 bytes for each of their 896 output channels
    assert loaded.packed_mb == pytest.approx((32_768 + 12 * 896) / 2**20)
    assert (int8.memory_mb() or 0) == pytest.approx(weights + loaded.packed_mb + loaded.working_mb)


def test_a_cpu_forward_pass_takes_at_most_32_images(
    registry: limner.Registry, varied_images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 64 ran slower an image than batches of 32 on a CPU: the pool may form 64,
    the backend runs them as passes of 32, and the rows do not depend on the passes."""
    backend = _backend_of(registry.embedder(TINY_KEY))
    backend.load()
    model = backend._require_loaded().model
    forward = model.get_image_features
    sizes: list[int] = []

    def counted(*, pixel_values: torch.Tensor) -> object:
        sizes.append(pixel_values.shape[0])
        assert pixel_values.is_contiguous()  # NCHW, as CLIPImageProcessor gives it
        return forward(pixel_values=pixel_values)

    monkeypatch.setattr(model, "get_image_features", counted)
    image = limner.inputs.decode_image(str(varied_images[0]), draft_size=backend.image_size)
    items = [backend.prepare(image)] * 40
    vectors = backend.embed_prepared(items)
    assert sizes == [32, 8]
    np.testing.assert_allclose(vectors[0], vectors[39], atol=1e-6)
