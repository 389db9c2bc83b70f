"""The one contract a limner plugin imports, as ``anyio.abc`` is for anyio.

A plugin declares its models with :func:`hookimpl` and :class:`ModelSpec`, and serves them
with a subclass of :class:`ImageEmbeddingBackend` or :class:`TextToImageBackend`. The helpers
here are what plugins share: device, dtype and flag settings, where the weights are (with
advice when they are missing), generated tiny models in the Hugging Face cache, and tiny
text encoders with tokenizers that need no files. Errors are in :mod:`limner.errors`; a
diffusers pipeline's backend is in :mod:`limner.diffusion`. Host code imports :mod:`limner`
instead. See docs/plugins.md.

Importing this module is cheap: torch and transformers are imported only by the helpers
that need them, when called.
"""

from __future__ import annotations

from limner._exports import present_as_public
from limner._registry._hookspecs import PLUGIN_API, RegisterModel, hookimpl
from limner._registry._spec import BackendFactory, Capability, ModelInfo, ModelSettings, ModelSpec
from limner.plugin._backends import Backend, ImageEmbeddingBackend, StepCallback, TextToImageBackend
from limner.plugin._devices import (
    DtypePolicy,
    Placement,
    parse_device,
    parse_dtype,
    parse_flag,
    resolve_device,
    resolve_dtype,
)
from limner.plugin._generation import GenerationResult, ImageGenerationConfig, Progress
from limner.plugin._loras import (
    ADAPTER_FILE,
    MAX_LORA_SCALE,
    MAX_LORAS,
    MIN_LORA_SCALE,
    LoraAdapter,
    LoraLayer,
    find_lora,
    lora_adapters,
    scan_lora_dirs,
)
from limner.plugin._memory import CachedPart, reserve_memory
from limner.plugin._quiet import quiet_loading
from limner.plugin._tiny_text import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_MAX_LENGTH,
    CLIP_TOKENS,
    CLIP_VOCAB_SIZE,
    clip_vocab,
    tiny_clip_text_encoder,
    tiny_clip_tokenizer,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)
from limner.plugin._transformers_backend import (
    BuiltOnFirstUse,
    TransformersEmbeddingBackend,
    embedding_dtype,
    pad_token_rows,
    pooled_features,
    tiny_model,
    unit_rows,
)
from limner.plugin._weights import (
    TinyModel,
    WeightSource,
    download_advice,
    hf_cache_dir,
    hf_offline,
    locate_weights,
    materialize_in_hf_cache,
    tiny_revision,
    weights_where,
)

__all__ = [
    "ADAPTER_FILE",
    "CLIP_BOS_ID",
    "CLIP_EOS_ID",
    "CLIP_MAX_LENGTH",
    "CLIP_TOKENS",
    "CLIP_VOCAB_SIZE",
    "MAX_LORAS",
    "MAX_LORA_SCALE",
    "MIN_LORA_SCALE",
    "PLUGIN_API",
    "Backend",
    "BackendFactory",
    "BuiltOnFirstUse",
    "CachedPart",
    "Capability",
    "DtypePolicy",
    "GenerationResult",
    "ImageEmbeddingBackend",
    "ImageGenerationConfig",
    "LoraAdapter",
    "LoraLayer",
    "ModelInfo",
    "ModelSettings",
    "ModelSpec",
    "Placement",
    "Progress",
    "RegisterModel",
    "StepCallback",
    "TextToImageBackend",
    "TinyModel",
    "TransformersEmbeddingBackend",
    "WeightSource",
    "clip_vocab",
    "download_advice",
    "embedding_dtype",
    "find_lora",
    "hf_cache_dir",
    "hf_offline",
    "hookimpl",
    "locate_weights",
    "lora_adapters",
    "materialize_in_hf_cache",
    "pad_token_rows",
    "parse_device",
    "parse_dtype",
    "parse_flag",
    "pooled_features",
    "quiet_loading",
    "reserve_memory",
    "resolve_device",
    "resolve_dtype",
    "scan_lora_dirs",
    "tiny_clip_text_encoder",
    "tiny_clip_tokenizer",
    "tiny_model",
    "tiny_revision",
    "tiny_t5_encoder",
    "tiny_t5_tokenizer",
    "unit_rows",
    "weights_where",
]

present_as_public(__name__, globals(), __all__)
