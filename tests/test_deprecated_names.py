"""Names that left ``limner`` keep working for a release: a plugin or host application
written against an earlier limner loads unchanged and is told where each name lives now."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import limner
import limner.inputs
import limner.plugin
import limner.runtime

#: Every name that left ``limner``, and its home now.
MOVED = {
    "Backend": "limner.plugin",
    "ImageEmbeddingBackend": "limner.plugin",
    "TextToImageBackend": "limner.plugin",
    "StepCallback": "limner.plugin",
    "hookimpl": "limner.plugin",
    "hf_cache_dir": "limner.plugin",
    "materialize_in_hf_cache": "limner.plugin",
    "tiny_revision": "limner.plugin",
    "InputKind": "limner.inputs",
    "classify_input": "limner.inputs",
    "decode_image": "limner.inputs",
    "encoded_bytes": "limner.inputs",
    "fetch_image_bytes": "limner.inputs",
    "Clock": "limner.runtime",
    "MemoryProbe": "limner.runtime",
    "MonotonicClock": "limner.runtime",
    "SystemMemory": "limner.runtime",
}


@pytest.mark.parametrize(("name", "home"), sorted(MOVED.items()))
def test_a_moved_name_warns_and_is_the_same_object(name: str, home: str) -> None:
    with pytest.warns(DeprecationWarning, match="is deprecated") as caught:
        old = getattr(limner, name)
    message = str(caught[0].message)
    assert f"limner.{name} is deprecated" in message
    assert f"use {home}.{name}" in message
    assert "removed in limner 0.3" in message
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert old is getattr(sys.modules[home], name)
    assert name not in limner.__all__  # `from limner import *` takes only current names


def test_hookspec_says_what_plugins_use_instead() -> None:
    with pytest.warns(DeprecationWarning, match=r"limner\.plugin\.hookimpl"):
        marker = getattr(limner, "hookspec")  # noqa: B009
    assert marker.project_name == "limner"


@pytest.mark.parametrize("name", ["Placement", "ThreadPlacement"])
def test_the_placements_that_went_name_the_runtime(name: str) -> None:
    with pytest.raises(ImportError, match=r"limner\.Runtime.*limner\.Pool"):
        exec(f"from limner import {name}", {})


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        getattr(limner, "nothing_here")  # noqa: B009
    assert not hasattr(limner, "nothing_here")


#: A plugin as the plugin guide had one written a week before the names moved: every
#: helper taken from ``limner`` itself.
LAST_WEEKS_PLUGIN = """
import numpy as np

import limner

LIMNER_PLUGIN_API = 1
TINY = "acme/tiny-legacy"
REVISION = limner.tiny_revision("acme-legacy-v1")


def write_weights(directory):
    (directory / "weights.npy").write_bytes(b"")
    np.save(directory / "weights.npy", np.eye(4, dtype=np.float32))


class LegacyEmbedder(limner.ImageEmbeddingBackend):
    def load(self) -> None:
        snapshot = limner.materialize_in_hf_cache(
            TINY, REVISION, write_weights, cache_dir=limner.hf_cache_dir()
        )
        self.weights = np.load(snapshot / "weights.npy")

    def embed_prepared(self, items):
        rows = np.stack([np.asarray(item, dtype=np.float32).mean(axis=(0, 1)) for item in items])
        rows = np.concatenate([rows, np.ones((len(items), 1), dtype=np.float32)], axis=1)
        rows = rows @ self.weights
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class LegacyGenerator(limner.TextToImageBackend):
    def load(self) -> None:
        pass

    def resolve_config(self, config):
        import dataclasses
        return dataclasses.replace(config, steps=config.steps or 2, seed=config.seed or 1)

    def generate(self, prompt, config, *, on_step: limner.StepCallback):
        from PIL import Image
        for step in range(config.steps):
            on_step(limner.Progress(step=step + 1, total=config.steps, elapsed=0.0))
        image = Image.new("RGB", (8, 8), (config.seed % 256, 0, 0))
        return limner.GenerationResult(
            model=self.spec.key, prompt=prompt, images=(image,), seed=config.seed, config=config
        )


@limner.hookimpl
def limner_register_models(register):
    register(limner.ModelSpec(
        key=TINY,
        factory=f"{__name__}:LegacyEmbedder",
        info=limner.ModelInfo(memory_mb=1, embedding_dimension=4, revision=REVISION),
    ))
    register(limner.ModelSpec(
        key="acme/legacy-generator",
        factory=f"{__name__}:LegacyGenerator",
        info=limner.ModelInfo(memory_mb=1),
    ))
"""


@pytest.fixture
def last_weeks_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    source = tmp_path / "acme_legacy_plugin.py"
    source.write_text(textwrap.dedent(LAST_WEEKS_PLUGIN))
    spec = importlib.util.spec_from_file_location("acme_legacy_plugin", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "acme_legacy_plugin", module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        spec.loader.exec_module(module)
    return module


@pytest.mark.anyio
async def test_last_weeks_plugin_loads_and_serves_unchanged(
    last_weeks_plugin: ModuleType, tmp_path: Path
) -> None:
    registry = limner.Registry(entry_points=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        registry.register_plugin(last_weeks_plugin, name="acme-legacy")
        async with limner.Pool():
            vector = await registry.embedder("acme/tiny-legacy").embed_images([_png()])
            result = await registry.generator("acme/legacy-generator").generate(
                "a lighthouse", limner.ImageGenerationConfig(seed=7)
            )
    assert vector.shape == (1, 4)
    assert np.isclose(np.linalg.norm(vector[0]), 1.0)
    assert result.seed == 7 and result.images[0].size == (8, 8)
    assert (tmp_path / "hub").is_dir()  # the tiny weights went where hf_cache_dir() says


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buffer, format="PNG")
    return buffer.getvalue()
