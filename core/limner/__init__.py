"""limner: serve image models from Python, extended by plugins.

Host code asks the registry for a model by key and calls its capability::

    import limner

    model = limner.get("openai/clip-vit-base-patch32")
    vector = await model.embed_image("cat.jpg")

Plugins are found through the ``limner`` entry-point group; what they implement and the
helpers they share are in :mod:`limner.plugin` (see docs/plugins.md). This module is the
host's API.
"""

from __future__ import annotations

from . import errors
from ._capabilities import ImageEmbeddingCapable, ImageInput, TextToImageCapable
from ._default_pool import default_pool
from ._embedder import DEFAULT_MAX_TEXT_CHARS, BlockingImageEmbedder, ImageEmbedder
from ._generation_types import GenerationChunk, GenerationResult, ImageGenerationConfig, Progress
from ._generator import BlockingImageGenerator, ImageGenerator
from ._image_fetch import fetch_image_bytes
from ._image_kinds import InputKind, classify_input
from ._images import DEFAULT_LIMITS, ImageLimits, decode_image, encoded_bytes
from ._pool import Pool, PoolOptions, current_pool, max_wait
from ._readings import Clock, MemoryProbe, MonotonicClock, SystemMemory
from ._registry import (
    Model,
    ModelEntry,
    PluginRecord,
    Registry,
    default_registry,
    embedder,
    generator,
    get,
)
from ._runtime import KeyStats, Runtime
from ._spec import Capability, ModelInfo, ModelSettings, ModelSpec
from .errors import (
    BlockingCallInEventLoop,
    Cancelled,
    FetchError,
    InvalidInput,
    LimnerError,
    MemoryExhausted,
    ModelError,
    ModelLoadError,
    PluginError,
    PoolBusy,
    UnknownModelError,
    WaitTimeout,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_TEXT_CHARS",
    "BlockingCallInEventLoop",
    "BlockingImageEmbedder",
    "BlockingImageGenerator",
    "Cancelled",
    "Capability",
    "Clock",
    "FetchError",
    "GenerationChunk",
    "GenerationResult",
    "ImageEmbedder",
    "ImageEmbeddingCapable",
    "ImageGenerationConfig",
    "ImageGenerator",
    "ImageInput",
    "ImageLimits",
    "InputKind",
    "InvalidInput",
    "KeyStats",
    "LimnerError",
    "MemoryExhausted",
    "MemoryProbe",
    "Model",
    "ModelEntry",
    "ModelError",
    "ModelInfo",
    "ModelLoadError",
    "ModelSettings",
    "ModelSpec",
    "MonotonicClock",
    "PluginError",
    "PluginRecord",
    "Pool",
    "PoolBusy",
    "PoolOptions",
    "Progress",
    "Registry",
    "Runtime",
    "SystemMemory",
    "TextToImageCapable",
    "UnknownModelError",
    "WaitTimeout",
    "__version__",
    "classify_input",
    "current_pool",
    "decode_image",
    "default_pool",
    "default_registry",
    "embedder",
    "encoded_bytes",
    "errors",
    "fetch_image_bytes",
    "generator",
    "get",
    "max_wait",
]
