"""`limner generate`: a prompt to an image file."""

from __future__ import annotations

import sys
from contextlib import aclosing
from pathlib import Path

import anyio
import click

from limner._budget import MemoryBudget
from limner._spec import Capability
from limner.errors import LimnerError

from ._app import _check_image_path, _chosen_model, _loaded, _model_options, _writing, cli


@cli.command(
    epilog="""\b
Examples:
  limner generate "a lighthouse at dusk" --model limner/tiny-flux --out lighthouse.png
  limner generate "a red fox" -m flux-schnell --seed 42 --steps 4 -o fox.png
  limner generate "a red fox" -m sd35-medium --num-images 4 -o foxes/fox.webp
"""
)
@click.argument("prompt")
@_model_options
@click.option(
    "-o",
    "--out",
    "out_path",
    required=True,
    type=click.Path(path_type=Path),  # checked by _check_writable, in one line
    help="Output file, .png, .jpg or .webp (a .png carries the prompt, seed and settings); "
    "-1, -2, ... are added for several images.",
)
@click.option("--width", type=int, help="Image width in pixels (default: the model's).")
@click.option("--height", type=int, help="Image height in pixels (default: the model's).")
@click.option("--steps", type=int, help="Denoising steps (default: the model's).")
@click.option("--seed", type=int, help="Random seed (default: drawn, and printed).")
@click.option("--guidance", type=float, help="Guidance scale (default: the model's).")
@click.option(
    "--num-images",
    type=int,
    default=1,
    show_default=True,
    help="Images from the one prompt, each with the next seed.",
)
@click.option("--negative-prompt", help="What to avoid, for models that support it.")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a TTY)."
)
def generate(
    prompt: str,
    model_key: str | None,
    device: str | None,
    dtype: str | None,
    memory_budget: MemoryBudget | None,
    out_path: Path,
    width: int | None,
    height: int | None,
    steps: int | None,
    seed: int | None,
    guidance: float | None,
    num_images: int,
    negative_prompt: str | None,
    progress: bool | None,
) -> None:
    """Generate images from PROMPT with a text-to-image model and save them.

    Everything is checked before the model loads: the model, the settings and where the
    images go. The seed is printed on stderr, so the image can be made again.
    """
    from tqdm import tqdm

    from limner._generation_types import GenerationResult, ImageGenerationConfig, Progress

    _check_image_path(out_path)
    registry, key = _chosen_model(model_key, Capability.TEXT_TO_IMAGE, device, dtype)
    model = registry.generator(key)
    config = model.resolve_config(
        ImageGenerationConfig(
            width=width,
            height=height,
            steps=steps,
            seed=seed,
            guidance=guidance,
            num_images=num_images,
            negative_prompt=negative_prompt,
        )
    )
    show_progress = progress if progress is not None else sys.stderr.isatty()

    async def run() -> GenerationResult:
        result: GenerationResult | None = None
        async with _loaded(model, memory_budget, show_progress):
            with tqdm(
                total=config.steps,
                unit="step",
                desc=model.key,
                file=sys.stderr,
                disable=not show_progress,
            ) as bar:
                # Closed however the loop ends: a Ctrl-C stops the run at its next step.
                async with aclosing(model.generate_image(prompt, config)) as stream:
                    async for chunk in stream:
                        if isinstance(chunk, Progress):
                            bar.update(chunk.step - bar.n)
                        else:
                            result = chunk
        if result is None:
            raise LimnerError(f"{model.key} finished without a result")
        return result

    result = anyio.run(run)
    with _writing(out_path):
        written = result.save_all(out_path)
    for target in written:
        click.echo(str(target))
    seconds = result.timings.get("generate")
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    click.echo(f"seed {result.seed}{took}", err=True)
