"""limner plugin: FLUX.1 text-to-image through diffusers.

Importing this module is cheap (no torch, no diffusers): it only declares the keys. The
backend in ``_backend`` is imported when a model is first built.
"""

from __future__ import annotations

from collections.abc import Callable

import limner

from ._variants import VARIANTS, FluxVariant

__all__ = ["limner_register_models", "model_specs"]

_FACTORY = "limner_flux._backend:FluxBackend"


def _spec(variant: FluxVariant) -> limner.ModelSpec:
    return limner.ModelSpec(
        key=variant.key,
        aliases=variant.aliases,
        capability=limner.Capability.TEXT_TO_IMAGE,
        factory=_FACTORY,
        info=limner.ModelInfo(
            memory_mb=variant.memory_mb,
            worker_overhead_mb=variant.working_mb,  # a second generation shares the weights
            max_batch_size=1,  # one request is one pipeline call; num_images batches inside it
            default_settings={"cpu_offload": False},
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
    """Declare the FLUX.1 keys and the tiny random FLUX."""
    for spec in model_specs():
        register(spec)
