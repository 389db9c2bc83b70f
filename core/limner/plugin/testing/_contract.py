"""The part of the conformance suite every plugin passes, whatever its capability:
:class:`PluginContract`, its fixtures, and the helpers the suites share. Public through
``limner.plugin.testing``."""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from limner import (
    Capability,
    InvalidInput,
    ModelLoadError,
    Pool,
    Registry,
)
from limner._registry._hookspecs import API_ATTRIBUTE, PLUGIN_API, PROJECT_NAME
from limner.plugin._backends import Backend, ImageEmbeddingBackend, TextToImageBackend
from limner.testing import FakeClock, FakeMemory

__all__ = [
    "HEAVY_MODULES",
    "PluginContract",
    "Vectors",
    "param_ids",
    "photo_like",
    "run_in_threads",
]

HEAVY_MODULES = ("torch", "transformers", "diffusers", "huggingface_hub")

Vectors = npt.NDArray[np.float32]
T = TypeVar("T")


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A seeded RGB image with structure at several scales (smooth colour fields and grain),
    so that resizing behaves as on photos and embeddings differ between images."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 40, 2), max(width // 40, 2), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.normal(0.0, 10.0, field.shape)
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


def run_in_threads(work: Callable[[T], object], arguments: Iterable[T], *, timeout: float) -> None:
    """``work(argument)`` for each of ``arguments``, each in a thread of its own, all at once;
    returns when every thread has ended (or waited ``timeout`` seconds for it). ``work``
    records its own failures: what a thread raises is lost with it."""
    threads = [threading.Thread(target=work, args=(argument,)) for argument in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)


def _offline(patch: pytest.MonkeyPatch, cache: Path) -> None:
    patch.setenv("HF_HUB_CACHE", str(cache))
    patch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("LIMNER_MODELS_DIR", "LIMNER_DEVICE", "LIMNER_DTYPE", "LIMNER_PLUGINS"):
        patch.delenv(name, raising=False)


def param_ids(values: Sequence[tuple[Any, ...]]) -> list[str]:
    """Readable pytest ids for parametrized tuples: ``key-field-value``."""
    return [
        "-".join(repr(part) if not isinstance(part, str) else part for part in value)
        for value in values
    ]


