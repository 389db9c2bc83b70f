"""Tiny random-weight pipelines, generated on first use into the Hugging Face cache.

A family's tiny model has every component of the real class and the real wiring, only tiny
widths, so tests and offline demos run exactly the code path of the real keys:
``from_pretrained`` from the cache layout. :func:`tiny_pipeline` is the outline every family
follows (seed, build the components, save the pipeline, into the cache at a revision named
by the recipe); :func:`tiny_vae` and limner.plugin's tiny text encoders and tokenizers are
the components the families share. torch,
transformers and diffusers are imported only when a model is written.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from limner.plugin import TinyModel, materialize_in_hf_cache, tiny_revision

from ._pipeline import diffusers_module

__all__ = ["TinyPipeline", "tiny_pipeline", "tiny_unet", "tiny_vae", "write_tiny_pipeline"]

Components = Callable[[Any], Mapping[str, Any]]
"""Builds a pipeline's components, given the ``diffusers`` module: ``{"vae": ..., ...}``."""


@dataclass(frozen=True)
class TinyPipeline(TinyModel):
    """A family's generated tiny pipeline: a :class:`~limner.plugin.TinyModel` that knows its
    diffusers pipeline class (which a :class:`DiffusersBackend` with this ``tiny`` loads,
    unless it names another)."""

    pipeline_class: str = ""


def write_tiny_pipeline(
    directory: Path, *, pipeline_class: str, seed: int, components: Components
) -> None:
    """Seed torch, build the components, and save ``diffusers.<pipeline_class>`` of them
    (safetensors and ``model_index.json``) into ``directory``. The components are built in
    the order ``components`` builds them, so the same seed gives the same weights. The
    pipeline's optional components not given (a safety checker, a feature extractor, an image
    encoder) are left out."""
    import torch
    import transformers  # noqa: F401 - imported before the seed, as every component needs it

    diffusers = diffusers_module()
    torch.manual_seed(seed)
    cls = getattr(diffusers, pipeline_class)
    parts = dict(components(diffusers))
    accepted = inspect.signature(cls.__init__).parameters
    for name in getattr(cls, "_optional_components", ()):  # a tiny model leaves them out
        if name in accepted:
            parts.setdefault(name, None)
    if "requires_safety_checker" in accepted and parts.get("safety_checker") is None:
        parts.setdefault("requires_safety_checker", False)  # noise needs no safety checker
    cls(**parts).save_pretrained(directory)


def tiny_pipeline(
    recipe: str, *, seed: int, pipeline_class: str, components: Components
) -> TinyPipeline:
    """A family's tiny model, named by its ``recipe``, ``"<key>@<version>"``: the key is
    written on first use into the Hugging Face cache by :func:`write_tiny_pipeline`, at the
    revision :func:`~limner.plugin.tiny_revision` derives from the recipe. Bump the version
    whenever the components or the seed change, so caches holding the old snapshot are not
    reused for a different model."""
    key, at, version = recipe.partition("@")
    if not (at and version):
        raise ValueError(f"a tiny model's recipe looks like 'limner/tiny-x@1', got {recipe!r}")
    revision = tiny_revision(recipe)

    def write(directory: Path) -> None:
        write_tiny_pipeline(
            directory, pipeline_class=pipeline_class, seed=seed, components=components
        )

    def ensure(cache_dir: Path | None = None) -> Path:
        return materialize_in_hf_cache(key, revision, write, cache_dir=cache_dir)

    return TinyPipeline(key=key, revision=revision, ensure=ensure, pipeline_class=pipeline_class)


def tiny_vae(*, scaling_factor: float, shift_factor: float, latent_channels: int = 16) -> Any:
    """An ``AutoencoderKL`` that downsamples 8x (four blocks) into 16 latent channels, as in
    FLUX.1 and SD3 (4 for Stable Diffusion 1 and 2), with the family's latent statistics."""
    return diffusers_module().AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_unet(*, cross_attention_dim: int, in_channels: int = 4, sample_size: int = 8) -> Any:
    """A ``UNet2DConditionModel`` of Stable Diffusion 1 and 2's blocks at tiny widths: two
    levels, the lower one attending to the text (``cross_attention_dim``, the text encoder's
    width), over ``in_channels`` latent channels. ``sample_size`` is the latent side of the
    default image (8 for a tiny model's 64 px): diffusers' image-to-image and inpainting
    pipelines read it when they are built."""
    return diffusers_module().UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
    )
