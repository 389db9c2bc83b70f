"""The conformance suite: what every limner plugin passes, run against its real backend.

A plugin's tests subclass the contract of its capability, name the key of its tiny model,
and get every test below with the fixtures they use::

    import limner_acme
    from limner.plugin.testing import ImageEmbeddingContract


    class TestAcme(ImageEmbeddingContract):
        key = "acme/tiny"  # the tiny model the suite loads and runs
        plugin = limner_acme  # or leave it out: found through its `limner` entry point

Or, with nothing written, ``pytest --limner-conformance acme/tiny`` runs the suite on any
installed plugin's key (the option comes with limner, through pytest's ``pytest11`` entry
point). What it checks: the plugin module imports no torch; its specs are valid (the tiny
key pinned at its revision); it declares the plugin API it was written for; bad settings are
typed errors naming the setting, and a device it cannot use fails the load; memory is
reported after load, and an eviction frees the model (weak references die). For an
embedder: float32 rows of unit length and of the declared dimension, in input order; a batch
equals its singles, also through the pool and from several threads; text works where
declared and is refused where not. For a generator: ``resolve_config`` fills the defaults,
is idempotent, and refuses bad ``num_images``, sizes, steps, guidance, seeds, formats and
previews naming the field; generation streams progress then the result, is deterministic by
seed, and stops at the next step when cancelled.

Every test runs offline against a Hugging Face cache of the class's own, where the tiny model
is written on first load. Class attributes tune it (``bad_settings``, ``bad_fields``,
``text``, ``tolerance``, ``steps``); a plugin's own tests go in the same class.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.metadata
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from limner import (
    Capability,
    GenerationResult,
    ImageEmbedder,
    ImageGenerationConfig,
    ImageGenerator,
    InvalidInput,
    ModelLoadError,
    Pool,
    Progress,
    Registry,
)
from limner._backends import Backend, ImageEmbeddingBackend, TextToImageBackend
from limner._hookspecs import API_ATTRIBUTE, PLUGIN_API, PROJECT_NAME
from limner.errors import Cancelled
from limner.testing import FakeClock, FakeMemory

__all__ = [
    "HEAVY_MODULES",
    "ImageEmbeddingContract",
    "PluginContract",
    "TextToImageContract",
    "contract_for",
    "photo_like",
]

#: What importing a plugin module and building its backends must not import.
HEAVY_MODULES = ("torch", "transformers", "diffusers", "huggingface_hub")

Vectors = npt.NDArray[np.float32]


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A seeded RGB image with structure at several scales (smooth colour fields and grain),
    so that resizing behaves as on photos and embeddings differ between images."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 40, 2), max(width // 40, 2), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.normal(0.0, 10.0, field.shape)
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


def _offline(patch: pytest.MonkeyPatch, cache: Path) -> None:
    patch.setenv("HF_HUB_CACHE", str(cache))
    patch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("LIMNER_MODELS_DIR", "LIMNER_DEVICE", "LIMNER_DTYPE", "LIMNER_PLUGINS"):
        patch.delenv(name, raising=False)


def _ids(values: Sequence[tuple[Any, ...]]) -> list[str]:
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
            metafunc.parametrize("bad_setting", settings, ids=_ids(settings))

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


# -- image embedding --------------------------------------------------------------------------


class ImageEmbeddingContract(PluginContract):
    """The conformance suite of an image-embedding plugin; subclass it as ``Test<Plugin>``."""

    capability = Capability.IMAGE_EMBEDDING
    #: Whether the model embeds text; ``None`` checks nothing about it.
    text: ClassVar[bool | None] = None
    #: How far a row may stray between a batch and the same input alone (16-bit dtypes round
    #: differently in batches of other sizes).
    tolerance: ClassVar[float] = 2e-3

    @pytest.fixture(scope="class")
    @classmethod
    def images(cls) -> list[Image.Image]:
        """Seeded RGB images: landscape, portrait, a panorama, a square, odd and 1 x 1."""
        sizes = [(640, 480), (300, 400), (1000, 333), (224, 224), (33, 17), (1, 1)]
        return [photo_like(width, height, seed) for seed, (width, height) in enumerate(sizes)]

    def embed(self, backend: ImageEmbeddingBackend, images: Sequence[Image.Image]) -> Vectors:
        """``images`` through ``prepare`` and one ``embed_prepared`` batch, checked."""
        rows = backend.embed_prepared([backend.prepare(image) for image in images])
        return self.check_rows(backend, rows, len(images))

    def check_rows(self, backend: Backend, rows: Any, count: int) -> Vectors:
        dimension = backend.spec.info.embedding_dimension
        assert isinstance(rows, np.ndarray), f"returned {type(rows).__name__}, not an array"
        assert rows.dtype == np.float32, f"returned {rows.dtype} rows, not float32"
        assert rows.shape == (count, dimension), (
            f"returned {rows.shape}; want ({count}, {dimension})"
        )
        assert np.isfinite(rows).all()
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3)
        return rows

    def test_vectors_are_unit_float32_rows_of_the_declared_dimension(
        self, loaded: ImageEmbeddingBackend, images: list[Image.Image]
    ) -> None:
        vectors = self.embed(loaded, images)
        assert np.abs(vectors[0] - vectors[1]).max() > 1e-3, "two images gave one vector"

    def test_rows_follow_the_input_order(
        self, loaded: ImageEmbeddingBackend, images: list[Image.Image]
    ) -> None:
        forward = self.embed(loaded, images)
        backward = self.embed(loaded, images[::-1])
        np.testing.assert_allclose(backward, forward[::-1], atol=self.tolerance)

    def test_a_batch_equals_its_singles(
        self, loaded: ImageEmbeddingBackend, images: list[Image.Image]
    ) -> None:
        batch = self.embed(loaded, images)
        for index, image in enumerate(images):
            single = self.embed(loaded, [image])
            np.testing.assert_allclose(single[0], batch[index], atol=self.tolerance)

    def test_concurrent_batches_match_sequential_ones(
        self, loaded: ImageEmbeddingBackend, images: list[Image.Image]
    ) -> None:
        halves = [images[:3], images[3:]]
        expected = [self.embed(loaded, half) for half in halves]
        failures: list[str] = []

        def work(slot: int) -> None:
            try:
                for _ in range(3):
                    got = loaded.embed_prepared([loaded.prepare(image) for image in halves[slot]])
                    if not np.allclose(got, expected[slot], atol=self.tolerance):
                        failures.append(f"batch {slot} differs")
            except Exception as error:
                failures.append(repr(error))

        threads = [threading.Thread(target=work, args=(slot,)) for slot in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert failures == []

    @pytest.mark.anyio
    async def test_served_through_the_pool_as_it_runs_directly(
        self,
        registry: Registry,
        loaded: ImageEmbeddingBackend,
        images: list[Image.Image],
        tmp_path: Path,
    ) -> None:
        paths = []
        for index, image in enumerate(images):
            paths.append(tmp_path / f"image-{index}.png")
            image.save(paths[-1])
        direct = self.embed(loaded, images)
        model = registry.embedder(self.key)
        async with Pool(memory=FakeMemory(total_mb=1_000_000), clock=FakeClock()) as pool:
            served = await model.using(pool).embed_images(paths)
            one = await model.using(pool).embed_image(paths[2])
        np.testing.assert_allclose(served, direct, atol=self.tolerance)
        assert one.shape == (model.embedding_dimension,)

    def test_text_works_where_declared(self, loaded: ImageEmbeddingBackend) -> None:
        if self.text is not None:
            assert loaded.supports_text == self.text, (
                "override embed_texts to embed text" if self.text else "embed_texts is overridden"
            )
        if not loaded.supports_text:
            pytest.skip(f"{self.key} embeds no text")
        texts = ["a red fox", "a lighthouse at dusk", "", "Ünïcödé, 東京 🦊", "word " * 2_000]
        vectors = self.check_rows(
            loaded, loaded.embed_texts([loaded.prepare_text(t) for t in texts]), len(texts)
        )
        assert np.abs(vectors[0] - vectors[1]).max() > 1e-3, "two texts gave one vector"
        for index, text in enumerate(texts):
            single = loaded.embed_texts([loaded.prepare_text(text)])
            np.testing.assert_allclose(single[0], vectors[index], atol=self.tolerance)

    @pytest.mark.anyio
    async def test_bad_inputs_are_typed_errors(self, registry: Registry, tmp_path: Path) -> None:
        model: ImageEmbedder = registry.embedder(self.key)
        good = tmp_path / "good.png"
        photo_like(64, 48, 0).save(good)
        async with Pool(memory=FakeMemory(total_mb=1_000_000), clock=FakeClock()) as pool:
            served = model.using(pool)
            with pytest.raises(InvalidInput) as caught:
                await served.embed_images([good, b"not an image"])
            assert caught.value.index == 1
            with pytest.raises(InvalidInput):
                await served.embed_images([tmp_path / "missing.png"])
            if not model.supports_text:
                with pytest.raises(InvalidInput, match="does not embed text"):
                    await served.embed_text("a red fox")
            else:
                with pytest.raises(InvalidInput) as caught:
                    await served.embed_text(["fine", 3])  # type: ignore[list-item]
                assert caught.value.index == 1


# -- text to image ----------------------------------------------------------------------------

#: ``(field, value)`` every generator's ``resolve_config`` refuses, naming the field.
BAD_FIELDS: tuple[tuple[str, object], ...] = (
    ("num_images", 0),
    ("num_images", -1),
    ("num_images", 1.5),
    ("num_images", True),
    ("num_images", 10_000),
    ("width", 0),
    ("width", -64),
    ("width", 64.5),
    ("width", "64"),
    ("width", True),
    ("width", 100_000),
    ("height", 0),
    ("height", 100_000),
    ("steps", 0),
    ("steps", -1),
    ("steps", 2.5),
    ("steps", "4"),
    ("steps", 100_000),
    ("guidance", -1.0),
    ("guidance", math.nan),
    ("guidance", math.inf),
    ("guidance", "3"),
    ("seed", -1),
    ("seed", 1.5),
    ("seed", "42"),
    ("output_format", "gif"),
    ("output_format", ""),
    ("output_format", 3),
    ("preview", "yes"),
)


class TextToImageContract(PluginContract):
    """The conformance suite of a text-to-image plugin; subclass it as ``Test<Plugin>``."""

    capability = Capability.TEXT_TO_IMAGE
    #: ``(key, field, value)``: more config values a key refuses, naming the field.
    bad_fields: ClassVar[Sequence[tuple[str, str, Any]]] = ()
    #: Steps the suite's generations run: few, on the tiny model.
    steps: ClassVar[int] = 2

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        super().pytest_generate_tests(metafunc)
        if "bad_field" in metafunc.fixturenames:
            fields = [(self.key, field, value) for field, value in BAD_FIELDS]
            fields += list(self.bad_fields)
            metafunc.parametrize("bad_field", fields, ids=_ids(fields))

    def run(
        self, backend: TextToImageBackend, prompt: str = "a lighthouse at dusk", **fields: Any
    ) -> tuple[list[Progress], GenerationResult]:
        """Generate with a loaded backend directly: each step's progress, then the result."""
        steps: list[Progress] = []
        config = backend.resolve_config(ImageGenerationConfig(**{"steps": self.steps, **fields}))
        return steps, backend.generate(prompt, config, on_step=steps.append)

    def test_resolve_config_fills_the_defaults_and_is_idempotent(self, make_backend: Any) -> None:
        backend = make_backend()
        resolved = backend.resolve_config(ImageGenerationConfig(seed=7))
        assert None not in (resolved.width, resolved.height, resolved.steps, resolved.guidance)
        assert resolved.seed == 7
        assert backend.resolve_config(resolved) == resolved
        drawn = {backend.resolve_config(ImageGenerationConfig()).seed for _ in range(8)}
        assert None not in drawn and len(drawn) > 1, "a seed is drawn when none is given"
        for output_format in ("png", "jpeg", "webp"):
            config = ImageGenerationConfig(output_format=output_format)
            assert backend.resolve_config(config).output_format == output_format

    def test_resolve_config_refuses_a_bad_field_naming_it(
        self, make_backend: Any, bad_field: tuple[str, str, Any]
    ) -> None:
        key, field, value = bad_field
        config = dataclasses.replace(ImageGenerationConfig(), **{field: value})
        with pytest.raises(InvalidInput) as caught:
            make_backend(key).resolve_config(config)
        assert caught.value.field == field
        assert field in str(caught.value)

    @pytest.mark.anyio
    async def test_streams_progress_then_the_result(
        self, registry: Registry, loaded: TextToImageBackend
    ) -> None:
        model: ImageGenerator = registry.generator(self.key)
        config = ImageGenerationConfig(steps=self.steps, seed=21, num_images=2)
        async with Pool(memory=FakeMemory(total_mb=1_000_000), clock=FakeClock()) as pool:
            chunks = [c async for c in model.using(pool).generate_image("a red fox", config)]
        *progress, result = chunks
        assert isinstance(result, GenerationResult), "the last chunk is the result"
        assert progress and all(isinstance(chunk, Progress) for chunk in progress)
        totals = {chunk.total for chunk in progress if isinstance(chunk, Progress)}
        assert len(totals) == 1, f"progress changed its total: {totals}"
        total = totals.pop()
        assert [c.step for c in progress if isinstance(c, Progress)] == list(range(1, total + 1))
        resolved = model.resolve_config(config)
        assert (result.model, result.prompt, result.seed) == (self.key, "a red fox", 21)
        assert len(result.images) == 2
        for image in result.images:
            assert image.mode == "RGB"
            assert image.size == (resolved.width, resolved.height)
        _, direct = self.run(loaded, "a red fox", seed=21, num_images=2)
        for served, alone in zip(result.images, direct.images):
            assert np.array_equal(np.asarray(served), np.asarray(alone)), "the pool changed it"

    def test_deterministic_by_seed(self, loaded: TextToImageBackend) -> None:
        _, one = self.run(loaded, seed=1234)
        _, same = self.run(loaded, seed=1234)
        _, other = self.run(loaded, seed=1235)
        first = np.asarray(one.images[0])
        assert np.array_equal(first, np.asarray(same.images[0])), "one seed, two images"
        assert not np.array_equal(first, np.asarray(other.images[0])), "two seeds, one image"
        assert first.std() > 0, "a flat image"
        _, drawn = self.run(loaded)
        _, again = self.run(loaded, seed=drawn.seed)
        assert np.array_equal(np.asarray(drawn.images[0]), np.asarray(again.images[0])), (
            "the seed a result reports does not make it again"
        )

    def test_stops_at_the_next_step_when_cancelled(self, loaded: TextToImageBackend) -> None:
        seen: list[int] = []

        def on_step(progress: Progress) -> None:
            seen.append(progress.step)
            raise Cancelled("the consumer went away")

        config = loaded.resolve_config(ImageGenerationConfig(steps=max(self.steps, 3), seed=1))
        with pytest.raises(Cancelled):
            loaded.generate("a cat", config, on_step=on_step)
        assert seen == [1], f"ran on after the first step raised: {seen}"
        steps, result = self.run(loaded)  # unharmed: the next one runs to the end
        assert steps and len(result.images) == 1


def contract_for(key: str) -> type[PluginContract]:
    """A contract class for an installed plugin's ``key``, of the key's capability: what
    ``pytest --limner-conformance KEY`` runs."""
    capability = Registry().spec(key).capability
    base: type[PluginContract] = (
        ImageEmbeddingContract if capability is Capability.IMAGE_EMBEDDING else TextToImageContract
    )
    name = "TestConformance_" + re.sub(r"\W", "_", key)
    return type(name, (base,), {"key": key, "__module__": __name__})
