"""The tests every diffusion family passes, as one class its test suite subclasses.

Like diffusers' ``PipelineTesterMixin``: a family's tests subclass
:class:`DiffusionFamilyContract`, say which plugin, backend and keys it is about, and get
limner's conformance suite for generators (:class:`limner.plugin.testing.TextToImageContract`,
run on the family's tiny model) and the tests every diffusers family shares (its tiny model
generating through the real pipeline, the core pool included, loading errors, offload and
dtypes) with the fixtures they use::

    class TestAcme(DiffusionFamilyContract):
        plugin = limner_acme
        backend_class = AcmeBackend
        family_name = "Acme"  # the tiny key's description: "TINY random-weight Acme ..."
        real_key = "acme/acme-1"
        tiny_files = ("model_index.json", "unet/config.json")

        def test_something_only_acme_does(self, tiny: DiffusersBackend[Any]) -> None: ...

docs/plugins.md ("A family's tests") lists every attribute the class reads, and
``pipeline_steps``, which a family whose scheduler runs more steps than asked overrides.

Every test runs offline, against a Hugging Face cache of the class's own, where the tiny
model is written on first load. It needs pytest, with limner's pytest plugin (installed with
limner) registering the ``real_weights`` and ``gpu`` markers of the one test that runs the real
weights on a GPU when they are cached.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import limner
from limner import Capability, ModelError, ModelLoadError

from ._backend import DiffusersBackend
from ._contract import USER_CACHE, BackendMaker, GenerationTests, pixels, run
from ._lora_contract import LoraTests, write_tiny_lora

__all__ = [
    "USER_CACHE",
    "BackendMaker",
    "DiffusionFamilyContract",
    "pixels",
    "run",
    "write_tiny_lora",
]


class DiffusionFamilyContract(GenerationTests, LoraTests):
    """The shared tests of a diffusion family; subclass it as ``Test<Family>``."""

    # -- registration; the import cost, settings and config checks are the suite's -----------

    def test_every_key_is_built_by_the_family_backend(self, registry: limner.Registry) -> None:
        """The rest of the specs' checks are the conformance suite's."""
        backend = self.backend_class
        for entry in registry.entries():
            spec = registry.spec(entry.key)
            assert spec.capability is Capability.TEXT_TO_IMAGE
            assert spec.factory == f"{backend.__module__}:{backend.__qualname__}"
        tiny = registry.spec(self.tiny_key()).info
        assert tiny.description.startswith(f"TINY random-weight {self.family_name}")
        assert not registry.spec(self.real_key).info.tiny

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
        denoiser = next(copy / name for name in ("transformer", "unet") if (copy / name).is_dir())
        (denoiser / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
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
