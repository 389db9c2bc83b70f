"""The contract a runtime implements, as ``anyio.abc`` is for anyio.

A runtime runs a model's calls somewhere: :class:`~limner.Pool` in this process,
:class:`limner.ray.RayRuntime` on a cluster. It implements :class:`Runtime`, answers
:class:`KeyStats` per key, and, where the work runs, builds a backend from the key's
:class:`~limner.ModelSpec` and checks it against its capability's row (:func:`row_for`);
:func:`repeat_every` runs its housekeeping. Everything else it needs is public in
:mod:`limner` (``Pool``, ``ModelSpec``, ``ModelSettings``, ``GenerationChunk``,
``ImageGenerationConfig``, ``default_registry``) and :mod:`limner.plugin` (``Backend``,
``TextToImageBackend``).
"""

from __future__ import annotations

from limner._capability_table import CapabilityRow, row_for
from limner._exports import present_as_public
from limner._readings import Clock, MemoryProbe, MonotonicClock, SystemMemory
from limner._runtime import KeyStats, ModelState, RequestKind, Runtime, repeat_every

__all__ = [
    "CapabilityRow",
    "Clock",
    "KeyStats",
    "MemoryProbe",
    "ModelState",
    "MonotonicClock",
    "RequestKind",
    "Runtime",
    "SystemMemory",
    "repeat_every",
    "row_for",
]

present_as_public(__name__, globals(), __all__)
