"""LoRA adapters through limner: adapter files read from their headers, the registry's
listing, the checks before any weights load, tiny FLUX and SD3.5 served with adapters by the
pool (never mixed, the base never reloaded, within the budget), and the request crossing a
runtime as data. Each family's own adapter tests are its contract's
(``limner.diffusion.testing``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt
import pytest

import limner
from limner import (
    GenerationResult,
    ImageGenerationConfig,
    InvalidInput,
    MemoryExhausted,
    Pool,
    Registry,
)
from limner.plugin import find_lora, scan_lora_dirs
from limner.runtime import StreamCall
from limner.testing import FakeMemory, MockRuntime, fake_generation_spec

limner_flux = pytest.importorskip("limner_flux")
limner_sd35 = pytest.importorskip("limner_sd35")

FLUX, SD35 = "limner/tiny-flux", "limner/tiny-sd35"
Image = npt.NDArray[np.int64]


@pytest.fixture
def anyio_backend() -> str:
    """The real tiny models are slow enough on one backend: the pool's own tests run both."""
    return "asyncio"


def registry_of(lora_dir: Path) -> Registry:
    registry = Registry(entry_points=False, lora_dirs=[lora_dir])
    registry.register_plugin(limner_flux)
    registry.register_plugin(limner_sd35)
    return registry


# -- adapter files --------------------------------------------------------------------------


