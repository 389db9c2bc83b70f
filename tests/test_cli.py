"""The CLI on the tiny CLIP and FLUX models, offline: in this process where a process of its
own adds nothing (``run``, as ``main`` runs a command), and as a real subprocess where it
does (what the libraries print, which modules a command imports, signals, the hub's own
settings, which it reads once per process)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import limner._registry._registry as registry_module
from limner._cli import run

if TYPE_CHECKING:
    from tests.conftest import LocalHTTPServer

TINY = "limner/tiny-clip"
TINY_DIMENSION = 64
TINY_FLUX = "limner/tiny-flux"

pytest.importorskip("limner_clip", reason="the CLI tests use the CLIP plugin's tiny model")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An isolated, offline Hugging Face cache shared by this module's commands."""
    cache = tmp_path_factory.mktemp("hf-cache")
    environment = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "LIMNER_PLUGINS": "clip,flux",
        # No defaults saved by whoever runs the tests, nor theirs overwritten.
        "LIMNER_CONFIG_DIR": str(tmp_path_factory.mktemp("config")),
    }
    for name in ("LIMNER_EMBED_MODEL", "LIMNER_GENERATE_MODEL", "LIMNER_MEMORY_BUDGET"):
        environment.pop(name, None)
    return environment


@pytest.fixture(autouse=True)
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command builds its default registry from its own environment (LIMNER_PLUGINS),
    as a process of its own would, and the suite's is put back after the test."""
    monkeypatch.setattr(registry_module, "_default", None)


