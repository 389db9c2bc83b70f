"""What a registry knows of plugins and keys, and the plain functions it builds them with:
plugin records, entries, the ``LIMNER_PLUGINS`` filter, spec checks, capability derivation
and building a backend from its factory."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from limner._registry import _hookspecs
from limner._registry._capabilities import CAPABILITIES, FrontOptions, row_for, row_of_backend
from limner._registry._spec import BackendFactory, Capability, ModelSettings, ModelSpec
from limner.errors import LimnerError, PluginError
from limner.plugin._backends import Backend, TextToImageBackend
from limner.plugin._loras import LoraAdapter

if TYPE_CHECKING:
    from limner._registry._registry import Model

__all__ = [
    "HOST",
    "LoraEntry",
    "ModelEntry",
    "PluginFilter",
    "PluginRecord",
    "api_mismatch",
    "broken",
    "build_backend",
    "check_specs",
    "front_for",
    "hook_kwargs",
    "with_capability",
]


HOST = "host"
"""Plugin name recorded for specs a host application registers itself."""


@dataclass(frozen=True)
class PluginRecord:
    """One plugin the registry saw: where it came from, what it serves, or why it broke."""

    name: str
    distribution: str | None = None
    version: str | None = None
    keys: tuple[str, ...] = ()
    error: str | None = None

    @property
    def label(self) -> str:
        if self.distribution:
            return f"{self.distribution} {self.version}" if self.version else self.distribution
        return self.name


@dataclass(frozen=True)
class ModelEntry:
    """A registered model key and the plugin that serves it."""

    spec: ModelSpec
    plugin: PluginRecord = field(compare=False)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def capability(self) -> Capability:
        """The key's capability (the registry derives it when the spec does not declare it)."""
        assert self.spec.capability is not None, "registered specs have their capability"
        return self.spec.capability


@dataclass(frozen=True)
class LoraEntry:
    """A LoRA adapter in the registry's adapter folders, and the models it fits: ``models``
    (keys) and their ``family``; when it fits none, or cannot be used, ``reason`` says why."""

    adapter: LoraAdapter
    models: tuple[str, ...] = ()
    family: str | None = None
    reason: str | None = None

    @property
    def name(self) -> str:
        return self.adapter.name


def lora_entry(adapter: LoraAdapter, backends: Sequence[TextToImageBackend]) -> LoraEntry:
    """Which of ``backends`` (the models served) ``adapter`` fits, or why none."""
    if adapter.error is not None:
        return LoraEntry(adapter, reason=f"{adapter.path} {adapter.error}")
    fits, misfits = [], []
    for backend in backends:
        reason = backend.lora_fit(adapter)
        if reason is None:
            fits.append(backend)
        elif backend.supports_loras:
            misfits.append(f"{backend.spec.key}: {reason}")
    if fits:
        models = tuple(backend.spec.key for backend in fits)
        return LoraEntry(adapter, models=models, family=fits[0].lora_family)
    if not misfits:
        return LoraEntry(adapter, reason="no model served takes LoRA adapters")
    shown = "; ".join(misfits[:3]) + ("; ..." if len(misfits) > 3 else "")
    return LoraEntry(adapter, reason=f"fits none of the models served ({shown})")


@dataclass
class PluginFilter:
    """``LIMNER_PLUGINS``: ``"a,b"`` allows only a and b, ``"-c"`` denies c, ``""`` loads none."""

    allow: frozenset[str] | None
    deny: frozenset[str]

    @classmethod
    def parse(cls, value: str | None) -> PluginFilter:
        if value is None:
            return cls(allow=None, deny=frozenset())
        names = [name.strip() for name in value.split(",") if name.strip()]
        deny = frozenset(name[1:] for name in names if name.startswith("-"))
        allow = frozenset(name for name in names if not name.startswith("-"))
        if not names:
            return cls(allow=frozenset(), deny=frozenset())
        return cls(allow=allow or None, deny=deny)

    def allows(self, *names: str | None) -> bool:
        given = {name for name in names if name}
        if given & self.deny:
            return False
        return self.allow is None or bool(given & self.allow)


