"""`limner new-plugin`: the example plugins are what it writes, and what it writes installs
with `pip install -e` and passes its own tests (limner's conformance suite) at once."""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from limner import InvalidInput
from limner._cli import cli
from limner._scaffold import installed_as, plugin_names, render_plugin

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {
    "image-embedding": ("acme", ROOT / "examples" / "plugins" / "limner-acme"),
    "text-to-image": ("acme-diffusion", ROOT / "examples" / "plugins" / "limner-acme-diffusion"),
}


def tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): path.read_text(encoding="utf-8")
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and ".pytest_cache" not in path.parts
    }


@pytest.mark.parametrize("capability", sorted(EXAMPLES))
def test_the_example_plugins_are_what_new_plugin_writes(capability: str) -> None:
    """One source: the tutorial's code (run by the tests) is the scaffold's, name for name."""
    name, example = EXAMPLES[capability]
    assert render_plugin(name, capability) == tree(example), (
        f"{example} and limner/_scaffold/templates/{capability} differ; change both"
    )


def test_names() -> None:
    assert plugin_names("limner-acme-demo") == plugin_names("acme-demo")
    assert plugin_names("acme-demo") == {
        "name": "acme-demo",
        "dist": "limner-acme-demo",
        "package": "limner_acme_demo",
        "module": "acme_demo",
        "Class": "AcmeDemo",
    }
    for bad in ("Acme", "acme_demo", "-acme", "acme-", "9acme", "acme--demo", "", "acme\n",
                "a" * 65, "a" * 248, "a" * 300):  # fmt: skip
        with pytest.raises(InvalidInput) as caught:
            plugin_names(bad)
        assert caught.value.field == "name"


def test_the_command_writes_a_distribution_and_refuses_to_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["new-plugin", "acme-demo", "--capability", "text-to-image", "-d", str(tmp_path)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    written = tree(tmp_path / "limner-acme-demo")
    assert sorted(written) == [
        "README.md",
        "limner_acme_demo/__init__.py",
        "limner_acme_demo/py.typed",
        "pyproject.toml",
        "tests/test_acme_demo.py",
    ]
    assert 'acme-demo = "limner_acme_demo"' in written["pyproject.toml"]
    assert "class TestAcmeDemo(DiffusionFamilyContract):" in written["tests/test_acme_demo.py"]
    assert "backend_class = AcmeDemoBackend" in written["tests/test_acme_demo.py"]
    again = runner.invoke(cli, args)
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(cli, ["new-plugin", "Acme", "--capability", "image-embedding"])
    assert bad.exit_code == 2 and "lowercase" in bad.output


def new_plugin(directory: Path, name: str, *options: str) -> Any:
    args = ["new-plugin", name, "--capability", "image-embedding", "-d", str(directory)]
    return CliRunner().invoke(cli, [*args, *options])


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("acme\n", "lowercase letters"),  # a regex's $ matches before a trailing newline
        ("a" * 300, "at most 64 characters"),
        ("a" * 248, "at most 64 characters"),  # once wrote 4 of 5 files, then crashed
    ],
)
def test_bad_names_are_refused_in_one_line_and_write_nothing(
    tmp_path: Path, name: str, says: str
) -> None:
    for _ in range(2):  # and the same again: refused for the same reason, not "exists"
        result = new_plugin(tmp_path, name)
        assert result.exit_code == 2, result.output
        assert says in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert list(tmp_path.iterdir()) == []


def test_a_dangling_symlink_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "limner-acme-demo").symlink_to(tmp_path / "nowhere")
    result = new_plugin(tmp_path, "acme-demo")
    assert result.exit_code == 2
    assert "already exists" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_name_shadowing_an_installed_distribution_needs_force(tmp_path: Path) -> None:
    pytest.importorskip("limner_clip", reason="needs an installed plugin to shadow")
    refused = new_plugin(tmp_path, "clip")
    assert refused.exit_code == 2
    assert "limner-clip would shadow the distribution limner-clip" in refused.output
    assert "--force" in refused.output
    assert list(tmp_path.iterdir()) == []
    forced = new_plugin(tmp_path, "clip", "--force")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "limner-clip" / "limner_clip" / "__init__.py").is_file()
    assert installed_as("acme-never-installed") is None


