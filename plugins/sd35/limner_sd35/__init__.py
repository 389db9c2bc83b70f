"""limner plugin: Stable Diffusion 3.5 text-to-image through diffusers.

Importing this module is cheap (no torch, no diffusers): it only declares the keys. The
backend in ``_backend`` is imported when a model is first built.
"""

from __future__ import annotations

from limner.plugin import ModelSpec, RegisterModel, hookimpl

from ._variants import VARIANTS

#: The major version of limner's plugin API this plugin is written for.
LIMNER_PLUGIN_API = 1

__all__ = ["LIMNER_PLUGIN_API", "limner_register_models", "model_specs"]

_FACTORY = "limner_sd35._backend:SD35Backend"


def model_specs() -> list[ModelSpec]:
    """Every key this plugin serves."""
    return [variant.spec(_FACTORY, drop_t5=False) for variant in VARIANTS]


@hookimpl
def limner_register_models(register: RegisterModel) -> None:
    """Declare the SD3.5 keys and the tiny random SD3.5."""
    for spec in model_specs():
        register(spec)
