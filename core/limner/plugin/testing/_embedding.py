"""The conformance suite of an image-embedding plugin. Public through
``limner.plugin.testing``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from limner import (
    Capability,
    ImageEmbedder,
    InvalidInput,
    Pool,
    Registry,
)
from limner.plugin._backends import Backend, ImageEmbeddingBackend
from limner.plugin.testing._contract import PluginContract, Vectors, photo_like, run_in_threads
from limner.testing import FakeClock, FakeMemory

__all__ = ["ImageEmbeddingContract"]


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

        run_in_threads(work, (0, 1), timeout=300)
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
