"""docs/api.md lists exactly what each public module exports, under the module's heading,
one table row a name, as datasette documents each of its hooks: a new name without a line
there, or a line for a name that went, fails here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "api.md"


def documented() -> dict[str, list[str]]:
    """Each ``## `module``` section's names, in the order its table lists them."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in PAGE.read_text().splitlines():
        heading = re.fullmatch(r"## `([\w.]+)`", line)
        if heading:
            current = sections.setdefault(heading.group(1), [])
        elif line.startswith("## "):
            current = None
        elif current is not None and (row := re.match(r"\| `(\w+)` \|", line)):
            current.append(row.group(1))
    return sections


SECTIONS = documented()


def public_modules() -> list[str]:
    """Every module of core/limner whose dotted name has no part starting with ``_``."""
    core = ROOT / "core"
    found = []
    for path in (core / "limner").rglob("*.py"):
        parts = list(path.relative_to(core).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if not any(part.startswith("_") for part in parts):
            found.append(".".join(parts))
    return sorted(found)


def test_the_page_has_a_section_for_each_public_module() -> None:
    assert sorted(SECTIONS) == public_modules()


@pytest.mark.parametrize("module", sorted(SECTIONS))
def test_each_section_lists_exactly_what_its_module_exports(module: str) -> None:
    exported = importlib.import_module(module).__all__
    assert SECTIONS[module] == list(exported), f"docs/api.md's `{module}` and its __all__"
