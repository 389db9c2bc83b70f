"""The command line: one module per command, all on the group in ``_app``."""

from . import _embed, _generate, _loras, _models, _new_plugin, _serve  # noqa: F401 - they register
from ._app import cli, main, run

__all__ = ["cli", "main", "run"]
