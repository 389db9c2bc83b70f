"""`limner serve` caps glibc's malloc arenas, unless the operator already chose."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.subprocess,  # the cap is the process's: each probe runs in its own
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="malloc arenas are glibc's, on Linux"
    ),
]

PROBE = "from limner.server._heap import limit_malloc_arenas; print(limit_malloc_arenas(2))"


def run_probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_cap_is_set_by_default() -> None:
    assert run_probe() == "True"


def test_an_operator_s_malloc_arena_max_wins() -> None:
    assert run_probe(MALLOC_ARENA_MAX="8") == "False"
