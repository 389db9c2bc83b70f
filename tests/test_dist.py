"""`make dist` builds the four wheels, and what they install works: the README's second way
to install, tested as a user would follow it (less the download of the dependencies, which
the running interpreter already has)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEELS = {"limner", "limner_clip", "limner_flux", "limner_sd35"}

pytestmark = [
    pytest.mark.packaging,  # builds the wheels, installs them
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheels, built with the Makefile by the interpreter running the tests (its pip
    builds each in an isolated environment with hatchling)."""
    folder = tmp_path_factory.mktemp("dist")
    venv = Path(sys.prefix)
    result = subprocess.run(
        ["make", "-C", str(ROOT), "dist", f"DIST={folder}", f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


def test_make_dist_builds_the_four_wheels(dist: Path) -> None:
    wheels = sorted(dist.glob("*.whl"))
    assert {wheel.name.split("-")[0] for wheel in wheels} == WHEELS
    with zipfile.ZipFile(next(dist.glob("limner-*.whl"))) as core:
        names = set(core.namelist())
    assert {"limner/py.typed", "limner/server/static/app.js", "limner/_cli/__init__.py"} <= names
    assert not any(name.startswith(("tests/", "plugins/")) for name in names)


def test_the_wheels_install_and_run(dist: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"),
            *("--no-deps", "--target", str(target)),
            *map(str, sorted(dist.glob("*.whl"))),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(target),  # the wheels' code and metadata, and nothing from the clone
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "HF_HUB_OFFLINE": "1",
        "LIMNER_CONFIG_DIR": str(tmp_path / "config"),
    }
    env.pop("LIMNER_PLUGINS", None)
    where = subprocess.run(
        [sys.executable, "-c", "import limner, limner_clip; print(limner.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(target))
    listed = subprocess.run(
        [sys.executable, "-m", "limner", "models", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    plugins = {p["distribution"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert {"limner-clip", "limner-flux", "limner-sd35"} <= set(plugins)
    assert all(plugin["error"] is None for plugin in plugins.values())
    embedded = subprocess.run(
        [sys.executable, "-m", "limner", "embed", "--text", "a red fox", "-m", "limner/tiny-clip"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert embedded.returncode == 0, embedded.stderr
    assert embedded.stdout.startswith("a red fox\t")
