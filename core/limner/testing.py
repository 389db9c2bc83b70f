"""Test doubles for host applications and plugin authors.

``FakeEmbeddingBackend`` and ``FakeTextToImageBackend`` are real backends with no weights:
deterministic outputs, counters, and knobs to make loading or a batch fail, block or run out
of memory. ``FakeMemory`` and ``FakeClock`` replace the pool's memory readings and time, so
pool behaviour is tested without sleeping or owning gigabytes::

    registry = limner.Registry(entry_points=False)
    registry.register(fake_embedding_spec("fake/embedder", dimension=8))
    memory, clock = FakeMemory(total_mb=1000), FakeClock()
    async with limner.Pool(memory=memory, clock=clock) as pool:
        vector = await registry.embedder("fake/embedder").embed_image("cat.jpg")
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import pickle
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from limner._exports import CallsOfTheLastRelease
from limner._registry._spec import Capability, ModelInfo, ModelSettings, ModelSpec
from limner.errors import InvalidInput, LimnerError
from limner.plugin._backends import Backend, ImageEmbeddingBackend, StepCallback, TextToImageBackend
from limner.plugin._generation import (
    GenerationChunk,
    GenerationResult,
    ImageGenerationConfig,
    Progress,
)
from limner.runtime import BatchCall, KeyStats, RequestKind, StreamCall, backend_method

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "FakeClock",
    "FakeEmbeddingBackend",
    "FakeMemory",
    "FakeTextToImageBackend",
    "MockRuntime",
    "fake_embedding_spec",
    "fake_generation_spec",
]


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.time = start

    def now(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += seconds


class FakeMemory:
    """Injected memory readings: ``used_mb`` moves as fake backends load and unload."""

    def __init__(self, *, total_mb: float, used_mb: float = 0.0) -> None:
        self.total = total_mb
        self.used = used_mb
        self._lock = threading.Lock()

    def total_mb(self, device: str) -> float:
        return self.total

    def used_mb(self, device: str) -> float:
        return self.used

    def allocate(self, mb: float) -> None:
        with self._lock:
            self.used += mb

    def free(self, mb: float) -> None:
        with self._lock:
            self.used -= mb


_THUMBNAIL = 8


class FakeEmbeddingBackend(ImageEmbeddingBackend):
    """Embeds an 8x8 thumbnail through a fixed random projection: same image, same vector.

    Options (``ModelSettings.options`` or ``default_settings``): ``load_seconds`` sleeps in
    ``load``; ``fail_loads`` makes that many loads raise; ``fail_on_batch_size`` makes a
    batch of that size raise; ``batch_seconds`` sleeps per batch; ``oom_above`` raises
    ``MemoryError`` for batches larger than that; ``gate`` (a ``threading.Event``) holds every
    batch and load until set; ``memory`` (a :class:`FakeMemory`) is charged the spec's
    ``memory_mb`` while loaded; ``concurrent_calls`` is what ``max_concurrent_calls`` says;
    ``unload_gate`` (a ``threading.Event``) holds ``unload`` until set. ``events`` records
    each finished ``"load"`` and ``"unload"`` in order.
    """

    image_size = _THUMBNAIL

    def __init__(self, spec: ModelSpec, settings: ModelSettings) -> None:
        super().__init__(spec, settings)
        self.loads = 0
        self.unloads = 0
        self.events: list[str] = []
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()
        dimension = spec.info.embedding_dimension or 8
        generator = np.random.default_rng(0)
        # One row more than the thumbnail's values: a constant feature, so that even a black
        # image has a direction (the pool refuses all-zero rows).
        self._projection = generator.standard_normal(
            (_THUMBNAIL * _THUMBNAIL * 3 + 1, dimension)
        ).astype(np.float32)
        self._text_projection = generator.standard_normal((256, dimension)).astype(np.float32)
        self.loaded = False

    def _option(self, name: str, default: Any) -> Any:
        return self.settings.options.get(name, default)

    def _wait_for_gate(self) -> None:
        gate = self._option("gate", None)
        if gate is not None and not gate.wait(timeout=30):
            raise RuntimeError("gate never opened")

    def load(self) -> None:
        time.sleep(float(self._option("load_seconds", 0.0)))
        self._wait_for_gate()
        with self._lock:
            self.loads += 1
            if self.loads <= int(self._option("fail_loads", 0)):
                raise RuntimeError(f"injected load failure #{self.loads}")
            self.loaded = True
            self.events.append("load")
        memory = self._option("memory", None)
        if memory is not None:
            memory.allocate(self.spec.info.memory_mb)

    def unload(self) -> None:
        gate = self._option("unload_gate", None)
        if gate is not None and not gate.wait(timeout=30):
            raise RuntimeError("unload gate never opened")
        with self._lock:
            self.unloads += 1
            self.events.append("unload")
            was_loaded, self.loaded = self.loaded, False
        memory = self._option("memory", None)
        if memory is not None and was_loaded:
            memory.free(self.spec.info.memory_mb)

    def memory_mb(self) -> float | None:
        return self.spec.info.memory_mb

    def max_concurrent_calls(self) -> int | None:
        value = self._option("concurrent_calls", None)
        return None if value is None else int(value)

    def prepare(self, image: Image) -> npt.NDArray[np.float32]:
        thumbnail = image.resize((_THUMBNAIL, _THUMBNAIL))
        pixels = np.asarray(thumbnail, dtype=np.float32).reshape(-1) / 255.0
        return np.append(pixels, np.float32(1.0))

    def embed_prepared(self, items: Sequence[Any]) -> npt.NDArray[np.float32]:
        if not self.loaded:
            raise RuntimeError("embed_prepared called before load")
        self._wait_for_gate()
        with self._lock:
            self.batch_sizes.append(len(items))
        if len(items) == int(self._option("fail_on_batch_size", 0)):
            raise RuntimeError(f"injected failure on a batch of {len(items)}")
        oom_above = self._option("oom_above", None)
        if oom_above is not None and len(items) > int(oom_above):
            raise MemoryError(f"injected out of memory on a batch of {len(items)}")
        time.sleep(float(self._option("batch_seconds", 0.0)))
        vectors = np.stack(list(items)) @ self._projection
        return _normalise(vectors)

    def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        counts = np.zeros((len(texts), 256), dtype=np.float32)
        for row, text in enumerate(texts):
            for byte in text.encode("utf-8"):
                counts[row, byte] += 1.0
        return _normalise(counts @ self._text_projection)


def _normalise(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalised: npt.NDArray[np.float32] = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return normalised


def fake_embedding_spec(
    key: str = "fake/embedder",
    *,
    dimension: int = 8,
    memory_mb: float = 100.0,
    max_batch_size: int = 32,
    aliases: Sequence[str] = (),
    options: dict[str, Any] | None = None,
) -> ModelSpec:
    """A spec served by :class:`FakeEmbeddingBackend`."""
    return _fake_spec(
        key,
        Capability.IMAGE_EMBEDDING,
        FakeEmbeddingBackend,
        aliases,
        options,
        memory_mb=memory_mb,
        embedding_dimension=dimension,
        max_batch_size=max_batch_size,
        description="fake embedder for tests: no weights, deterministic vectors",
    )


def _fake_spec(
    key: str,
    capability: Capability,
    backend: type[Backend],
    aliases: Sequence[str],
    options: dict[str, Any] | None,
    **info: Any,
) -> ModelSpec:
    """A spec served by a fake ``backend``: tiny (no weights), its options the defaults."""
    return ModelSpec(
        key=key,
        capability=capability,
        factory=backend,
        aliases=tuple(aliases),
        info=ModelInfo(default_settings=options or {}, tiny=True, **info),
    )


class FakeTextToImageBackend(TextToImageBackend):
    """Generates flat-colour images whose colour derives from prompt and seed, step by step.

    It edits too: the colour blended into the source at ``strength`` (0.6 by default),
    inside the mask only, over ``ceil(steps * strength)`` steps, as a diffusers pipeline
    counts them. With ``preview``, each step carries a flat preview an eighth of the size.

    Options: ``step_seconds`` sleeps per step; ``gate`` holds each step until set;
    ``fail_at_step`` raises at that step; ``memory`` as for :class:`FakeEmbeddingBackend`.
    ``steps_run`` counts the steps actually executed, across all generations.
    """

    #: What an edit without a strength uses, as diffusers' image-to-image pipelines do.
    default_strength = 0.6

    def __init__(self, spec: ModelSpec, settings: ModelSettings) -> None:
        super().__init__(spec, settings)
        self.loads = 0
        self.steps_run = 0
        self.loaded = False
        self._lock = threading.Lock()

    def _option(self, name: str, default: Any) -> Any:
        return self.settings.options.get(name, default)

    def load(self) -> None:
        with self._lock:
            self.loads += 1
            self.loaded = True
        memory = self._option("memory", None)
        if memory is not None:
            memory.allocate(self.spec.info.memory_mb)

    def unload(self) -> None:
        with self._lock:
            was_loaded, self.loaded = self.loaded, False
        memory = self._option("memory", None)
        if memory is not None and was_loaded:
            memory.free(self.spec.info.memory_mb)

    def resolve_config(self, config: ImageGenerationConfig) -> ImageGenerationConfig:
        width = config.width or 16
        height = config.height or 16
        for name, value in (("width", width), ("height", height)):
            if value % 8 or not 8 <= value <= 256:
                raise InvalidInput(f"{name} must be a multiple of 8 in 8..256", field=name)
        steps = config.steps or 4
        if not 1 <= steps <= 50:
            raise InvalidInput("steps must be in 1..50", field="steps")
        strength = config.strength
        if strength is not None and not (isinstance(strength, (int, float)) and 0 <= strength <= 1):
            raise InvalidInput("strength must be a number in 0..1", field="strength")
        seed = config.seed if config.seed is not None else random.randrange(2**32)
        return dataclasses.replace(config, width=width, height=height, steps=steps, seed=seed)

    def generate(
        self, prompt: str, config: ImageGenerationConfig, *, on_step: StepCallback
    ) -> GenerationResult:
        assert config.steps is not None
        return self._run(prompt, config, config.steps, on_step, lambda colour: colour)

    def edit(
        self,
        prompt: str,
        config: ImageGenerationConfig,
        image: npt.NDArray[np.uint8],
        mask: npt.NDArray[np.uint8] | None,
        *,
        on_step: StepCallback,
    ) -> GenerationResult:
        from PIL import Image

        steps, width, height = config.steps, config.width, config.height
        assert steps is not None and width is not None and height is not None
        strength = self.default_strength if config.strength is None else float(config.strength)
        config = dataclasses.replace(config, strength=strength)
        size = (width, height)
        source = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.NEAREST))
        inside = np.ones(source.shape[:2], dtype=bool)
        if mask is not None:
            inside = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST)) > 0

        def blend(colour: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
            mixed = np.rint(source * (1 - strength) + colour.astype(np.float64) * strength)
            return np.where(inside[..., None], mixed, source).astype(np.uint8)

        return self._run(prompt, config, math.ceil(steps * strength), on_step, blend)

    def _run(
        self,
        prompt: str,
        config: ImageGenerationConfig,
        steps: int,
        on_step: StepCallback,
        paint: Callable[[Any], Any],
    ) -> GenerationResult:
        """``steps`` steps, then each image: ``paint`` of its flat colour (an array)."""
        from PIL import Image

        if not self.loaded:
            raise RuntimeError("generate called before load")
        assert config.seed is not None
        assert config.width is not None
        assert config.height is not None
        started = time.perf_counter()
        gate = self._option("gate", None)
        digest = hashlib.sha256(f"{prompt}|{config.seed}".encode()).digest()
        colours = [
            np.array(list(digest[3 * i : 3 * i + 3]), dtype=np.uint8)
            for i in range(max(1, config.num_images))
        ]
        for step in range(1, steps + 1):
            if gate is not None and not gate.wait(timeout=30):
                raise RuntimeError("gate never opened")
            time.sleep(float(self._option("step_seconds", 0.0)))
            if step == int(self._option("fail_at_step", 0)):
                raise RuntimeError(f"injected failure at step {step}")
            with self._lock:
                self.steps_run += 1
            preview = None
            if config.preview:  # the colour fading in, an eighth of the size
                small = (max(1, config.width // 8), max(1, config.height // 8))
                shade = tuple(int(value) * step // steps for value in colours[0])
                preview = Image.new("RGB", small, shade)
            elapsed = time.perf_counter() - started
            on_step(Progress(step=step, total=steps, elapsed=elapsed, preview=preview))
        flat = np.zeros((config.height, config.width, 3), dtype=np.uint8)
        images = tuple(
            Image.fromarray(np.asarray(paint(flat + colours[i]), dtype=np.uint8))
            for i in range(config.num_images)
        )
        return GenerationResult(
            model=self.spec.key,
            prompt=prompt,
            images=images,
            seed=config.seed,
            config=config,
            timings={"generate": time.perf_counter() - started},
        )


def fake_generation_spec(
    key: str = "fake/generator",
    *,
    memory_mb: float = 100.0,
    aliases: Sequence[str] = (),
    options: dict[str, Any] | None = None,
) -> ModelSpec:
    """A spec served by :class:`FakeTextToImageBackend`."""
    return _fake_spec(
        key,
        Capability.TEXT_TO_IMAGE,
        FakeTextToImageBackend,
        aliases,
        options,
        memory_mb=memory_mb,
        description="fake generator for tests: flat-colour images, no weights",
    )


T = TypeVar("T")

EmbedHandler = Callable[[str, RequestKind, list[Any]], Any]
GenerateHandler = Callable[[str, str, ImageGenerationConfig], Iterable[GenerationChunk]]
BatchHandler = Callable[[str, BatchCall], Any]
StreamHandler = Callable[[str, StreamCall], Iterable[GenerationChunk]]

_EMBED_KINDS: dict[str, RequestKind] = {"embed_prepared": "image", "embed_texts": "text"}


def _crossed(value: T) -> T:
    """``value`` as a runtime in another process would see it: pickled and unpickled."""
    copy: T = pickle.loads(pickle.dumps(value))
    return copy


class MockRuntime(CallsOfTheLastRelease):
    """A :class:`~limner.Runtime` that answers from plain functions, as httpx's
    ``MockTransport`` answers from a handler: test host code and fronts without a pool.

    ``embed(key, kind, items)`` returns the rows for a batch of images (``kind="image"``) or
    texts; ``generate(key, prompt, config)`` returns the chunks of a generation; ``batch(key,
    call)`` and ``stream(key, call)`` answer any other :class:`~limner.runtime.BatchCall` or
    :class:`~limner.runtime.StreamCall`. Each may raise a :class:`~limner.LimnerError`.
    Everything crossing the seam, both ways, is pickled and unpickled on the way, as it would
    be to a runtime in another process: a front that sent more than data fails here.
    ``calls`` records each call in order.
    """

    def __init__(
        self,
        *,
        embed: EmbedHandler | None = None,
        generate: GenerateHandler | None = None,
        batch: BatchHandler | None = None,
        stream: StreamHandler | None = None,
    ) -> None:
        self._embed = embed
        self._generate = generate
        self._batch = batch
        self._stream = stream
        self.calls: list[tuple[Any, ...]] = []
        self.loaded: set[str] = set()
        self.closed = False

    async def run_batch(self, backend: Backend, call: BatchCall) -> npt.NDArray[np.float32]:
        key, crossed = backend.spec.key, _crossed(call)
        backend_method(backend, call)
        kind = _EMBED_KINDS.get(call.method)
        try:
            if kind is not None and self._embed is not None:
                self.calls.append(("embed", key, kind, len(call.items)))
                rows = self._embed(key, kind, list(crossed.items))
            elif self._batch is not None:
                self.calls.append(("batch", key, call.method, len(call.items)))
                rows = self._batch(key, crossed)
            else:
                raise LimnerError(f"this MockRuntime has no handler for {call.method} ({key})")
        except LimnerError as error:
            raise _crossed(error) from None
        self.loaded.add(key)
        vectors: npt.NDArray[np.float32] = _crossed(np.asarray(rows, dtype=np.float32))
        return vectors

    async def run_stream(
        self, backend: Backend, call: StreamCall
    ) -> AsyncIterator[GenerationChunk]:
        key, crossed = backend.spec.key, _crossed(call)
        backend_method(backend, call)
        try:
            if call.method == "generate" and self._generate is not None:
                self.calls.append(("generate", key, call.args[0]))
                chunks = self._generate(key, *crossed.args)
            elif self._stream is not None:
                self.calls.append(("stream", key, call.method))
                chunks = self._stream(key, crossed)
            else:
                raise LimnerError(f"this MockRuntime has no handler for {call.method} ({key})")
            self.loaded.add(key)
            for chunk in chunks:
                yield _crossed(chunk)
        except LimnerError as error:
            raise _crossed(error) from None

    @contextlib.contextmanager
    def preparing(self, backend: Backend, count: int) -> Iterator[None]:
        """Nothing to hold: a mock answers each call as it comes."""
        yield

    async def load(self, backend: Backend) -> None:
        self.calls.append(("load", backend.spec.key))
        self.loaded.add(backend.spec.key)

    def stats(self) -> dict[str, KeyStats]:
        return {
            key: KeyStats(
                key=key,
                state="ready",
                workers=1,
                queue_depth=0,
                in_flight=0,
                batches=sum(1 for call in self.calls if call[:2] == ("embed", key)),
                mean_batch_size=0.0,
                loads=1,
                load_seconds=0.0,
                evictions=0,
                memory_mb=0.0,
                device=None,
                last_used=None,
            )
            for key in sorted(self.loaded)
        }

    async def evict(self, key: str) -> bool:
        self.calls.append(("evict", key))
        if key not in self.loaded:
            return False
        self.loaded.discard(key)
        return True

    async def aclose(self) -> None:
        self.closed = True
