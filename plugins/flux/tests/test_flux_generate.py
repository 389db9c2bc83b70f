"""The tiny FLUX generating through the real FluxPipeline code path, and the real one on a GPU."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import numpy as np
import pytest
from PIL import Image

import limner
from limner import (
    Cancelled,
    GenerationResult,
    ImageGenerationConfig,
    ModelError,
    ModelLoadError,
    Pool,
    Progress,
)
from limner.testing import FakeClock, FakeMemory
from limner_flux._backend import FluxBackend
from limner_flux._tiny import TINY_REVISION

BackendMaker = Callable[..., FluxBackend]
TINY = "limner/tiny-flux"
SCHNELL = "black-forest-labs/FLUX.1-schnell"


def run(
    backend: FluxBackend, prompt: str = "a lighthouse at dusk", **fields: Any
) -> tuple[list[Progress], GenerationResult]:
    steps: list[Progress] = []
    config = backend.resolve_config(ImageGenerationConfig(**fields))
    result = backend.generate(prompt, config, on_step=steps.append)
    return steps, result


def pixels(image: Image.Image) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.asarray(image, dtype=np.uint8)


def test_tiny_model_is_written_in_the_hub_cache_layout(tiny: FluxBackend, hf_cache: Path) -> None:
    repo = hf_cache / "models--limner--tiny-flux"
    assert (repo / "refs" / "main").read_text() == TINY_REVISION
    snapshot = repo / "snapshots" / TINY_REVISION
    for name in ("model_index.json", "tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"):
        assert (snapshot / name).is_file()
    assert tiny.settings.revision == TINY_REVISION


def test_steps_then_result(tiny: FluxBackend) -> None:
    steps, result = run(tiny, steps=3, num_images=2, width=48, height=32, seed=11)
    assert [p.step for p in steps] == [1, 2, 3]
    assert {p.total for p in steps} == {3}
    elapsed = [p.elapsed for p in steps]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert all(p.preview is None for p in steps)
    assert len(result.images) == 2
    assert {image.size for image in result.images} == {(48, 32)}
    assert {image.mode for image in result.images} == {"RGB"}
    assert result.model == TINY and result.prompt == "a lighthouse at dusk"
    assert result.seed == 11 and result.config.seed == 11
    assert result.config.steps == 3 and result.config.width == 48
    assert result.timings["generate"] >= result.timings["decode"] > 0
    assert result.timings["load"] > 0
    assert result.metadata["seeds"] == [11, 12]
    assert result.metadata["steps"] == 3 and result.metadata["scheduler"]
    assert result.metadata["dtype"] == "float32" and result.metadata["device"] == "cpu"


def test_random_seed_is_reported_and_reproduces(tiny: FluxBackend) -> None:
    _, first = run(tiny, steps=1)
    _, again = run(tiny, steps=1, seed=first.seed)
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_same_seed_same_pixels_other_seed_other_pixels(tiny: FluxBackend) -> None:
    _, one = run(tiny, steps=2, seed=1234)
    _, same = run(tiny, steps=2, seed=1234)
    _, other = run(tiny, steps=2, seed=1235)
    assert np.array_equal(pixels(one.images[0]), pixels(same.images[0]))
    assert not np.array_equal(pixels(one.images[0]), pixels(other.images[0]))
    assert pixels(one.images[0]).std() > 0  # noise, but not a flat image


def test_each_image_of_a_batch_has_its_own_seed(tiny: FluxBackend) -> None:
    """Image k of a batch starts from seed + k, so any one image can be made again alone."""
    _, batch = run(tiny, steps=2, seed=50, num_images=2)
    _, alone = run(tiny, steps=2, seed=51)
    first, second = (pixels(image).astype(int) for image in batch.images)
    assert not np.array_equal(first, second)
    # Same noise, same prompt; only the batched matrix products round differently.
    assert np.abs(second - pixels(alone.images[0]).astype(int)).max() <= 2


def test_preview_is_a_small_latent_projection(tiny: FluxBackend) -> None:
    steps, result = run(tiny, steps=2, width=64, height=48, preview=True, seed=3)
    assert len(steps) == 2
    for progress in steps:
        assert progress.preview is not None
        assert progress.preview.size == (8, 6)  # one pixel per latent
        assert progress.preview.mode == "RGB"
    first, last = (pixels(p.preview) for p in steps if p.preview is not None)
    assert not np.array_equal(first, last)  # it follows the latents
    assert result.images[0].size == (64, 48)


def test_preview_projection_is_cheap_at_1024px(tiny: FluxBackend) -> None:
    import torch

    projection = tiny._latent_rgb(tiny._require_loaded())
    latents = torch.randn(1, 16, 128, 128)  # FLUX's unpacked latents of a 1024 x 1024 image
    projection.image(latents)
    timings = []
    for _ in range(10):
        started = time.perf_counter()
        image = projection.image(latents)
        timings.append(time.perf_counter() - started)
    assert image.size == (128, 128)
    # About 0.25 ms on an idle 2-core CPU, and tens of ms when other jobs crowd it; decoding
    # the same latents with a VAE of the real size takes seconds there. The bound tells the
    # two apart on a busy machine.
    assert min(timings) < 0.1, f"preview took {min(timings) * 1000:.2f} ms per step"


def test_cancelled_at_step_two_stops_before_decoding(
    tiny: FluxBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = tiny._require_loaded().pipeline.vae
    decodes: list[int] = []
    real_decode = vae.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        decodes.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", counting_decode)
    seen: list[int] = []

    def on_step(progress: Progress) -> None:
        seen.append(progress.step)
        if progress.step == 2:
            raise Cancelled("consumer went away")

    config = tiny.resolve_config(ImageGenerationConfig(steps=6, seed=1))
    with pytest.raises(Cancelled):
        tiny.generate("a cat", config, on_step=on_step)
    assert seen == [1, 2]
    assert decodes == []
    # The backend is unharmed: the next generation runs all its steps.
    steps, result = run(tiny, steps=3)
    assert [p.step for p in steps] == [1, 2, 3] and len(result.images) == 1
    assert len(decodes) == 1


def test_concurrent_generations_match_sequential_ones(tiny: FluxBackend) -> None:
    seeds = (101, 202)
    sequential = {seed: pixels(run(tiny, steps=3, seed=seed)[1].images[0]) for seed in seeds}
    both_started = threading.Barrier(2, timeout=30)
    results: dict[int, GenerationResult] = {}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        def on_step(progress: Progress) -> None:
            if progress.step == 1:
                both_started.wait()  # both calls are inside the denoising loop at once

        try:
            config = tiny.resolve_config(ImageGenerationConfig(steps=3, seed=seed))
            results[seed] = tiny.generate("a lighthouse at dusk", config, on_step=on_step)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    for seed in seeds:
        assert np.array_equal(pixels(results[seed].images[0]), sequential[seed])
        assert results[seed].config.steps == 3


def test_many_threads_with_different_prompts_match_sequential_runs(tiny: FluxBackend) -> None:
    """Prompts and sequence lengths that differ between threads: the tokenizers' padding
    state, set before every encode, must not leak from one call into another."""

    def generate(index: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        words = "a lighthouse at dusk " * (1 + index % 5)
        length = 8 * (1 + index % 4)
        _, result = run(
            tiny, words, steps=1, seed=index, width=32, height=32, max_sequence_length=length
        )
        return pixels(result.images[0])

    expected = {index: generate(index) for index in range(8)}
    failures: list[str] = []

    def worker(offset: int) -> None:
        for turn in range(8):
            index = (turn + offset) % 8
            try:
                if not np.array_equal(generate(index), expected[index]):
                    failures.append(f"image {index} differs")
            except Exception as error:
                failures.append(repr(error))

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []


@pytest.mark.anyio
async def test_streamed_by_an_async_consumer_that_leaves_early(tiny: FluxBackend) -> None:
    """The way the core drives a backend: chunks cross from the worker thread into a stream,
    and once the consumer has gone, ``on_step`` raises ``Cancelled`` and generation stops."""
    send, receive = anyio.create_memory_object_stream[Progress](0)  # a hand-over, no buffer
    gone = threading.Event()
    seen: list[int] = []

    def on_step(progress: Progress) -> None:
        if gone.is_set():
            raise Cancelled("consumer left")
        seen.append(progress.step)
        try:
            anyio.from_thread.run(send.send, progress)
        except anyio.BrokenResourceError:
            raise Cancelled("consumer left") from None

    config = tiny.resolve_config(ImageGenerationConfig(steps=8, seed=5))

    async def consume() -> list[int]:
        received = []
        async for progress in receive:
            received.append(progress.step)
            if len(received) == 2:
                gone.set()
                break
        return received

    outcome: dict[str, Any] = {}

    async def produce() -> None:
        try:
            outcome["result"] = await anyio.to_thread.run_sync(
                lambda: tiny.generate("a cat", config, on_step=on_step)
            )
        except Cancelled as error:
            outcome["error"] = error

    async with anyio.create_task_group() as group:
        group.start_soon(produce)
        received = await consume()
        receive.close()
    assert received == [1, 2]
    assert isinstance(outcome.get("error"), Cancelled)
    assert seen in ([1, 2], [1, 2, 3])  # at most one step past the consumer


@pytest.mark.anyio
async def test_served_through_the_core_pool(
    registry: limner.Registry, tiny: FluxBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: registry, pool worker threads, streamed chunks; a consumer that stops
    early stops the pipeline before its VAE decode."""
    model = registry.generator(TINY)
    config = ImageGenerationConfig(steps=3, seed=21, num_images=2, width=32, height=48)
    decodes: list[int] = []
    async with Pool(memory=FakeMemory(total_mb=10_000), clock=FakeClock()):
        chunks = [chunk async for chunk in model.generate_image("a lighthouse at dusk", config)]
        pipeline = model.backend._require_loaded().pipeline  # type: ignore[attr-defined]
        real_decode = pipeline.vae.decode

        def counting_decode(*args: Any, **kwargs: Any) -> Any:
            decodes.append(1)
            return real_decode(*args, **kwargs)

        monkeypatch.setattr(pipeline.vae, "decode", counting_decode)
        stream = model.generate_image("a cat", ImageGenerationConfig(steps=6, seed=1))
        early = []
        async for chunk in stream:
            early.append(chunk)
            if len(early) == 2:
                break
        await stream.aclose()
    assert decodes == []  # the pool has drained: the stopped run never reached its decode
    assert [type(chunk) for chunk in chunks] == [Progress, Progress, Progress, GenerationResult]
    assert [chunk.step for chunk in chunks if isinstance(chunk, Progress)] == [1, 2, 3]
    result = chunks[-1]
    assert isinstance(result, GenerationResult)
    assert [image.size for image in result.images] == [(32, 48), (32, 48)]
    _, direct = run(tiny, steps=3, seed=21, num_images=2, width=32, height=48)
    for served, alone in zip(result.images, direct.images):
        assert np.array_equal(pixels(served), pixels(alone))
    assert [chunk.step for chunk in early if isinstance(chunk, Progress)] == [1, 2]


