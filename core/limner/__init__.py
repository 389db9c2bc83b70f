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

from typing import TYPE_CHECKING

from limner import errors
from limner._exports import Moved, Removed, deprecated_names, present_as_public
from limner._fronts._default_pool import default_pool
from limner._fronts._embedder import DEFAULT_MAX_TEXT_CHARS, BlockingImageEmbedder, ImageEmbedder
from limner._fronts._generator import BlockingImageGenerator, ImageGenerator
from limner._fronts._protocols import ImageEmbeddingCapable, ImageInput, TextToImageCapable
from limner._inputs._decode import DEFAULT_LIMITS, ImageLimits
from limner._pool import Pool, PoolOptions, current_pool, max_wait
from limner._registry._registry import (
    LoraEntry,
    Model,
    ModelEntry,
    PluginRecord,
    Registry,
    default_registry,
    embedder,
    generator,
    get,
)
from limner._registry._spec import Capability, ModelInfo, ModelSettings, ModelSpec
from limner.errors import (
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
    RuntimeUnavailable,
    UnknownModelError,
    WaitTimeout,
)
from limner.plugin._generation import (
    GenerationChunk,
    GenerationResult,
    ImageGenerationConfig,
    Progress,
)
from limner.runtime import KeyStats, Runtime

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_TEXT_CHARS",
    "BlockingCallInEventLoop",
    "BlockingImageEmbedder",
    "BlockingImageGenerator",
    "Cancelled",
    "Capability",
    "FetchError",
    "GenerationChunk",
    "GenerationResult",
    "ImageEmbedder",
    "ImageEmbeddingCapable",
    "ImageGenerationConfig",
    "ImageGenerator",
    "ImageInput",
    "ImageLimits",
    "InvalidInput",
    "KeyStats",
    "LimnerError",
    "LoraEntry",
    "MemoryExhausted",
    "Model",
    "ModelEntry",
    "ModelError",
    "ModelInfo",
    "ModelLoadError",
    "ModelSettings",
    "ModelSpec",
    "PluginError",
    "PluginRecord",
    "Pool",
    "PoolBusy",
    "PoolOptions",
    "Progress",
    "Registry",
    "Runtime",
    "RuntimeUnavailable",
    "TextToImageCapable",
    "UnknownModelError",
    "WaitTimeout",
    "__version__",
    "current_pool",
    "default_pool",
    "default_registry",
    "embedder",
    "errors",
    "generator",
    "get",
    "max_wait",
]

present_as_public(__name__, globals(), __all__, first=True)

_RUNTIMES = (
    "runtimes implement limner.Runtime (see limner.runtime); limner.Pool is the in-process "
    "one, and a model's device and dtype are limner.plugin.Placement"
)

if not TYPE_CHECKING:  # type checkers flag the old names; at run time they warn
    __getattr__ = deprecated_names(
        __name__,
        {
            # What plugins implement and use moved to limner.plugin, their one contract.
            "Backend": Moved("limner.plugin"),
            "ImageEmbeddingBackend": Moved("limner.plugin"),
            "TextToImageBackend": Moved("limner.plugin"),
            "StepCallback": Moved("limner.plugin"),
            "hookimpl": Moved("limner.plugin"),
            "hookspec": Moved(
                "limner._registry._hookspecs",
                advice="plugins implement limner's hooks with limner.plugin.hookimpl; the hook "
                "specifications are limner's own",
            ),
            "hf_cache_dir": Moved("limner.plugin"),
            "materialize_in_hf_cache": Moved("limner.plugin"),
            "tiny_revision": Moved("limner.plugin"),
            "Placement": Removed(_RUNTIMES),
            "ThreadPlacement": Removed(_RUNTIMES),
            # What only a server needs: reading strangers' inputs, and the pool's probes.
            "InputKind": Moved("limner.inputs"),
            "classify_input": Moved("limner.inputs"),
            "decode_image": Moved("limner.inputs"),
            "encoded_bytes": Moved("limner.inputs"),
            "fetch_image_bytes": Moved("limner.inputs"),
            "Clock": Moved("limner.runtime"),
            "MemoryProbe": Moved("limner.runtime"),
            "MonotonicClock": Moved("limner.runtime"),
            "SystemMemory": Moved("limner.runtime"),
        },
    )
