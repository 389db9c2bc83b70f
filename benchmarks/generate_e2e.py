"""Text-to-image through limner against the plain diffusers pipeline, same process.

On this CPU machine the real FLUX.1 / SD3.5 weights cannot run, so this measures what limner
adds around a pipeline call: config validation, the pool's worker thread, one cross-thread
hop per step for the progress stream, the per-call pipeline view. It uses the TINY random
models (`limner/tiny-flux`, `limner/tiny-sd35`), where that overhead is most visible, at the
same seed and settings, and checks both paths give the same pixels.

    python benchmarks/generate_e2e.py --repeats 5 --steps 4 --size 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import anyio
import numpy as np
import torch

import limner
from limner import ImageGenerationConfig, Pool, Registry

PIPELINES = {"limner/tiny-flux": "FluxPipeline", "limner/tiny-sd35": "StableDiffusion3Pipeline"}
PROMPT = "a lighthouse at dusk"


def plain_pipeline(key: str, registry: Registry) -> Any:
    """The pipeline a diffusers user would load from the same snapshot."""
    import diffusers
    from huggingface_hub import snapshot_download

    settings = registry.settings(key)
    directory = snapshot_download(settings.weights, revision=settings.revision)
    pipeline_class = getattr(diffusers, PIPELINES[key])
    return pipeline_class.from_pretrained(directory, dtype=torch.float32).to("cpu")


def run_plain(pipeline: Any, config: ImageGenerationConfig) -> np.ndarray:
    assert config.seed is not None
    generator = torch.Generator("cpu").manual_seed(config.seed)
    output = pipeline(
        PROMPT,
        width=config.width,
        height=config.height,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance,
        generator=generator,
        max_sequence_length=config.max_sequence_length,
    )
    return np.asarray(output.images[0])


async def bench(key: str, args: argparse.Namespace, registry: Registry) -> None:
    model = registry.generator(key)
    config = model.resolve_config(
        ImageGenerationConfig(width=args.size, height=args.size, steps=args.steps, seed=7)
    )
    async with Pool() as pool:
        model = model.using(pool)
        first = await model.generate(PROMPT, config)  # cold start, outside the timing
        limner_times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            await model.generate(PROMPT, config)
            limner_times.append(time.perf_counter() - started)
    pipeline = await anyio.to_thread.run_sync(plain_pipeline, key, registry)
    plain_image = run_plain(pipeline, config)
    plain_times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        run_plain(pipeline, config)
        plain_times.append(time.perf_counter() - started)
    ours = np.asarray(first.images[0]).astype(np.int16)
    difference = int(np.abs(ours - plain_image.astype(np.int16)).max())
    t_limner, t_plain = statistics.median(limner_times), statistics.median(plain_times)
    print(
        f"{key} (TINY random weights), {args.size}x{args.size}, {args.steps} steps, "
        f"median of {args.repeats}:"
    )
    print(f"  plain diffusers: {t_plain * 1000:7.1f} ms/image")
    print(
        f"  limner (pool, streamed): {t_limner * 1000:7.1f} ms/image   "
        f"ratio {t_limner / t_plain:.2f}x; max pixel difference {difference}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--model", choices=sorted(PIPELINES), action="append")
    args = parser.parse_args()
    registry = limner.default_registry()
    for key in args.model or sorted(PIPELINES):
        anyio.run(bench, key, args, registry)


if __name__ == "__main__":
    main()
