"""FLUX.1 served through diffusers' ``FluxPipeline``.

The machinery (loading, offload, concurrent calls on shared weights, previews, metadata) is
``limner.diffusion.DiffusersBackend``; this module adds what is particular to FLUX.1: its
variants, its tiny model, and its packed latents. Torch and diffusers are imported only in
``load`` and ``generate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from limner import ImageGenerationConfig, ModelSpec
from limner.diffusion import (
    DiffusersBackend,
    parse_device,
    parse_dtype,
    parse_flag,
    resolve_device,
    resolve_dtype,
    select_variant,
)

from ._tiny import TINY_KEY, TINY_REVISION, ensure_tiny_flux
from ._variants import VARIANTS, FluxVariant, resolve_config

if TYPE_CHECKING:
    import torch

__all__ = [
    "FluxBackend",
    "parse_device",
    "parse_dtype",
    "parse_flag",
    "resolve_device",
    "resolve_dtype",
]


class FluxBackend(DiffusersBackend[FluxVariant]):
    """FLUX.1 [schnell] and [dev] (and the tiny random FLUX) through ``FluxPipeline``.

    Options: ``cpu_offload`` (bool, default false) keeps each component in CPU memory and
    moves it to the GPU only while it runs (diffusers' ``enable_model_cpu_offload``).
    """

    pipeline_class = "FluxPipeline"
    tiny_key = TINY_KEY
    tiny_revision = TINY_REVISION
    download_size = "34 GB"

    def find_variant(self, spec: ModelSpec) -> FluxVariant:
        return select_variant(spec, VARIANTS, "limner-flux")

    def ensure_tiny(self, cache_dir: Path) -> None:
        ensure_tiny_flux(cache_dir)

    def gated(self) -> bool:
        return self.variant.key.endswith("FLUX.1-dev")

    def resolve_config(self, config: ImageGenerationConfig) -> ImageGenerationConfig:
        return resolve_config(self.variant, config)

    def preview_latents(
        self, pipe: Any, latents: torch.Tensor, config: ImageGenerationConfig
    ) -> torch.Tensor:
        """Flux packs 2x2 latent patches into the channels; unpack to (batch, 16, h, w)."""
        unpacked: torch.Tensor = pipe._unpack_latents(
            latents, config.height, config.width, pipe.vae_scale_factor
        )
        return unpacked
