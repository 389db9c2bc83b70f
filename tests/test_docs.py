"""The docs keep up with the code: one section per hook, every public name exported sorted."""

from __future__ import annotations

import re
from pathlib import Path

import limner
from limner import _hookspecs

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
