"""The LoRA part of :class:`limner.diffusion.testing.DiffusionFamilyContract`: tiny adapters
built with PEFT on the family's tiny model and saved as diffusers saves them, then loaded,
combined, switched, counted, dropped and refused. Skipped for a family that takes none."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import limner
from limner import ImageGenerationConfig, InvalidInput
from limner.plugin import ADAPTER_FILE, hf_cache_dir
from limner.plugin.testing import run_in_threads

from ._backend import DiffusersBackend
from ._contract import FamilyFixtures, pixels, run
from ._pipeline import diffusers_module
from ._tiny import TinyPipeline

__all__ = ["ATTENTION", "LoraTests", "write_tiny_lora"]

#: The layers the tiny adapters change: the attention projections, as most adapters do.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def write_tiny_lora(
    tiny: TinyPipeline,
    path: str | os.PathLike[str],
    *,
    rank: int = 4,
    seed: int = 0,
    targets: Sequence[str] = ATTENTION,
    cache_dir: Path | None = None,
) -> Path:
    """A random LoRA adapter for the ``tiny`` model (written into the cache when missing),
    made with PEFT and saved as diffusers saves them: at ``path`` when it ends in
    ``.safetensors``, else in the folder ``path`` as ``pytorch_lora_weights.safetensors``.
    The same seed makes the same adapter; returns its file."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    diffusers = diffusers_module()
    snapshot = Path(str(tiny.ensure(cache_dir or hf_cache_dir())))
    index = json.loads((snapshot / "model_index.json").read_text())
    transformer = getattr(diffusers, index["transformer"][1]).from_pretrained(
        snapshot / "transformer"
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # B random too: PEFT's default zeroes it, and such an adapter changes nothing
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False
        )
        transformer.add_adapter(config, adapter_name="tiny")
    layers = get_peft_model_state_dict(transformer, adapter_name="tiny")
    target = Path(path)
    folder, name = (
        (target.parent, target.name) if target.suffix == ".safetensors" else (target, None)
    )
    pipeline_class = getattr(diffusers, tiny.pipeline_class)
    pipeline_class.save_lora_weights(folder, transformer_lora_layers=layers, weight_name=name)
    return folder / (name or ADAPTER_FILE)


Image = npt.NDArray[np.int64]


