"""The hooks a limner plugin can implement. Each is documented in docs/plugins.md."""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from limner._registry._spec import ModelSpec

__all__ = ["API_ATTRIBUTE", "PLUGIN_API", "PROJECT_NAME", "RegisterModel", "hookimpl", "hookspec"]

PROJECT_NAME = "limner"
"""The pluggy project name and the entry-point group plugins are found under."""

PLUGIN_API = 1
"""The major version of the plugin contract (the hooks and ``limner.plugin``) this limner
implements. A plugin says which it was written for as ``LIMNER_PLUGIN_API = 1`` in the module
its entry point names; the registry refuses a plugin written for another one."""

API_ATTRIBUTE = "LIMNER_PLUGIN_API"
"""The module attribute in which a plugin declares the :data:`PLUGIN_API` it was written for."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

RegisterModel = Callable[[ModelSpec], None]


@hookspec
def limner_register_models(register: RegisterModel) -> None:
    """Call ``register(spec)`` once for each model key the plugin serves.

    Runs when the registry first needs the list of models. Keep it cheap: build
    :class:`~limner.ModelSpec` objects, import nothing heavy (no torch).
    """
