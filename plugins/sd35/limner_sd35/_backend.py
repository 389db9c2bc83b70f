"""Stable Diffusion 3.5 served through diffusers' ``StableDiffusion3Pipeline``.

The machinery (loading, offload, concurrent calls on shared weights, request validation,
previews, metadata) is ``limner.diffusion.DiffusersBackend``; this module adds what is
particular to SD3.5: its variants, its tiny model, the negative prompt and the ``drop_t5``
option. Torch and diffusers are imported only in ``load`` and ``generate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from limner.diffusion import DiffusersBackend, LoadedPipeline
from limner.plugin import ImageGenerationConfig, ModelSettings, ModelSpec, parse_flag

from ._lora import sd3_lora_layers
from ._tiny import TINY
from ._variants import VARIANTS, SD35Variant

__all__ = ["SD35Backend"]


class SD35Backend(DiffusersBackend[SD35Variant]):
    """SD3.5 Large Turbo, Large and Medium (and the tiny random SD3.5) through
    ``StableDiffusion3Pipeline``.

    Options: ``cpu_offload`` (bool, default false) keeps each component in CPU memory and
    moves it to the GPU only while it runs (diffusers' ``enable_model_cpu_offload``);
    ``drop_t5`` (bool, default false) loads no T5 encoder (about 9 GiB less in bf16) and
    conditions on the two CLIP encoders alone, which follows long prompts less well.
    Requests may name LoRA adapters in diffusers' format (docs/lora.md).
    """

    pipeline_class = "StableDiffusion3Pipeline"
    img2img_class = "StableDiffusion3Img2ImgPipeline"  # editing: built on the loaded components
    inpaint_class = "StableDiffusion3InpaintPipeline"
    tiny = TINY
    variants = VARIANTS
    lora_family = "SD3.5"

    def __init__(self, spec: ModelSpec, settings: ModelSettings) -> None:
        super().__init__(spec, settings)
        self._drop_t5 = parse_flag("drop_t5", settings.options.get("drop_t5", False))

    def lora_layers(self) -> Mapping[str, tuple[int, int]] | None:
        """The Linear layers of the checkpoint's transformer: what adapters may change."""
        config = self.variant.transformer
        return None if config is None else sd3_lora_layers(config)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        return {"text_encoder_3": None, "tokenizer_3": None} if self._drop_t5 else {}

    def extra_metadata(
        self, loaded: LoadedPipeline, config: ImageGenerationConfig
    ) -> dict[str, Any]:
        return {
            "negative_prompt": config.negative_prompt,
            "t5": loaded.pipeline.text_encoder_3 is not None,
        }