def test_memory_device_resolves_auto(make_backend: BackendMaker) -> None:
    assert make_backend(TINY).memory_device() == "cpu"  # no CUDA here
    assert make_backend(TINY, device="cpu").memory_device() == "cpu"


def test_load_unload_and_memory(make_backend: BackendMaker) -> None:
    backend = make_backend(TINY)
    assert backend.memory_mb() is None
    with pytest.raises(ModelError, match="not loaded"):
        run(backend)
    backend.load()
    measured = backend.memory_mb()
    assert measured is not None and 0 < measured < backend.spec.info.memory_mb
    backend.unload()
    assert backend.memory_mb() is None
    with pytest.raises(ModelError, match="not loaded"):
        run(backend)


def test_cpu_offload_on_the_cpu_changes_nothing(make_backend: BackendMaker) -> None:
    backend = make_backend(TINY, device="cpu", options={"cpu_offload": "true"})
    backend.load()
    _, result = run(backend, steps=1, seed=9)
    _, reference = run(backend, steps=1, seed=9)
    assert result.metadata["cpu_offload"] is False
    assert np.array_equal(pixels(result.images[0]), pixels(reference.images[0]))


def test_dtype_override(make_backend: BackendMaker) -> None:
    backend = make_backend(TINY, dtype="bf16")
    backend.load()
    _, result = run(backend, steps=1, seed=9, width=32, height=32)
    assert result.metadata["dtype"] == "bfloat16"
    assert result.images[0].size == (32, 32)


