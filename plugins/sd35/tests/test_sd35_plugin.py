"""Registration, import cost and config validation: nothing here loads weights."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

import limner
from limner import Capability, ImageGenerationConfig, InvalidInput
from limner_sd35._backend import SD35Backend

BackendMaker = Callable[..., SD35Backend]
TINY = "limner/tiny-sd35"
TURBO = "stabilityai/stable-diffusion-3.5-large-turbo"
LARGE = "stabilityai/stable-diffusion-3.5-large"
MEDIUM = "stabilityai/stable-diffusion-3.5-medium"


def test_hook_registers_keys(registry: limner.Registry) -> None:
    keys = [entry.key for entry in registry.entries()]
    assert keys == [TINY, LARGE, TURBO, MEDIUM]
    assert registry.spec("sd3.5-large-turbo").key == TURBO
    assert registry.spec("sd3.5-large").key == LARGE
    assert registry.spec("sd3.5-medium").key == MEDIUM
    for key in keys:
        spec = registry.spec(key)
        assert spec.capability is Capability.TEXT_TO_IMAGE
        assert spec.factory == "limner_sd35._backend:SD35Backend"
    turbo = registry.spec(TURBO).info
    assert turbo.source_repo == TURBO
    assert turbo.license == "stabilityai-ai-community"
    assert turbo.memory_mb == pytest.approx(28.5 * 1024)
    assert registry.spec(LARGE).info.memory_mb == turbo.memory_mb
    assert registry.spec(MEDIUM).info.memory_mb < turbo.memory_mb
    assert not turbo.tiny
    tiny = registry.spec(TINY).info
    assert tiny.tiny
    assert tiny.description.startswith("TINY random-weight SD3.5")
    assert tiny.revision is not None
    assert len(tiny.revision) == 40
    assert registry.settings(TINY).revision == tiny.revision
    assert registry.settings(TINY).options == {"cpu_offload": False, "drop_t5": False}


def test_registered_through_the_entry_point() -> None:
    """The installed distribution declares the plugin where the registry looks for it."""
    registry = limner.Registry(plugins="sd35")
    assert TINY in {entry.key for entry in registry.entries()}
    record = next(p for p in registry.plugins() if p.name == "sd35")
    assert record.distribution == "limner-sd35"
    assert record.error is None


def test_import_and_construction_pull_no_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        import limner, limner_sd35
        from limner_sd35._backend import SD35Backend
        registry = limner.Registry(entry_points=False)
        registry.register_plugin(limner_sd35)
        key = "sd3.5-large-turbo"
        backend = SD35Backend(registry.spec(key), registry.settings(key))
        backend.resolve_config(limner.ImageGenerationConfig())
        heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        print(",".join(heavy) or "none")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "none"


def test_real_key_defaults(make_backend: BackendMaker) -> None:
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


def test_seed_is_drawn_when_missing_and_kept_when_given(make_backend: BackendMaker) -> None:
    backend = make_backend(TURBO)
    drawn = {backend.resolve_config(ImageGenerationConfig()).seed for _ in range(8)}
    assert None not in drawn
    assert len(drawn) > 1
    assert backend.resolve_config(ImageGenerationConfig(seed=7)).seed == 7
    resolved = backend.resolve_config(ImageGenerationConfig(seed=0, width=512))
    assert backend.resolve_config(resolved) == resolved  # idempotent


def test_negative_prompt_is_kept_with_guidance(make_backend: BackendMaker) -> None:
    large = make_backend(LARGE).resolve_config(ImageGenerationConfig(negative_prompt="blurry"))
    assert large.negative_prompt == "blurry"
    turbo = make_backend(TURBO).resolve_config(
        ImageGenerationConfig(negative_prompt="blurry", guidance=2)
    )
    assert turbo.negative_prompt == "blurry"
    assert turbo.guidance == 2.0
    empty = make_backend(TURBO).resolve_config(ImageGenerationConfig(negative_prompt=""))
    assert empty.negative_prompt is None


def test_values_are_normalised(make_backend: BackendMaker) -> None:
    config = make_backend(TURBO).resolve_config(
        ImageGenerationConfig(output_format="WEBP", guidance=1)  # type: ignore[arg-type]
    )
    assert config.output_format == "webp"
    assert isinstance(config.guidance, float)


BAD_FIELDS: list[tuple[str, str, Any]] = [
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
]


@pytest.mark.parametrize(("key", "field", "value"), BAD_FIELDS)
def test_every_bad_field_is_named(
    make_backend: BackendMaker, key: str, field: str, value: Any
) -> None:
    config = dataclasses.replace(ImageGenerationConfig(), **{field: value})
    with pytest.raises(InvalidInput) as caught:
        make_backend(key).resolve_config(config)
    assert caught.value.field == field
    assert field in str(caught.value)


def test_negative_prompt_error_explains_the_guidance(make_backend: BackendMaker) -> None:
    with pytest.raises(InvalidInput, match="guidance above 1") as caught:
        make_backend(TURBO).resolve_config(ImageGenerationConfig(negative_prompt="blurry"))
    assert f"the default of {TURBO}" in str(caught.value)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("device", "tpu"), ("dtype", "float8"), ("cpu_offload", 2), ("drop_t5", "maybe")],
)
def test_bad_settings_are_named_at_construction(
    make_backend: BackendMaker, setting: str, value: object
) -> None:
    configure: dict[str, Any] = (
        {"options": {setting: value}} if setting in ("cpu_offload", "drop_t5") else {setting: value}
    )
    with pytest.raises(InvalidInput) as caught:
        make_backend(TINY, **configure)
    assert caught.value.field == setting
