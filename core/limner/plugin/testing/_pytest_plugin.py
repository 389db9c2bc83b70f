"""limner's pytest plugin, found through the ``pytest11`` entry point: the plugin authors'
conformance suite on the command line (``pytest --limner-conformance KEY``), assertion
rewriting for the contract classes, and the markers they use."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.register_assert_rewrite(
    "limner.plugin.testing",
    "limner.plugin.testing._contract",
    "limner.plugin.testing._embedding",
    "limner.plugin.testing._generation",
    "limner.diffusion.testing",
    "limner.diffusion._contract",
)

__all__ = ["conformance_keys", "pytest_addoption", "pytest_configure"]

_KEYS: list[str] = []


def conformance_keys() -> list[str]:
    """The keys given to ``--limner-conformance`` in this run."""
    return list(_KEYS)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("limner", "limner plugins")
    group.addoption(
        "--limner-conformance",
        action="append",
        default=[],
        metavar="KEY",
        help="run limner's plugin conformance suite on the installed plugin serving KEY "
        "(its tiny model); repeatable. Alone, it runs only the suite.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_weights: needs the real model weights in the local Hugging Face cache"
    )
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    keys = config.getoption("limner_conformance", default=None) or []
    if not keys:
        return
    _KEYS[:] = keys
    suite = str(Path(__file__).with_name("_conformance.py"))
    if config.args_source is pytest.Config.ArgsSource.ARGS:
        config.args.append(suite)  # the paths given on the command line, and the suite
    else:
        config.args[:] = [suite]  # only the suite, not the project's own tests
