"""limner.plugin is the one contract plugins import, limner.runtime the one runtimes add: their
names sorted and importable, and neither the plugins nor limner.diffusion, limner.server or
limner.ray reach past them into the core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import limner
import limner.diffusion
import limner.plugin
import limner.runtime

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core" / "limner"
PLUGIN_PACKAGES = sorted(ROOT.glob("plugins/*/limner_*"))
#: What a plugin package may import of limner.
PLUGIN_MAY_IMPORT = {"limner.plugin", "limner.diffusion", "limner.errors"}
#: What a wing (limner.diffusion, .server, .ray) may import of the one private core module it
#: may reach, limner._exports: how public names are presented, and deprecated ones (names,
#: a runtime's calls) warn.
WING_MAY_IMPORT = {"CallsOfTheLastRelease", "present_as_public", "warn_deprecated"}


def isort_style(name: str) -> tuple[int, str]:  # ruff's RUF022 order
    group = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return group, name


@pytest.mark.parametrize(
    "module", [limner.plugin, limner.diffusion, limner.runtime], ids=lambda m: m.__name__
)
def test_public_names_are_sorted_and_importable(module: ModuleType) -> None:
    names = module.__all__
    assert names == sorted(names, key=isort_style)
    for name in names:
        assert hasattr(module, name), name


@pytest.mark.parametrize("module", ["limner.plugin", "limner.diffusion", "limner.runtime"])
def test_importing_it_imports_no_heavy_library(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = {'torch', 'diffusers', 'transformers', 'huggingface_hub'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_host_api_and_the_plugin_contract_share_their_common_names() -> None:
    """A name in both is one object: a spec a plugin builds is the spec a host registers."""
    for name in set(limner.__all__) & set(limner.plugin.__all__):
        assert getattr(limner, name) is getattr(limner.plugin, name), name


Import = tuple[int, str, tuple[str, ...]]
"""An import: its line, the absolute module, and the names taken from it (none for
``import m``)."""


def module_name(path: Path) -> str:
    """The dotted name of a source file of the core or of a plugin package."""
    root = CORE.parent if path.is_relative_to(CORE) else path.parents[len(path.parents) - 1]
    for package in PLUGIN_PACKAGES:
        if path.is_relative_to(package):
            root = package.parent
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, *, is_package: bool = False) -> list[Import]:
    """Every import in ``source``, the source of ``module``, relative ones made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            absolute = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                absolute = ".".join([*anchor, *filter(None, [node.module])])
            found.append((node.lineno, absolute, tuple(alias.name for alias in node.names)))
    return found


def imports_of(path: Path) -> list[Import]:
    source = path.read_text(encoding="utf-8")
    return imports(source, module_name(path), is_package=path.name == "__init__.py")


def private_core_module(module: str) -> bool:
    """``limner._x`` (and below it): a private module of the core package itself; not a
    dunder such as ``limner.__version__``."""
    parts = module.split(".")
    return (
        parts[0] == "limner"
        and len(parts) > 1
        and parts[1].startswith("_")
        and not parts[1].startswith("__")
    )


def reaches_private_core(imported: Import) -> bool:
    _, module, names = imported
    return private_core_module(module) or any(
        private_core_module(f"{module}.{name}") for name in names
    )


def outside_plugin_contract(imported: Import) -> bool:
    _, module, names = imported
    if module != "limner" and not module.startswith("limner."):
        return False
    if any(module == m or module.startswith(f"{m}.") for m in PLUGIN_MAY_IMPORT):
        return False
    # ``from limner import errors`` is an import of limner.errors; ``import limner`` is not
    return not names or any(f"{module}.{name}" not in PLUGIN_MAY_IMPORT for name in names)


def source_files(*directories: Path) -> list[Path]:
    return sorted(path for directory in directories for path in directory.rglob("*.py"))


@pytest.mark.parametrize(
    "path",
    source_files(CORE / "diffusion", CORE / "server", CORE / "ray", *PLUGIN_PACKAGES),
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_no_private_core_module_is_imported(path: Path) -> None:
    found = [imported for imported in imports_of(path) if reaches_private_core(imported)]
    if path.is_relative_to(CORE):  # a wing's __init__ presents its names as limner's do
        found = [
            imported
            for imported in found
            if imported[1] != "limner._exports" or not set(imported[2]) <= WING_MAY_IMPORT
        ]
    assert found == []


@pytest.mark.parametrize(
    "path", source_files(*PLUGIN_PACKAGES), ids=lambda path: str(path.relative_to(ROOT))
)
def test_plugins_import_only_the_plugin_contract(path: Path) -> None:
    assert [imported for imported in imports_of(path) if outside_plugin_contract(imported)] == []


def test_the_checks_see_what_they_look_for() -> None:
    """Relative imports are resolved and every way of reaching a private module is caught,
    so the tests above pass for the right reason."""
    assert len(PLUGIN_PACKAGES) == 3
    assert module_name(CORE / "diffusion" / "_backend.py") == "limner.diffusion._backend"
    assert module_name(CORE / "server" / "__init__.py") == "limner.server"
    assert module_name(PLUGIN_PACKAGES[0] / "_backend.py").endswith("._backend")
    source = (
        "from .._spec import ModelSpec\n"
        "import limner._pool\n"
        "from limner import _weights, __version__\n"
        "from . import _config\n"
        "from limner.plugin import hookimpl\n"
    )
    found = imports(source, "limner.diffusion._backend")
    assert [module for _, module, _ in found] == [
        "limner._spec",
        "limner._pool",
        "limner",
        "limner.diffusion",
        "limner.plugin",
    ]
    assert [reaches_private_core(imported) for imported in found] == [
        True,
        True,
        True,
        False,
        False,
    ]
    plugin_source = "import limner\nfrom limner import errors\nfrom limner import Registry\n"
    found = imports(plugin_source, "limner_acme._backend")
    assert [outside_plugin_contract(imported) for imported in found] == [True, False, True]
