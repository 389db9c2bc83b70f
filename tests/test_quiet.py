"""A host application's output while limner loads models: no loading bars or advice from
transformers and diffusers, and its own logging left as it was, thread by thread."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from limner.plugin._quiet import quiet_loading

transformers_logging = pytest.importorskip(
    "transformers.utils.logging", reason="quiets transformers, which the CLIP plugin brings"
)


class Records(logging.Handler):
    """A host's handler on the library's logger: what reaches it, by message."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def host_handler() -> Iterator[Records]:
    logger = logging.getLogger("transformers")
    handler = Records()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
    if not was_on:
        transformers_logging.disable_progress_bar()


def bar_output() -> str:
    """What a transformers bar over three items prints."""
    out = io.StringIO()
    for _ in transformers_logging.tqdm(range(3), desc="Loading weights", file=out):
        pass
    return out.getvalue()


def in_thread(function: object) -> None:
    thread = threading.Thread(target=function)  # type: ignore[arg-type]
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()


def log_and_draw(tag: str, bars: dict[str, str]) -> None:
    logging.getLogger("transformers.models.x").warning("advice from %s", tag)
    logging.getLogger("transformers.models.x").error("error from %s", tag)
    bars[tag] = bar_output()


def test_only_the_loading_thread_is_quiet_and_only_while_it_loads(host_handler: Records) -> None:
    bars: dict[str, str] = {}
    inside = threading.Event()
    done = threading.Event()

    def load() -> None:
        with quiet_loading("transformers"):
            log_and_draw("the load", bars)
            inside.set()
            assert done.wait(timeout=60)

    loader = threading.Thread(target=load)
    loader.start()
    assert inside.wait(timeout=60)
    in_thread(lambda: log_and_draw("another thread", bars))  # during the load
    done.set()
    loader.join(timeout=60)
    log_and_draw("after", bars)

    assert host_handler.messages == [
        "error from the load",  # errors still show
        "advice from another thread",
        "error from another thread",
        "advice from after",
        "error from after",
    ]
    assert bars["the load"] == ""
    assert "Loading weights" in bars["another thread"]
    assert "Loading weights" in bars["after"]


def test_overlapping_loads_put_everything_back_when_the_last_ends(
    host_handler: Records,
) -> None:
    logger = logging.getLogger("transformers")
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def first() -> None:
        with quiet_loading("transformers"):
            first_in.set()
            assert second_in.wait(timeout=60)
        first_out.set()

    def second() -> None:
        assert first_in.wait(timeout=60)
        with quiet_loading("transformers"):
            second_in.set()
            assert first_out.wait(timeout=60)
            # The first load ended: this one is still quiet.
            seen["bar"] = bar_output()
            seen["filters"] = [list(handler.filters) for handler in logger.handlers]

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen["bar"] == ""
    assert all(filters for filters in seen["filters"])  # type: ignore[attr-defined]
    # Both ended: no filter left on any handler, and no hook.
    assert all(not handler.filters for handler in logger.handlers)
    assert transformers_logging.set_tqdm_hook(None) is None


def test_a_hook_the_host_set_is_kept_and_still_called(host_handler: Records) -> None:
    calls: list[str] = []

    def host_hook(factory: object, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
        calls.append(str(kwargs.get("desc")))
        return factory(*args, **kwargs)  # type: ignore[operator]

    transformers_logging.set_tqdm_hook(host_hook)
    try:
        with quiet_loading("transformers"):
            assert bar_output() == ""
        assert "Loading weights" in bar_output()
        assert calls == ["Loading weights", "Loading weights"]
    finally:
        assert transformers_logging.set_tqdm_hook(None) is host_hook


HOST_SCRIPT = """
import logging
import sys

import limner

# A host with logging of its own, at INFO, on stderr.
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="host: %(name)s %(message)s")
root = logging.getLogger()
before = (root.level, list(root.handlers))
vector = limner.embedder("limner/tiny-clip").blocking().embed_image("examples/logo.png")
generator = limner.generator("limner/tiny-flux").blocking()
result = generator.generate("a lighthouse", limner.ImageGenerationConfig(seed=1, steps=2))
print(vector.shape, result.images[0].size)

import transformers.utils.logging as transformers_logging
import diffusers.utils.logging as diffusers_logging

assert (root.level, list(root.handlers)) == before
for name in ("transformers", "diffusers", None):
    for handler in logging.getLogger(name).handlers:
        assert not handler.filters, (name, handler.filters)
assert transformers_logging.set_tqdm_hook(None) is None
assert type(diffusers_logging.tqdm).__name__ == "_tqdm_cls", diffusers_logging.tqdm
# The host's own use of the libraries prints as before.
logging.getLogger("transformers.host").warning("the host's warning")
logging.getLogger("diffusers.host").warning("the host's diffusers warning")
"""


@pytest.mark.subprocess  # a host's script, as it runs on its own
def test_a_host_script_sees_no_bars_or_advice_and_keeps_its_logging(tmp_path: Path) -> None:
    pytest.importorskip("limner_clip", reason="loads the CLIP plugin's tiny model")
    pytest.importorskip("limner_flux", reason="loads the FLUX plugin's tiny model")
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "HF_HUB_OFFLINE": "1",
        "LIMNER_PLUGINS": "clip,flux",
        # With CI set, transformers' loggers also propagate to the host's root handlers.
        "CI": "true",
    }
    for name in [*env]:  # the process is a host's, not quieted by environment
        if name.endswith("_VERBOSITY") or "PROGRESS_BARS" in name or name.startswith("TQDM_"):
            del env[name]
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(HOST_SCRIPT)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "(64,) (64, 64)\n"
    for noise in ("Loading weights", "Loading pipeline components", "torchvision", "%|"):
        assert noise not in result.stderr, result.stderr
    assert "the host's warning" in result.stderr
    assert "the host's diffusers warning" in result.stderr
    # limner's own log still reaches the host's handlers.
    assert "host: limner.pool loaded limner/tiny-clip" in result.stderr, result.stderr
