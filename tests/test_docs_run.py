"""Every code block of README.md and docs/ runs as written, so the docs cannot drift.

Each document's blocks run in order, in a folder holding a copy of examples/, offline, on the
tiny models: a real key in a block is swapped for the tiny one of its family, and
``https://example.com/`` for a local HTTP server serving the example images. Shell blocks run
in bash (``curl`` with ``-f``, so an HTTP error fails); a ``limner serve`` line starts the
server in the background (on a free port, URL inputs from this machine allowed) for the
blocks after it, and ``127.0.0.1:8000`` then means that server. Python blocks run as scripts.
docs/plugins.md shows pieces of a plugin of one's own: its Python is compiled and its TOML
parsed. JSON and untagged blocks are data (answers, logs, diagrams), not code.

docs/distributed.md runs the same way on a local Ray cluster of the test's own, on loopback,
which its blocks join through ``RAY_ADDRESS``.

A few shell lines are not run here, each for a reason listed in ``NOT_RUN``.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import tomllib

if TYPE_CHECKING:
    from tests.conftest import LocalHTTPServer

ROOT = Path(__file__).resolve().parent.parent
RUN = ("README.md", "docs/cli.md", "docs/http.md", "docs/lora.md")
RAY_GUIDE = "docs/distributed.md"
COMPILED = ("docs/plugins.md",)
DATA = {"json", "", "text"}

# Longest first: an alias may be part of a longer name.
REAL_TO_TINY = (
    ("black-forest-labs/FLUX.1-schnell", "limner/tiny-flux"),
    ("openai/clip-vit-base-patch32", "limner/tiny-clip"),
    ("flux-schnell", "limner/tiny-flux"),
)

NOT_RUN = {
    "make demo": "runs the tiny models as these tests do, after installing (CI runs make check)",
    "make test": "is how these tests run",
    "make dist": "tests/test_dist.py builds the wheels and installs them",
    "pip install": "would change the environment the tests run in; tests/test_dist.py "
    "installs the wheels",
    "ray start": "the test starts its cluster itself, a head node that ends with the test "
    "(a `ray start` cluster would outlive it)",
    "python benchmarks/": "a benchmark, run by hand (benchmarks/README.md)",
}

WRITE_INTO_OUT = ("README.md", "docs/cli.md", "docs/http.md", "docs/lora.md")
"""What these documents' examples write goes into out/, which .gitignore covers, never next to
the code of a clone they are run in."""
WORKSPACE_OWN = frozenset({"examples", "bin", "config"})

pytestmark = [
    pytest.mark.subprocess,  # each block runs as a script or in a shell
    pytest.mark.skipif(shutil.which("curl") is None, reason="the docs call curl"),
]


@dataclass(frozen=True)
class Block:
    path: str
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.lang or 'untagged'})"


def blocks(path: str) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    found: list[Block] = []
    lang: str | None = None
    start, lines = 0, list[str]()
    for number, line in enumerate((ROOT / path).read_text().splitlines(), start=1):
        if lang is None:
            if line.startswith("```"):
                lang, start, lines = line[3:].strip(), number, []
        elif line.startswith("```"):
            found.append(Block(path, start, lang, "\n".join(lines) + "\n"))
            lang = None
        else:
            lines.append(line)
    assert lang is None, f"{path}:{start}: a code block is never closed"
    return found


def commands(script: str) -> list[str]:
    """A shell block's commands: continuation lines joined, blank and comment lines dropped."""
    joined, current = [], ""
    for line in script.splitlines():
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            joined.append(current.strip())
        current = ""
    return joined


