"""limner plugin: Stable Diffusion 3.5 text-to-image through diffusers.

Importing this module is cheap (no torch, no diffusers): it declares the keys, each built by
``SD35Backend``, which imports torch and diffusers only when a model loads.
"""

from __future__ import annotations

from limner.plugin import RegisterModel, hookimpl

from ._backend import SD35Backend

#: The major version of limner's plugin API this plugin is written for.
LIMNER_PLUGIN_API = 1

__all__ = ["LIMNER_PLUGIN_API", "limner_register_models"]


@hookimpl
def limner_register_models(register: RegisterModel) -> None:
    """Declare the SD3.5 keys and the tiny random SD3.5."""
    SD35Backend.register_specs(register, drop_t5=False)
