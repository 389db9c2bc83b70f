"""Building blocks for plugins that wrap a diffusers text-to-image pipeline.

:class:`DiffusersBackend` holds what every such backend needs: device, dtype and flag
settings, loading with CPU offload and load-error advice, request validation against each
:class:`Checkpoint`'s limits (:func:`resolve_config`), concurrent generations on shared
weights (a per-call pipeline view with its own scheduler and per-thread tokenizers), step
progress and cancellation, cheap latent previews, result metadata and memory measurement. A
model family subclasses it, describes its checkpoints, builds its tiny model with
:func:`tiny_pipeline`, and overrides a few hooks; see docs/plugins.md. Its tests subclass
:class:`limner.diffusion.testing.DiffusionFamilyContract`.

Importing this package is cheap: torch, diffusers and transformers are imported only when a
model loads, generates or writes its tiny weights. They are the plugin's dependencies, not
limner's.
"""

from __future__ import annotations

from limner._exports import present_as_public

from ._backend import DiffusersBackend, DiffusionVariant, select_variant
from ._checkpoint import Checkpoint
from ._config import (
    MAX_NUM_IMAGES,
    MAX_SEED,
    fit_edit_size,
    resolve_config,
    resolve_guidance,
    resolve_integer,
    resolve_number,
    resolve_output_format,
    resolve_preview,
    resolve_seed,
    resolve_side,
    resolve_strength,
)
from ._pipeline import LoadedPipeline, diffusion_dtype
from ._preview import LatentRGB, fit_latent_rgb
from ._tiny import TinyPipeline, tiny_pipeline, tiny_unet, tiny_vae, write_tiny_pipeline

__all__ = [
    "MAX_NUM_IMAGES",
    "MAX_SEED",
    "Checkpoint",
    "DiffusersBackend",
    "DiffusionVariant",
    "LatentRGB",
    "LoadedPipeline",
    "TinyPipeline",
    "diffusion_dtype",
    "fit_edit_size",
    "fit_latent_rgb",
    "resolve_config",
    "resolve_guidance",
    "resolve_integer",
    "resolve_number",
    "resolve_output_format",
    "resolve_preview",
    "resolve_seed",
    "resolve_side",
    "resolve_strength",
    "select_variant",
    "tiny_pipeline",
    "tiny_unet",
    "tiny_vae",
    "write_tiny_pipeline",
]

present_as_public(__name__, globals(), __all__)
