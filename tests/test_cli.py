"""The CLI through a real subprocess, on the tiny CLIP model, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from tests.conftest import LocalHTTPServer

TINY = "limner/tiny-clip"
TINY_DIMENSION = 64

pytest.importorskip("limner_clip", reason="the CLI tests use the CLIP plugin's tiny model")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An isolated, offline Hugging Face cache shared by this module's subprocesses."""
    cache = tmp_path_factory.mktemp("hf-cache")
    return {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "LIMNER_PLUGINS": "clip",
    }


def limner(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "limner", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    jpeg = root / "photo.jpg"
    Image.new("RGB", (640, 480), (200, 80, 40)).save(jpeg, quality=90)
    png = root / "nested" / "logo.png"
    png.parent.mkdir()
    Image.new("RGBA", (120, 90), (10, 200, 30, 128)).save(png)
    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(jpeg.read_bytes()[:200])
    return {"jpeg": jpeg, "png": png, "corrupt": corrupt, "root": root}


def test_help_everywhere(env: dict[str, str]) -> None:
    for command in ([], ["models"], ["embed"]):
        result = limner(env, *command, "--help")
        assert "Usage:" in result.stdout


def test_models_json_lists_clip_keys(env: dict[str, str]) -> None:
    document = json.loads(limner(env, "models", "--json").stdout)
    models = {model["key"]: model for model in document["models"]}
    assert models["openai/clip-vit-base-patch32"]["embedding_dimension"] == 512
    assert models["openai/clip-vit-large-patch14-336"]["embedding_dimension"] == 768
    assert models[TINY]["embedding_dimension"] == TINY_DIMENSION
    assert models[TINY]["tiny"] is True
    assert models[TINY]["distribution"] == "limner-clip"
    assert all(plugin["error"] is None for plugin in document["plugins"])


def test_models_table(env: dict[str, str]) -> None:
    out = limner(env, "models").stdout
    assert f"{TINY} (tiny)" in out
    assert "openai/clip-vit-base-patch32" in out


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_embed_jpeg_png_and_url(
    env: dict[str, str], images: dict[str, Path], http_server: LocalHTTPServer
) -> None:
    url = http_server.route(
        "/remote.jpg", body=images["jpeg"].read_bytes(), content_type="image/jpeg"
    )
    out = limner(
        env, "embed", str(images["jpeg"]), str(images["png"]), url, "--model", TINY, "--json"
    ).stdout
    records = parse_json_lines(out)
    assert [record["input"] for record in records] == [str(images["jpeg"]), str(images["png"]), url]
    vectors = np.array([record["embedding"] for record in records], dtype=np.float32)
    assert vectors.shape == (3, TINY_DIMENSION)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert np.allclose(vectors[0], vectors[2], atol=1e-5)  # same bytes, by path and by URL


def test_embed_plain_output_and_directory(env: dict[str, str], images: dict[str, Path]) -> None:
    out = limner(env, "embed", str(images["png"]), "--model", TINY).stdout
    label, floats = out.strip().split("\t")
    assert label == str(images["png"])
    assert len(floats.split()) == TINY_DIMENSION


def test_embed_npy(env: dict[str, str], images: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "sub" / "vectors.npy"
    out = limner(
        env, "embed", str(images["jpeg"]), str(images["png"]), "--model", TINY, "--npy", str(target)
    ).stdout
    array = np.load(target)
    assert array.shape == (2, TINY_DIMENSION) and array.dtype == np.float32
    assert out.splitlines() == [f"0\t{images['jpeg']}", f"1\t{images['png']}"]


def test_corrupt_file_is_one_line_error_and_others_still_embed(
    env: dict[str, str], images: dict[str, Path]
) -> None:
    result = limner(
        env, "embed", str(images["corrupt"]), str(images["jpeg"]), "--model", TINY, check=False
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert "corrupt.jpg" in errors[0]
    assert "Traceback" not in result.stderr
    assert len(result.stdout.splitlines()) == 1  # the good input still came out


def test_single_corrupt_file_fails(env: dict[str, str], images: dict[str, Path]) -> None:
    result = limner(env, "embed", str(images["corrupt"]), "--model", TINY, check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def test_unknown_model_suggests(env: dict[str, str], images: dict[str, Path]) -> None:
    result = limner(env, "embed", str(images["jpeg"]), "--model", "limner/tiny-clp", check=False)
    assert result.returncode == 1
    assert "Did you mean: limner/tiny-clip" in result.stderr
    assert "Traceback" not in result.stderr
    debug = limner(
        env, "--debug", "embed", str(images["jpeg"]), "--model", "limner/tiny-clp", check=False
    )
    assert "Traceback" in debug.stderr


def test_embed_text(env: dict[str, str]) -> None:
    out = limner(env, "embed", "--text", "a red fox", "a lighthouse", "--model", TINY, "--json")
    records = parse_json_lines(out.stdout)
    assert [record["input"] for record in records] == ["a red fox", "a lighthouse"]
    assert all(len(record["embedding"]) == TINY_DIMENSION for record in records)


def test_usage_errors_exit_2(env: dict[str, str], images: dict[str, Path]) -> None:
    result = limner(env, "embed", str(images["jpeg"]), check=False)
    assert result.returncode == 2
    assert "--model" in result.stderr
    both = limner(
        env, "embed", str(images["jpeg"]), "-m", TINY, "--json", "--npy", "x.npy", check=False
    )
    assert both.returncode == 2
