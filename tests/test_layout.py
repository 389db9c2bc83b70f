"""docs/architecture.md's layout is the tree's: every module and package of core/limner is
listed, and everything listed is there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core" / "limner"


def listed() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("This block is checked against")[1].split("```")[1]
    return {match.group(1) for match in re.finditer(r"^(core/limner/\S+)", block, re.M)}


def in_the_tree() -> set[str]:
    """core/limner's modules, its packages, and the packages inside plugin/."""
    found = {f"core/limner/{path.name}" for path in CORE.glob("*.py")}
    found |= {
        f"core/limner/{path.name}/"
        for path in CORE.iterdir()
        if path.is_dir() and (path / "__init__.py").exists()
    }
    found |= {
        f"core/limner/plugin/{path.name}/"
        for path in (CORE / "plugin").iterdir()
        if path.is_dir() and (path / "__init__.py").exists()
    }
    return found


def test_the_layout_lists_the_tree() -> None:
    assert listed() == in_the_tree()


def test_the_check_reads_the_block() -> None:
    entries = listed()
    assert "core/limner/_pool/" in entries and "core/limner/runtime.py" in entries
    assert len(entries) >= 15