def test_a_failed_write_leaves_nothing_and_says_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files go to a temporary folder moved into place at the end: a disk that fills
    half-way leaves no half-written plugin, and the command can be run again."""
    real_write = Path.write_text
    written: list[Path] = []

    def fill_up(self: Path, *args: Any, **kwargs: Any) -> int:
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        written.append(self)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fill_up)
    failed = new_plugin(tmp_path, "acme-demo")
    assert failed.exit_code == 1
    lines = failed.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot write "), failed.output
    assert "No space left on device" in lines[0]
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Path, "write_text", real_write)
    again = new_plugin(tmp_path, "acme-demo")
    assert again.exit_code == 0, again.output
    assert len(tree(tmp_path / "limner-acme-demo")) == 5


def test_a_file_in_the_directory_path_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = new_plugin(blocker / "plugins", "acme-demo")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot write "), result.output
    assert "Not a directory" in lines[0]


def _needs_a_build_backend() -> None:
    if importlib.util.find_spec("hatchling") is None:
        reason = "hatchling (the dev extra) is not installed: cannot build the new plugin"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"{reason}; CI=true, so this test must run, not skip")
        pytest.skip(reason)


def _pytest_plugin() -> list[str]:
    """``-p`` for limner's pytest plugin, unless its ``pytest11`` entry point loads it (an
    installed limner; an uninstalled checkout on PYTHONPATH has none)."""
    plugins = importlib.metadata.entry_points(group="pytest11")
    if any(ep.value == "limner.plugin.testing._pytest_plugin" for ep in plugins):
        return []
    return ["-p", "limner.plugin.testing._pytest_plugin"]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.packaging  # a venv of its own, pip installs the new plugin
@pytest.mark.parametrize("capability", ["image-embedding", "text-to-image"])
def test_a_new_plugin_installs_and_passes_its_own_tests(capability: str, tmp_path: Path) -> None:
    """In a throwaway venv that sees this environment (limner, torch, ...) through a .pth
    file: `limner new-plugin`, `pip install -e`, then `pytest` in the new distribution; its
    entry point is found (the suite's entry-point test runs, not skips), and `pytest
    --limner-conformance KEY` runs the suite on the installed plugin. 30-60 s each."""
    _needs_a_build_backend()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "parent-environment.pth").write_text(
        "\n".join(path for path in sys.path if path and Path(path).is_dir()) + "\n"
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "LIMNER_PLUGINS", "PYTEST_ADDOPTS")
    }
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hf-cache"))
    _run([str(python), "-m", "limner", "new-plugin", "acme-demo", "--capability", capability,
          "-d", str(tmp_path)], tmp_path, env)  # fmt: skip
    project = tmp_path / "limner-acme-demo"
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-build-isolation", "--no-index", "-e", str(project)],
        tmp_path,
        env,
    )  # fmt: skip
    listed = _run([str(python), "-m", "limner", "models"], tmp_path, env)
    assert "acme-demo/tiny (tiny)" in listed
    output = _run(
        [str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"], project, env
    )
    summary = output.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, output
    # Only the real weights on a GPU may be skipped here (the family contract's last test),
    # and the LoRA tests of the contract: the scaffold's family (SD1.5's UNet) declares no
    # layers an adapter may change.
    skips = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    on_gpu = [line for line in skips if "needs a CUDA device" in line]
    no_loras = [line for line in skips if "acme-demo/tiny takes no LoRA adapters" in line]
    assert len(on_gpu) + len(no_loras) == len(skips), output
    if capability == "text-to-image":
        assert len(on_gpu) == 1 and no_loras, output
    else:
        assert not skips, output
    if capability == "image-embedding":  # the suite on the command line, with nothing written
        output = _run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *_pytest_plugin(),
             "--limner-conformance", "acme-demo/tiny"],
            tmp_path,
            env,
        )  # fmt: skip
        summary = output.strip().splitlines()[-1]
        assert " passed" in summary and "failed" not in summary, output
