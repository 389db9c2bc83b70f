"""``limner serve`` as a user runs it: a real process, a real port, a signal to stop."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("limner_clip", reason="serves the CLIP plugin's tiny model")

KEY = "cli-key"


@pytest.fixture
def env(hf_cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_CACHE": str(hf_cache),
        "HF_HUB_OFFLINE": "1",
        "LIMNER_PLUGINS": "clip",
        "LIMNER_API_KEY": KEY,
    }


Lines = queue.Queue[str]


def lines_of(stream: object) -> Lines:
    """The stream's lines as a queue, read by a daemon thread, so waits can time out."""
    lines: Lines = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@contextmanager
def serving(
    env: dict[str, str], *args: str, command: tuple[str, ...] = ("-m", "limner")
) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """``limner serve --port 0 ARGS`` in the background, and its stderr's lines; killed at the
    end unless it has stopped. ``command`` is what Python runs instead of ``-m limner``."""
    process = subprocess.Popen(
        [sys.executable, *command, "serve", "--port", "0", *args],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert process.stderr is not None
    try:
        yield process, lines_of(process.stderr)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def limner_serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``limner serve ARGS`` run to its end: for what is refused before the server runs."""
    return subprocess.run(
        [sys.executable, "-m", "limner", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def read_until(lines: Lines, pattern: str, *, timeout: float = 120) -> list[str]:
    """Lines up to and including the first that matches ``pattern``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no line matched {pattern!r}:\n" + "".join(seen))
        seen.append(line)
        if re.search(pattern, line):
            return seen


RUNNING = r"running on (http://127\.0\.0\.1:\d+)"


@pytest.fixture
def served(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with serving(env, "--models", "limner/tiny-clip") as (process, lines):
        running = re.search(RUNNING, read_until(lines, RUNNING, timeout=60)[-1])
        assert running is not None
        yield running.group(1), process


@pytest.mark.subprocess
def test_serve_binds_loopback_needs_the_key_from_the_environment_and_stops_on_sigint(
    served: tuple[str, subprocess.Popen[str]],
) -> None:
    url, process = served
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/models").status_code == 401
        listed = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert [model["id"] for model in listed.json()["data"]] == ["limner/tiny-clip"]
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0


@pytest.mark.subprocess
def test_serve_refuses_an_unknown_model_before_binding(env: dict[str, str]) -> None:
    result = limner_serve(env, "--port", "0", "--models", "limner/tiny-clp")
    assert result.returncode == 1
    assert "Unknown model 'limner/tiny-clp'" in result.stderr
    assert "Did you mean: limner/tiny-clip" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.subprocess
def test_serve_refuses_an_api_key_with_spaces_around_it(env: dict[str, str]) -> None:
    result = limner_serve({**env, "LIMNER_API_KEY": f" {KEY} "}, "--port", "0")
    assert result.returncode == 2
    assert "LIMNER_API_KEY" in result.stderr and "whitespace" in result.stderr
    assert "running on" not in result.stderr  # refused before binding
    assert "Traceback" not in result.stderr


@pytest.mark.subprocess
def test_importing_limner_does_not_import_the_server_stack() -> None:
    code = (
        "import sys, limner; print(sorted({'fastapi', 'uvicorn', 'starlette'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.subprocess
def test_start_up_says_what_is_served_whether_a_key_is_needed_and_when_ready(
    env: dict[str, str],
) -> None:
    preloading = ("--models", "limner/tiny-clip", "--preload", "limner/tiny-clip")
    with serving(env, *preloading) as (_, lines):
        seen = read_until(lines, r"ready: limner/tiny-clip preloaded in")
    log = "".join(seen)
    assert "serving models (1): limner/tiny-clip" in log
    assert "API key required" in log
    assert "preloading limner/tiny-clip" in log
    assert re.search(r"running on http://127\.0\.0\.1:\d+", log)
    for noise in ("Loading", "[transformers]", "torchvision", "Warning"):
        assert noise not in log


@pytest.mark.subprocess
def test_a_port_in_use_is_one_line_and_exit_code_1(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = limner_serve(env, "--port", str(port))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: cannot listen on 127.0.0.1:{port}:")
    assert "pick another --port" in lines[0]


@pytest.mark.subprocess
def test_serve_takes_the_memory_budget(env: dict[str, str]) -> None:
    with serving(env, "--preload", "limner/tiny-clip", "--memory-budget", "1MB") as (_, lines):
        seen = read_until(lines, r"preloading limner/tiny-clip failed")
    assert "Cannot spawn workers for limner/tiny-clip" in seen[-1]


# `limner serve` in a process whose registry also has a fake generator with slow steps.
SLOW_GENERATOR = """
import limner
from limner.testing import fake_generation_spec
limner.default_registry().register(
    fake_generation_spec("fake/slow", options={"step_seconds": 0.4})
)
from limner._cli import main
main()
"""


@pytest.mark.subprocess
def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(env: dict[str, str]) -> None:
    """As http.md says: on SIGTERM the server stops accepting, lets the request in flight
    finish, the pool drains, and the command exits 0 (not 143)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    command = ("-c", SLOW_GENERATOR)
    with serving(env, "--models", "fake/slow", command=command) as (process, lines):
        running = re.search(RUNNING, read_until(lines, RUNNING, timeout=60)[-1])
        assert running is not None
        url = running.group(1)
        answers: list[httpx.Response] = []

        def generate() -> None:
            with httpx.Client(base_url=url, timeout=60, headers=auth) as client:
                body = {"model": "fake/slow", "prompt": "p", "steps": 8, "size": "16x16"}
                answers.append(client.post("/v1/images/generations", json=body))

        in_flight = threading.Thread(target=generate)
        in_flight.start()
        with httpx.Client(base_url=url, timeout=10, headers=auth) as client:
            deadline = time.monotonic() + 60
            while not any(m["in_flight"] for m in client.get("/v1/pool").json()["models"]):
                assert time.monotonic() < deadline, "the generation never started"
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        in_flight.join(timeout=60)
        assert process.wait(timeout=60) == 0
    assert len(answers) == 1
    assert answers[0].status_code == 200, answers[0].text
    assert len(answers[0].json()["data"]) == 1


@pytest.mark.subprocess
def test_the_host_and_connection_options_reach_the_server(env: dict[str, str]) -> None:
    options = ("--models", "limner/tiny-clip", "--allowed-host", "models.lan",
               "--header-timeout", "1", "--max-connections", "8")  # fmt: skip
    with serving(env, *options) as (process, lines):
        running = re.search(RUNNING, read_until(lines, RUNNING, timeout=60)[-1])
        assert running is not None
        url = running.group(1)
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, timeout=10, headers=auth) as client:
            assert client.get("/v1/models", headers={"Host": "models.lan:8000"}).is_success
            forged = client.get("/v1/models", headers={"Host": "rebind.attacker.example"})
            metrics = client.get("/metrics").text
        assert forged.status_code == 400
        assert forged.json()["error"]["code"] == "invalid_host"
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            started = time.monotonic()
            answer = b""
            while chunk := slow.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 1 + 5
        assert "limner_http_connections_open" in metrics
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


@pytest.mark.subprocess
def test_a_bad_allowed_host_is_refused_before_binding(env: dict[str, str]) -> None:
    result = limner_serve(env, "--port", "0", "--allowed-host", "models.lan:8000")
    assert result.returncode == 2
    assert "--allowed-host" in result.stderr
    assert "running on" not in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_hands_the_pool_its_budget_floor_and_max_wait(served_apps: list[Any]) -> None:
    from click.testing import CliRunner

    from limner import PoolOptions
    from limner._cli import cli

    flags = ["--memory-budget", "90MB", "--memory-floor", "1GB", "--max-wait", "5"]
    result = CliRunner().invoke(cli, ["serve", "--port", "0", "--no-ui", *flags])
    assert result.exit_code == 0, result.output
    options = served_apps[-1].state.limner.settings.pool_options
    assert options == PoolOptions(memory_budget_mb=90, memory_floor_mb=1024, max_wait=5)
    for bad, flag in (
        (["--memory-floor", "lots"], "--memory-floor"),
        (["--max-wait", "0"], "--max-wait"),
        (["--memory-budget", "0"], "--memory-budget"),
    ):
        refused = CliRunner().invoke(cli, ["serve", "--port", "0", *bad])
        assert refused.exit_code == 2 and flag in refused.output, refused.output


def test_serve_on_ray_hands_the_pool_settings_to_every_replica(served_apps: list[Any]) -> None:
    pytest.importorskip("ray.serve", reason="`--runtime ray` needs Ray Serve")
    pytest.importorskip("limner_clip", reason="preloads the CLIP plugin's tiny model")
    from click.testing import CliRunner

    from limner._cli import cli

    arguments = ["serve", "--port", "0", "--no-ui", "--runtime", "ray", "--address", "auto"]
    flags = ["--memory-budget", "90MB", "--max-wait", "5", "--preload", "limner/tiny-clip"]
    result = CliRunner().invoke(cli, [*arguments, *flags])
    assert result.exit_code == 0, result.output
    runtime = served_apps[-1].state.limner.settings.runtime()  # made, not started
    changed = {"memory_budget_mb": 90.0, "max_wait": 5.0}  # the rest: the replica's defaults
    assert dict(runtime.options.pool_options) == changed
    assert dict(runtime.options_per_key["limner/tiny-clip"].pool_options) == changed