def api_mismatch(plugin: object) -> str | None:
    """Why ``plugin`` was written for another plugin API than this limner's, or ``None``.

    A plugin that declares no version is taken to be written for this one.
    """
    declared = getattr(plugin, _hookspecs.API_ATTRIBUTE, None)
    if declared is None or (type(declared) is int and declared == _hookspecs.PLUGIN_API):
        return None
    if type(declared) is not int:
        return (
            f"{_hookspecs.API_ATTRIBUTE} must be an integer, the major version of the limner "
            f"plugin API it was written for (this limner's is {_hookspecs.PLUGIN_API}); "
            f"got {declared!r}"
        )
    advice = (
        "upgrade limner, or install a release of the plugin written for API "
        f"{_hookspecs.PLUGIN_API}"
        if declared > _hookspecs.PLUGIN_API
        else f"upgrade the plugin to a release written for API {_hookspecs.PLUGIN_API}"
    )
    return (
        f"written for limner plugin API {declared}, but this limner implements API "
        f"{_hookspecs.PLUGIN_API}: {advice}"
    )


def broken(record: PluginRecord, error: str) -> PluginRecord:
    return PluginRecord(record.name, record.distribution, record.version, error=error)


def hook_kwargs(argnames: tuple[str, ...], register: Any) -> dict[str, Any]:
    available = {"register": register}
    return {name: available[name] for name in argnames}


def check_specs(specs: list[ModelSpec]) -> None:
    """Refuse the plugin's registration as a whole before any of it is added."""
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, ModelSpec):
            raise PluginError(f"registered {type(spec).__name__} {spec!r}, not a limner.ModelSpec")
        for name in (spec.key, *spec.aliases):
            if name in seen:
                raise PluginError(f"registered {name!r} twice")
            seen.add(name)


def import_factory(path: str, entry: ModelEntry) -> BackendFactory:
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory: BackendFactory = getattr(module, attribute)
    except Exception as error:
        raise PluginError(
            f"{entry.plugin.label} could not import the factory {path!r} for "
            f"{entry.spec.key}: {error!r}"
        ) from error
    return factory


def with_capability(spec: ModelSpec, record: PluginRecord) -> ModelSpec:
    """``spec`` with its capability, derived from its backend class when not declared.

    A declared capability is kept as is: the backend's class is checked against it when
    the model is built.
    """
    if spec.capability is not None:
        return spec
    factory = spec.factory
    if isinstance(factory, str):
        factory = import_factory(factory, ModelEntry(spec, record))
    row = row_of_backend(factory) if isinstance(factory, type) else None
    if row is None:
        bases = ", ".join(row.backend.__name__ for row in CAPABILITIES)
        raise PluginError(
            f"{record.label} gives {spec.key} a factory that is not a backend class "
            f"(a subclass of {bases}); pass the class, or declare capability="
        )
    return dataclasses.replace(spec, capability=row.capability)


def build_backend(entry: ModelEntry, settings: ModelSettings) -> Backend:
    """Call the entry's factory (importing an import path first); a failure is the plugin's."""
    spec = entry.spec
    factory = spec.factory
    if isinstance(factory, str):
        factory = import_factory(factory, entry)
    try:
        backend: Backend = factory(spec, settings)  # its type is checked in front_for
    except LimnerError:
        raise
    except Exception as error:
        raise PluginError(f"{entry.plugin.label} failed to build {spec.key}: {error!r}") from error
    return backend


def front_for(spec: ModelSpec, backend: Backend, options: FrontOptions) -> Model:
    """The async front of the spec's capability over ``backend``, once its class checks out."""
    assert spec.capability is not None
    row = row_for(spec.capability)
    if not isinstance(backend, row.backend):
        raise PluginError(
            f"the factory of {spec.key} returned {type(backend).__name__}, "
            f"not an {row.backend.__name__}"
        )
    return row.front(spec, backend, options)