@dataclass
class Workspace:
    folder: Path
    env: dict[str, str]
    example_base: str
    servers: list[subprocess.Popen[str]]
    server_url: str | None = None
    swaps: dict[str, str] = field(default_factory=dict)
    """More of what a document says, as the test's environment has it (a port, say)."""

    def swap(self, text: str) -> str:
        for real, tiny in [*REAL_TO_TINY, *self.swaps.items()]:
            text = text.replace(real, tiny)
        text = text.replace("https://example.com/", self.example_base)
        if self.server_url is not None:
            text = text.replace("http://127.0.0.1:8000", self.server_url)
        return text

    def run(self, block: Block, command: list[str], *, tail: int | None = None) -> None:
        """Run ``command`` in the folder, failing ``block`` with its output (the last
        ``tail`` characters of stdout) when it fails."""
        result = subprocess.run(
            command,
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        out = result.stdout[-tail:] if tail else result.stdout
        assert result.returncode == 0, f"{block} failed:\n{out}\n{result.stderr}"

    def stop_servers(self) -> None:
        for server in self.servers:
            server.kill()
            server.wait(timeout=10)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-cache")


@pytest.fixture
def workspace(tmp_path: Path, hf_cache: Path, http_server: LocalHTTPServer) -> Iterator[Workspace]:
    """A folder with examples/ and a `limner` command, an offline environment, and the
    example images behind the local server."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "limner"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m limner "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    for name, source in (("dog.png", "logo.png"), ("cat.jpg", "landscape.jpg")):
        kind = "image/png" if name.endswith(".png") else "image/jpeg"
        body = (ROOT / "examples" / source).read_bytes()
        http_server.route(f"/docs/{name}", body=body, content_type=kind)
    http_server.route(
        "/docs/fox.jpg",
        body=(ROOT / "examples" / "landscape.jpg").read_bytes(),
        content_type="image/jpeg",
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_CACHE": str(hf_cache),
        "HF_HUB_OFFLINE": "1",
        "LIMNER_PLUGINS": "clip,flux",
        "LIMNER_CONFIG_DIR": str(tmp_path / "config"),
    }
    for name in ("LIMNER_EMBED_MODEL", "LIMNER_GENERATE_MODEL", "LIMNER_MEMORY_BUDGET"):
        env.pop(name, None)
    space = Workspace(tmp_path, env, http_server.url("/docs/"), [])
    try:
        yield space
    finally:
        space.stop_servers()


def run_python(block: Block, space: Workspace) -> None:
    script = space.folder / f"block_{block.line}.py"
    script.write_text(space.swap(block.text))
    space.run(block, [sys.executable, str(script)])


def start_server(block: Block, command: str, space: Workspace) -> None:
    """Run a `limner serve` line in the background until the test ends."""
    space.stop_servers()  # one at a time: a later block's server replaces it
    line = re.sub(r"\s+#.*$", "", command)  # options go before a comment
    process = subprocess.Popen(
        ["bash", "-c", f"exec env {line} --port 0 --allow-private-urls"],
        cwd=space.folder,
        env=space.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    space.servers.append(process)
    assert process.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr or ()), daemon=True)
    reader.start()
    url, ready = None, "--preload" not in command
    deadline = time.monotonic() + 120
    while url is None or not ready:
        if time.monotonic() > deadline or process.poll() is not None:
            pytest.fail(f"{block}: `{command}` did not start:\n" + "".join(lines))
        time.sleep(0.05)
        log = "".join(lines)
        found = re.search(r"running on (http://127\.0\.0\.1:\d+)", log)
        url = found.group(1) if found else None
        ready = ready or "ready: " in log
    space.server_url = url


def run_shell(block: Block, space: Workspace, skipped: list[str]) -> None:
    script = []
    for command in commands(block.text):
        words = re.sub(r"^(\w+=\S+\s+)+", "", command)  # a leading NAME=value is the env's
        reason = next((why for start, why in NOT_RUN.items() if words.startswith(start)), None)
        if reason is not None:
            skipped.append(f"{block}: `{command}` {reason}")
            continue
        exported = re.fullmatch(r"export (\w+)=(\S+)(\s+#.*)?", command)
        if exported:
            space.env[exported.group(1)] = exported.group(2)
            continue
        if words.startswith("limner serve"):
            start_server(block, space.swap(command), space)
            continue
        script.append(space.swap(command).replace("curl ", "curl -sSf "))
    if not script:
        return
    body = "\n".join(["trap 'echo \"failed: $BASH_COMMAND\" >&2' ERR", *script])
    space.run(block, ["bash", "-euo", "pipefail", "-c", body], tail=3000)


def run_blocks(path: str, workspace: Workspace) -> list[str]:
    """Run every block of ``path`` in order; what was left unrun, and why."""
    skipped: list[str] = []
    ran = 0
    for block in blocks(path):
        if block.lang == "python":
            run_python(block, workspace)
        elif block.lang in ("sh", "bash"):
            run_shell(block, workspace, skipped)
        else:
            assert block.lang in DATA, f"{block}: no rule to run a {block.lang!r} block"
            continue
        ran += 1
    assert ran, f"{path} has no code block to run"
    return skipped


@pytest.mark.parametrize("path", RUN)
def test_every_block_runs_as_written(path: str, workspace: Workspace) -> None:
    skipped = run_blocks(path, workspace)
    if path in WRITE_INTO_OUT:
        made = {entry.name for entry in workspace.folder.iterdir()} - WORKSPACE_OWN
        scripts = {name for name in made if re.fullmatch(r"block_\d+\.py", name)}
        assert made - scripts <= {"out"}, f"{path} writes outside out/: {made - scripts}"
    for line in skipped:  # shown with -rP: what the docs say that this test does not run
        print(line)


SCAFFOLD_STEPS = frozenset({"cd", "limner", "pip", "pytest"})
"""The commands a plugin guide's shell block may use: each is run by tests/test_scaffold.py."""


@pytest.mark.parametrize("path", COMPILED)
def test_plugin_pieces_compile(path: str) -> None:
    found = blocks(path)
    assert found
    for block in found:
        if block.lang == "python":
            ast.parse(block.text, filename=str(block))
        elif block.lang == "toml":
            tomllib.loads(block.text)
        elif block.lang in ("bash", "sh"):
            # The scaffold's walk-through: tests/test_scaffold.py runs exactly these steps
            # (new-plugin, an editable install, the plugin's pytest and its
            # conformance run, limner models).
            for line in filter(
                None, (raw.split("#")[0].strip() for raw in block.text.splitlines())
            ):
                assert line.split()[0] in SCAFFOLD_STEPS, f"{block}: {line!r} is run nowhere"
        else:
            assert block.lang in DATA, f"{block}: no rule to check a {block.lang!r} block"


# What the Ray guide asks of the environment where a local cluster starts (see its "A cluster
# on one machine"); the test's cluster starts so.
RAY_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1"}

# A head node in a process of its own: it prints how to join it (the cluster's address, and
# the auth mode Ray chose, which a joining process must set too), waits for stdin to close,
# prints what every process of the cluster listens on, and shuts the cluster down.
RAY_HEAD = """
import json, os, sys
import psutil, ray

ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False,
         object_store_memory=150 * 1024 * 1024, logging_level="WARNING")
joining = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
if os.environ.get("RAY_AUTH_MODE"):
    joining["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
print(json.dumps(joining), flush=True)
sys.stdin.read()
listening = []
for process in psutil.Process().children(recursive=True):
    try:
        for connection in process.net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN:
                listening.append([process.name(), connection.laddr.ip])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
print(json.dumps(listening), flush=True)
ray.shutdown()
"""


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.mark.slow
def test_the_ray_guide_runs_on_a_local_cluster(workspace: Workspace) -> None:
    """docs/distributed.md's blocks, in order, against a local cluster started as the guide
    says (on loopback): each joins it as ``address="auto"`` does, through ``RAY_ADDRESS``.
    Then every process of the cluster listened on loopback, but the Serve replicas'
    inter-deployment gRPC servers, as the guide says."""
    pytest.importorskip("ray.serve", reason="needs ray[serve] (the dev extra installs it)")
    pytest.importorskip("fastapi", reason="the guide serves over HTTP: the server extra")
    pytest.importorskip("limner_flux", reason="the guide generates with the FLUX plugin")
    home = workspace.folder / "ray-home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="limner-ray-", dir="/tmp")  # short: Ray's sockets
    env = workspace.env
    env.update(RAY_LOOPBACK, HOME=str(home), RAY_TMPDIR=temp_dir, RAY_USAGE_STATS_ENABLED="0")
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(name, None)
    # `serve start` is Ray's command, next to the interpreter running the tests.
    env["PATH"] = os.pathsep.join([env["PATH"], str(Path(sys.executable).parent)])
    head = subprocess.Popen(
        [sys.executable, "-c", RAY_HEAD],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert head.stdout is not None and head.stdin is not None
        joining = head.stdout.readline()
        assert joining, "the head node did not start"
        env.update(json.loads(joining))
        proxy_port = str(free_port())
        workspace.swaps.update(
            {"--http-port 8080": f"--http-port {proxy_port}", ":8080/": f":{proxy_port}/"}
        )
        skipped = run_blocks(RAY_GUIDE, workspace)
        workspace.stop_servers()
        head.stdin.close()
        listening = json.loads(head.stdout.readline())
        assert head.wait(timeout=120) == 0
    finally:
        if head.poll() is None:
            head.kill()
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert listening, "the cluster's processes listened nowhere"
    wide = {(name, ip) for name, ip in listening if not is_loopback(ip)}
    # A replica's name is its process title, cut to 15 characters or not.
    assert all(name.startswith("ray::ServeRepli") for name, _ in wide), wide
    assert all(ip in ("::", "0.0.0.0") for _, ip in wide), wide
    for line in skipped:
        print(line)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_only_known_lines_are_left_unrun() -> None:
    """Each line NOT_RUN leaves out is still in the docs: the list cannot go stale."""
    text = "\n".join(block.text for path in (*RUN, RAY_GUIDE) for block in blocks(path))
    for start in NOT_RUN:
        assert start in text, f"NOT_RUN lists {start!r}, which no document runs any more"
