"""``limner new-plugin``: a complete plugin distribution, written from templates.

The templates are the two example plugins of the repository (examples/plugins/limner-acme,
an image embedder over a transformers model, and examples/plugins/limner-acme-diffusion, a
diffusers text-to-image model) with their names as placeholders: what a new plugin starts
from is code that limner's tests run, and its own tests, limner's conformance suite, pass
as soon as it is installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import secrets
import shutil
import string
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from limner._registry._spec import Capability
from limner.errors import InvalidInput

__all__ = ["MAX_NAME_LENGTH", "installed_as", "plugin_names", "render_plugin", "write_plugin"]

_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")

MAX_NAME_LENGTH = 64
"""Longest plugin name: its files' names (``tests/test_NAME.py``) stay far below any file
system's limit, and it is typed in commands and imports."""


def plugin_names(name: str) -> dict[str, str]:
    """The placeholders of the templates for a plugin ``name`` (``acme-demo``, or
    ``limner-acme-demo``): the entry point and key namespace ``name``, the distribution
    ``dist``, the ``package``, the ``module`` of its tests and its ``Class`` prefix."""
    short = name.removeprefix("limner-")
    if len(short) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"a plugin name is at most {MAX_NAME_LENGTH} characters; got {len(short)}",
            field="name",
        )
    if not _NAME.fullmatch(short):
        raise InvalidInput(
            "a plugin name is lowercase letters and digits, words joined by '-', starting "
            f"with a letter (e.g. acme-demo); got {name!r}",
            field="name",
        )
    module = short.replace("-", "_")
    return {
        "name": short,
        "dist": f"limner-{short}",
        "package": f"limner_{module}",
        "module": module,
        "Class": "".join(part.capitalize() for part in short.split("-")),
    }


def render_plugin(name: str, capability: Capability | str) -> dict[str, str]:
    """Every file of the new distribution: its path inside it, and its text."""
    names = plugin_names(name)
    root = resources.files(__package__) / "templates" / Capability(capability).value
    files: dict[str, str] = {}

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".tmpl"):
                path = prefix + child.name.removesuffix(".tmpl")
                path = path.replace("PACKAGE", names["package"]).replace("MODULE", names["module"])
                files[path] = string.Template(child.read_text(encoding="utf-8")).substitute(names)

    walk(root, "")
    return dict(sorted(files.items()))


def installed_as(name: str) -> str | None:
    """What already installed a plugin ``name`` would shadow: its distribution (``limner-clip
    0.1.0``) or its package (``limner_clip``); None if nothing."""
    names = plugin_names(name)
    try:
        found = importlib.metadata.distribution(names["dist"])
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        return f"the distribution {found.metadata['Name']} {found.version}"
    if importlib.util.find_spec(names["package"]) is not None:
        return f"the package {names['package']}"
    return None


def write_plugin(
    name: str, capability: Capability | str, directory: Path, *, force: bool = False
) -> Path:
    """Write the distribution into ``directory/limner-NAME``, which must not exist yet.

    The files are written into a temporary folder beside it, moved into place in one rename:
    a failure leaves nothing behind, and the same command can be run again. A name whose
    distribution or package is installed already is refused unless ``force``: the new plugin
    would shadow it. ``OSError`` when the files cannot be written.
    """
    names = plugin_names(name)
    target = directory / names["dist"]
    if os.path.lexists(target):  # a dangling symlink too
        raise InvalidInput(f"{target} already exists; pick another name or directory", field="name")
    shadowed = None if force else installed_as(name)
    if shadowed is not None:
        raise InvalidInput(
            f"{names['dist']} would shadow {shadowed}, which is installed; pick another name "
            "(or pass --force to write it anyway)",
            field="name",
        )
    files = render_plugin(name, capability)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".{names['dist']}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    try:
        for path, text in files.items():
            destination = staging / path
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text(text, encoding="utf-8")
        if os.path.lexists(target):  # made meanwhile: never replaced
            raise InvalidInput(
                f"{target} already exists; pick another name or directory", field="name"
            )
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
