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

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from limner.plugin import TinyModel, materialize_in_hf_cache, tiny_revision

from ._backend import _diffusers

__all__ = ["tiny_pipeline", "tiny_vae", "write_tiny_pipeline"]

Components = Callable[[Any], Mapping[str, Any]]
"""Builds a pipeline's components, given the ``diffusers`` module: ``{"vae": ..., ...}``."""


def write_tiny_pipeline(
    directory: Path, *, pipeline_class: str, seed: int, components: Components
) -> None:
    """Seed torch, build the components, and save ``diffusers.<pipeline_class>`` of them
    (safetensors and ``model_index.json``) into ``directory``. The components are built in
    the order ``components`` builds them, so the same seed gives the same weights."""
    import torch
    import transformers  # noqa: F401 - imported before the seed, as every component needs it

    diffusers = _diffusers()
    torch.manual_seed(seed)
    pipeline = getattr(diffusers, pipeline_class)(**components(diffusers))
    pipeline.save_pretrained(directory)


def tiny_pipeline(
    recipe: str, *, seed: int, pipeline_class: str, components: Components
) -> TinyModel:
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

    return TinyModel(key=key, revision=revision, ensure=ensure)


def tiny_vae(*, scaling_factor: float, shift_factor: float, latent_channels: int = 16) -> Any:
    """An ``AutoencoderKL`` that downsamples 8x (four blocks) into 16 latent channels, as in
    FLUX.1 and SD3 (4 for Stable Diffusion 1 and 2), with the family's latent statistics."""
    return _diffusers().AutoencoderKL(
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
