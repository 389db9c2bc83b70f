"""Device and dtype resolution, and settings that are wrong before anything loads."""

from __future__ import annotations

import pytest
import torch

import limner
from limner.plugin import parse_device, parse_dtype, resolve_device
from limner_clip import _backend
from limner_clip._backend import cpuinfo_flags, resolve_precision

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw {extra}
bugs\t\t: spectre_v1
"""


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", None), ("cpu", "cpu"), ("CUDA", "cuda"), ("cuda:1", "cuda:1"), (" mps ", "mps")],
)
def test_parse_device(value: str, expected: str | None) -> None:
    assert parse_device(value) == expected


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "tpu", ""])
def test_bad_device_names_the_setting(value: str) -> None:
    with pytest.raises(limner.InvalidInput, match="device must be") as caught:
        parse_device(value)
    assert caught.value.field == "device"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", None),
        ("float32", "float32"),
        ("fp32", "float32"),
        ("bfloat16", "bfloat16"),
        ("BF16", "bfloat16"),
        ("float16", "float16"),
        ("fp16", "float16"),
        ("half", "float16"),
    ],
)
def test_parse_dtype(value: str, expected: str | None) -> None:
    assert parse_dtype(value) == expected


@pytest.mark.parametrize("value", ["int8", "float64", "fp8", "bfloat"])
def test_bad_dtype_names_the_setting(value: str) -> None:
    with pytest.raises(limner.InvalidInput, match="dtype must be") as caught:
        parse_dtype(value)
    assert caught.value.field == "dtype"


def test_cpuinfo_flags() -> None:
    assert "avx512_bf16" in cpuinfo_flags(CPUINFO.format(extra="avx512_bf16"))
    assert {"amx_tile", "amx_bf16"} <= cpuinfo_flags(CPUINFO.format(extra="amx_tile amx_bf16"))
    assert cpuinfo_flags("") == frozenset()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("amx_bf16 avx512_bf16 avx512_vnni", "bfloat16"),
        ("avx512_bf16 avx512_vnni", "int8"),
        ("avx512_vnni", "int8"),
        ("", "float32"),
    ],
)
def test_auto_dtype_on_cpu_follows_the_flags(
    monkeypatch: pytest.MonkeyPatch, extra: str, expected: str
) -> None:
    monkeypatch.setattr(_backend, "cpu_flags", lambda: cpuinfo_flags(CPUINFO.format(extra=extra)))
    assert resolve_precision(None, torch.device("cpu")) == expected


def test_auto_dtype_on_accelerators_is_fp16() -> None:
    assert resolve_precision(None, torch.device("cuda")) == "float16"
    assert resolve_precision(None, torch.device("cuda:1")) == "float16"


def test_explicit_dtype_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_backend, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert resolve_precision("float32", torch.device("cpu")) == "float32"
    assert resolve_precision("float16", torch.device("cpu")) == "float16"
    assert resolve_precision("bfloat16", torch.device("cuda")) == "bfloat16"


def test_auto_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_without_cuda_is_a_load_error() -> None:
    with pytest.raises(limner.ModelLoadError, match="no CUDA device"):
        resolve_device("cuda:1")


def test_environment_setting_is_validated(
    registry: limner.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIMNER_DTYPE", "fp64")
    with pytest.raises(limner.InvalidInput, match="fp64"):
        registry.get("limner/tiny-clip")


def test_image_size_is_known_before_loading(registry: limner.Registry) -> None:
    assert registry.embedder("clip-vit-l-14-336").backend.image_size == 336
    assert registry.embedder("clip-vit-b-32").backend.image_size == 224
    assert registry.embedder("limner/tiny-clip").backend.image_size == 224
