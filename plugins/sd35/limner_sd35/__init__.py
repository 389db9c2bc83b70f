"""limner plugin: Stable Diffusion 3.5 text-to-image through diffusers.

Importing this module is cheap (no torch, no diffusers): it only declares the keys. The
backend in ``_backend`` is imported when a model is first built.
"""

from __future__ import annotations

from collections.abc import Callable

import limner

from ._variants import VARIANTS, SD35Variant

__all__ = ["limner_register_models", "model_specs"]

_FACTORY = "limner_sd35._backend:SD35Backend"


def _spec(variant: SD35Variant) -> limner.ModelSpec:
    return limner.ModelSpec(
        key=variant.key,
        aliases=variant.aliases,
        capability=limner.Capability.TEXT_TO_IMAGE,
        factory=_FACTORY,
        info=limner.ModelInfo(
            memory_mb=variant.memory_mb,
            worker_overhead_mb=variant.working_mb,  # a second generation shares the weights
            max_batch_size=1,  # one request is one pipeline call; num_images batches inside it
            default_settings={"cpu_offload": False, "drop_t5": False},
            source_repo=variant.source_repo,
            revision=variant.revision,
            license=variant.license,
            description=variant.description,
            tiny=variant.tiny,
        ),
    )


def model_specs() -> list[limner.ModelSpec]:
    """Every key this plugin serves."""
    return [_spec(variant) for variant in VARIANTS]


@limner.hookimpl
def limner_register_models(register: Callable[[limner.ModelSpec], None]) -> None:
    """Declare the SD3.5 keys and the tiny random SD3.5."""
    for spec in model_specs():
        register(spec)
