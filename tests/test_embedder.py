"""The async embedding front and its blocking facade, over the fake backend."""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

import limner
import limner._fronts._embedder
from limner import (
    BlockingCallInEventLoop,
    ImageLimits,
    InvalidInput,
    ModelError,
    ModelLoadError,
    Registry,
)
from limner.testing import FakeClock, FakeEmbeddingBackend, fake_embedding_spec


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def registry() -> Registry:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/embedder", dimension=8, aliases=("fake",)))
    return registry


@pytest.fixture
def red_path(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    path.write_bytes(png_bytes((255, 0, 0)))
    return path


@pytest.mark.anyio
async def test_every_method_gives_unit_vectors(registry: Registry, red_path: Path) -> None:
    model = registry.embedder("fake")
    encoded = base64.b64encode(red_path.read_bytes()).decode()
    single = await model.embed_image(red_path)
    assert single.shape == (8,) and single.dtype == np.float32
    assert np.isclose(np.linalg.norm(single), 1.0, atol=1e-5)
    assert np.allclose(await model.embed_image(str(red_path)), single)
    assert np.allclose(await model.embed_image_base64(encoded), single)
    assert np.allclose(await model.embed_image_base64(f"data:image/png;base64,{encoded}"), single)
    batch = await model.batch_embed_images([red_path, red_path])
    assert batch.shape == (2, 8)
    mixed = await model.embed_images(
        [red_path, red_path.read_bytes(), Image.open(red_path), png_bytes((0, 0, 255))]
    )
    assert mixed.shape == (4, 8)
    assert np.allclose(mixed[:3], single, atol=1e-6)
    assert not np.allclose(mixed[3], single)  # a blue image is somewhere else


@pytest.mark.anyio
async def test_empty_batch_is_an_empty_array(registry: Registry) -> None:
    model = registry.embedder("fake")
    result = await model.embed_images([])
    assert result.shape == (0, 8)
    assert isinstance(model.backend, FakeEmbeddingBackend)
    assert model.backend.loads == 0  # nothing to do, nothing loaded


@pytest.mark.anyio
async def test_weights_load_once_on_first_use(registry: Registry, red_path: Path) -> None:
    model = registry.embedder("fake")
    assert isinstance(model.backend, FakeEmbeddingBackend)
    assert model.backend.loads == 0
    await model.embed_image(red_path)  # served by the process-wide default pool
    await model.embed_image(red_path)
    assert model.backend.loads == 1


@pytest.mark.anyio
async def test_bad_input_in_a_batch_is_located(registry: Registry, red_path: Path) -> None:
    model = registry.embedder("fake")
    with pytest.raises(InvalidInput) as caught:
        await model.embed_images([red_path, b"not an image", red_path])
    assert caught.value.index == 1
    assert str(caught.value).startswith("input #1")


@pytest.mark.anyio
async def test_explicit_methods_check_the_input_kind(registry: Registry, red_path: Path) -> None:
    model = registry.embedder("fake")
    with pytest.raises(InvalidInput, match="expected URL"):
        await model.embed_image_url(str(red_path))
    with pytest.raises(InvalidInput, match="expected path"):
        await model.embed_image("https://example.invalid/cat.jpg")


@pytest.mark.anyio
async def test_embed_image_base64_takes_either_encoding_as_the_classifier_sees_it(
    registry: Registry, red_path: Path
) -> None:
    model = registry.embedder("fake")
    encoded = base64.b64encode(red_path.read_bytes()).decode()
    expected = await model.embed_image(red_path)
    for data in (encoded, f"DATA:image/png;base64,{encoded}", f" data:image/png;base64,{encoded}"):
        assert np.allclose(await model.embed_image_base64(data), expected), data[:12]
    with pytest.raises(InvalidInput, match="expected base64 or data URL, got path"):
        await model.embed_image_base64(str(red_path))


@pytest.mark.anyio
async def test_text_embedding(registry: Registry) -> None:
    model = registry.embedder("fake")
    one = await model.embed_text("a red square")
    many = await model.embed_text(["a red square", "a blue circle"])
    assert one.shape == (8,) and many.shape == (2, 8)
    assert np.allclose(many[0], one)
    with pytest.raises(InvalidInput, match="text must be a string"):
        await model.embed_text(["ok", 3])  # type: ignore[list-item]


@pytest.mark.anyio
async def test_texts_over_max_text_chars_are_refused_naming_the_index(registry: Registry) -> None:
    model = registry.embedder("fake")
    limit = model.max_text_chars
    assert limit == limner._fronts._embedder.DEFAULT_MAX_TEXT_CHARS
    assert (await model.embed_text("x" * limit)).shape == (8,)  # the limit itself is fine
    with pytest.raises(InvalidInput, match=f"over the limit of {limit}") as caught:
        await model.embed_text("x" * (limit + 1))
    assert caught.value.index is None
    with pytest.raises(InvalidInput) as caught:
        await model.embed_text(["ok", "fine", "y" * (limit + 1)])
    assert caught.value.index == 2 and str(caught.value).startswith("input #2")
    assert isinstance(model.backend, FakeEmbeddingBackend)
    assert model.backend.loads == 1  # only the text at the limit reached the model

    small = Registry(entry_points=False, max_text_chars=5)
    small.register(fake_embedding_spec("fake/small"))
    async with limner.Pool() as pool:
        bound = small.embedder("fake/small").using(pool)
        assert bound.max_text_chars == 5
        with pytest.raises(InvalidInput, match="over the limit of 5"):
            await bound.embed_text("123456")
    with pytest.raises(InvalidInput, match="positive") as refused:
        Registry(entry_points=False, max_text_chars=0)
    assert refused.value.field == "max_text_chars"


class PreparingBackend(FakeEmbeddingBackend):
    """Records where its texts are prepared, and refuses the text "bad"."""

    def __init__(self, spec: limner.ModelSpec, settings: limner.ModelSettings) -> None:
        super().__init__(spec, settings)
        self.prepared_on: list[int] = []
        self.embedded: list[object] = []

    def prepare_text(self, text: str) -> object:
        if text == "bad":
            raise InvalidInput("cannot be tokenized")
        self.prepared_on.append(threading.get_ident())
        return text.upper()

    def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.embedded.extend(texts)
        return super().embed_texts(texts)


@pytest.mark.anyio
async def test_texts_are_prepared_in_a_thread_before_queueing() -> None:
    registry = Registry(entry_points=False)
    spec = dataclasses.replace(fake_embedding_spec("fake/preparing"), factory=PreparingBackend)
    registry.register(spec)
    model = registry.embedder("fake/preparing")
    backend = model.backend
    assert isinstance(backend, PreparingBackend)
    await model.embed_text(["a red fox", "a lighthouse"])
    assert backend.embedded == ["A RED FOX", "A LIGHTHOUSE"]  # what prepare_text returned
    assert threading.get_ident() not in backend.prepared_on  # never on the event loop
    with pytest.raises(InvalidInput, match="cannot be tokenized") as caught:
        await model.embed_text(["fine", "bad"])
    assert caught.value.index == 1
    assert backend.embedded == ["A RED FOX", "A LIGHTHOUSE"]  # nothing of it was queued


@pytest.mark.anyio
async def test_load_failure_is_typed_and_retried(red_path: Path) -> None:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/flaky", options={"fail_loads": 1}))
    model = registry.embedder("fake/flaky")
    clock = FakeClock()
    # The load may fail while the call still decodes its image (the pool starts a cold model
    # for a caller that is preparing its inputs): the call then finds the key in its backoff,
    # and gets the same error. After the backoff the next request loads again.
    async with limner.Pool(load_retry_backoff=(1.0, 1.0), clock=clock):
        with pytest.raises(ModelLoadError, match="injected load failure #1"):
            await model.embed_image(red_path)
        clock.advance(2.0)
        vector = await model.embed_image(red_path)  # the next request loads again
    assert vector.shape == (8,)


@pytest.mark.anyio
async def test_batch_failure_is_a_model_error(red_path: Path) -> None:
    registry = Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/fails-on-2", options={"fail_on_batch_size": 2}))
    model = registry.embedder("fake/fails-on-2")
    with pytest.raises(ModelError) as caught:
        await model.batch_embed_images([red_path, red_path])
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert (await model.embed_image(red_path)).shape == (8,)  # the model still serves


def test_blocking_facade_from_sync_code(registry: Registry, red_path: Path) -> None:
    model = registry.embedder("fake").blocking()
    vector = model.embed_image(red_path)
    assert vector.shape == (8,)
    assert model.batch_embed_images([red_path, red_path]).shape == (2, 8)
    assert model.embed_text("hello").shape == (8,)


@pytest.mark.anyio
async def test_blocking_facade_refuses_a_running_loop(registry: Registry, red_path: Path) -> None:
    model = registry.embedder("fake").blocking()
    with pytest.raises(BlockingCallInEventLoop, match="await the async API"):
        model.embed_image(red_path)


def test_capability_protocol_is_satisfied(registry: Registry) -> None:
    assert isinstance(registry.get("fake"), limner.ImageEmbeddingCapable)


# -- what decoding may cost -------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_image_without_pixels_is_invalid_input(registry: Registry) -> None:
    model = registry.embedder("fake")
    with pytest.raises(InvalidInput, match="0 x 4 has no pixels") as caught:
        await model.embed_images([png_bytes((255, 0, 0)), Image.new("RGB", (0, 4))])
    assert caught.value.index == 1
    assert "PIL.Image.Image" in str(caught.value)


@pytest.mark.anyio
async def test_with_limits_keeps_the_pool(registry: Registry, red_path: Path) -> None:
    async with limner.Pool() as pool:
        model = registry.embedder("fake").using(pool).with_limits(ImageLimits(max_pixels=100))
        with pytest.raises(InvalidInput, match="32 x 24 = 768 pixels is over the limit of 100"):
            await model.embed_image(red_path)
        roomy = model.with_limits(ImageLimits(max_pixels=1000))
        assert (await roomy.embed_image(red_path)).shape == (8,)
        assert pool.stats()["fake/embedder"].batches == 1


class PrepareProbe(FakeEmbeddingBackend):
    """Records how many ``prepare`` calls run at once; each holds its thread briefly so that
    unbounded decoding would overlap."""

    def __init__(self, spec: limner.ModelSpec, settings: limner.ModelSettings) -> None:
        super().__init__(spec, settings)
        self.running = 0
        self.most_at_once = 0
        self._count_lock = threading.Lock()

    def prepare(self, image: Image.Image) -> npt.NDArray[np.float32]:
        with self._count_lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.02)
        with self._count_lock:
            self.running -= 1
        return super().prepare(image)


@pytest.mark.anyio
@pytest.mark.parametrize("at_once", [1, 3])
async def test_one_call_decodes_at_most_max_concurrent_decodes_at_once(
    red_path: Path, at_once: int
) -> None:
    registry = Registry(entry_points=False, limits=ImageLimits(max_concurrent_decodes=at_once))
    registry.register(dataclasses.replace(fake_embedding_spec("fake/probe"), factory=PrepareProbe))
    model = registry.embedder("fake/probe")
    assert isinstance(model.backend, PrepareProbe)
    vectors = await model.embed_images([red_path] * 12)
    assert vectors.shape == (12, 8)
    assert 1 <= model.backend.most_at_once <= at_once