class PluginContract:
    """The tests every plugin passes, whatever its capability. Subclass
    :class:`ImageEmbeddingContract` or :class:`TextToImageContract` instead."""

    #: The key the suite loads and runs: the plugin's tiny model (``ModelInfo(tiny=True)``).
    key: ClassVar[str]
    #: The plugin module its entry point names; ``None``: found through that entry point.
    plugin: ModuleType | None = None
    #: The entry point's name and the distribution, when the test should insist on them.
    entry_point: ClassVar[str | None] = None
    distribution: ClassVar[str | None] = None
    #: ``(setting, value)`` the backend refuses when built, besides a bad device and dtype:
    #: an option of the plugin's (``ModelSettings.options``), named in the ``InvalidInput``.
    bad_settings: ClassVar[Sequence[tuple[str, object]]] = ()
    capability: ClassVar[Capability]

    # -- finding the plugin ---------------------------------------------------------------

    @classmethod
    def installed_entry_point(cls) -> importlib.metadata.EntryPoint | None:
        """The ``limner`` entry point of the plugin, when its distribution is installed."""
        found = list(importlib.metadata.entry_points(group=PROJECT_NAME))
        if cls.plugin is None:
            registry = Registry()
            names = {entry.plugin.name for entry in registry.entries() if entry.key == cls.key}
            return next((ep for ep in found if ep.name in names), None)
        module = cls.plugin.__name__
        return next((ep for ep in found if ep.value.partition(":")[0] == module), None)

    @classmethod
    def plugin_module(cls) -> ModuleType:
        if cls.plugin is not None:
            return cls.plugin
        entry_point = cls.installed_entry_point()
        if entry_point is None:
            raise LookupError(
                f"no installed limner plugin serves {cls.key!r}; install it, or set the "
                "contract's plugin attribute to its module"
            )
        module = entry_point.load()
        assert isinstance(module, ModuleType), module
        return module

    @classmethod
    def new_registry(cls) -> Registry:
        """A registry that knows only the plugin (installed or not)."""
        registry = Registry(entry_points=False)
        registry.register_plugin(cls.plugin_module())
        return registry

    @classmethod
    def build_backend(cls, registry: Registry, key: str | None = None, **configure: Any) -> Any:
        """A new backend as the core builds it (the spec's factory, the registry's settings),
        not loaded; ``configure`` goes to ``registry.configure``."""
        key = key or cls.key
        if configure:
            registry.configure(key, **configure)
        spec = registry.spec(key)
        factory = spec.factory
        if isinstance(factory, str):
            module, _, name = factory.partition(":")
            factory = getattr(importlib.import_module(module), name)
        return factory(spec, registry.settings(key))

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "bad_setting" in metafunc.fixturenames:
            settings = [("device", "gpu"), ("dtype", "int4"), *self.bad_settings]
            metafunc.parametrize("bad_setting", settings, ids=param_ids(settings))

    # -- fixtures -------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def anyio_backend(cls) -> str:
        return "asyncio"

    @pytest.fixture(scope="class")
    @classmethod
    def hf_cache(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A fresh Hugging Face cache for the class: the tiny model is written there."""
        return tmp_path_factory.mktemp("hf-cache")

    @pytest.fixture(autouse=True)
    def offline_cache(self, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        """Every test is offline and sees only the class's cache."""
        _offline(monkeypatch, hf_cache)
        return hf_cache

    @pytest.fixture
    def registry(self) -> Registry:
        return self.new_registry()

    @pytest.fixture
    def make_backend(self, registry: Registry) -> Any:
        """``make_backend(key=None, **configure)``: a backend as the core builds it."""

        def make(key: str | None = None, **configure: Any) -> Any:
            return self.build_backend(registry, key, **configure)

        return make

    @pytest.fixture(scope="class")
    @classmethod
    def loaded(cls, hf_cache: Path) -> Iterator[Any]:
        """The tiny model's backend, loaded once for the class and shared."""
        with pytest.MonkeyPatch.context() as patch:
            _offline(patch, hf_cache)
            backend = cls.build_backend(cls.new_registry())
            backend.load()
        yield backend
        backend.unload()

    # -- the plugin and its specs ---------------------------------------------------------

    def test_plugin_module_imports_no_torch(self) -> None:
        """Importing the plugin, registering it and building its backends (and, for a
        generator, resolving a config) import nothing heavy: that waits for ``load``."""
        code = textwrap.dedent(
            f"""
            import importlib, sys
            import limner
            registry = limner.Registry(entry_points=False)
            registry.register_plugin(importlib.import_module({self.plugin_module().__name__!r}))
            for entry in registry.entries():
                model = registry.get(entry.key)
                if hasattr(model, "resolve_config"):
                    model.resolve_config()
            heavy = sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)
            print(",".join(heavy) or "none")
            """
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "none", "imported when the plugin registers"

    def test_declares_the_plugin_api_it_is_written_for(self) -> None:
        declared = getattr(self.plugin_module(), API_ATTRIBUTE, None)
        assert declared == PLUGIN_API, (
            f"set {API_ATTRIBUTE} = {PLUGIN_API} in {self.plugin_module().__name__}"
        )

    def test_specs_are_valid(self, registry: Registry) -> None:
        [record] = registry.plugins()
        assert record.error is None, record.error
        assert self.key in record.keys, f"{self.key} is not among {record.keys}"
        for entry in registry.entries():
            spec = entry.spec
            assert spec.capability is not None
            backend = registry.get(spec.key).backend  # the factory builds it, cheaply
            base = (
                ImageEmbeddingBackend
                if spec.capability is Capability.IMAGE_EMBEDDING
                else TextToImageBackend
            )
            assert isinstance(backend, base)
            assert spec.info.description, f"{spec.key} has no description"
            assert spec.info.license, f"{spec.key} declares no license"
            if spec.capability is Capability.IMAGE_EMBEDDING:
                dimension = spec.info.embedding_dimension
                assert isinstance(dimension, int) and dimension > 0, spec.key
            else:
                resolved = registry.generator(spec.key).resolve_config()
                assert None not in (resolved.width, resolved.height, resolved.steps, resolved.seed)
        tiny = registry.spec(self.key)
        assert tiny.capability is self.capability
        assert tiny.info.tiny, f"{self.key} is not marked ModelInfo(tiny=True)"
        assert tiny.info.description.startswith("TINY"), "say TINY in a tiny model's description"
        revision = tiny.info.revision
        assert revision is not None and re.fullmatch("[0-9a-f]{40}", revision), (
            f"{self.key} must declare ModelInfo(revision=<its tiny revision>), or loading "
            "looks for another revision (TinyModel.info sets it)"
        )
        assert registry.settings(self.key).revision == revision

    def test_registered_through_its_entry_point(self) -> None:
        entry_point = self.installed_entry_point()
        if entry_point is None:
            pytest.skip(f"{self.plugin_module().__name__} is not installed: pip install -e it")
        registry = Registry(plugins=entry_point.name)
        record = next(p for p in registry.plugins() if p.name == entry_point.name)
        assert record.error is None, record.error
        assert set(record.keys) == {entry.key for entry in self.new_registry().entries()}
        if self.entry_point is not None:
            assert entry_point.name == self.entry_point
        if self.distribution is not None:
            assert record.distribution == self.distribution

    # -- settings, loading, memory --------------------------------------------------------

    def test_bad_settings_are_typed_errors_naming_the_setting(
        self, registry: Registry, bad_setting: tuple[str, object]
    ) -> None:
        setting, value = bad_setting
        configure: dict[str, Any] = (
            {setting: value} if setting in ("device", "dtype") else {"options": {setting: value}}
        )
        registry.configure(self.key, **configure)
        with pytest.raises(InvalidInput) as caught:
            registry.get(self.key)
        assert caught.value.field == setting
        assert str(value) in str(caught.value)

    def test_a_device_it_cannot_use_fails_the_load(self, make_backend: Any) -> None:
        """The device setting is honoured, not ignored: there is no 99th CUDA device."""
        with pytest.raises(ModelLoadError, match="cuda:99"):
            make_backend(device="cuda:99").load()

    def test_memory_is_reported_after_load(self, loaded: Backend) -> None:
        measured = loaded.memory_mb()
        assert isinstance(measured, (int, float)) and measured > 0, (
            "memory_mb() must measure the loaded model"
        )
        declared = loaded.spec.info.memory_mb
        assert measured < 4 * declared, f"measured {measured:.0f} MB, declared {declared:.0f}"
        assert re.fullmatch(r"cpu|cuda:\d+", loaded.memory_device())

    @pytest.mark.anyio
    async def test_an_eviction_frees_the_model(self, registry: Registry) -> None:
        """After the pool evicts the model (``unload()``, then the attributes ``load`` added
        are dropped) nothing keeps it alive: no module-level cache, no reference cycle."""
        model = registry.get(self.key)
        backend = model.backend
        before = dict(vars(backend))
        async with Pool(memory=FakeMemory(total_mb=1_000_000), clock=FakeClock()) as pool:
            await model.using(pool).load()
            refs = _model_references(backend, before)
            assert refs, "load() kept nothing on the backend that a weak reference can follow"
            assert await pool.evict(self.key)
        gc.collect()
        alive = [description for description, ref in refs if ref() is not None]
        assert alive == [], f"still alive after the eviction: {alive}"


def _model_references(backend: Backend, before: dict[str, Any]) -> list[tuple[str, Any]]:
    """Weak references to what ``load`` put on the backend: the torch modules in it, or the
    new attribute values themselves when there are none."""
    torch = sys.modules.get("torch")
    added = {
        name: value
        for name, value in vars(backend).items()
        if name not in before or before[name] is not value
    }
    modules: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def visit(name: str, value: Any, depth: int) -> None:
        if id(value) in seen or depth > 4 or isinstance(value, (str, bytes, int, float)):
            return
        seen.add(id(value))
        if torch is not None and isinstance(value, torch.nn.Module):
            modules.append((name, weakref.ref(value)))
            return
        children: Any = ()
        if isinstance(value, dict):
            children = value.items()
        elif isinstance(value, (list, tuple)):
            children = enumerate(value)
        elif hasattr(value, "__dict__"):
            children = vars(value).items()
        for child_name, child in list(children):
            visit(f"{name}.{child_name}", child, depth + 1)

    for name, value in added.items():
        visit(name, value, 0)
    if modules:
        return modules
    refs = []
    for name, value in added.items():
        try:
            refs.append((name, weakref.ref(value)))
        except TypeError:
            continue
    return refs
