"""The tests every diffusion family passes, as one class its test suite subclasses.

Like diffusers' ``PipelineTesterMixin``: a family's tests subclass
:class:`DiffusionFamilyContract`, say which plugin, backend and keys it is about, and get
the shared tests (registration, import cost, config validation, and its tiny model
generating through the real pipeline, the core pool included) with the fixtures they use::

    class TestAcme(DiffusionFamilyContract):
        plugin: ClassVar[ModuleType] = limner_acme
        backend_class = AcmeBackend
        ...  # and the other attributes the class declares

        def test_something_only_acme_does(self, tiny: DiffusersBackend[Any]) -> None: ...

Every test runs offline, against a Hugging Face cache of the class's own, where the tiny
model is written on first load. It needs pytest (and the ``real_weights`` and ``gpu`` markers
registered, for the one test that runs the real weights on a GPU when they are cached).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import limner
from limner import Capability, ImageGenerationConfig, InvalidInput, ModelError, ModelLoadError

from ._backend import DiffusersBackend
from ._contract import USER_CACHE, BackendMaker, GenerationTests, pixels, run

__all__ = ["USER_CACHE", "BackendMaker", "DiffusionFamilyContract", "pixels", "run"]


class DiffusionFamilyContract(GenerationTests):
    """The shared tests of a diffusion family; subclass it as ``Test<Family>``."""

    # -- registration, import cost, config validation: no weights -----------------------------

    def test_every_key_is_text_to_image_and_the_tiny_one_is_pinned(
        self, registry: limner.Registry
    ) -> None:
        backend = self.backend_class
        for entry in registry.entries():
            spec = registry.spec(entry.key)
            assert spec.capability is Capability.TEXT_TO_IMAGE
            assert spec.factory == f"{backend.__module__}:{backend.__qualname__}"
        tiny = registry.spec(self.tiny_key()).info
        assert tiny.tiny
        assert tiny.description.startswith(f"TINY random-weight {self.family_name}")
        assert tiny.revision is not None
        assert len(tiny.revision) == 40
        assert registry.settings(self.tiny_key()).revision == tiny.revision
        assert not registry.spec(self.real_key).info.tiny

    def test_registered_through_the_entry_point(self) -> None:
        """The installed distribution declares the plugin where the registry looks for it."""
        registry = limner.Registry(plugins=self.entry_point)
        assert self.tiny_key() in {entry.key for entry in registry.entries()}
        record = next(p for p in registry.plugins() if p.name == self.entry_point)
        assert record.distribution == self.distribution
        assert record.error is None

    def test_import_and_construction_pull_no_torch(self) -> None:
        backend = self.backend_class
        code = textwrap.dedent(
            f"""
            import sys
            import limner, {self.plugin.__name__}
            from {backend.__module__} import {backend.__qualname__}
            registry = limner.Registry(entry_points=False)
            registry.register_plugin({self.plugin.__name__})
            key = {self.real_key!r}
            backend = {backend.__qualname__}(registry.spec(key), registry.settings(key))
            backend.resolve_config(limner.ImageGenerationConfig())
            heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
            print(",".join(heavy) or "none")
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert result.stdout.strip() == "none"

    def test_seed_is_drawn_when_missing_and_kept_when_given(
        self, make_backend: BackendMaker
    ) -> None:
        backend = make_backend(self.real_key)
        drawn = {backend.resolve_config(ImageGenerationConfig()).seed for _ in range(8)}
        assert None not in drawn
        assert len(drawn) > 1
        assert backend.resolve_config(ImageGenerationConfig(seed=7)).seed == 7
        resolved = backend.resolve_config(ImageGenerationConfig(seed=0, width=512))
        assert backend.resolve_config(resolved) == resolved  # idempotent

    def test_every_bad_field_is_named(
        self, make_backend: BackendMaker, bad_field: tuple[str, str, Any]
    ) -> None:
        key, field, value = bad_field
        config = dataclasses.replace(ImageGenerationConfig(), **{field: value})
        with pytest.raises(InvalidInput) as caught:
            make_backend(key).resolve_config(config)
        assert caught.value.field == field
        assert field in str(caught.value)

    def test_bad_settings_are_named_at_construction(
        self, make_backend: BackendMaker, bad_setting: tuple[str, object]
    ) -> None:
        setting, value = bad_setting
        configure: dict[str, Any] = (
            {setting: value} if setting in ("device", "dtype") else {"options": {setting: value}}
        )
        with pytest.raises(InvalidInput) as caught:
            make_backend(self.tiny_key(), **configure)
        assert caught.value.field == setting

    # -- loading: settings, memory, weights that are missing or wrong -------------------------

    def test_memory_device_resolves_auto(self, make_backend: BackendMaker) -> None:
        assert make_backend().memory_device() == "cpu"  # no CUDA here
        assert make_backend(device="cpu").memory_device() == "cpu"

    def test_load_unload_and_memory(self, make_backend: BackendMaker) -> None:
        backend = make_backend()
        assert backend.memory_mb() is None
        with pytest.raises(ModelError, match="not loaded"):
            run(backend)
        backend.load()
        measured = backend.memory_mb()
        assert measured is not None and 0 < measured < backend.spec.info.memory_mb
        backend.unload()
        assert backend.memory_mb() is None
        with pytest.raises(ModelError, match="not loaded"):
            run(backend)

    def test_cpu_offload_on_the_cpu_changes_nothing(self, make_backend: BackendMaker) -> None:
        backend = make_backend(device="cpu", options={"cpu_offload": "true"})
        backend.load()
        _, result = run(backend, steps=1, seed=9)
        _, reference = run(backend, steps=1, seed=9)
        assert result.metadata["cpu_offload"] is False
        assert np.array_equal(pixels(result.images[0]), pixels(reference.images[0]))

    def test_dtype_override(self, make_backend: BackendMaker) -> None:
        backend = make_backend(dtype="bf16")
        backend.load()
        _, result = run(backend, steps=1, seed=9, width=32, height=32)
        assert result.metadata["dtype"] == "bfloat16"
        assert result.images[0].size == (32, 32)

    def test_missing_real_weights_offline_fail_with_advice(
        self, make_backend: BackendMaker
    ) -> None:
        with pytest.raises(ModelLoadError, match=re.escape(f"hf download {self.real_key}")):
            make_backend(self.real_key, device="cpu").load()

    def test_local_dir_without_a_pipeline_fails_with_advice(
        self, make_backend: BackendMaker, tmp_path: Path
    ) -> None:
        with pytest.raises(ModelLoadError, match=re.escape("model_index.json")):
            make_backend(self.real_key, local_dir=tmp_path, device="cpu").load()

    def test_corrupt_weights_become_a_load_error(
        self,
        make_backend: BackendMaker,
        tiny: DiffusersBackend[Any],
        hf_cache: Path,
        tmp_path: Path,
    ) -> None:
        copy = tmp_path / "tiny-copy"
        repo = hf_cache / ("models--" + self.tiny_key().replace("/", "--"))
        assert tiny.settings.revision is not None
        shutil.copytree(repo / "snapshots" / tiny.settings.revision, copy)
        (copy / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
        with pytest.raises(ModelLoadError, match=f"could not load {self.tiny_key()}"):
            make_backend(local_dir=copy).load()

    def test_tiny_at_another_revision_is_refused(self, make_backend: BackendMaker) -> None:
        with pytest.raises(ModelLoadError, match="got revision 'main': leave it unset"):
            make_backend(revision="main").load()

    def test_tiny_with_the_revision_unset_loads_the_one_limner_writes(
        self, registry: limner.Registry
    ) -> None:
        spec = registry.spec(self.tiny_key())
        # as a host may build it
        backend = self.backend_class(spec, limner.ModelSettings(weights=self.tiny_key()))
        assert backend.settings.revision is None
        backend.load()
        try:
            _, result = run(backend, steps=1, width=32, height=32, seed=1)
            assert result.images[0].size == (32, 32)
        finally:
            backend.unload()

    @pytest.mark.real_weights
    @pytest.mark.gpu
    def test_real_weights_on_a_gpu(
        self, make_backend: BackendMaker, user_cache: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import torch
        from huggingface_hub import try_to_load_from_cache

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device; torch sees none")
        cached = try_to_load_from_cache(self.real_key, "model_index.json", cache_dir=user_cache)
        if not isinstance(cached, str):
            pytest.skip(f"{self.real_key} is not in the local Hugging Face cache ({user_cache})")
        monkeypatch.setenv("HF_HUB_CACHE", str(user_cache))
        backend = make_backend(self.real_key)
        torch.cuda.reset_peak_memory_stats()
        backend.load()
        try:
            steps, result = run(backend, "a red fox in the snow, photograph", seed=0, preview=True)
            assert [p.step for p in steps] == [1, 2, 3, 4]
            image = pixels(result.images[0])
            assert result.images[0].size == (1024, 1024)
            assert image.std() > 10  # a picture, not a flat or black image
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
            assert peak_mb < backend.spec.info.memory_mb * 1.1
        finally:
            backend.unload()
