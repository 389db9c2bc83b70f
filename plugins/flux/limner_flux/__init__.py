"""limner plugin: FLUX.1 text-to-image through diffusers.

Importing this module is cheap (no torch, no diffusers): it only declares the keys. The
backend in ``_backend`` is imported when a model is first built.
"""

from __future__ import annotations

from limner.plugin import ModelSpec, RegisterModel, hookimpl

from ._variants import VARIANTS

#: The major version of limner's plugin API this plugin is written for.
LIMNER_PLUGIN_API = 1

__all__ = ["LIMNER_PLUGIN_API", "limner_register_models", "model_specs"]

_FACTORY = "limner_flux._backend:FluxBackend"


def model_specs() -> list[ModelSpec]:
    """Every key this plugin serves."""
    return [variant.spec(_FACTORY) for variant in VARIANTS]


@hookimpl
def limner_register_models(register: RegisterModel) -> None:
    """Declare the FLUX.1 keys and the tiny random FLUX."""
    for spec in model_specs():
        register(spec)
