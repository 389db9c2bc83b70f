"""limner plugin: FLUX.1 text-to-image through diffusers.

Importing this module is cheap (no torch, no diffusers): it declares the keys, each built by
``FluxBackend``, which imports torch and diffusers only when a model loads.
"""

from __future__ import annotations

from limner.plugin import RegisterModel, hookimpl

from ._backend import FluxBackend

#: The major version of limner's plugin API this plugin is written for.
LIMNER_PLUGIN_API = 1

__all__ = ["LIMNER_PLUGIN_API", "limner_register_models"]


@hookimpl
def limner_register_models(register: RegisterModel) -> None:
    """Declare the FLUX.1 keys and the tiny random FLUX."""
    FluxBackend.register_specs(register)