def test_missing_real_weights_offline_fail_with_advice(make_backend: BackendMaker) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(f"hf download {SCHNELL}")):
        make_backend(SCHNELL, device="cpu").load()


def test_local_dir_without_a_pipeline_fails_with_advice(
    make_backend: BackendMaker, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match=re.escape("model_index.json")):
        make_backend(SCHNELL, local_dir=tmp_path, device="cpu").load()


def test_corrupt_weights_become_a_load_error(
    make_backend: BackendMaker, tiny: FluxBackend, hf_cache: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "tiny-copy"
    shutil.copytree(hf_cache / "models--limner--tiny-flux" / "snapshots" / TINY_REVISION, copy)
    (copy / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelLoadError, match=f"could not load {TINY}"):
        make_backend(TINY, local_dir=copy).load()


def test_tiny_at_another_revision_is_refused(make_backend: BackendMaker) -> None:
    with pytest.raises(ModelLoadError, match="got revision 'main': leave it unset"):
        make_backend(TINY, revision="main").load()


def test_tiny_with_the_revision_unset_loads_the_one_limner_writes(
    registry: limner.Registry,
) -> None:
    spec = registry.spec(TINY)
    backend = FluxBackend(spec, limner.ModelSettings(weights=TINY))  # as a host may build it
    assert backend.settings.revision is None
    backend.load()
    try:
        _, result = run(backend, steps=1, width=32, height=32, seed=1)
        assert result.images[0].size == (32, 32)
    finally:
        backend.unload()


@pytest.mark.real_weights
@pytest.mark.gpu
def test_real_schnell_on_a_gpu(
    make_backend: BackendMaker, user_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from huggingface_hub import try_to_load_from_cache

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; torch sees none")
    if not isinstance(
        try_to_load_from_cache(SCHNELL, "model_index.json", cache_dir=user_cache), str
    ):
        pytest.skip(f"{SCHNELL} is not in the local Hugging Face cache ({user_cache})")
    monkeypatch.setenv("HF_HUB_CACHE", str(user_cache))
    backend = make_backend(SCHNELL)
    torch.cuda.reset_peak_memory_stats()
    backend.load()
    try:
        steps, result = run(backend, "a red fox in the snow, photograph", seed=0, preview=True)
        assert [p.step for p in steps] == [1, 2, 3, 4]
        image = pixels(result.images[0])
        assert result.images[0].size == (1024, 1024)
        assert image.std() > 10  # a picture, not a flat or black image
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        assert peak_mb < backend.spec.info.memory_mb * 1.1
    finally:
        backend.unload()
