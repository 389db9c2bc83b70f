"""Building blocks for plugins that wrap a diffusers text-to-image pipeline.

:class:`DiffusersBackend` holds what every such backend needs: device, dtype and flag
settings, loading with CPU offload and load-error advice, concurrent generations on shared
weights (a per-call pipeline view with its own scheduler and per-thread tokenizers), step
progress and cancellation, cheap latent previews, result metadata and memory measurement. A
model family subclasses it and overrides a few hooks; see docs/plugins.md.

Importing this package is cheap: torch, diffusers and transformers are imported only when a
model loads, generates or writes its tiny weights. They are the plugin's dependencies, not
limner's.
"""

from __future__ import annotations

from ._backend import (
    DiffusersBackend,
    DiffusionVariant,
    LoadedPipeline,
    parse_device,
    parse_dtype,
    parse_flag,
    resolve_device,
    resolve_dtype,
    select_variant,
)
from ._config import (
    MAX_NUM_IMAGES,
    MAX_SEED,
    resolve_guidance,
    resolve_integer,
    resolve_number,
    resolve_output_format,
    resolve_preview,
    resolve_seed,
    resolve_side,
)
from ._preview import LatentRGB, fit_latent_rgb
from ._tokenizers import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    T5_EOS_ID,
    T5_PAD_ID,
    T5_VOCAB_SIZE,
    clip_vocab,
    t5_vocab,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)

__all__ = [
    "CLIP_BOS_ID",
    "CLIP_EOS_ID",
    "CLIP_MAX_LENGTH",
    "CLIP_VOCAB_SIZE",
    "MAX_NUM_IMAGES",
    "MAX_SEED",
    "T5_EOS_ID",
    "T5_PAD_ID",
    "T5_VOCAB_SIZE",
    "DiffusersBackend",
    "DiffusionVariant",
    "LatentRGB",
    "LoadedPipeline",
    "clip_vocab",
    "fit_latent_rgb",
    "parse_device",
    "parse_dtype",
    "parse_flag",
    "resolve_device",
    "resolve_dtype",
    "resolve_guidance",
    "resolve_integer",
    "resolve_number",
    "resolve_output_format",
    "resolve_preview",
    "resolve_seed",
    "resolve_side",
    "select_variant",
    "t5_vocab",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
]
