"""LoRA adapters on the command line, its commands run in this process as tests/test_cli.py
runs them: `limner loras`, `limner generate --lora NAME:SCALE --lora-dir DIR` (the Python
API's pixels), each bad --lora a one-line usage error naming the flag before any model loads,
and `limner serve --lora-dir`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from limner import ImageGenerationConfig, Registry
from limner._cli import run
from limner._registry import _registry as registry_module

limner_flux = pytest.importorskip("limner_flux")

FLUX = "limner/tiny-flux"


@pytest.fixture(scope="module")
def folder(lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("cli-loras") / "loras"
    shutil.copytree(lora_dir, copy)
    (copy / "junk.safetensors").write_bytes(b"junk")
    return copy


@pytest.fixture(autouse=True)
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's default registry is put back after each command."""
    monkeypatch.setattr(registry_module, "_default", None)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    environment = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path_factory.mktemp("hf-cache")),
        "HF_HUB_OFFLINE": "1",
        "LIMNER_PLUGINS": "flux,sd35",
        "LIMNER_CONFIG_DIR": str(tmp_path_factory.mktemp("config")),
    }
    for name in ("LIMNER_GENERATE_MODEL", "LIMNER_MEMORY_BUDGET", "LIMNER_LORA_DIRS"):
        environment.pop(name, None)
    return environment


def limner(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``limner ARGS`` run in this process with ``env`` as its environment: its exit status
    and output as a subprocess's."""
    changed: dict[str, str | None] = {
        name: value for name, value in env.items() if os.environ.get(name) != value
    }
    changed.update({name: None for name in os.environ if name not in env})
    registry_module._default = None  # a command's registry is its own environment's
    with CliRunner().isolation(env=changed) as (stdout, stderr, _):
        code = run(args)
        sys.stdout.flush()
        sys.stderr.flush()
        out, err = stdout.getvalue().decode(), stderr.getvalue().decode()
    registry_module._default = None
    return subprocess.CompletedProcess(["limner", *args], code, out, err)


def test_loras_lists_the_adapters_and_says_which_cannot_be_used(
    env: dict[str, str], folder: Path
) -> None:
    table = limner(env, "loras", "--lora-dir", str(folder))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "RANK", "SIZE", "MODELS", "FILE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == ["ink", "moss", "oil", "tea"]
    assert rows["ink"][1:3] == ["FLUX.1", "4"] and rows["ink"][5] == FLUX
    assert rows["moss"][5] == "limner/tiny-sd35"
    assert rows["oil"][-1] == str(folder / "oil.safetensors")
    assert table.stderr.strip() == (
        f"Unusable adapter junk: {folder / 'junk.safetensors'} is not a safetensors file: "
        "it holds 4 bytes"
    )
    listed = limner({**env, "LIMNER_LORA_DIRS": str(folder)}, "loras", "--json")
    document = {entry["name"]: entry for entry in json.loads(listed.stdout)}
    assert document["oil"]["rank"] == 8 and document["oil"]["models"] == [FLUX]
    assert document["junk"]["models"] == [] and document["junk"]["reason"]


def test_loras_needs_a_folder(env: dict[str, str], tmp_path: Path) -> None:
    missing = limner(env, "loras")
    assert missing.returncode == 2 and "--lora-dir DIR" in missing.stderr
    nowhere = limner(env, "loras", "--lora-dir", str(tmp_path / "nowhere"))
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr


def test_generate_with_adapters_makes_the_python_apis_pixels(
    env: dict[str, str], folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fox.png"
    args = ["generate", "a fox", "-m", FLUX, "--size", "32x32", "--steps", "2", "--seed", "7"]
    made = limner(
        env, *args, "--lora-dir", str(folder), "--lora", "oil:0.5", "--lora", "ink", "-o", str(out)
    )
    assert made.returncode == 0, made.stderr
    registry = Registry(entry_points=False, lora_dirs=[folder])
    registry.register_plugin(limner_flux)
    backend: Any = registry.generator(FLUX).backend
    backend.load()
    config = backend.resolve_config(
        ImageGenerationConfig(
            width=32, height=32, steps=2, seed=7, loras=[("ink", 1), ("oil", 0.5)]
        )
    )
    expected = backend.generate("a fox", config, on_step=lambda _: None).images[0]
    backend.unload()
    with Image.open(out) as image:
        assert np.array_equal(np.asarray(image), np.asarray(expected))
        settings = json.loads(image.info["limner"])
    assert settings["loras"] == [["oil", 0.5], ["ink", 1.0]]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--lora", "tea:1"], "loras[0].name: "),
        (["--lora", "ink:1", "--lora", "oil:9"], "loras[1].scale: must be between -4 and 4"),
        (["--lora", "ink:x"], "'ink:x': the scale after ':' must be a number"),
        (["--lora", "../ink"], "never a path"),
    ],
)
def test_a_bad_lora_is_a_usage_error_naming_the_flag(
    env: dict[str, str], folder: Path, tmp_path: Path, flags: list[str], words: str
) -> None:
    args = [
        "generate",
        "a fox",
        "-m",
        FLUX,
        "--lora-dir",
        str(folder),
        "-o",
        str(tmp_path / "x.png"),
    ]
    refused = limner(env, *args, *flags)
    assert refused.returncode == 2
    error = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and error[0].startswith("Error: Invalid value for '--lora': ")
    assert words in error[0]
    assert not (tmp_path / "x.png").exists()


def test_serve_looks_adapters_up_in_its_folders(served_apps: list[Any], folder: Path) -> None:
    from limner._cli import cli

    result = CliRunner().invoke(cli, ["serve", "--port", "0", "--no-ui", "--lora-dir", str(folder)])
    assert result.exit_code == 0, result.output
    registry = served_apps[-1].state.limner.registry
    assert registry.lora_dirs == (str(folder.resolve()),)
    assert registry.settings(FLUX).lora_dirs == (str(folder.resolve()),)
