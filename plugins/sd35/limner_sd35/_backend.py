"""Stable Diffusion 3.5 served through diffusers' ``StableDiffusion3Pipeline``.

The machinery (loading, offload, concurrent calls on shared weights, previews, metadata) is
``limner.diffusion.DiffusersBackend``; this module adds what is particular to SD3.5: its
variants, its tiny model, the negative prompt and the ``drop_t5`` option. Torch and diffusers
are imported only in ``load`` and ``generate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from limner import ImageGenerationConfig, ModelSettings, ModelSpec
from limner.diffusion import (
    DiffusersBackend,
    LoadedPipeline,
    parse_device,
    parse_dtype,
    parse_flag,
    resolve_device,
    resolve_dtype,
    select_variant,
)

from ._tiny import TINY_KEY, TINY_REVISION, ensure_tiny_sd35
from ._variants import VARIANTS, SD35Variant, resolve_config

__all__ = [
    "SD35Backend",
    "parse_device",
    "parse_dtype",
    "parse_flag",
    "resolve_device",
    "resolve_dtype",
]


class SD35Backend(DiffusersBackend[SD35Variant]):
    """SD3.5 Large Turbo, Large and Medium (and the tiny random SD3.5) through
    ``StableDiffusion3Pipeline``.

    Options: ``cpu_offload`` (bool, default false) keeps each component in CPU memory and
    moves it to the GPU only while it runs (diffusers' ``enable_model_cpu_offload``);
    ``drop_t5`` (bool, default false) loads no T5 encoder (about 9 GiB less in bf16) and
    conditions on the two CLIP encoders alone, which follows long prompts less well.
    """

    pipeline_class = "StableDiffusion3Pipeline"
    tiny_key = TINY_KEY
    tiny_revision = TINY_REVISION

    def __init__(self, spec: ModelSpec, settings: ModelSettings) -> None:
        super().__init__(spec, settings)
        self._drop_t5 = parse_flag("drop_t5", settings.options.get("drop_t5", False))

    def find_variant(self, spec: ModelSpec) -> SD35Variant:
        return select_variant(spec, VARIANTS, "limner-sd35")

    def ensure_tiny(self, cache_dir: Path) -> None:
        ensure_tiny_sd35(cache_dir)

    def gated(self) -> bool:
        return self.variant.gated

    def resolve_config(self, config: ImageGenerationConfig) -> ImageGenerationConfig:
        return resolve_config(self.variant, config)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        return {"text_encoder_3": None, "tokenizer_3": None} if self._drop_t5 else {}

    def call_kwargs(self, config: ImageGenerationConfig) -> dict[str, Any]:
        return {"negative_prompt": config.negative_prompt}

    def extra_metadata(
        self, loaded: LoadedPipeline, config: ImageGenerationConfig
    ) -> dict[str, Any]:
        return {
            "negative_prompt": config.negative_prompt,
            "t5": loaded.pipeline.text_encoder_3 is not None,
        }