def safetensors(tensors: dict[str, tuple[str, list[int]]], *, cut: int = 0) -> bytes:
    """A safetensors file of zeros: ``name -> (dtype, shape)``; ``cut`` bytes short."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        end = offset + math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header).encode()
    whole = len(text).to_bytes(8, "little") + text + bytes(offset)
    return whole[: len(whole) - cut]


def lora_layer(module: str, rank: int = 4, width: int = 32) -> dict[str, tuple[str, list[int]]]:
    return {
        f"transformer.{module}.lora_A.weight": ("F32", [rank, width]),
        f"transformer.{module}.lora_B.weight": ("F32", [width, rank]),
    }


@pytest.mark.parametrize(
    ("tensors", "cut", "words"),
    [
        (lora_layer("transformer_blocks.0.attn.to_q"), 4, "is truncated"),
        ({}, 0, "holds no tensors"),
        (
            {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": ("F32", [4, 32])},
            0,
            "kohya/sd-scripts' format",
        ),
        (
            {"text_encoder.text_model.q_proj.lora_A.weight": ("F32", [4, 32])},
            0,
            "changes the text encoder",
        ),
        (
            {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": ("I32", [4, 32])},
            0,
            "not a float type",
        ),
        (
            {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": ("F32", [4, 32])},
            0,
            "has no lora_B for layer 'transformer_blocks.0.attn.to_q'",
        ),
        (
            {
                "transformer.x.lora_A.weight": ("F32", [4, 32]),
                "transformer.x.lora_B.weight": ("F32", [32, 8]),
            },
            0,
            "lora_A of rank 4, lora_B of 8",
        ),
    ],
)
def test_a_file_that_cannot_be_used_says_why_in_one_line(
    tmp_path: Path, tensors: dict[str, tuple[str, list[int]]], cut: int, words: str
) -> None:
    (tmp_path / "bad.safetensors").write_bytes(safetensors(tensors, cut=cut))
    adapter = find_lora([str(tmp_path)], "bad")
    assert adapter is not None and adapter.error is not None
    assert words in adapter.error and "\n" not in adapter.error
    assert adapter.layers == ()


@pytest.mark.parametrize(
    "content", [b"", b"1234567", b"\xff" * 64, b"\x08" + bytes(7) + b"{[}}}}}}"]
)
def test_what_is_not_a_safetensors_file_is_said(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "noise.safetensors").write_bytes(content)
    adapter = find_lora([str(tmp_path)], "noise")
    assert adapter is not None and "is not a safetensors file" in (adapter.error or "")


def test_an_adapter_is_read_from_its_header(tmp_path: Path) -> None:
    tensors = {**lora_layer("a.to_q", rank=4), **lora_layer("b.proj", rank=8, width=64)}
    (tmp_path / "mix.safetensors").write_bytes(safetensors(tensors))
    adapter = find_lora([str(tmp_path)], "mix")
    assert adapter is not None and adapter.error is None
    assert {
        (layer.module, layer.in_features, layer.out_features, layer.rank)
        for layer in adapter.layers
    } == {
        ("a.to_q", 32, 32, 4),
        ("b.proj", 64, 64, 8),
    }
    assert adapter.rank == 8 and adapter.parameters == 2 * 4 * 32 + 2 * 8 * 64
    assert adapter.tensor_bytes == 4 * adapter.parameters
    assert adapter.memory_mb(2) == pytest.approx(adapter.parameters * 2 / 2**20)


def test_folders_name_adapters_first_come_first_served(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        (folder / "ink").mkdir(parents=True)
        (folder / "ink" / "pytorch_lora_weights.safetensors").write_bytes(
            safetensors(lora_layer("x"))
        )
    (first / "ink.safetensors").write_bytes(safetensors(lora_layer("y")))
    (first / "bad name!.safetensors").write_bytes(safetensors(lora_layer("y")))
    (first / ".hidden.safetensors").write_bytes(b"")
    found = scan_lora_dirs([str(first), str(second)])
    usable = [a for a in found if a.error is None]
    assert [(a.name, a.where) for a in usable] == [("ink", "ink.safetensors")]
    shadowed = sorted(a.path for a in found if a.error and "comes first" in a.error)
    assert shadowed == [
        str(first / "ink" / "pytorch_lora_weights.safetensors"),
        str(second / "ink" / "pytorch_lora_weights.safetensors"),
    ]
    assert any("not an adapter name" in (a.error or "") for a in found)
    found_ink = find_lora([str(first), str(second)], "ink")
    assert found_ink is not None and found_ink.where == "ink.safetensors"


def test_adapter_folders_must_be_folders(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="is not a folder") as error:
        Registry(lora_dirs=[tmp_path / "nowhere"])
    assert error.value.field == "lora_dirs"
    with pytest.raises(InvalidInput, match="not one"):
        Registry(lora_dirs=str(tmp_path))
    assert Registry(lora_dirs=[tmp_path, tmp_path]).lora_dirs == (str(tmp_path.resolve()),)


# -- the registry's listing -----------------------------------------------------------------


def test_the_registry_lists_each_adapter_with_the_models_it_fits(lora_dir: Path) -> None:
    entries = {entry.name: entry for entry in registry_of(lora_dir).loras()}
    assert sorted(entries) == ["ink", "moss", "oil", "tea"]
    for name, key, family, rank in (
        ("ink", FLUX, "FLUX.1", 4),
        ("oil", FLUX, "FLUX.1", 8),
        ("tea", SD35, "SD3.5", 4),
        ("moss", SD35, "SD3.5", 8),
    ):
        entry = entries[name]
        assert (entry.models, entry.family, entry.adapter.rank) == ((key,), family, rank)
        assert entry.reason is None
    # the real checkpoints are 3072 (FLUX.1) or 1536 and 2432 (SD3.5) wide: none fits
    assert registry_of(lora_dir).settings(FLUX).lora_dirs == (str(lora_dir.resolve()),)


def test_an_adapter_no_model_fits_is_listed_with_the_reason(lora_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tea.safetensors").write_bytes((lora_dir / "moss.safetensors").read_bytes())
    (tmp_path / "stub.safetensors").write_bytes(b"junk")
    registry = Registry(entry_points=False, lora_dirs=[tmp_path])
    registry.register_plugin(limner_flux)  # no SD3.5 here: tea fits nothing served
    entries = {entry.name: entry for entry in registry.loras()}
    assert entries["tea"].models == () and entries["tea"].family is None
    assert "fits none of the models served" in (entries["tea"].reason or "")
    assert "transformer_blocks.1.attn" in (entries["tea"].reason or "")
    assert "stub.safetensors is not a safetensors file" in (entries["stub"].reason or "")


@pytest.mark.subprocess
def test_the_listing_reads_headers_without_torch(lora_dir: Path) -> None:
    code = (
        "import sys, limner\n"
        f"entries = limner.Registry(lora_dirs=[{str(lora_dir)!r}]).loras()\n"
        "print(sorted((e.name, e.models) for e in entries))\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    listing, heavy = done.stdout.strip().splitlines()
    assert "('ink', ('limner/tiny-flux',))" in listing
    assert heavy == "False False"


# -- checks before any weights load ---------------------------------------------------------


def test_every_bad_adapter_is_refused_before_any_weights_load(lora_dir: Path) -> None:
    model = registry_of(lora_dir).generator(FLUX)
    cases: list[tuple[Any, str, str]] = [
        ([("inq", 1.0)], "loras[0].name", "Did you mean: ink"),
        ([("ink", 1.0), ("oil", -4.5)], "loras[1].scale", "between -4 and 4"),
        ([("../oil", 1.0)], "loras[0].name", "never a path"),
        ([("tea", 1.0)], "loras[0].name", "tea/pytorch_lora_weights.safetensors does not fit"),
    ]
    for loras, field, words in cases:
        with pytest.raises(InvalidInput) as refused:
            model.resolve_config(ImageGenerationConfig(loras=loras))
        assert refused.value.field == field and words in str(refused.value)
        assert "\n" not in str(refused.value)
    with pytest.raises(InvalidInput, match=r"moss\.safetensors does not fit limner/tiny-flux"):
        model.resolve_config(ImageGenerationConfig(loras={"moss": 0.5}))  # type: ignore[arg-type]
    assert model.backend._loaded is None  # type: ignore[attr-defined]
    sd35 = registry_of(lora_dir).generator(SD35)
    with pytest.raises(InvalidInput, match=r"ink/pytorch_lora_weights\.safetensors does not fit"):
        sd35.resolve_config(ImageGenerationConfig(loras=[("ink", 1.0)]))


def test_a_model_that_takes_no_adapters_refuses_them() -> None:
    registry = Registry(entry_points=False)
    registry.register(fake_generation_spec("fake/gen"))
    with pytest.raises(InvalidInput, match="fake/gen takes no LoRA adapters") as refused:
        registry.generator("fake/gen").resolve_config(ImageGenerationConfig(loras=[("ink", 1)]))
    assert refused.value.field == "loras"


def test_the_adapters_cross_a_runtime_as_data(lora_dir: Path) -> None:
    """The config (adapters in the request's order) and the call's group (their canonical
    set) cross the runtime pickled: no runtime learns what a LoRA is."""
    seen: list[StreamCall] = []

    def stream(key: str, call: StreamCall) -> Iterator[GenerationResult]:
        seen.append(call)
        prompt, config = call.args
        yield GenerationResult(model=key, prompt=prompt, images=(), seed=0, config=config)

    runtime = MockRuntime(stream=stream)
    model = registry_of(lora_dir).generator(FLUX).using(runtime)
    config = ImageGenerationConfig(seed=1, loras=[("oil", 0.5), ("ink", 1)])
    result = anyio.run(model.generate, "a fox", config)
    assert isinstance(result, GenerationResult)
    assert result.config.loras == (("oil", 0.5), ("ink", 1.0))
    assert seen[0].group == (("ink", 1.0), ("oil", 0.5))
    assert seen[0].args[1].loras == (("oil", 0.5), ("ink", 1.0))


# -- served by the pool ---------------------------------------------------------------------

SETS: dict[str, list[tuple[tuple[str, float], ...]]] = {
    FLUX: [(), (("ink", 0.8),), (("oil", 1.0),), (("ink", 0.8), ("oil", 1.0))],
    SD35: [(), (("tea", 0.8),), (("moss", 1.0),), (("moss", 1.0), ("tea", 0.8))],
}


async def image(model: limner.ImageGenerator, loras: Iterable[tuple[str, float]]) -> Image:
    config = ImageGenerationConfig(steps=2, width=32, height=32, seed=7, loras=list(loras))
    result = await model.generate("a lighthouse", config)
    return np.asarray(result.images[0]).astype(np.int64)


@pytest.mark.anyio
@pytest.mark.parametrize("key", [FLUX, SD35])
async def test_twenty_alternating_requests_never_mix(lora_dir: Path, key: str) -> None:
    """Twenty requests at once, four sets of adapters in turn, two workers: each image
    equals its set's image made alone, and the base weights were loaded once."""
    model = registry_of(lora_dir).generator(key)
    sets = SETS[key]
    async with Pool(memory=FakeMemory(total_mb=100_000), max_workers=2) as pool:
        alone = [await image(model, chosen) for chosen in sets]
        assert len({one.tobytes() for one in alone}) == len(sets)
        results: dict[int, Image] = {}

        async def one(index: int) -> None:
            results[index] = await image(model, sets[index % len(sets)])

        async with anyio.create_task_group() as tasks:
            for index in range(20):
                tasks.start_soon(one, index)
        stats = pool.stats()[key]
    for index, made in results.items():
        assert np.array_equal(made, alone[index % len(sets)]), f"request {index}"
    assert stats.loads == 1 and stats.evictions == 0


def adapter_mb(lora_dir: Path, name: str) -> float:
    adapter = find_lora([str(lora_dir)], name)
    assert adapter is not None
    return adapter.memory_mb(4)  # float32 on the CPU


async def footprints(lora_dir: Path) -> dict[str, float]:
    """Each tiny model's footprint in a pool, as the pool counts it, without adapters."""
    registry = registry_of(lora_dir)
    async with Pool(memory=FakeMemory(total_mb=100_000), max_workers=1) as pool:
        for key in (FLUX, SD35):
            await image(registry.generator(key), ())
        return {key: stats.memory_mb for key, stats in pool.stats().items()}


@pytest.mark.anyio
async def test_adapters_count_and_the_least_recently_used_goes_before_a_model(
    lora_dir: Path,
) -> None:
    """FLUX holds oil (used first) and ink; SD3.5 needs the room of oil but not of ink: oil
    goes, FLUX stays loaded with ink, SD3.5 loads. (Before its first load in a pool, a
    model needs what its spec declares.)"""
    needs = await footprints(lora_dir)
    ink, oil = adapter_mb(lora_dir, "ink"), adapter_mb(lora_dir, "oil")
    assert oil == pytest.approx(2 * ink)
    registry = registry_of(lora_dir)
    budget = needs[FLUX] + registry.spec(SD35).info.memory_mb + ink + 0.002
    flux, sd35 = registry.generator(FLUX), registry.generator(SD35)
    async with Pool(
        memory=FakeMemory(total_mb=100_000), memory_budget_mb=budget, max_workers=1
    ) as pool:
        await image(flux, [("oil", 1.0)])
        await image(flux, [("ink", 1.0)])
        assert pool.stats()[FLUX].memory_mb == pytest.approx(needs[FLUX] + ink + oil)
        await image(sd35, [])
        stats = pool.stats()
        assert stats[FLUX].state == "ready" and stats[FLUX].evictions == 0
        assert stats[FLUX].memory_mb == pytest.approx(needs[FLUX] + ink)
        assert stats[SD35].state == "ready"
        adapters = flux.backend._require_loaded().adapters  # type: ignore[attr-defined]
        assert adapters.names() == ["ink"]
        assert stats[FLUX].loads == 1  # dropping an adapter never touched the base weights


@pytest.mark.anyio
async def test_an_adapter_larger_than_the_budget_is_memory_exhausted(lora_dir: Path) -> None:
    """The budget holds the model and half of ink. (The spec declares a footprint below
    the measured one, so that the model is admitted before it is measured.)"""
    needs = await footprints(lora_dir)
    ink = adapter_mb(lora_dir, "ink")
    registry = registry_of(lora_dir)
    spec = registry.spec(FLUX)
    small = dataclasses.replace(spec, info=dataclasses.replace(spec.info, memory_mb=1.0))
    registry.register(small, replace=True)
    model = registry.generator(FLUX)
    async with Pool(
        memory=FakeMemory(total_mb=100_000),
        memory_budget_mb=needs[FLUX] + ink / 2,
        max_workers=1,
    ) as pool:
        plain = await image(model, [])
        with pytest.raises(MemoryExhausted, match=r"Cannot load LoRA adapter 'ink' \(") as error:
            await image(model, [("ink", 1.0)])
        assert error.value.need_mb == pytest.approx(ink)
        assert "\n" not in str(error.value)
        assert np.array_equal(await image(model, []), plain)  # the model serves on
        assert pool.stats()[FLUX].memory_mb == pytest.approx(needs[FLUX])


def test_the_contract_adapters_match_the_files(lora_dir: Path) -> None:
    """The session's adapters are what diffusers' save_lora_weights writes."""
    names = sorted(os.listdir(lora_dir))
    assert names == ["ink", "moss.safetensors", "oil.safetensors", "tea"]
    header = (lora_dir / "ink" / "pytorch_lora_weights.safetensors").read_bytes()
    length = int.from_bytes(header[:8], "little")
    keys = json.loads(header[8 : 8 + length])
    assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in keys