class LoraTests(FamilyFixtures):
    """A family's tiny model with tiny adapters: ``ink`` (rank 4, a folder), ``oil`` (rank 8,
    a file), and files that cannot be used."""

    @pytest.fixture(scope="class")
    @classmethod
    def lora_dir(cls, loaded: DiffusersBackend[Any], hf_cache: Path, tmp_path_factory: Any) -> Path:
        if not loaded.supports_loras:
            pytest.skip(f"{cls.tiny_key()} takes no LoRA adapters")
        folder = Path(tmp_path_factory.mktemp("loras"))
        tiny = cls.backend_class.tiny
        assert isinstance(tiny, TinyPipeline)
        write_tiny_lora(tiny, folder / "ink", rank=4, seed=1, cache_dir=hf_cache)
        write_tiny_lora(tiny, folder / "oil.safetensors", rank=8, seed=2, cache_dir=hf_cache)
        oil = (folder / "oil.safetensors").read_bytes()
        (folder / "truncated.safetensors").write_bytes(oil[: len(oil) // 2])
        (folder / "noise.safetensors").write_bytes(os.urandom(256))
        (folder / "misfit.safetensors").write_bytes(
            _renamed(oil, "transformer_blocks.0.", "transformer_blocks.99.")
        )
        return folder

    @pytest.fixture(scope="class")
    @classmethod
    def lora(cls, lora_dir: Path, hf_cache: Path) -> Iterator[DiffusersBackend[Any]]:
        """The tiny model with ``lora_dir`` as its adapter folder, loaded once."""
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HF_HUB_CACHE", str(hf_cache))
            patch.setenv("HF_HUB_OFFLINE", "1")
            registry = cls.new_registry()
            backend = cls.build_backend(registry)
            backend.settings = dataclasses.replace(backend.settings, lora_dirs=(str(lora_dir),))
            backend.load()
        yield backend
        backend.unload()

    @staticmethod
    def lora_image(
        backend: DiffusersBackend[Any], *loras: tuple[str, float], seed: int = 7
    ) -> Image:
        _, result = run(backend, steps=2, width=32, height=32, seed=seed, loras=list(loras))
        return pixels(result.images[0]).astype(np.int64)

    def test_an_adapter_changes_the_image_and_repeats(self, lora: DiffusersBackend[Any]) -> None:
        plain = self.lora_image(lora)
        inked = self.lora_image(lora, ("ink", 0.8))
        assert np.abs(inked - plain).max() > 0
        assert np.array_equal(self.lora_image(lora, ("ink", 0.8)), inked)
        assert np.array_equal(self.lora_image(lora), plain)  # off again after it
        assert not np.array_equal(self.lora_image(lora, ("ink", 0.4)), inked)  # the scale counts

    def test_an_adapter_at_scale_zero_is_no_adapter(self, lora: DiffusersBackend[Any]) -> None:
        plain = self.lora_image(lora, seed=3)
        assert np.array_equal(self.lora_image(lora, ("oil", 0.0), seed=3), plain)

    def test_two_adapters_combine_in_any_order(self, lora: DiffusersBackend[Any]) -> None:
        ink, oil = self.lora_image(lora, ("ink", 1.0)), self.lora_image(lora, ("oil", 0.5))
        both = self.lora_image(lora, ("ink", 1.0), ("oil", 0.5))
        assert not np.array_equal(both, ink) and not np.array_equal(both, oil)
        assert np.array_equal(self.lora_image(lora, ("oil", 0.5), ("ink", 1.0)), both)
        result = run(lora, steps=1, width=32, height=32, loras=[("oil", 0.5), ("ink", 1.0)])[1]
        assert result.config.loras == (("oil", 0.5), ("ink", 1.0))  # as asked: said back
        assert json.loads(result.text_metadata()["limner"])["loras"] == [["oil", 0.5], ["ink", 1.0]]

    def test_alternating_adapters_never_mix(self, lora: DiffusersBackend[Any]) -> None:
        """20 calls from 4 threads, each set in turn; each image equals its set's image made
        alone, however the calls overlapped."""
        sets: list[tuple[tuple[str, float], ...]] = [
            (),
            (("ink", 0.8),),
            (("oil", 1.0),),
            (("ink", 0.8), ("oil", 1.0)),
        ]
        expected = [self.lora_image(lora, *chosen) for chosen in sets]
        assert len({image.tobytes() for image in expected}) == len(sets)
        failures: list[str] = []

        def worker(offset: int) -> None:
            for turn in range(5):
                index = (offset + turn) % len(sets)
                try:
                    if not np.array_equal(self.lora_image(lora, *sets[index]), expected[index]):
                        failures.append(f"set {sets[index]} made another image")
                except Exception as error:
                    failures.append(repr(error))

        run_in_threads(worker, range(4), timeout=300)
        assert failures == []

    def test_switching_adapters_never_reloads_the_base_weights(
        self, lora: DiffusersBackend[Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        loaded = lora._require_loaded()
        transformer = loaded.pipeline.transformer
        base = {
            name: tensor.data_ptr()
            for name, tensor in transformer.state_dict().items()
            if "lora_" not in name
        }
        loads: list[object] = []
        monkeypatch.setattr(type(lora), "load", lambda self: loads.append(self))
        for chosen in ((("ink", 1.0),), (("oil", 0.3),), (), (("ink", 0.2), ("oil", 0.2))):
            self.lora_image(lora, *chosen)
        assert loads == [] and lora._require_loaded() is loaded
        after = {
            name.replace(".base_layer", ""): tensor.data_ptr()
            for name, tensor in transformer.state_dict().items()
            if "lora_" not in name
        }
        assert after == {name.replace(".base_layer", ""): ptr for name, ptr in base.items()}

    def test_bad_adapters_are_refused_and_the_model_keeps_serving(
        self, lora: DiffusersBackend[Any], lora_dir: Path
    ) -> None:
        plain = self.lora_image(lora, seed=5)
        cases: list[tuple[Any, str, str]] = [
            ([("inc", 1.0)], "loras[0].name", "Did you mean: ink"),
            ([("ink", 1.0), ("oil", 4.5)], "loras[1].scale", "between -4 and 4"),
            ([("ink", float("nan"))], "loras[0].scale", "finite"),
            ([("../ink", 1.0)], "loras[0].name", "never a path"),
            ([("/etc/passwd", 1.0)], "loras[0].name", "never a path"),
            ([("ink", 1.0), ("ink", 0.5)], "loras[1].name", "given twice"),
            ([("truncated", 1.0)], "loras[0].name", "truncated.safetensors is"),
            ([("noise", 1.0)], "loras[0].name", "noise.safetensors is not a safetensors"),
            ([("misfit", 1.0)], "loras[0].name", "misfit.safetensors does not fit"),
            ([("ink", 1.0)] * 5, "loras", "at most 4"),
            ([("ink",)], "loras[0]", "pair"),
            ("ink", "loras", "list of (name, scale) pairs"),
        ]
        for loras, field, words in cases:
            with pytest.raises(InvalidInput) as refused:
                lora.resolve_config(ImageGenerationConfig(loras=loras))
            assert refused.value.field == field, loras
            assert words in str(refused.value) and "\n" not in str(refused.value)
            config = lora.resolve_config(ImageGenerationConfig(steps=1))
            bad = dataclasses.replace(config, loras=loras)
            with pytest.raises(InvalidInput):  # a direct call checks them too
                lora.generate("a cat", bad, on_step=lambda _: None)
        assert np.array_equal(self.lora_image(lora, seed=5), plain)
        assert "misfit" not in lora._require_loaded().adapters.names()

    def test_a_file_diffusers_cannot_load_is_one_line_and_undone(
        self, lora: DiffusersBackend[Any], lora_dir: Path
    ) -> None:
        """A file that passes the header check and still fails in diffusers (it changed
        under the server, say): the error names the file, and nothing of it stays."""
        loaded = lora._require_loaded()
        ink = limner.plugin.find_lora([str(lora_dir)], "ink")
        assert ink is not None
        broken = dataclasses.replace(ink, name="gone", path=str(lora_dir / "gone.safetensors"))
        with pytest.raises(InvalidInput, match=r"gone\.safetensors could not be loaded") as error:
            with loaded.adapters.use(loaded, [(broken, 1.0)], key=lora.spec.key):
                pass
        assert error.value.field == "loras[0].name" and "\n" not in str(error.value)
        assert "gone" not in loaded.adapters.names()
        self.test_an_adapter_changes_the_image_and_repeats(lora)

    def test_adapters_count_in_memory_and_drop_least_recently_used_first(
        self, lora: DiffusersBackend[Any]
    ) -> None:
        lora.drop_caches(["ink", "oil"])
        bare = lora.memory_mb()
        assert bare is not None and [part.name for part in lora.caches()] == []
        self.lora_image(lora, ("oil", 1.0))
        self.lora_image(lora, ("ink", 1.0))
        grown = lora.memory_mb()
        assert grown is not None
        # float32 here: 4 bytes a parameter; rank 8 and rank 4 on the same layers
        ink, oil = (lora_size(lora, name) for name in ("ink", "oil"))
        assert grown - bare == pytest.approx(ink + oil)
        assert oil == pytest.approx(2 * ink)
        parts = sorted(lora.caches(), key=lambda part: part.last_used)
        assert [part.name for part in parts] == ["oil", "ink"]  # oil was used first
        lora.drop_caches([parts[0].name])
        assert [part.name for part in lora.caches()] == ["ink"]
        assert lora.memory_mb() == pytest.approx(bare + ink)
        inked = self.lora_image(lora, ("ink", 1.0))
        assert np.array_equal(
            self.lora_image(lora, ("oil", 1.0), ("ink", 1.0)),
            self.lora_image(lora, ("ink", 1.0), ("oil", 1.0)),
        )
        assert np.array_equal(self.lora_image(lora, ("ink", 1.0)), inked)

    def test_an_adapter_in_use_is_never_dropped(self, lora: DiffusersBackend[Any]) -> None:
        started, release = threading.Event(), threading.Event()

        def on_step(progress: limner.Progress) -> None:
            started.set()
            release.wait(30)

        def generate() -> None:
            config = lora.resolve_config(
                ImageGenerationConfig(steps=2, seed=1, loras=[("ink", 1.0)])
            )
            lora.generate("a cat", config, on_step=on_step)

        thread = threading.Thread(target=generate)
        thread.start()
        try:
            assert started.wait(30)
            assert lora.caches() == []  # a call runs: nothing can be dropped now
            lora.drop_caches(["ink", "oil"])
            assert "ink" in lora._require_loaded().adapters.names()
        finally:
            release.set()
            thread.join(30)

    def test_a_changed_file_is_loaded_again(
        self, lora: DiffusersBackend[Any], lora_dir: Path, hf_cache: Path
    ) -> None:
        tiny = self.backend_class.tiny
        assert isinstance(tiny, TinyPipeline)
        fresh = lora_dir / "fresh.safetensors"
        write_tiny_lora(tiny, fresh, seed=11, cache_dir=hf_cache)
        first = self.lora_image(lora, ("fresh", 1.0))
        write_tiny_lora(tiny, fresh, seed=12, cache_dir=hf_cache)
        os.utime(fresh, ns=(1, 1))  # another version, whatever the clock's resolution
        assert not np.array_equal(self.lora_image(lora, ("fresh", 1.0)), first)
        write_tiny_lora(tiny, fresh, seed=11, cache_dir=hf_cache)
        assert np.array_equal(self.lora_image(lora, ("fresh", 1.0)), first)

    def test_the_registry_lists_the_adapters(self, lora_dir: Path) -> None:
        registry = limner.Registry(entry_points=False, lora_dirs=[lora_dir])
        registry.register_plugin(self.plugin_module())
        entries = {entry.name: entry for entry in registry.loras()}
        ink, oil = entries["ink"], entries["oil"]
        assert ink.models == (self.tiny_key(),) and ink.family == self.backend_class.lora_family
        assert (ink.adapter.rank, oil.adapter.rank) == (4, 8)
        assert ink.adapter.where == os.path.join("ink", ADAPTER_FILE)
        assert oil.adapter.where == "oil.safetensors"
        assert oil.adapter.tensor_bytes == 2 * ink.adapter.tensor_bytes
        for name in ("truncated", "noise", "misfit"):
            assert entries[name].models == () and entries[name].reason, name
        assert "transformer_blocks.99" in (entries["misfit"].reason or "")


def lora_size(backend: DiffusersBackend[Any], name: str) -> float:
    """The MB an adapter holds in ``backend``, from its file's header."""
    adapter = limner.plugin.find_lora(backend.settings.lora_dirs, name)
    assert adapter is not None
    return adapter.memory_mb(backend._require_loaded().dtype.itemsize)


def _renamed(safetensors: bytes, old: str, new: str) -> bytes:
    """A safetensors file with its tensors' names changed (same data, same layout)."""
    length = int.from_bytes(safetensors[:8], "little")
    header = json.loads(safetensors[8 : 8 + length])
    header = {key.replace(old, new): value for key, value in header.items()}
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + safetensors[8 + length :]
