"""The default model per capability, for commands run without ``--model``.

Set with ``limner models default KEY`` (kept in ``defaults.json`` in limner's configuration
folder, ``~/.config/limner`` on Linux) or per shell with ``LIMNER_EMBED_MODEL`` and
``LIMNER_GENERATE_MODEL``, which win over the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from limner._registry._spec import Capability
from limner.errors import LimnerError

__all__ = ["ENV_VARS", "config_dir", "default_model", "read_defaults", "write_default"]

ENV_VARS = {
    Capability.IMAGE_EMBEDDING: "LIMNER_EMBED_MODEL",
    Capability.TEXT_TO_IMAGE: "LIMNER_GENERATE_MODEL",
}


def config_dir() -> Path:
    """``LIMNER_CONFIG_DIR``, else the platform's folder for limner's settings."""
    override = os.environ.get("LIMNER_CONFIG_DIR")
    if override:
        return Path(override).expanduser()
    import click

    return Path(click.get_app_dir("limner"))


def _path() -> Path:
    return config_dir() / "defaults.json"


def read_defaults() -> dict[Capability, str]:
    """The defaults saved with ``limner models default``; ``{}`` when none are."""
    path = _path()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise LimnerError(f"cannot read the default models from {path}: {error}") from None
    if not isinstance(document, dict):
        raise LimnerError(f"{path} should hold a JSON object of capability to model key")
    return {
        Capability(name): key
        for name, key in document.items()
        if name in {c.value for c in Capability} and isinstance(key, str) and key
    }


def write_default(capability: Capability, key: str | None) -> Path:
    """Save (or with ``None`` forget) the default for ``capability``; returns the file."""
    path = _path()
    defaults = read_defaults()
    if key is None:
        defaults.pop(capability, None)
    else:
        defaults[capability] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {str(c): k for c, k in sorted(defaults.items())}
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=".defaults.", delete=False
    ) as temporary:
        json.dump(document, temporary, indent=2)
        temporary.write("\n")
    Path(temporary.name).replace(path)
    return path


def default_model(capability: Capability) -> tuple[str, str] | None:
    """The default key for ``capability`` and where it came from, or None."""
    variable = ENV_VARS[capability]
    if value := os.environ.get(variable, "").strip():
        return value, variable
    saved = read_defaults().get(capability)
    return (saved, str(_path())) if saved else None
