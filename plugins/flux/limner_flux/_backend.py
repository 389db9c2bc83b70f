"""FLUX.1 served through diffusers' ``FluxPipeline``.

The machinery (loading, offload, concurrent calls on shared weights, request validation,
previews, metadata) is ``limner.diffusion.DiffusersBackend``; this module adds what is
particular to FLUX.1: its variants, its tiny model, and its packed latents. Torch and
diffusers are imported only in ``load`` and ``generate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from limner.diffusion import DiffusersBackend
from limner.plugin import ImageGenerationConfig

from ._lora import flux_lora_layers
from ._tiny import TINY
from ._variants import VARIANTS, FluxVariant

if TYPE_CHECKING:
    import torch

__all__ = ["FluxBackend"]


class FluxBackend(DiffusersBackend[FluxVariant]):
    """FLUX.1 [schnell] and [dev] (and the tiny random FLUX) through ``FluxPipeline``.

    Options: ``cpu_offload`` (bool, default false) keeps each component in CPU memory and
    moves it to the GPU only while it runs (diffusers' ``enable_model_cpu_offload``).
    Requests may name LoRA adapters in diffusers' format (docs/lora.md).
    """

    pipeline_class = "FluxPipeline"
    img2img_class = "FluxImg2ImgPipeline"  # editing: built on the loaded components
    inpaint_class = "FluxInpaintPipeline"
    tiny = TINY
    variants = VARIANTS
    download_size = "34 GB"
    lora_family = "FLUX.1"

    def lora_layers(self) -> Mapping[str, tuple[int, int]] | None:
        """The Linear layers of the checkpoint's transformer: what adapters may change."""
        config = self.variant.transformer
        return None if config is None else flux_lora_layers(config)

    def preview_latents(
        self, pipe: Any, latents: torch.Tensor, config: ImageGenerationConfig
    ) -> torch.Tensor:
        """Flux packs 2x2 latent patches into the channels; unpack to (batch, 16, h, w)."""
        unpacked: torch.Tensor = pipe._unpack_latents(
            latents, config.height, config.width, pipe.vae_scale_factor
        )
        return unpacked
