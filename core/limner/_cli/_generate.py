"""`limner generate`: a prompt to an image file."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import click
import psutil

from limner._fronts._generator import (
    ImageGenerator,
    check_prompt,
    check_strength,
    read_edit_inputs,
)
from limner._pool._budget import MemoryBudget
from limner._registry._spec import Capability
from limner.errors import InvalidInput, LimnerError
from limner.plugin._generation import GenerationResult, ImageGenerationConfig, Progress

from ._app import (
    _bad_option,
    _check_image_path,
    _chosen_model,
    _loaded,
    _lora_dirs_option,
    _model_options,
    _writing,
    cli,
)

# The options each config field comes from, for errors that name what the user typed.
_SETTING_FLAGS = {
    "prompt": "PROMPT",
    "width": "--width",
    "height": "--height",
    "steps": "--steps",
    "seed": "--seed",
    "guidance": "--guidance",
    "num_images": "--num-images",
    "negative_prompt": "--negative-prompt",
    "image": "--image",
    "mask": "--mask",
    "strength": "--strength",
    "loras": "--lora",
}
_SIZE_FLAGS = {"width": "--size", "height": "--size"}


@contextmanager
def _naming_flags(flags: dict[str, str]) -> Iterator[None]:
    """A config error about a field the command line sets becomes a usage error naming the
    option (``Invalid value for '--size': width must be ...``), exit code 2."""
    try:
        yield
    except InvalidInput as error:
        field = error.field or ""
        flag = flags.get(field) or flags.get(field.partition("[")[0])
        if flag is None:
            raise
        # --size sets two fields, --lora one per adapter: say which one is wrong.
        reason = error.reason
        if flag == "--size":
            reason = f"{field} {reason}"
        elif field != "loras" and flag == "--lora":
            reason = f"{field}: {reason}"
        raise _bad_option(f"'{flag}'", reason) from None


if TYPE_CHECKING:
    _SizeParam = click.ParamType[tuple[int, int] | None]
else:
    _SizeParam = click.ParamType  # generic only in recent click


class _Size(_SizeParam):
    """``--size``: ``WIDTHxHEIGHT`` as the HTTP API takes it (``auto``: the model's)."""

    name = "WxH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or isinstance(value, tuple):
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return None
        width, x, height = text.partition("x")
        if not (x and width.isdigit() and height.isdigit()):
            self.fail(f"{value!r} is not WIDTHxHEIGHT, e.g. 1024x768", param, ctx)
        return int(width), int(height)


if TYPE_CHECKING:
    _LoraParam = click.ParamType[tuple[str, float]]
else:
    _LoraParam = click.ParamType  # generic only in recent click


class _Lora(_LoraParam):
    """``--lora``: ``NAME:SCALE``, or ``NAME`` for scale 1."""

    name = "NAME[:SCALE]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        name, colon, scale = str(value).rpartition(":")
        if not colon:
            return str(value), 1.0
        try:
            return name, float(scale)
        except ValueError:
            self.fail(f"{value!r}: the scale after ':' must be a number, as in ink:0.8", param, ctx)


def _edit_config(
    model: ImageGenerator, config: ImageGenerationConfig, image: Path, mask: Path | None
) -> ImageGenerationConfig:
    """The config of an edit, its files read and checked now, before the model loads: a
    model that cannot edit, an unreadable image or mask, a mask of another size, a strength
    outside 0..1 each name their option."""
    if not model.supports_editing:
        raise InvalidInput(f"model {model.key} cannot edit images", field="image")
    check_strength(config.strength)
    source, _ = read_edit_inputs(image, mask, limits=model.limits)
    return model.resolve_config(config, source_size=(source.shape[1], source.shape[0]))


def _time_taken(result: GenerationResult, load_seconds: float) -> str:
    """``in 6.1 s (loading 4.9 s, generating 0.3 s)``: the whole command, from its process's
    start, which is what the user waited, and the model's two parts of it."""
    waited = time.time() - psutil.Process().create_time()
    parts = [f"loading {load_seconds:.1f} s"]
    generating = result.timings.get("generate")
    if generating is not None:
        parts.append(f"generating {generating:.1f} s")
    return f"in {waited:.1f} s ({', '.join(parts)})"


@cli.command(
    epilog="""\b
Examples:
  limner generate "a lighthouse at dusk" --model limner/tiny-flux --out lighthouse.png
  limner generate "a red fox" -m flux-schnell --seed 42 --steps 4 -o fox.png
  limner generate "a red fox" -m sd35-medium --num-images 4 -o foxes/fox.webp
  limner generate "a red fox" -m flux-dev --lora-dir loras --lora ink:0.8 -o fox.png
  limner generate "a red fox in snow" -m flux-schnell --image fox.png --strength 0.6 -o snow.png
  limner generate "a red hat" -m flux-schnell --image fox.png --mask hat.png -o hat.png
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
@click.option(
    "--size",
    type=_Size(),
    help="WIDTHxHEIGHT in pixels, as the HTTP API's size (default, or auto: the model's).",
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
    "--image",
    "image_path",
    type=click.Path(path_type=Path),  # checked, and decoded, before the model loads
    help="Edit this image instead of starting from noise (models that edit); the output "
    "takes its size unless --size says otherwise.",
)
@click.option(
    "--mask",
    "mask_path",
    type=click.Path(path_type=Path),
    help="With --image: repaint only the mask's white pixels (or, in a mask with "
    "transparency, its fully transparent ones, as OpenAI's); the image's size.",
)
@click.option(
    "--strength",
    type=float,
    help="With --image: how far from it to go, 0 (the image) to 1 (default: the model's).",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    type=_Lora(),
    help="A LoRA adapter of the --lora-dir folders, with its scale (ink:0.8; repeatable: "
    "they combine). `limner loras` lists them.",
)
@_lora_dirs_option
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
    size: tuple[int, int] | None,
    width: int | None,
    height: int | None,
    steps: int | None,
    seed: int | None,
    guidance: float | None,
    num_images: int,
    negative_prompt: str | None,
    image_path: Path | None,
    mask_path: Path | None,
    strength: float | None,
    progress: bool | None,
    loras: tuple[tuple[str, float], ...] = (),
    lora_dirs: tuple[str, ...] = (),
) -> None:
    """Generate images from PROMPT with a text-to-image model and save them.

    Everything is checked before the model loads: the prompt, the model, the settings, the
    image and mask to edit, and where the images go. The seed is printed on stderr, so the
    image can be made again, with the time the command took.
    """
    from tqdm import tqdm

    if size is not None:
        if width is not None or height is not None:
            raise click.UsageError("give the size once: --size WxH, or --width and --height")
        width, height = size
    flags = {**_SETTING_FLAGS, **(_SIZE_FLAGS if size is not None else {})}
    with _naming_flags(flags):
        check_prompt(prompt)
    _check_image_path(out_path)
    registry, key = _chosen_model(
        model_key, Capability.TEXT_TO_IMAGE, device, dtype, lora_dirs=lora_dirs
    )
    model = registry.generator(key)
    requested = ImageGenerationConfig(
        width=width,
        height=height,
        steps=steps,
        seed=seed,
        guidance=guidance,
        num_images=num_images,
        negative_prompt=negative_prompt,
        strength=strength,
        loras=loras,
    )
    with _naming_flags(flags):
        if image_path is None:
            if mask_path is not None or strength is not None:
                given = "--mask" if mask_path is not None else "--strength"
                raise click.UsageError(f"{given} edits an image: give the image with --image")
            config = model.resolve_config(requested)
        else:
            config = _edit_config(model, requested, image_path, mask_path)
    show_progress = progress if progress is not None else sys.stderr.isatty()

    async def run() -> tuple[GenerationResult, float]:
        result: GenerationResult | None = None
        async with _loaded(model, memory_budget, show_progress) as load_seconds:
            with tqdm(
                total=config.steps,
                unit="step",
                desc=model.key,
                file=sys.stderr,
                disable=not show_progress,
            ) as bar:
                # Closed however the loop ends: a Ctrl-C stops the run at its next step.
                edit = {"image": image_path, "mask": mask_path} if image_path else {}
                async with aclosing(model.generate_image(prompt, config, **edit)) as stream:
                    async for chunk in stream:
                        if isinstance(chunk, Progress):
                            bar.update(chunk.step - bar.n)
                        else:
                            result = chunk
        if result is None:
            raise LimnerError(f"{model.key} finished without a result")
        return result, load_seconds

    result, load_seconds = anyio.run(run)
    with _writing(out_path):
        written = result.save_all(out_path)
    for target in written:
        click.echo(str(target))
    click.echo(f"seed {result.seed} {_time_taken(result, load_seconds)}", err=True)
