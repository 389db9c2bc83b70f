"""The docs keep up with the code: one section per hook with its signature, every public name
exported sorted, every name of the plugin contract documented, the plugin guide's code the
example plugins' own."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import limner
import limner.plugin
import limner.plugin.testing
from limner._registry import _hookspecs

ROOT = Path(__file__).resolve().parent.parent


def hook_names() -> set[str]:
    return {name for name in dir(_hookspecs) if name.startswith("limner_")}


def test_every_hook_has_exactly_one_documented_section() -> None:
    text = (ROOT / "docs" / "plugins.md").read_text()
    hooks_part = text.split("\n## Hooks\n", 1)[1]
    sections = re.findall(r"^### (\w+)\(", hooks_part, flags=re.MULTILINE)
    assert sorted(sections) == sorted(hook_names())
    assert len(sections) == len(set(sections))


def test_public_names_are_sorted_and_importable() -> None:
    def isort_style(name: str) -> tuple[int, str]:  # ruff's RUF022 order
        group = 0 if name.isupper() else 1 if name[0].isupper() else 2
        return group, name

    assert limner.__all__ == sorted(limner.__all__, key=isort_style)
    for name in limner.__all__:
        assert hasattr(limner, name), name


def test_errors_module_lists_every_error() -> None:
    exported = set(limner.errors.__all__)
    defined = {
        name
        for name, value in vars(limner.errors).items()
        if isinstance(value, type) and issubclass(value, Exception)
    }
    assert defined <= exported


PLUGINS_MD = ROOT / "docs" / "plugins.md"
EXAMPLE_MODULES = [
    ROOT / "examples" / "plugins" / "limner-acme" / "limner_acme" / "__init__.py",
    ROOT
    / "examples"
    / "plugins"
    / "limner-acme-diffusion"
    / "limner_acme_diffusion"
    / "__init__.py",
]


def test_each_hook_section_shows_the_hookspec_signature() -> None:
    hooks_part = PLUGINS_MD.read_text().split("\n## Hooks\n", 1)[1]
    sections = re.findall(r"^### (\w+)\(([^)]*)\)", hooks_part, flags=re.MULTILINE)
    assert sections, "no hook sections"
    for name, parameters in sections:
        documented = [p.strip() for p in parameters.split(",") if p.strip()]
        expected = list(inspect.signature(getattr(_hookspecs, name)).parameters)
        assert documented == expected, name


@pytest.mark.parametrize(
    "module", [limner.plugin, limner.plugin.testing], ids=lambda module: module.__name__
)
def test_every_public_name_of_the_plugin_contract_is_documented(module: ModuleType) -> None:
    text = PLUGINS_MD.read_text()
    missing = [name for name in module.__all__ if not re.search(rf"`{name}\b", text)]
    assert missing == [], f"docs/plugins.md does not mention {missing}"


def excerpts() -> list[tuple[str, str]]:
    """``(path, code)`` of every code block the guide says is taken from a file."""
    found = re.findall(
        r"^<!-- from (\S+) -->\n```\w*\n(.*?)^```$", PLUGINS_MD.read_text(), re.M | re.S
    )
    return [(path, code) for path, code in found]


def test_the_guides_code_is_the_code_the_tests_run() -> None:
    """Every block taken from a file is in that file, verbatim: the example plugins, which
    the test suite runs (their tests are limner's conformance suite)."""
    blocks = excerpts()
    assert {path for path, _ in blocks} >= {str(path.relative_to(ROOT)) for path in EXAMPLE_MODULES}
    for path, code in blocks:
        assert code in (ROOT / path).read_text(), f"a block differs from {path}"


@pytest.mark.parametrize("path", EXAMPLE_MODULES, ids=lambda path: path.parent.name)
def test_the_guide_walks_through_every_definition_of_the_examples(path: Path) -> None:
    shown = "\n".join(code for _, code in excerpts())
    source = path.read_text()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
            segment = ast.get_source_segment(source, node)
            assert segment is not None and segment in shown, segment
