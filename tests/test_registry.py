"""The registry: discovery from real distribution metadata, laziness, errors, concurrency."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import limner
import limner.plugin
from limner import Capability, ModelInfo, ModelSpec, PluginError, Registry, UnknownModelError
from limner.testing import FakeEmbeddingBackend, fake_embedding_spec

PLUGIN_TEMPLATE = """
import limner.plugin
from limner.testing import FakeEmbeddingBackend

BUILT = []

def build(spec, settings):
    BUILT.append(spec.key)
    return FakeEmbeddingBackend(spec, settings)

@limner.plugin.hookimpl
def limner_register_models(register):
{body}
"""


def make_distribution(
    root: Path, name: str, body: str, *, version: str = "1.0", entry: str | None = None
) -> None:
    """Write an installed-looking distribution: a module plus a dist-info with entry points."""
    module = f"{name.replace('-', '_')}_plugin"
    source = PLUGIN_TEMPLATE.format(body=textwrap.indent(textwrap.dedent(body), "    "))
    (root / f"{module}.py").write_text(source)
    dist_info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )
    (dist_info / "entry_points.txt").write_text(f"[limner]\n{entry or name} = {module}\n")


def spec_line(key: str, *, aliases: tuple[str, ...] = (), dimension: int = 8) -> str:
    return (
        f"register(limner.ModelSpec(key={key!r}, capability='image-embedding', "
        f"factory='{{module}}:build', aliases={aliases!r}, "
        f"info=limner.ModelInfo(memory_mb=10, embedding_dimension={dimension})))"
    )


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path that importlib.metadata scans like site-packages."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.endswith("_plugin")]:
        del sys.modules[name]


def add_plugin(site: Path, name: str, *lines: str, **kwargs: str) -> None:
    module = f"{name.replace('-', '_')}_plugin"
    body = "\n".join(line.replace("{module}", module) for line in lines)
    make_distribution(site, name, body, **kwargs)


def test_discovers_models_from_distribution_metadata(site: Path) -> None:
    add_plugin(site, "acme-vision", spec_line("acme/small", aliases=("acme-s",), dimension=16))
    registry = Registry(plugins="acme-vision")
    entries = registry.entries()
    assert [entry.key for entry in entries] == ["acme/small"]
    entry = entries[0]
    assert entry.plugin.distribution == "acme-vision"
    assert entry.plugin.version == "1.0"
    assert entry.spec.info.embedding_dimension == 16
    assert [plugin.keys for plugin in registry.plugins()] == [("acme/small",)]


def test_get_is_lazy_and_builds_once(site: Path) -> None:
    add_plugin(site, "acme-vision", spec_line("acme/small"))
    registry = Registry(plugins="acme-vision")
    registry.entries()
    assert "acme_vision_plugin" in sys.modules
    plugin = sys.modules["acme_vision_plugin"]
    assert plugin.BUILT == []  # listing builds nothing
    model = registry.get("acme/small")
    assert plugin.BUILT == ["acme/small"]
    assert isinstance(model.backend, FakeEmbeddingBackend)
    assert model.backend.loads == 0  # no weights on get
    assert registry.get("acme/small") is model
    assert plugin.BUILT == ["acme/small"]


def test_aliases_resolve_to_the_same_model() -> None:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/one", aliases=("one", "uno")))
    assert registry.get("one") is registry.get("fake/one") is registry.get("uno")
    assert registry.spec("uno").key == "fake/one"


def test_unknown_key_suggests_close_matches() -> None:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("openai/clip-vit-base-patch32"))
    registry.register(fake_embedding_spec("openai/clip-vit-large-patch14-336"))
    with pytest.raises(UnknownModelError) as caught:
        registry.get("openai/clip-vit-base-patch23")
    assert caught.value.suggestions[0] == "openai/clip-vit-base-patch32"
    assert "Did you mean: openai/clip-vit-base-patch32" in str(caught.value)
    assert "limner models" in str(caught.value)
    assert isinstance(caught.value, KeyError)


def test_unknown_key_lists_installed_plugins(site: Path) -> None:
    add_plugin(site, "acme-vision", spec_line("acme/small"))
    registry = Registry(plugins="acme-vision")
    with pytest.raises(UnknownModelError, match=r"Installed plugins: acme-vision 1\.0"):
        registry.get("nothing/like-it")


def test_two_distributions_claiming_one_key_are_both_named(site: Path) -> None:
    add_plugin(site, "acme-vision", spec_line("shared/model"), spec_line("acme/own"))
    add_plugin(site, "other-vision", spec_line("shared/model"))
    registry = Registry(plugins="acme-vision,other-vision")
    with pytest.raises(PluginError) as caught:
        registry.get("shared/model")
    message = str(caught.value)
    assert "acme-vision 1.0" in message
    assert "other-vision 1.0" in message
    assert set(registry.conflicts()) == {"shared/model"}
    assert registry.get("acme/own").key == "acme/own"  # the rest of the plugin still works


def test_programmatic_duplicate_is_refused_unless_replaced() -> None:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/one", dimension=8))
    with pytest.raises(PluginError, match="already served by host"):
        registry.register(fake_embedding_spec("fake/one", dimension=4))
    registry.register(fake_embedding_spec("fake/one", dimension=4), replace=True)
    assert registry.embedder("fake/one").embedding_dimension == 4


def test_broken_plugins_are_recorded_and_isolated(site: Path) -> None:
    add_plugin(site, "good-vision", spec_line("good/model"))
    add_plugin(site, "hook-raises", "raise RuntimeError('boom in hook')")
    (site / "broken_import_plugin.py").write_text("import not_a_module_anywhere\n")
    dist_info = site / "broken_import-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-import\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text("[limner]\nbroken = broken_import_plugin\n")
    registry = Registry(plugins="good-vision,hook-raises,broken-import")
    errors = {p.distribution: p.error for p in registry.plugins()}
    assert errors["good-vision"] is None
    assert errors["hook-raises"] is not None and "boom in hook" in errors["hook-raises"]
    assert errors["broken-import"] is not None
    assert "not_a_module_anywhere" in errors["broken-import"]
    assert registry.get("good/model").key == "good/model"


def test_a_hook_with_a_wrong_signature_breaks_only_its_plugin(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LIMNER_PLUGINS", raising=False)
    add_plugin(site, "good-vision", spec_line("good/model"))
    (site / "bad_signature_plugin.py").write_text(
        "import limner.plugin\n\n"
        "@limner.plugin.hookimpl\n"
        "def limner_register_models(register, extra):\n"
        "    raise AssertionError('pluggy refuses this hook before calling it')\n"
    )
    dist_info = site / "bad_signature-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bad-signature\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text("[limner]\nbad = bad_signature_plugin\n")
    registry = Registry()  # every installed plugin too, as `limner models` sees them
    first = registry.entries()
    assert registry.entries() == first  # discovery is done once, and consistently
    records = {p.name: p for p in registry.plugins()}
    bad = records.pop("bad")
    assert bad.error is not None and "'extra'" in bad.error and bad.keys == ()
    assert "\n" not in bad.error
    assert "good/model" in records["good-vision"].keys
    for record in records.values():  # the installed ones (clip, flux, sd35) are all there
        assert record.error is None, record
        assert set(record.keys) <= {entry.key for entry in first}
    assert registry.get("good/model").key == "good/model"


def test_a_plugin_registering_something_else_than_a_spec_is_broken(site: Path) -> None:
    add_plugin(site, "odd", spec_line("odd/fine"), "register({'key': 'odd/dict'})")
    registry = Registry(plugins="odd")
    [record] = registry.plugins()
    assert record.error is not None and "not a limner.ModelSpec" in record.error
    assert registry.entries() == []  # all-or-nothing: the valid spec is not added either


def test_a_plugin_registering_a_key_twice_is_broken_as_a_whole(site: Path) -> None:
    add_plugin(site, "twice", spec_line("twice/a"), spec_line("twice/a"))
    registry = Registry(plugins="twice")
    [record] = registry.plugins()
    assert record.error is not None and "twice" in record.error
    assert registry.entries() == []


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (None, {"alpha/m", "beta/m"}),
        ("alpha", {"alpha/m"}),
        ("beta-vision", {"beta/m"}),
        ("-alpha", {"beta/m"}),
        ("", set()),
    ],
)
def test_limner_plugins_allow_and_deny(
    site: Path, monkeypatch: pytest.MonkeyPatch, setting: str | None, expected: set[str]
) -> None:
    add_plugin(site, "alpha-vision", spec_line("alpha/m"), entry="alpha")
    add_plugin(site, "beta-vision", spec_line("beta/m"), entry="beta")
    if setting is None:
        monkeypatch.delenv("LIMNER_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("LIMNER_PLUGINS", setting)
    keys = {entry.key for entry in Registry().entries()} & {"alpha/m", "beta/m"}
    assert keys == expected


def test_hundred_threads_build_a_cold_key_once() -> None:
    built: list[str] = []
    lock = threading.Lock()

    def slow_factory(spec: ModelSpec, settings: limner.ModelSettings) -> FakeEmbeddingBackend:
        with lock:
            built.append(spec.key)
        threading.Event().wait(0.05)  # widen the race window
        return FakeEmbeddingBackend(spec, settings)

    registry = Registry(entry_points=False)
    registry.register(
        ModelSpec(
            key="fake/slow",
            capability=Capability.IMAGE_EMBEDDING,
            factory=slow_factory,
            info=ModelInfo(memory_mb=1, embedding_dimension=8),
            aliases=("slow",),
        )
    )
    barrier = threading.Barrier(100)
    results: list[object] = []

    def worker(index: int) -> None:
        barrier.wait()
        results.append(registry.get("slow" if index % 2 else "fake/slow"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert built == ["fake/slow"]
    assert len(results) == 100
    assert all(result is results[0] for result in results)


def test_factory_errors_become_plugin_errors() -> None:
    def failing(spec: ModelSpec, settings: limner.ModelSettings) -> FakeEmbeddingBackend:
        raise RuntimeError("cannot construct")

    registry = Registry(entry_points=False)
    registry.register(
        ModelSpec(
            key="fake/failing",
            capability="image-embedding",  # type: ignore[arg-type]
            factory=failing,
            info=ModelInfo(memory_mb=1, embedding_dimension=8),
        )
    )
    with pytest.raises(PluginError, match="cannot construct"):
        registry.get("fake/failing")
    registry.register(
        ModelSpec(
            key="fake/bad-path",
            capability=Capability.IMAGE_EMBEDDING,
            factory="no_such_module_here:Backend",
            info=ModelInfo(memory_mb=1, embedding_dimension=8),
        )
    )
    with pytest.raises(PluginError, match="no_such_module_here"):
        registry.get("fake/bad-path")


def test_settings_follow_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIMNER_DEVICE", raising=False)
    monkeypatch.delenv("LIMNER_DTYPE", raising=False)
    registry = Registry(entry_points=False)
    spec = ModelSpec(
        key="org/model",
        capability=Capability.IMAGE_EMBEDDING,
        factory=FakeEmbeddingBackend,
        info=ModelInfo(memory_mb=1, embedding_dimension=8, revision="abc123"),
    )
    registry.register(spec)
    settings = registry.settings("org/model")
    assert (settings.weights, settings.revision, settings.local_dir) == (
        "org/model",
        "abc123",
        False,
    )
    assert (settings.device, settings.dtype) == ("auto", "auto")

    models_dir = tmp_path / "models"
    (models_dir / "org" / "model").mkdir(parents=True)
    monkeypatch.setenv("LIMNER_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("LIMNER_DEVICE", "cpu")
    settings = registry.settings("org/model")
    assert settings.weights == str(models_dir / "org" / "model")
    assert settings.local_dir and settings.revision is None
    assert settings.device == "cpu"

    registry.configure("org/model", local_dir=tmp_path, dtype="float32", options={"x": 1})
    settings = registry.settings("org/model")
    assert settings.weights == str(tmp_path)
    assert settings.dtype == "float32"
    assert settings.options["x"] == 1
    registry.get("org/model")
    with pytest.raises(limner.LimnerError, match="already built"):
        registry.configure("org/model", revision="other")


def test_wrong_backend_type_is_a_plugin_error() -> None:
    registry = Registry(entry_points=False)
    registry.register(
        ModelSpec(
            key="fake/wrong",
            capability=Capability.IMAGE_EMBEDDING,
            factory=lambda spec, settings: object(),
            info=ModelInfo(memory_mb=1, embedding_dimension=8),
        )
    )
    with pytest.raises(PluginError, match="not an ImageEmbeddingBackend"):
        registry.get("fake/wrong")


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="must start with a letter"):
        fake_embedding_spec("/bad key")
    with pytest.raises(ValueError, match="module:name"):
        ModelSpec(
            key="x/y",
            capability=Capability.IMAGE_EMBEDDING,
            factory="no_colon",
            info=ModelInfo(memory_mb=1),
        )
    with pytest.raises(ValueError, match="memory_mb"):
        ModelInfo(memory_mb=0)


def test_listing_imports_no_torch() -> None:
    """Listing every installed model (the CLIP plugin included) must not import torch."""
    code = (
        "import sys, limner\n"
        "entries = limner.default_registry().entries()\n"
        "assert entries, 'no models listed'\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules)\n"
        "print(len(entries), heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        (
            "LIMNER_PLUGIN_API = 2",
            "written for limner plugin API 2, but this limner implements API 1: upgrade limner",
        ),
        (
            "LIMNER_PLUGIN_API = 0",
            "written for limner plugin API 0, but this limner implements API 1: upgrade the plugin",
        ),
        ("LIMNER_PLUGIN_API = '1'", "LIMNER_PLUGIN_API must be an integer"),
        ("LIMNER_PLUGIN_API = True", "LIMNER_PLUGIN_API must be an integer"),
    ],
)
def test_a_plugin_written_for_another_api_is_broken_with_the_reason(
    site: Path, declared: str, expected: str
) -> None:
    add_plugin(site, "good-vision", spec_line("good/model"))
    add_plugin(site, "future", spec_line("future/model"))
    module = site / "future_plugin.py"
    module.write_text(f"{declared}\n{module.read_text()}")
    registry = Registry(plugins="good-vision,future")
    records = {p.name: p for p in registry.plugins()}
    assert records["future"].error is not None
    assert expected in records["future"].error
    assert records["future"].keys == ()
    assert [entry.key for entry in registry.entries()] == ["good/model"]
    with pytest.raises(UnknownModelError):
        registry.get("future/model")


def test_a_plugin_declaring_this_api_or_none_loads(site: Path) -> None:
    add_plugin(site, "current", spec_line("current/model"))
    add_plugin(site, "legacy", spec_line("legacy/model"))
    module = site / "current_plugin.py"
    module.write_text(f"LIMNER_PLUGIN_API = {limner.plugin.PLUGIN_API}\n{module.read_text()}")
    registry = Registry(plugins="current,legacy")
    assert [p.error for p in registry.plugins()] == [None, None]
    assert {entry.key for entry in registry.entries()} == {"current/model", "legacy/model"}


def test_register_plugin_checks_the_api_too() -> None:
    plugin = types.ModuleType("odd_api")
    plugin.LIMNER_PLUGIN_API = 99  # type: ignore[attr-defined]
    registry = Registry(entry_points=False)
    registry.register_plugin(plugin)
    [record] = registry.plugins()
    assert record.error is not None and "API 99" in record.error
