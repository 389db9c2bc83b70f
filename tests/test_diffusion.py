"""limner.diffusion: cheap to import, its names sorted and importable."""

from __future__ import annotations

import subprocess
import sys

import limner.diffusion


def test_importing_it_imports_no_heavy_library() -> None:
    code = (
        "import sys, limner.diffusion\n"
        "heavy = {'torch', 'diffusers', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_are_sorted_and_importable() -> None:
    def isort_style(name: str) -> tuple[int, str]:  # ruff's RUF022 order
        group = 0 if name.isupper() else 1 if name[0].isupper() else 2
        return group, name

    names = limner.diffusion.__all__
    assert names == sorted(names, key=isort_style)
    for name in names:
        assert hasattr(limner.diffusion, name), name
