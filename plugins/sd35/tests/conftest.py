"""Fixtures: an offline, throwaway Hugging Face cache and the tiny SD3.5 loaded once."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import limner
import limner_sd35
from limner_sd35._backend import SD35Backend

# Before anything imports huggingface_hub, which reads these once: nothing may go online.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

#: The user's own cache, where the real-weights test looks for SD3.5 Large Turbo.
USER_CACHE = limner.hf_cache_dir()

TINY = "limner/tiny-sd35"
BackendMaker = Callable[..., SD35Backend]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def user_cache() -> Path:
    return USER_CACHE


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh HF cache for the session: the tiny model is written there on first load."""
    return tmp_path_factory.mktemp("hf-cache")


def _offline_env(patch: pytest.MonkeyPatch, cache: Path) -> None:
    patch.setenv("HF_HUB_CACHE", str(cache))
    patch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("LIMNER_MODELS_DIR", "LIMNER_DEVICE", "LIMNER_DTYPE"):
        patch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def offline_cache(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test here sees only the session's cache; other test directories are untouched."""
    _offline_env(monkeypatch, hf_cache)
    return hf_cache


@pytest.fixture
def registry() -> limner.Registry:
    registry = limner.Registry(entry_points=False)
    registry.register_plugin(limner_sd35)
    return registry


def build_backend(registry: limner.Registry, key: str, **configure: Any) -> SD35Backend:
    """The backend exactly as the core builds it: the spec's factory, the registry's settings."""
    if configure:
        registry.configure(key, **configure)
    spec = registry.spec(key)
    assert isinstance(spec.factory, str)
    module, _, name = spec.factory.partition(":")
    factory = getattr(importlib.import_module(module), name)
    backend = factory(spec, registry.settings(key))
    assert isinstance(backend, SD35Backend)
    return backend


@pytest.fixture
def make_backend(registry: limner.Registry) -> BackendMaker:
    def make(key: str = TINY, **configure: Any) -> SD35Backend:
        return build_backend(registry, key, **configure)

    return make


@pytest.fixture(scope="session")
def tiny(hf_cache: Path) -> Iterator[SD35Backend]:
    """The tiny SD3.5, loaded once and shared: generation never mutates a backend."""
    registry = limner.Registry(entry_points=False)
    registry.register_plugin(limner_sd35)
    with pytest.MonkeyPatch.context() as patch:
        _offline_env(patch, hf_cache)
        backend = build_backend(registry, TINY)
        backend.load()
    yield backend
    backend.unload()
