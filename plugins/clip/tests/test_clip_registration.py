"""The plugin declares the right facts per key (the import cost, the entry point and the
specs' validity are checked by the conformance suite, test_clip_conformance.py)."""

from __future__ import annotations

import limner
from limner import Capability
from limner.plugin import tiny_revision

EXPECTED = {
    # key: (alias, dimension, input size)
    "openai/clip-vit-base-patch32": ("clip-vit-b-32", 512, 224),
    "openai/clip-vit-base-patch16": ("clip-vit-b-16", 512, 224),
    "openai/clip-vit-large-patch14": ("clip-vit-l-14", 768, 224),
    "openai/clip-vit-large-patch14-336": ("clip-vit-l-14-336", 768, 336),
}


def test_hook_registers_every_key_with_its_facts(registry: limner.Registry) -> None:
    entries = {entry.key: entry for entry in registry.entries()}
    assert set(entries) == {*EXPECTED, "limner/tiny-clip"}
    for key, (alias, dimension, size) in EXPECTED.items():
        spec = entries[key].spec
        assert spec.capability is Capability.IMAGE_EMBEDDING
        assert spec.factory == "limner_clip._backend:ClipBackend"
        assert spec.aliases == (alias,)
        assert registry.spec(alias) is spec
        assert spec.info.embedding_dimension == dimension
        assert spec.info.default_settings["image_size"] == size
        assert spec.info.source_repo == key
        assert spec.info.revision is None
        assert spec.info.license == "MIT"
        assert not spec.info.tiny
        assert spec.info.description
    assert registry.settings("clip-vit-b-32").weights == "openai/clip-vit-base-patch32"


def test_memory_estimates_follow_model_size(registry: limner.Registry) -> None:
    memory = {key: registry.spec(key).info.memory_mb for key in EXPECTED}
    # ViT-B/32 has 151.3 M parameters: 289 MiB of 16-bit weights plus a batch of 64.
    assert 300 < memory["openai/clip-vit-base-patch32"] < 700
    assert memory["openai/clip-vit-base-patch32"] < memory["openai/clip-vit-base-patch16"]
    assert memory["openai/clip-vit-base-patch16"] < memory["openai/clip-vit-large-patch14"]
    # 427.6 M parameters: 816 MiB of weights alone.
    assert memory["openai/clip-vit-large-patch14"] > 816
    assert registry.spec("limner/tiny-clip").info.memory_mb < 100


def test_tiny_key_is_labelled_tiny_and_pinned(registry: limner.Registry) -> None:
    info = registry.spec("limner/tiny-clip").info
    assert info.tiny
    assert info.description.startswith("TINY")
    assert "mean nothing" in info.description
    assert info.embedding_dimension == 64
    assert info.revision == tiny_revision("limner/tiny-clip@1")
    settings = registry.settings("limner/tiny-clip")
    assert (settings.weights, settings.revision) == ("limner/tiny-clip", info.revision)