def limner(
    env: dict[str, str], *args: str, check: bool = True, stdin: str | Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``limner ARGS`` run in this process with ``env`` as its environment; ``stdin`` is
    text to send, or a file to send. Its exit status and output as a subprocess's."""
    data = stdin.read_bytes() if isinstance(stdin, Path) else stdin
    changed: dict[str, str | None] = {
        name: value for name, value in env.items() if os.environ.get(name) != value
    }
    changed.update({name: None for name in os.environ if name not in env})
    registry_module._default = None  # a command's registry is its own environment's
    with CliRunner().isolation(input=data, env=changed) as (stdout, stderr, _):
        code = run(args)
        sys.stdout.flush()
        sys.stderr.flush()
        out, err = stdout.getvalue().decode(), stderr.getvalue().decode()
    registry_module._default = None
    if check and code != 0:
        raise AssertionError(f"exit {code}\n{out}\n{err}")
    return subprocess.CompletedProcess(["limner", *args], code, out, err)


def limner_process(
    env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``limner ARGS`` in a subprocess, for what only a process of its own shows."""
    result = subprocess.run(
        [sys.executable, "-m", "limner", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
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


@pytest.mark.subprocess
def test_debug_shows_the_traceback(env: dict[str, str], images: dict[str, Path]) -> None:
    debug = limner_process(
        env, "--debug", "embed", str(images["jpeg"]), "--model", "limner/tiny-clp", check=False
    )
    assert "Traceback" in debug.stderr
    assert "Did you mean: limner/tiny-clip" in debug.stderr


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


# -- a newcomer's first hour: quiet, one-line errors, the knobs --------------------------------


def needs_flux() -> None:
    pytest.importorskip("limner_flux", reason="generates with the FLUX plugin's tiny model")


def generate_tiny(
    env: dict[str, str], prompt: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``limner generate PROMPT -m limner/tiny-flux ARGS``; skipped without the FLUX plugin."""
    needs_flux()
    return limner(env, "generate", prompt, "-m", TINY_FLUX, *args, check=check)


NOISE = ("Loading", "[transformers]", "torchvision", "Warning", "%|", "\x1b[")


@pytest.mark.subprocess
def test_embed_prints_nothing_of_its_libraries(
    env: dict[str, str], images: dict[str, Path]
) -> None:
    result = limner_process(env, "embed", str(images["png"]), "--model", TINY, "--no-progress")
    assert result.stderr == ""
    text = limner_process(env, "embed", "--text", "a fox", "--model", TINY)
    assert text.stderr == ""


def test_generate_prints_only_its_seed_line(env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    result = generate_tiny(env, "a lighthouse", "--seed", "7", "-o", str(target))
    assert result.stdout.splitlines() == [str(target)]
    # The time is the whole command's, what the user waited, and the model's parts of it.
    timing = r"in (\d+\.\d) s \(loading (\d+\.\d) s, generating (\d+\.\d) s\)"
    found = re.fullmatch(rf"seed 7 {timing}\n", result.stderr)
    assert found, result.stderr
    waited, loading, generating = map(float, found.groups())
    assert waited >= loading + generating - 0.1  # each rounded to a tenth


@pytest.mark.subprocess
def test_progress_says_loading_then_counts_steps(env: dict[str, str], tmp_path: Path) -> None:
    """The bar starts once the model is loaded; what the libraries draw never shows."""
    needs_flux()
    args = ("generate", "x", "-m", TINY_FLUX, "--steps", "3", "-o", str(tmp_path / "a.png"))
    result = limner_process(env, *args, "--progress")
    assert re.search(rf"^loading {TINY_FLUX} \.\.\. \d+\.\d s$", result.stderr, re.MULTILINE)
    loaded = result.stderr.index("loading")
    assert result.stderr.index("3/3", loaded) > loaded
    for noise in ("Loading", "[transformers]", "torchvision", "Warning"):
        assert noise not in result.stderr


@pytest.mark.subprocess
def test_verbose_shows_limners_log(env: dict[str, str], images: dict[str, Path]) -> None:
    result = limner_process(env, "--verbose", "embed", str(images["png"]), "--model", TINY)
    assert f"limner.pool: loaded {TINY} on cpu" in result.stderr


def test_a_load_failure_is_one_line(env: dict[str, str], images: dict[str, Path]) -> None:
    result = limner(
        env, "embed", str(images["png"]), "--model", TINY, "--device", "cuda:99", check=False
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: device 'cuda:99'"), lines


@pytest.mark.parametrize(
    ("out", "says"),
    [
        ("gen/noext", "has no suffix"),
        ("picture.txt", "'.txt' is not an image format"),
        ("blocker/in/the/way.png", "is not a directory"),
        ("folder.png", "is a directory"),
    ],
)
def test_a_bad_out_fails_in_one_line_before_any_model_loads(
    env: dict[str, str], tmp_path: Path, out: str, says: str
) -> None:
    needs_flux()
    (tmp_path / "blocker").write_text("a file where a directory would go")
    (tmp_path / "folder.png").mkdir()
    target = str(tmp_path / out)
    # cuda:99 would fail the load: only a check made before loading can speak first.
    result = generate_tiny(env, "x", "--device", "cuda:99", "-o", target, check=False)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: Invalid value for '-o'"), lines
    assert says in lines[0]
    assert sorted(tmp_path.iterdir()) == [tmp_path / "blocker", tmp_path / "folder.png"]


HEAVY_MODULES = ("torch", "transformers", "diffusers")

# `limner ARGS`, then on stderr's last line which heavy libraries the process had imported.
RUN_AND_TELL_IMPORTS = f"""
import sys
from limner._cli import main
try:
    main(sys.argv[1:])
finally:
    print("imported:", *sorted(set({HEAVY_MODULES!r}) & set(sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (
            ("generate", "", "-m", TINY_FLUX, "-o", "out.png"),
            2,
            "Error: Invalid value for 'PROMPT': prompt must be a non-empty string",
        ),
        (
            ("generate", " \n", "-m", TINY_FLUX, "-o", "out.png"),
            2,
            "Error: Invalid value for 'PROMPT': prompt must be a non-empty string",
        ),
        (("embed", "missing.png", "-m", TINY), 1, "Error: 'missing.png': no such file"),
        (
            ("embed", "missing.png", "ftp://example.com/a.png", "-m", TINY),
            1,
            "Error: input #0 'missing.png': no such file",
        ),
        (
            ("generate", "x", "-m", TINY_FLUX, "-o", "out.png", "--width", "100"),
            2,
            "Error: Invalid value for '--width': must be a multiple of 16 for limner/tiny-flux, "
            "got 100 (try 96 or 112)",
        ),
        (
            ("generate", "x", "-m", TINY_FLUX, "-o", "out.png", "--size", "64x100"),
            2,
            "Error: Invalid value for '--size': height must be a multiple of 16 for "
            "limner/tiny-flux, got 100 (try 96 or 112)",
        ),
        (
            ("generate", "x", "-m", TINY_FLUX, "-o", "out.png", "--num-images", "9"),
            2,
            "Error: Invalid value for '--num-images': must be between 1 and 4, got 9",
        ),
    ],
)
@pytest.mark.subprocess
def test_bad_input_fails_before_any_heavy_import(
    env: dict[str, str], tmp_path: Path, args: tuple[str, ...], code: int, error: str
) -> None:
    """An empty prompt, a missing file or a bad setting is told before the model loads:
    without torch, transformers or diffusers imported (the loads import them)."""
    if "generate" in args:
        needs_flux()
    result = subprocess.run(
        [sys.executable, "-c", RUN_AND_TELL_IMPORTS, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == error, lines
    assert lines[-1] == "imported:", lines
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def edit_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64x48 source, OpenAI's mask of its middle (transparent there), one of 8x8, and a
    file that is no image."""
    root = tmp_path_factory.mktemp("edit")
    pixels = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "in.png")
    mask = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 8, 48, 40))
    mask.save(root / "mask.png")
    Image.new("L", (8, 8)).save(root / "small.png")
    (root / "text.png").write_text("not an image")
    return root


def test_generate_edits_an_image_inside_its_mask(
    env: dict[str, str], edit_inputs: Path, tmp_path: Path
) -> None:
    source = edit_inputs / "in.png"
    edit = ("--image", str(source), "--mask", str(edit_inputs / "mask.png"), "--strength", "0.8")
    for name in ("a.png", "b.png"):
        generate_tiny(
            env, "a red hat", *edit, "--seed", "3", "--steps", "2", "-o", str(tmp_path / name)
        )
    with Image.open(tmp_path / "a.png") as first, Image.open(tmp_path / "b.png") as second:
        assert first.size == (64, 48)  # the image's size: no --size given
        out, again = np.asarray(first.convert("RGB")), np.asarray(second.convert("RGB"))
        settings = json.loads(first.text["limner"])  # type: ignore[attr-defined]
    original = np.asarray(Image.open(source))
    outside = np.ones((48, 64), dtype=bool)
    outside[8:40, 16:48] = False
    assert np.array_equal(out[outside], original[outside])
    assert not np.array_equal(out[~outside], original[~outside])
    assert np.array_equal(out, again)  # the same seed, the same edit
    assert settings["strength"] == 0.8 and settings["edit"] == "inpaint"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--image", "missing.png"), "Error: Invalid value for '--image': no such file"),
        (("--image", "text.png"), "Error: Invalid value for '--image': not an image"),
        (
            ("--image", "in.png", "--mask", "small.png"),
            "Error: Invalid value for '--mask': the mask is 8x8 and the image 64x48; they must "
            "be the same size",
        ),
        (
            ("--image", "in.png", "--strength", "1.5"),
            "Error: Invalid value for '--strength': must be a number from 0 to 1, got 1.5",
        ),
        (("--mask", "mask.png"), "Error: --mask edits an image: give the image with --image"),
        (("--strength", "0.5"), "Error: --strength edits an image: give the image with --image"),
    ],
)
@pytest.mark.subprocess
def test_a_bad_edit_fails_before_any_heavy_import(
    env: dict[str, str], edit_inputs: Path, tmp_path: Path, args: tuple[str, ...], error: str
) -> None:
    needs_flux()
    result = subprocess.run(
        [sys.executable, "-c", RUN_AND_TELL_IMPORTS, "generate", "x", "-m", TINY_FLUX,
         *args, "-o", str(tmp_path / "out.png")],
        capture_output=True,
        text=True,
        env=env,
        cwd=edit_inputs,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert lines and lines[0].startswith(error), result.stderr
    assert result.stderr.splitlines()[-1] == "imported:", result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unreadable_inputs_are_told_first_and_the_rest_embedded(
    env: dict[str, str], images: dict[str, Path]
) -> None:
    result = limner(
        env, "embed", "missing.png", str(images["png"]), str(images["root"]), "-m", TINY,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert errors[0] == "Error: input #0 'missing.png': no such file"
    assert errors[-1] == "2 of 5 inputs failed."  # and the corrupt file, when decoded
    assert len(result.stdout.splitlines()) == 3


def test_size_sets_width_and_height_as_the_http_api(env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "wide.png"
    generate_tiny(env, "x", "--size", "96x48", "--steps", "1", "-o", str(target))
    with Image.open(target) as image:
        assert image.size == (96, 48)
    default = tmp_path / "default.png"
    generate_tiny(env, "x", "--size", "auto", "--steps", "1", "-o", str(default))
    with Image.open(default) as image:
        assert image.size == (64, 64)  # the tiny model's own


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--size", "96by48"), "Invalid value for '--size': '96by48' is not WIDTHxHEIGHT"),
        (("--size", "96x"), "Invalid value for '--size': '96x' is not WIDTHxHEIGHT"),
        (("--size", "96x48", "--height", "48"), "give the size once"),
    ],
)
def test_a_size_that_is_not_w_x_h_is_a_usage_error(
    env: dict[str, str], tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    result = generate_tiny(env, "x", *args, "-o", str(tmp_path / "a.png"), check=False)
    assert result.returncode == 2
    assert says in result.stderr.splitlines()[-1], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_several_images_are_numbered_files(env: dict[str, str], tmp_path: Path) -> None:
    target = str(tmp_path / "new" / "fox.webp")
    out = generate_tiny(env, "x", "--num-images", "2", "--steps", "1", "-o", target).stdout
    assert out.splitlines() == [str(tmp_path / "new" / f"fox-{n}.webp") for n in (1, 2)]
    with Image.open(tmp_path / "new" / "fox-2.webp") as image:
        assert image.format == "WEBP"


def test_inputs_are_numbered_in_the_whole_run_not_the_batch(
    env: dict[str, str], images: dict[str, Path]
) -> None:
    good = str(images["png"])
    result = limner(
        env,
        "embed",
        good,
        good,
        "missing-1.png",
        "missing-2.png",
        "--batch-size",
        "2",
        "--model",
        TINY,
        check=False,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: input #2 'missing-1.png': no such file",
        "Error: input #3 'missing-2.png': no such file",
    ]
    assert len(result.stdout.splitlines()) == 2


def test_real_weights_missing_offline_come_before_memory(
    env: dict[str, str], images: dict[str, Path]
) -> None:
    """Too little memory and no weights: what to fix first is the weights."""
    result = limner(
        env,
        "embed",
        str(images["png"]),
        "--model",
        "openai/clip-vit-base-patch32",
        "--memory-budget",
        "1MB",
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "is not in the Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert "hf download openai/clip-vit-base-patch32" in lines[0]


def test_a_gated_model_missing_offline_says_to_accept_its_licence(
    env: dict[str, str], tmp_path: Path
) -> None:
    """FLUX.1-dev is gated: downloading it alone would fail, so the one line says so."""
    out = tmp_path / "fox.png"
    result = limner(env, "generate", "a fox", "--model", "flux-dev", "--out", str(out), check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "black-forest-labs/FLUX.1-dev is not in the Hugging Face cache" in lines[0]
    assert "hf download black-forest-labs/FLUX.1-dev" in lines[0]
    assert "is gated: accept its licence on huggingface.co" in lines[0]
    assert "hf auth login" in lines[0]
    assert not out.exists()


@pytest.mark.subprocess
def test_without_offline_an_unreachable_hub_fails_fast_in_one_line(
    env: dict[str, str], images: dict[str, Path]
) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    online = {k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    online["HF_ENDPOINT"] = endpoint
    started = time.monotonic()
    result = limner_process(
        online,
        "embed",
        str(images["png"]),
        "--model",
        "openai/clip-vit-base-patch32",
        check=False,
    )
    assert time.monotonic() - started < 30  # the hub's own retries took 30 s
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert f"{endpoint} cannot be reached" in lines[0]
    assert "Retrying" not in result.stderr


def test_memory_budget_option_and_environment(env: dict[str, str], images: dict[str, Path]) -> None:
    png = str(images["png"])
    small = limner(env, "embed", png, "--model", TINY, "--memory-budget", "1MB", check=False)
    assert small.returncode == 1
    assert small.stderr.startswith(f"Error: Cannot spawn workers for {TINY}.")
    assert "--memory-budget" in small.stderr and len(small.stderr.splitlines()) == 1
    from_env = limner(
        {**env, "LIMNER_MEMORY_BUDGET": "1MB"}, "embed", png, "--model", TINY, check=False
    )
    assert from_env.returncode == 1 and "Cannot spawn workers" in from_env.stderr
    assert limner(env, "embed", png, "--model", TINY, "--memory-budget", "100%").returncode == 0
    bad = limner(env, "embed", png, "--model", TINY, "--memory-budget", "lots", check=False)
    assert bad.returncode == 2 and "LIMNER_MEMORY_BUDGET" in bad.stderr


def test_stdin_gives_an_image_or_one_input_per_line(
    env: dict[str, str], images: dict[str, Path]
) -> None:
    piped = limner(env, "embed", "-", "--model", TINY, "--json", stdin=images["png"]).stdout
    by_path = limner(env, "embed", str(images["png"]), "--model", TINY, "--json").stdout
    [image], [path] = parse_json_lines(piped), parse_json_lines(by_path)
    assert image["input"] == "-"
    assert np.allclose(image["embedding"], path["embedding"], atol=1e-6)
    listed = limner(
        env, "embed", "-", "--model", TINY, stdin=f"{images['png']}\n\n{images['jpeg']}\n"
    ).stdout
    assert [line.split("\t")[0] for line in listed.splitlines()] == [
        str(images["png"]),
        str(images["jpeg"]),
    ]
    texts = limner(env, "embed", "--text", "-", "--model", TINY, stdin="a red fox\na lighthouse\n")
    assert [line.split("\t")[0] for line in texts.stdout.splitlines()] == [
        "a red fox",
        "a lighthouse",
    ]


def test_a_text_stays_one_field_of_its_line(env: dict[str, str]) -> None:
    out = limner(env, "embed", "--text", "tab\there\nnewline", "--model", TINY).stdout
    [line] = out.splitlines()
    label, floats = line.split("\t")
    assert label == "tab\\there\\nnewline"
    assert len(floats.split()) == TINY_DIMENSION


def test_a_default_model_spares_the_model_option(
    env: dict[str, str], images: dict[str, Path], tmp_path: Path
) -> None:
    mine = {**env, "LIMNER_CONFIG_DIR": str(tmp_path)}
    png = str(images["png"])
    missing = limner(mine, "embed", png, check=False)
    assert missing.returncode == 2
    assert "limner models default" in missing.stderr and "LIMNER_EMBED_MODEL" in missing.stderr
    saved = limner(mine, "models", "default", "limner/tiny-clip")
    assert saved.stdout == "image-embedding: limner/tiny-clip\n"
    assert json.loads((tmp_path / "defaults.json").read_text()) == {"image-embedding": TINY}
    assert limner(mine, "embed", png).stdout.startswith(png + "\t")
    shown = limner(mine, "models", "default").stdout.splitlines()
    assert shown[0] == f"image-embedding: {TINY}  (from {tmp_path / 'defaults.json'})"
    assert shown[1] == "text-to-image: -"
    wrong = limner({**mine, "LIMNER_EMBED_MODEL": TINY_FLUX}, "embed", png, check=False)
    assert wrong.returncode == 1 and "is not an image-embedding model" in wrong.stderr
    unknown = limner(mine, "models", "default", "limner/tiny-clp", check=False)
    assert unknown.returncode == 1 and "Did you mean: limner/tiny-clip" in unknown.stderr
    limner(mine, "models", "default", "--clear")
    assert limner(mine, "embed", png, check=False).returncode == 2


def test_no_plugins_hint_works_from_a_clone(env: dict[str, str]) -> None:
    result = limner({**env, "LIMNER_PLUGINS": ""}, "models")
    assert "pip install ./plugins/clip" in result.stderr
    assert "'limner[clip]'" not in result.stderr.split("--find-links")[0]


def test_every_option_says_what_it_does_and_every_command_shows_examples() -> None:
    import click

    from limner._cli import cli

    def walk(command: click.Command, name: str) -> list[tuple[str, click.Command]]:
        found = [(name, command)]
        if isinstance(command, click.Group):
            for sub_name, sub in command.commands.items():
                found += walk(sub, f"{name} {sub_name}")
        return found

    for name, command in walk(cli, "limner"):
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("help", "version"):
                assert param.help, f"{name} {param.opts[0]} has no help"
        text = (command.help or "") + (command.epilog or "")
        assert "Examples:" in text, f"{name} --help shows no examples"


# A fake generator whose steps take STEP_SECONDS, registered in the process the CLI runs in.
SLOW_GENERATOR = """
import sys
import limner
from limner.testing import fake_generation_spec
limner.default_registry().register(
    fake_generation_spec("fake/slow", options={"step_seconds": float(sys.argv.pop(1))})
)
from limner._cli import main
main()
"""


@pytest.mark.subprocess
def test_ctrl_c_stops_a_generation_at_its_next_step_and_exits_130(
    env: dict[str, str], tmp_path: Path
) -> None:
    """SIGINT while a step runs: the run stops when that step returns, the pool has nothing
    left to drain, and the command exits 130 within 2 s of that step (not after the pool's
    30 s drain, nor after the 20 steps)."""
    step_seconds = 2.0
    target = tmp_path / "fox.png"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_GENERATOR, str(step_seconds), "generate", "a fox",
         "-m", "fake/slow", "--steps", "20", "-o", str(target), "--progress"],
        env={**env, "LIMNER_PLUGINS": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    seen = b""
    try:
        while b"1/20" not in seen:  # the first step is done: the second is running
            chunk = os.read(process.stderr.fileno(), 4096)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
        took = time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = (seen + process.stderr.read()).decode(errors="replace")
    assert code == 130, stderr
    assert took < step_seconds + 2.0 + 4.0, stderr  # the step, 2 s, and slack for a busy box
    assert "Aborted." in stderr
    assert "Traceback" not in stderr
    assert not target.exists()
