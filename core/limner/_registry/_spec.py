"""What a plugin declares about a model: its key, capability, factory and facts."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["BackendFactory", "Capability", "ModelInfo", "ModelSettings", "ModelSpec"]


class Capability(str, enum.Enum):
    """What a model can do; decides which front (embedder or generator) wraps it."""

    IMAGE_EMBEDDING = "image-embedding"
    TEXT_TO_IMAGE = "text-to-image"

    def __str__(self) -> str:
        return self.value


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Facts about a model that are known without loading it.

    ``memory_mb`` is the estimated resident memory of one loaded worker (weights plus working
    memory) in the dtype the plugin picks by default; the pool uses it until it has measured
    the real footprint. ``worker_overhead_mb`` is what each further worker costs when it
    shares the first one's weights (activations only); ``None`` means a full copy. ``gated``:
    ``source_repo`` needs its licence accepted on the Hugging Face Hub before it downloads,
    which the missing-weights error then says.
    """

    memory_mb: float
    worker_overhead_mb: float | None = None
    embedding_dimension: int | None = None
    max_batch_size: int = 32
    default_settings: Mapping[str, Any] = field(default_factory=dict)
    source_repo: str | None = None
    revision: str | None = None
    license: str | None = None
    description: str = ""
    tiny: bool = False
    gated: bool = False

    def __post_init__(self) -> None:
        if self.memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, got {self.memory_mb}")
        if self.worker_overhead_mb is not None and self.worker_overhead_mb < 0:
            raise ValueError(f"worker_overhead_mb must be >= 0, got {self.worker_overhead_mb}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        object.__setattr__(self, "default_settings", _frozen(self.default_settings))


BackendFactory = Callable[["ModelSpec", "ModelSettings"], Any]
"""Builds a model's backend cheaply: no weights, no heavy imports (those belong in ``load``)."""

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model key a plugin serves.

    ``factory`` is a backend class (or a callable building one) or an import path
    ``"package.module:name"``. ``capability`` need not be declared: the registry derives it
    from the backend class's base (importing an import path's module, which plugins keep
    cheap: torch and weights load in ``load``). A factory that is a plain function, not a
    class, declares it.
    """

    key: str
    capability: Capability | None = None
    factory: str | BackendFactory
    info: ModelInfo
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (self.key, *self.aliases):
            if not _KEY_PATTERN.match(name):
                raise ValueError(
                    f"model key or alias {name!r} must start with a letter or digit and contain "
                    "only letters, digits, '.', '_', '-' and '/'"
                )
        if self.capability is not None:
            object.__setattr__(self, "capability", Capability(self.capability))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        if isinstance(self.factory, str) and ":" not in self.factory:
            raise ValueError(f"factory import path {self.factory!r} must look like 'module:name'")


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """How to load one model here: where its weights are and on what device, in what dtype.

    ``weights`` is a Hugging Face repo id (resolved through the Hugging Face cache, honouring
    ``HF_HUB_OFFLINE``) or a local directory; ``revision`` pins a commit, branch or tag of the
    repo. ``device`` and ``dtype`` are ``"auto"`` unless the host chose; the plugin decides
    what auto means for its model. ``options`` carries plugin-specific settings.
    ``lora_dirs`` are the folders whose LoRA adapters requests may name (absolute paths; a
    backend that takes adapters looks them up there, on the machine it runs on).
    """

    weights: str
    revision: str | None = None
    local_dir: bool = False
    device: str = "auto"
    dtype: str = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)
    lora_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _frozen(self.options))
        object.__setattr__(self, "lora_dirs", tuple(self.lora_dirs))
