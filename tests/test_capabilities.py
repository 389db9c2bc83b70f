"""Capabilities as one table: every capability has one row, and a spec's capability is
derived from its backend's base class instead of being declared twice."""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

import pytest

import limner
from limner import Capability, ModelInfo, ModelSpec, PluginError, Registry
from limner._registry._capabilities import CAPABILITIES, row_for, row_of_backend
from limner.plugin import hookimpl
from limner.testing import (
    FakeEmbeddingBackend,
    FakeTextToImageBackend,
    fake_embedding_spec,
    fake_generation_spec,
)


def undeclared(key: str, factory: Any) -> ModelSpec:
    return ModelSpec(key=key, factory=factory, info=ModelInfo(memory_mb=10, embedding_dimension=8))


def test_every_capability_has_exactly_one_row() -> None:
    assert sorted(row.capability for row in CAPABILITIES) == sorted(Capability)
    for capability in Capability:
        assert row_for(capability).capability is capability


def test_a_backend_class_finds_its_row_by_its_base() -> None:
    assert row_of_backend(FakeEmbeddingBackend) is row_for(Capability.IMAGE_EMBEDDING)
    assert row_of_backend(FakeTextToImageBackend) is row_for(Capability.TEXT_TO_IMAGE)
    assert row_of_backend(dict) is None


def test_capability_is_derived_from_a_class_or_an_import_path() -> None:
    registry = Registry(entry_points=False)
    registry.register(undeclared("fake/by-class", FakeEmbeddingBackend))
    registry.register(undeclared("fake/by-path", "limner.testing:FakeTextToImageBackend"))
    capabilities = {entry.key: entry.capability for entry in registry.entries()}
    assert capabilities == {
        "fake/by-class": Capability.IMAGE_EMBEDDING,
        "fake/by-path": Capability.TEXT_TO_IMAGE,
    }
    assert isinstance(registry.get("fake/by-class"), limner.ImageEmbedder)
    assert isinstance(registry.get("fake/by-path"), limner.ImageGenerator)


def test_a_function_factory_must_declare_its_capability() -> None:
    registry = Registry(entry_points=False)

    def build(spec: ModelSpec, settings: limner.ModelSettings) -> FakeEmbeddingBackend:
        return FakeEmbeddingBackend(spec, settings)

    with pytest.raises(PluginError, match=r"fake/function.*declare capability"):
        registry.register(undeclared("fake/function", build))
    declared = dataclasses.replace(
        undeclared("fake/function", build), capability=Capability.IMAGE_EMBEDDING
    )
    registry.register(declared)
    assert isinstance(registry.get("fake/function"), limner.ImageEmbedder)


def test_a_plugin_whose_factory_is_no_backend_breaks_alone() -> None:
    good = types.ModuleType("good_plugin")
    bad = types.ModuleType("bad_plugin")

    @hookimpl
    def good_hook(register: Any) -> None:
        register(undeclared("good/model", FakeEmbeddingBackend))

    @hookimpl
    def bad_hook(register: Any) -> None:
        register(undeclared("bad/model", "limner.testing:FakeClock"))

    good.limner_register_models = good_hook  # type: ignore[attr-defined]
    bad.limner_register_models = bad_hook  # type: ignore[attr-defined]
    registry = Registry(entry_points=False)
    registry.register_plugin(good)
    registry.register_plugin(bad)
    assert [entry.key for entry in registry.entries()] == ["good/model"]
    broken = {record.name: record.error for record in registry.plugins()}
    assert broken["good_plugin"] is None
    assert "not a backend class" in (broken["bad_plugin"] or "")


def test_the_fronts_are_the_capabilities_host_code_types_against() -> None:
    """``embedder`` and ``generator`` give objects of the protocols: mypy checks the
    assignments below (tests are type-checked), and at run time every member of each
    protocol is there with the same parameters."""
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/embedder", dimension=8))
    registry.register(fake_generation_spec("fake/generator"))
    embedder: limner.ImageEmbeddingCapable = registry.embedder("fake/embedder")
    generator: limner.TextToImageCapable = registry.generator("fake/generator")
    for front, protocol in (
        (embedder, limner.ImageEmbeddingCapable),
        (generator, limner.TextToImageCapable),
    ):
        assert isinstance(front, protocol)
        members = [name for name in vars(protocol) if not name.startswith("_")]
        assert members, protocol
        for name in members:
            declared, implemented = inspect.getattr_static(protocol, name), getattr(front, name)
            if isinstance(declared, property):
                continue
            assert list(inspect.signature(declared).parameters)[1:] == list(
                inspect.signature(implemented).parameters
            ), f"{type(front).__name__}.{name}"


def test_an_object_without_every_member_is_not_capable() -> None:
    class Partial:
        key = "partial"
        embedding_dimension = 8

        async def embed_image(self, path: str) -> None: ...

    assert not isinstance(Partial(), limner.ImageEmbeddingCapable)
    assert not isinstance(Partial(), limner.TextToImageCapable)
