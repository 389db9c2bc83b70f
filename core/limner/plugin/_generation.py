"""The text-to-image data types: the config a caller sends and the chunks it streams back."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["GenerationChunk", "GenerationResult", "ImageGenerationConfig", "Progress"]

OutputFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True, kw_only=True)
class ImageGenerationConfig:
    """What to generate. ``None`` fields take the model's defaults; ``seed=None`` draws one,
    and the seed used is always reported back in the result.

    ``strength`` applies to edits only (a source image given): how far from the source the
    result may go, from 0 (the source itself) to 1 (the prompt alone decides); ``None`` takes
    the model's default, which the result's config reports.

    ``loras`` names LoRA adapters to apply, each with its scale: ``[("ink", 0.8)]``, kept as
    a tuple of pairs (a mapping of names to scales is taken too). The model checks them with
    the rest of the config, before any weights load, and applies them in its own order
    (by name), whatever the request's (see docs/lora.md).
    """

    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    num_images: int = 1
    negative_prompt: str | None = None
    max_sequence_length: int | None = None
    output_format: OutputFormat = "png"
    preview: bool = False
    strength: float | None = None
    loras: Sequence[tuple[str, float]] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", _pairs(self.loras))


def _pairs(loras: object) -> object:
    """``[("ink", 0.8)]`` or ``{"ink": 0.8}`` as ``(("ink", 0.8),)``: hashable, as a frozen
    config must be. Anything else is left for ``resolve_config`` to refuse, naming it."""
    if isinstance(loras, Mapping):
        loras = list(loras.items())
    if (
        isinstance(loras, Sequence)
        and not isinstance(loras, str)
        and all(isinstance(e, Sequence) and not isinstance(e, str) for e in loras)
    ):
        return tuple(tuple(entry) for entry in loras)
    return loras


@dataclass(frozen=True, kw_only=True)
class Progress:
    """One denoising step finished. ``preview`` is a small RGB image when asked for."""

    step: int
    total: int
    elapsed: float
    preview: Image | None = None


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """The last chunk of a generation: the images and everything needed to make them again."""

    model: str
    prompt: str
    images: tuple[Image, ...]
    seed: int
    config: ImageGenerationConfig
    timings: Mapping[str, float] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def seed_of(self, index: int) -> int:
        """The seed that makes image ``index`` alone: plugins that seed each image of a batch
        separately list them in ``metadata["seeds"]``."""
        seeds = self.metadata.get("seeds")
        if isinstance(seeds, (list, tuple)) and index < len(seeds):
            return int(seeds[index])
        return self.seed

    def text_metadata(self, index: int = 0) -> dict[str, str]:
        """What to store beside image ``index`` so it can be made again: prompt, its seed,
        model, config."""
        settings = {
            k: v for k, v in dataclasses.asdict(self.config).items() if v is not None and v != ()
        }
        return {
            "prompt": self.prompt,
            "seed": str(self.seed_of(index)),
            "model": self.model,
            "limner": json.dumps({**settings, **self.metadata}, sort_keys=True, default=str),
        }

    def save(self, path: str | os.PathLike[str], *, index: int | None = None) -> Path:
        """Write image ``index`` (or the only image); the format follows the suffix. PNGs
        carry :meth:`text_metadata` in their text chunks.

        A result of several images needs ``index``, or :meth:`save_all`, which writes them
        all: this never writes one of them silently.
        """
        if index is None:
            if len(self.images) != 1:
                from limner.errors import InvalidInput

                raise InvalidInput(
                    f"this result holds {len(self.images)} images; save(path, index=i) writes "
                    "one of them, save_all(path) writes them all",
                    field="index",
                )
            index = 0
        from PIL.PngImagePlugin import PngInfo

        target = Path(path)
        image = self.images[index]
        if target.suffix.lower() == ".png":
            info = PngInfo()
            for key, value in self.text_metadata(index).items():
                info.add_itxt(key, value)
            image.save(target, pnginfo=info)
        else:
            image.save(target)
        return target

    def save_all(self, path: str | os.PathLike[str]) -> list[Path]:
        """Write every image: ``path`` itself for one image, else ``NAME-1.png`` ...
        ``NAME-N.png`` beside it (as ``limner generate --num-images`` names them)."""
        return [self.save(target, index=i) for i, target in enumerate(self.paths(path))]

    def paths(self, path: str | os.PathLike[str]) -> list[Path]:
        """Where :meth:`save_all` writes each image."""
        target = Path(path)
        if len(self.images) == 1:
            return [target]
        return [
            target.with_name(f"{target.stem}-{i + 1}{target.suffix}")
            for i in range(len(self.images))
        ]


GenerationChunk = Progress | GenerationResult
