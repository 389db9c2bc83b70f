"""``limner new-plugin``: a complete plugin distribution, written from templates.

The templates are the two example plugins of the repository (examples/plugins/limner-acme,
an image embedder over a transformers model, and examples/plugins/limner-acme-diffusion, a
diffusers text-to-image model) with their names as placeholders: what a new plugin starts
from is code that limner's tests run, and its own tests, limner's conformance suite, pass
as soon as it is installed.
"""

from __future__ import annotations

import re
import string
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from limner._spec import Capability
from limner.errors import InvalidInput

__all__ = ["plugin_names", "render_plugin", "write_plugin"]

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def plugin_names(name: str) -> dict[str, str]:
    """The placeholders of the templates for a plugin ``name`` (``acme-demo``, or
    ``limner-acme-demo``): the entry point and key namespace ``name``, the distribution
    ``dist``, the ``package``, the ``module`` of its tests and its ``Class`` prefix."""
    short = name.removeprefix("limner-")
    if not _NAME.match(short):
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


def write_plugin(name: str, capability: Capability | str, directory: Path) -> Path:
    """Write the distribution into ``directory/limner-NAME``, which must not exist yet."""
    target = directory / plugin_names(name)["dist"]
    if target.exists():
        raise InvalidInput(f"{target} already exists; pick another name or directory", field="name")
    for path, text in render_plugin(name, capability).items():
        destination = target / path
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(text, encoding="utf-8")
    return target
