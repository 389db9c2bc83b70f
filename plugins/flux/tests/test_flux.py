"""FLUX.1: the diffusion family contract (registration, config validation, the tiny FLUX
through the real FluxPipeline code path, the real one on a GPU), and what only FLUX.1 does."""

from __future__ import annotations

import pytest

import limner
import limner_flux
from limner import ImageGenerationConfig
from limner.diffusion.testing import BackendMaker, DiffusionFamilyContract
from limner_flux._backend import FluxBackend

TINY = "limner/tiny-flux"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
DEV = "black-forest-labs/FLUX.1-dev"


class TestFlux(DiffusionFamilyContract):
    plugin = limner_flux
    entry_point = "flux"
    distribution = "limner-flux"
    backend_class = FluxBackend
    family_name = "FLUX"
    real_key = SCHNELL
    tiny_files = ("model_index.json", "tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json")
    bad_fields = (
        (SCHNELL, "width", 1000),  # not a multiple of 16
        (SCHNELL, "width", 128),  # below 256
        (SCHNELL, "height", 4096),
        (SCHNELL, "height", 512.0),
        (SCHNELL, "width", True),
        (TINY, "width", 8),
        (TINY, "height", 1024),
        (SCHNELL, "steps", 0),
        (SCHNELL, "steps", 101),
        (SCHNELL, "steps", "4"),
        (SCHNELL, "guidance", 3.5),  # schnell has no guidance input
        (DEV, "guidance", -1.0),
        (DEV, "guidance", float("nan")),
        (DEV, "guidance", 21),
        (SCHNELL, "seed", -1),
        (SCHNELL, "seed", 2**64),
        (SCHNELL, "seed", 1.5),
        (SCHNELL, "num_images", 0),
        (SCHNELL, "num_images", 5),
        (SCHNELL, "negative_prompt", "blurry"),
        (DEV, "negative_prompt", "blurry"),
        (SCHNELL, "negative_prompt", 3),
        (SCHNELL, "max_sequence_length", 257),
        (DEV, "max_sequence_length", 513),
        (SCHNELL, "max_sequence_length", 0),
        (SCHNELL, "output_format", "gif"),
        (SCHNELL, "preview", "yes"),
    )
    bad_settings = (("cpu_offload", "sometimes"),)  # besides a bad device and dtype

    def test_hook_registers_keys(self, registry: limner.Registry) -> None:
        keys = [entry.key for entry in registry.entries()]
        assert keys == [DEV, SCHNELL, TINY]
        assert registry.spec("flux-schnell").key == SCHNELL
        assert registry.spec("flux-dev").key == DEV
        schnell = registry.spec(SCHNELL).info
        assert schnell.source_repo == SCHNELL
        assert schnell.license == "apache-2.0"
        assert schnell.memory_mb == pytest.approx(33.8 * 1024)
        assert not schnell.tiny
        assert "non-commercial" in (registry.spec(DEV).info.license or "")

    def test_real_key_defaults(self, make_backend: BackendMaker) -> None:
        schnell = make_backend(SCHNELL).resolve_config(ImageGenerationConfig())
        assert (schnell.width, schnell.height, schnell.steps) == (1024, 1024, 4)
        assert schnell.guidance == 0.0
        assert schnell.max_sequence_length == 256
        assert schnell.num_images == 1 and schnell.output_format == "png"
        dev = make_backend(DEV).resolve_config(ImageGenerationConfig())
        assert (dev.steps, dev.guidance, dev.max_sequence_length) == (28, 3.5, 512)
        tiny = make_backend(TINY).resolve_config(ImageGenerationConfig())
        assert (tiny.width, tiny.height) == (64, 64)

    def test_values_are_normalised(self, make_backend: BackendMaker) -> None:
        backend = make_backend(SCHNELL)
        config = backend.resolve_config(
            ImageGenerationConfig(output_format="JPG", negative_prompt="", guidance=0)  # type: ignore[arg-type]
        )
        assert config.output_format == "jpeg"
        assert config.negative_prompt is None
        assert isinstance(config.guidance, float)

    def test_dev_accepts_its_guidance_range(self, make_backend: BackendMaker) -> None:
        backend = make_backend(DEV)
        assert backend.resolve_config(ImageGenerationConfig(guidance=7)).guidance == 7.0
        assert backend.resolve_config(ImageGenerationConfig(max_sequence_length=512)).steps == 28
