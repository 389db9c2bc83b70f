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
from limner_flux._backend import FluxBackend

BackendMaker = Callable[..., FluxBackend]
TINY = "limner/tiny-flux"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
DEV = "black-forest-labs/FLUX.1-dev"


def test_hook_registers_keys(registry: limner.Registry) -> None:
    keys = [entry.key for entry in registry.entries()]
    assert keys == [DEV, SCHNELL, TINY]
    assert registry.spec("flux-schnell").key == SCHNELL
    assert registry.spec("flux-dev").key == DEV
    for key in keys:
        spec = registry.spec(key)
        assert spec.capability is Capability.TEXT_TO_IMAGE
        assert spec.factory == "limner_flux._backend:FluxBackend"
    schnell = registry.spec(SCHNELL).info
    assert schnell.source_repo == SCHNELL
    assert schnell.license == "apache-2.0"
    assert schnell.memory_mb == pytest.approx(33.8 * 1024)
    assert not schnell.tiny
    assert "non-commercial" in (registry.spec(DEV).info.license or "")
    tiny = registry.spec(TINY).info
    assert tiny.tiny
    assert tiny.description.startswith("TINY random-weight FLUX")
    assert tiny.revision is not None and len(tiny.revision) == 40
    assert registry.settings(TINY).revision == tiny.revision


def test_registered_through_the_entry_point() -> None:
    """The installed distribution declares the plugin where the registry looks for it."""
    registry = limner.Registry(plugins="flux")
    assert TINY in {entry.key for entry in registry.entries()}
    record = next(p for p in registry.plugins() if p.name == "flux")
    assert record.distribution == "limner-flux" and record.error is None


def test_import_and_construction_pull_no_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        import limner, limner_flux
        from limner_flux._backend import FluxBackend
        registry = limner.Registry(entry_points=False)
        registry.register_plugin(limner_flux)
        backend = FluxBackend(registry.spec("flux-schnell"), registry.settings("flux-schnell"))
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
    schnell = make_backend(SCHNELL).resolve_config(ImageGenerationConfig())
    assert (schnell.width, schnell.height, schnell.steps) == (1024, 1024, 4)
    assert schnell.guidance == 0.0
    assert schnell.max_sequence_length == 256
    assert schnell.num_images == 1 and schnell.output_format == "png"
    dev = make_backend(DEV).resolve_config(ImageGenerationConfig())
    assert (dev.steps, dev.guidance, dev.max_sequence_length) == (28, 3.5, 512)
    tiny = make_backend(TINY).resolve_config(ImageGenerationConfig())
    assert (tiny.width, tiny.height) == (64, 64)


def test_seed_is_drawn_when_missing_and_kept_when_given(make_backend: BackendMaker) -> None:
    backend = make_backend(SCHNELL)
    drawn = {backend.resolve_config(ImageGenerationConfig()).seed for _ in range(8)}
    assert None not in drawn and len(drawn) > 1
    assert backend.resolve_config(ImageGenerationConfig(seed=7)).seed == 7
    resolved = backend.resolve_config(ImageGenerationConfig(seed=0, width=512))
    assert backend.resolve_config(resolved) == resolved  # idempotent


def test_values_are_normalised(make_backend: BackendMaker) -> None:
    backend = make_backend(SCHNELL)
    config = backend.resolve_config(
        ImageGenerationConfig(output_format="JPG", negative_prompt="", guidance=0)  # type: ignore[arg-type]
    )
    assert config.output_format == "jpeg"
    assert config.negative_prompt is None
    assert isinstance(config.guidance, float)


BAD_FIELDS: list[tuple[str, str, Any]] = [
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


def test_dev_accepts_its_guidance_range(make_backend: BackendMaker) -> None:
    backend = make_backend(DEV)
    assert backend.resolve_config(ImageGenerationConfig(guidance=7)).guidance == 7.0
    assert backend.resolve_config(ImageGenerationConfig(max_sequence_length=512)).steps == 28


@pytest.mark.parametrize(
    ("setting", "value"),
    [("device", "gpu"), ("dtype", "int8"), ("cpu_offload", "sometimes")],
)
def test_bad_settings_are_named_at_construction(
    make_backend: BackendMaker, setting: str, value: str
) -> None:
    configure: dict[str, Any] = (
        {"options": {setting: value}} if setting == "cpu_offload" else {setting: value}
    )
    with pytest.raises(InvalidInput) as caught:
        make_backend(TINY, **configure)
    assert caught.value.field == setting
