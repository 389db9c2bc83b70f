"""SD3.5: the diffusion family contract (registration, config validation, the tiny SD3.5
through the real StableDiffusion3Pipeline code path, the real one on a GPU), and what only
SD3.5 does: the negative prompt and ``drop_t5``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import limner
import limner_sd35
from limner import ImageGenerationConfig, InvalidInput
from limner.diffusion import DiffusersBackend
from limner.diffusion.testing import BackendMaker, DiffusionFamilyContract, pixels, run
from limner_sd35._backend import SD35Backend

TINY = "limner/tiny-sd35"
TURBO = "stabilityai/stable-diffusion-3.5-large-turbo"
LARGE = "stabilityai/stable-diffusion-3.5-large"
MEDIUM = "stabilityai/stable-diffusion-3.5-medium"


class TestSD35(DiffusionFamilyContract):
    plugin = limner_sd35
    entry_point = "sd35"
    distribution = "limner-sd35"
    backend_class = SD35Backend
    family_name = "SD3.5"
    real_key = TURBO
    tiny_files = ("model_index.json", "tokenizer/tokenizer.json", "tokenizer_3/tokenizer.json")
    bad_fields = (
        (TURBO, "width", 1000),  # not a multiple of 16
        (TURBO, "width", 128),  # below 256
        (TURBO, "height", 4096),
        (TURBO, "height", 512.0),
        (TURBO, "width", False),
        (TINY, "width", 8),
        (TINY, "height", 2048),
        (TURBO, "steps", 0),
        (TURBO, "steps", 101),
        (TURBO, "steps", 2.0),
        (TURBO, "guidance", -0.5),
        (LARGE, "guidance", float("inf")),
        (LARGE, "guidance", 25),
        (LARGE, "guidance", "3.5"),
        (TURBO, "seed", -1),
        (TURBO, "seed", 2**64),
        (TURBO, "seed", "42"),
        (TURBO, "num_images", 0),
        (TURBO, "num_images", 5),
        (TURBO, "negative_prompt", "blurry"),  # guidance 0: no classifier-free guidance
        (TURBO, "negative_prompt", ["blurry"]),
        (TURBO, "max_sequence_length", 513),
        (TURBO, "max_sequence_length", 0),
        (TURBO, "output_format", "bmp"),
        (TURBO, "preview", 1),
    )
    bad_settings = (  # besides the suite's bad device and dtype
        ("device", "tpu"),
        ("dtype", "float8"),
        ("cpu_offload", 2),
        ("drop_t5", "maybe"),
    )

    def test_hook_registers_keys(self, registry: limner.Registry) -> None:
        keys = [entry.key for entry in registry.entries()]
        assert keys == [TINY, LARGE, TURBO, MEDIUM]
        assert registry.spec("sd3.5-large-turbo").key == TURBO
        assert registry.spec("sd3.5-large").key == LARGE
        assert registry.spec("sd3.5-medium").key == MEDIUM
        turbo = registry.spec(TURBO).info
        assert turbo.source_repo == TURBO
        assert turbo.license == "stabilityai-ai-community"
        assert turbo.memory_mb == pytest.approx(28.5 * 1024)
        assert registry.spec(LARGE).info.memory_mb == turbo.memory_mb
        assert registry.spec(MEDIUM).info.memory_mb < turbo.memory_mb
        assert not turbo.tiny
        assert registry.settings(TINY).options == {"cpu_offload": False, "drop_t5": False}

    def test_real_key_defaults(self, make_backend: BackendMaker) -> None:
        turbo = make_backend(TURBO).resolve_config(ImageGenerationConfig())
        assert (turbo.width, turbo.height, turbo.steps) == (1024, 1024, 4)
        assert turbo.guidance == 0.0
        assert turbo.max_sequence_length == 256
        assert turbo.num_images == 1
        assert turbo.output_format == "png"
        large = make_backend(LARGE).resolve_config(ImageGenerationConfig())
        assert (large.steps, large.guidance) == (28, 3.5)
        medium = make_backend(MEDIUM).resolve_config(ImageGenerationConfig())
        assert (medium.steps, medium.guidance) == (40, 4.5)
        tiny = make_backend(TINY).resolve_config(ImageGenerationConfig())
        assert (tiny.width, tiny.height) == (64, 64)

    def test_negative_prompt_is_kept_with_guidance(self, make_backend: BackendMaker) -> None:
        large = make_backend(LARGE).resolve_config(ImageGenerationConfig(negative_prompt="blurry"))
        assert large.negative_prompt == "blurry"
        turbo = make_backend(TURBO).resolve_config(
            ImageGenerationConfig(negative_prompt="blurry", guidance=2)
        )
        assert turbo.negative_prompt == "blurry"
        assert turbo.guidance == 2.0
        empty = make_backend(TURBO).resolve_config(ImageGenerationConfig(negative_prompt=""))
        assert empty.negative_prompt is None

    def test_values_are_normalised(self, make_backend: BackendMaker) -> None:
        config = make_backend(TURBO).resolve_config(
            ImageGenerationConfig(output_format="WEBP", guidance=1)  # type: ignore[arg-type]
        )
        assert config.output_format == "webp"
        assert isinstance(config.guidance, float)

    def test_negative_prompt_error_explains_the_guidance(self, make_backend: BackendMaker) -> None:
        with pytest.raises(InvalidInput, match="guidance above 1") as caught:
            make_backend(TURBO).resolve_config(ImageGenerationConfig(negative_prompt="blurry"))
        assert f"the default of {TURBO}" in str(caught.value)

    def test_negative_prompt_runs_classifier_free_guidance(
        self, tiny: DiffusersBackend[Any]
    ) -> None:
        _, plain = run(tiny, steps=2, seed=8, guidance=4.0)
        _, negative = run(tiny, steps=2, seed=8, guidance=4.0, negative_prompt="fog, rain")
        _, unguided = run(tiny, steps=2, seed=8)
        assert negative.config.negative_prompt == "fog, rain"
        assert negative.metadata["negative_prompt"] == "fog, rain"
        assert not np.array_equal(pixels(plain.images[0]), pixels(negative.images[0]))
        assert not np.array_equal(pixels(plain.images[0]), pixels(unguided.images[0]))
        _, again = run(tiny, steps=2, seed=8, guidance=4.0, negative_prompt="fog, rain")
        assert np.array_equal(pixels(negative.images[0]), pixels(again.images[0]))

    def test_drop_t5_conditions_on_clip_alone(
        self, make_backend: BackendMaker, tiny: DiffusersBackend[Any]
    ) -> None:
        backend = make_backend(TINY, options={"drop_t5": True})
        backend.load()
        loaded = backend._require_loaded()
        assert loaded.pipeline.text_encoder_3 is None
        steps, result = run(backend, steps=2, seed=4)
        assert len(steps) == 2
        assert result.metadata["t5"] is False
        _, with_t5 = run(tiny, steps=2, seed=4)
        assert with_t5.metadata["t5"] is True
        assert not np.array_equal(pixels(result.images[0]), pixels(with_t5.images[0]))
        full = tiny.memory_mb()
        dropped = backend.memory_mb()
        assert full is not None
        assert dropped is not None
        assert dropped < full
