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
from pathlib import Path

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


def lines_of(stream: object) -> queue.Queue[str]:
    """The stream's lines as a queue, read by a daemon thread, so waits can time out."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.fixture
def served(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "limner", "serve", "--port", "0", "--models", "limner/tiny-clip"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert process.stderr is not None
    lines = lines_of(process.stderr)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            seen.append(line)
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if found:
                break
        yield found.group(1), process
    except queue.Empty:
        pytest.fail("the server never said it was running:\n" + "".join(seen))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


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


def test_serve_refuses_an_unknown_model_before_binding(env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "limner", "serve", "--port", "0", "--models", "limner/tiny-clp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Unknown model 'limner/tiny-clp'" in result.stderr
    assert "Did you mean: limner/tiny-clip" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_api_key_with_spaces_around_it(env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "limner", "serve", "--port", "0"],
        env={**env, "LIMNER_API_KEY": f" {KEY} "},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "LIMNER_API_KEY" in result.stderr and "whitespace" in result.stderr
    assert "running on" not in result.stderr  # refused before binding
    assert "Traceback" not in result.stderr


def test_importing_limner_does_not_import_the_server_stack() -> None:
    code = (
        "import sys, limner; print(sorted({'fastapi', 'uvicorn', 'starlette'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def read_until(lines: queue.Queue[str], pattern: str, *, timeout: float = 120) -> list[str]:
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


def test_start_up_says_what_is_served_whether_a_key_is_needed_and_when_ready(
    env: dict[str, str],
) -> None:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "limner", "serve", "--port", "0"),
            *("--models", "limner/tiny-clip", "--preload", "limner/tiny-clip"),
        ],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert process.stderr is not None
    try:
        seen = read_until(lines_of(process.stderr), r"ready: limner/tiny-clip preloaded in")
    finally:
        process.kill()
        process.wait(timeout=10)
    log = "".join(seen)
    assert "serving models (1): limner/tiny-clip" in log
    assert "API key required" in log
    assert "preloading limner/tiny-clip" in log
    assert re.search(r"running on http://127\.0\.0\.1:\d+", log)
    for noise in ("Loading", "[transformers]", "torchvision", "Warning"):
        assert noise not in log


def test_a_port_in_use_is_one_line_and_exit_code_1(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "limner", "serve", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: cannot listen on 127.0.0.1:{port}:")
    assert "pick another --port" in lines[0]


def test_serve_takes_the_memory_budget(env: dict[str, str]) -> None:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "limner", "serve", "--port", "0"),
            *("--preload", "limner/tiny-clip", "--memory-budget", "1MB"),
        ],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert process.stderr is not None
    try:
        seen = read_until(lines_of(process.stderr), r"preloading limner/tiny-clip failed")
    finally:
        process.kill()
        process.wait(timeout=10)
    assert "Cannot spawn workers for limner/tiny-clip" in seen[-1]
