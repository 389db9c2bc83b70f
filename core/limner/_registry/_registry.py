"""Finds models through entry points and builds their fronts lazily, once per key."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from limner._fronts._embedder import DEFAULT_MAX_TEXT_CHARS, ImageEmbedder, check_max_text_chars
from limner._fronts._generator import ImageGenerator
from limner._inputs._decode import DEFAULT_LIMITS, ImageLimits
from limner._registry import _hookspecs
from limner._registry._capabilities import FrontOptions, row_for
from limner._registry._entries import (
    HOST,
    LoraEntry,
    ModelEntry,
    PluginFilter,
    PluginRecord,
    api_mismatch,
    broken,
    build_backend,
    check_specs,
    front_for,
    hook_kwargs,
    lora_entry,
    with_capability,
)
from limner._registry._hookspecs import PROJECT_NAME
from limner._registry._spec import Capability, ModelSettings, ModelSpec
from limner.errors import InvalidInput, LimnerError, PluginError, UnknownModelError
from limner.plugin._backends import TextToImageBackend
from limner.plugin._loras import lora_dirs_setting, scan_lora_dirs
from limner.plugin._weights import models_dir_override

Model = ImageEmbedder | ImageGenerator
"""What ``Registry.get`` returns: the async front matching the key's capability."""

__all__ = [
    "LoraEntry",
    "Model",
    "ModelEntry",
    "PluginRecord",
    "Registry",
    "default_registry",
    "embedder",
    "generator",
    "get",
]


class Registry:
    """The models installed plugins serve, by key.

    Entry points in the ``limner`` group are read once, on first need. ``get`` builds a model's
    front on the first request for its key (no weights are loaded until the model is used)
    and caches it; later calls are a dict lookup.

    ``lora_dirs`` are folders of LoRA adapters that requests may name (see :meth:`loras`);
    every model gets them in its settings, and those that take adapters look them up there.
    """

    def __init__(
        self,
        *,
        entry_points: bool = True,
        plugins: str | None = None,
        limits: ImageLimits = DEFAULT_LIMITS,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        lora_dirs: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        self.lora_dirs = lora_dirs_setting(lora_dirs, field="lora_dirs")
        self._use_entry_points = entry_points
        self._filter = PluginFilter.parse(
            plugins if plugins is not None else os.environ.get("LIMNER_PLUGINS")
        )
        self._front_options = FrontOptions(
            limits=limits, max_text_chars=check_max_text_chars(max_text_chars)
        )
        self._manager = pluggy.PluginManager(PROJECT_NAME)
        self._manager.add_hookspecs(_hookspecs)
        self._lock = threading.RLock()  # guards discovery and the tables below; never held on I/O
        self._discovered = False
        self._entries: dict[str, ModelEntry] = {}
        self._aliases: dict[str, str] = {}
        self._conflicts: dict[str, tuple[PluginRecord, PluginRecord]] = {}
        self._plugins: list[PluginRecord] = []
        self._settings: dict[str, dict[str, Any]] = {}
        self._models: dict[str, Model] = {}
        self._build_locks: dict[str, threading.Lock] = {}

    # -- registration ---------------------------------------------------------------------

    def register(self, spec: ModelSpec, *, replace: bool = False) -> None:
        """Register a model key from host code (tests, apps with their own models)."""
        self._discover()
        with self._lock:
            record = self._host_record()
            spec = with_capability(spec, record)
            if replace:
                self._forget(spec.key)
            self._add_specs(record, [spec], raise_on_conflict=True)
            self._plugins = [
                PluginRecord(HOST, keys=(*p.keys, spec.key)) if p.name == HOST else p
                for p in self._plugins
            ]

    def register_plugin(self, plugin: object, *, name: str | None = None) -> None:
        """Register a plugin object (a module or class with hook implementations) directly."""
        self._discover()
        plugin_name = name or getattr(plugin, "__name__", None) or repr(plugin)
        self._load_plugin(plugin, PluginRecord(plugin_name))

    def configure(
        self,
        key: str,
        *,
        local_dir: str | os.PathLike[str] | None = None,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """Set how one key loads: a local weights directory, a pinned revision, device, dtype.

        Must be called before the key's model is first built by ``get``.
        """
        resolved = self._resolve_name(key)
        with self._lock:
            if resolved in self._models:
                raise LimnerError(
                    f"{resolved} is already built; configure it before the first get()"
                )
            current = self._settings.setdefault(resolved, {})
            if local_dir is not None:
                current["local_dir"] = os.fspath(local_dir)
            for name, value in (("revision", revision), ("device", device), ("dtype", dtype)):
                if value is not None:
                    current[name] = value
            if options is not None:
                current["options"] = {**current.get("options", {}), **options}

    # -- lookup ---------------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        """Every registered key, sorted; builds nothing. Only a spec that leaves its
        capability to be derived has its factory's module imported (at registration)."""
        self._discover()
        with self._lock:
            return [self._entries[key] for key in sorted(self._entries)]

    def plugins(self) -> list[PluginRecord]:
        """Every plugin seen, the broken ones with their error."""
        self._discover()
        with self._lock:
            return list(self._plugins)

    def conflicts(self) -> dict[str, tuple[PluginRecord, PluginRecord]]:
        """Keys claimed by two plugins; neither plugin serves such a key until one goes."""
        self._discover()
        with self._lock:
            return dict(self._conflicts)

    def spec(self, key: str) -> ModelSpec:
        """The spec for a key or alias, without building anything."""
        return self._entries[self._resolve_name(key)].spec

    def settings(self, key: str) -> ModelSettings:
        """How the key would load here, after overrides and ``LIMNER_MODELS_DIR``."""
        spec = self.spec(key)
        with self._lock:
            chosen = dict(self._settings.get(spec.key, {}))
        local = chosen.get("local_dir") or models_dir_override(spec.key)
        return ModelSettings(
            weights=os.fspath(local) if local else spec.info.source_repo or spec.key,
            revision=None if local else chosen.get("revision", spec.info.revision),
            local_dir=bool(local),
            device=chosen.get("device") or os.environ.get("LIMNER_DEVICE") or "auto",
            dtype=chosen.get("dtype") or os.environ.get("LIMNER_DTYPE") or "auto",
            options={**spec.info.default_settings, **chosen.get("options", {})},
            lora_dirs=self.lora_dirs,
        )

    def loras(self, keys: Iterable[str] | None = None) -> list[LoraEntry]:
        """Every LoRA adapter in :attr:`lora_dirs`, sorted by name, with the models of
        ``keys`` (default: every text-to-image key) it fits, or why it fits none. Reads each
        adapter's header, loads no weights and imports no torch; a folder's adapters are
        read again whenever they change."""
        if keys is None:
            keys = [e.key for e in self.entries() if e.capability is Capability.TEXT_TO_IMAGE]
        backends = []
        for key in keys:
            try:
                model = self.get(key)
            except LimnerError:
                continue  # a key that cannot be built is said by `limner models` and its calls
            if isinstance(model.backend, TextToImageBackend):
                backends.append(model.backend)
        return [lora_entry(adapter, backends) for adapter in scan_lora_dirs(self.lora_dirs)]

    def get(self, key: str) -> Model:
        """The model for a key or alias, built (without weights) on first request."""
        model = self._models.get(key)
        if model is not None:
            return model
        return self._build(key)

    def embedder(self, key: str) -> ImageEmbedder:
        """Like ``get``, for a key that must be an image-embedding model."""
        model = self.get(key)
        if not isinstance(model, ImageEmbedder):
            raise InvalidInput(f"{model.key} is not an {row_for(Capability.IMAGE_EMBEDDING).noun}")
        return model

    def generator(self, key: str) -> ImageGenerator:
        """Like ``get``, for a key that must be a text-to-image model."""
        model = self.get(key)
        if not isinstance(model, ImageGenerator):
            raise InvalidInput(f"{model.key} is not a {row_for(Capability.TEXT_TO_IMAGE).noun}")
        return model

    # -- internals ------------------------------------------------------------------------

    def _build(self, name: str) -> Model:
        key = self._resolve_name(name)
        with self._lock:
            build_lock = self._build_locks.setdefault(key, threading.Lock())
        with build_lock:  # per key: a cold key never blocks lookups of other keys
            model = self._models.get(key)
            if model is None:
                entry = self._entries[key]
                backend = build_backend(entry, self.settings(key))
                model = front_for(entry.spec, backend, self._front_options)
                self._models[key] = model
        if name != key:
            self._models[name] = model
        return model

    def _resolve_name(self, name: str) -> str:
        self._discover()
        with self._lock:
            key = self._aliases.get(name, name)
            if key in self._entries:
                return key
            if key in self._conflicts:
                first, second = self._conflicts[key]
                raise PluginError(
                    f"model key {key!r} is claimed by both {first.label} and {second.label}; "
                    f"uninstall one, or deny one with LIMNER_PLUGINS=-{second.name}"
                )
            known = sorted({*self._entries, *self._aliases})
            plugins = [p.label for p in self._plugins if p.name != HOST]
        suggestions = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        if not suggestions:
            lowered = name.lower()
            suggestions = [k for k in known if lowered in k.lower()][:3]
        raise UnknownModelError(name, suggestions=suggestions, plugins=plugins)

    def _discover(self) -> None:
        if self._discovered:
            return
        with self._lock:
            if self._discovered:
                return
            entry_points = (
                list(importlib.metadata.entry_points(group=PROJECT_NAME))
                if self._use_entry_points
                else []
            )
            # Set before loading: a plugin's hook that looks the registry up must not recurse.
            self._discovered = True
            for entry_point in entry_points:
                self._load_entry_point(entry_point)

    def _load_entry_point(self, entry_point: importlib.metadata.EntryPoint) -> None:
        """Load one plugin; whatever goes wrong is recorded against it, never raised, so one
        broken distribution cannot hide the others."""
        try:
            dist = entry_point.dist
            record = PluginRecord(
                entry_point.name,
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
            )
        except Exception as error:  # unreadable metadata: the entry point's name is all we have
            self._plugins.append(
                PluginRecord(entry_point.name, error=f"unreadable metadata: {error!r}")
            )
            return
        if not self._filter.allows(record.name, record.distribution):
            return
        try:
            plugin = entry_point.load()
        except Exception as error:
            self._plugins.append(broken(record, f"import failed: {error!r}"))
            return
        self._load_plugin(plugin, record)

    def _load_plugin(self, plugin: object, record: PluginRecord) -> None:
        with self._lock:
            mismatch = api_mismatch(plugin)
            if mismatch is not None:
                self._plugins.append(broken(record, mismatch))
                return
            try:
                self._manager.register(plugin, name=record.name)
            except Exception as error:  # a taken name, or a hook pluggy refuses (its signature)
                if self._manager.is_registered(plugin):  # pluggy leaves it half-registered
                    self._manager.unregister(plugin)
                reason = " ".join(str(error).split())  # pluggy's message spans lines
                self._plugins.append(broken(record, f"cannot register: {reason}"))
                return
            specs: list[ModelSpec] = []
            try:
                for impl in self._manager.hook.limner_register_models.get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(**hook_kwargs(impl.argnames, specs.append))
                check_specs(specs)
                specs = [with_capability(spec, record) for spec in specs]
            except Exception as error:
                self._manager.unregister(plugin)
                self._plugins.append(broken(record, f"limner_register_models failed: {error!r}"))
                return
            keys = self._add_specs(record, specs, raise_on_conflict=False)
            self._plugins.append(
                PluginRecord(record.name, record.distribution, record.version, tuple(keys))
            )

    def _add_specs(
        self, record: PluginRecord, specs: Iterable[ModelSpec], *, raise_on_conflict: bool
    ) -> list[str]:
        added = []
        for spec in specs:
            names = (spec.key, *spec.aliases)
            if spec.key in self._conflicts:
                continue  # already contested by two plugins; a third changes nothing
            clash = next((n for n in names if n in self._entries or n in self._aliases), None)
            if clash is not None:
                owner = self._entries[self._aliases.get(clash, clash)].plugin
                if raise_on_conflict:
                    raise PluginError(
                        f"model key or alias {clash!r} is already served by {owner.label}; "
                        "pass replace=True to override it"
                    )
                self._conflicts[spec.key] = (owner, record)
                if clash == spec.key:
                    self._forget(spec.key)
                continue
            self._entries[spec.key] = ModelEntry(spec, record)
            for alias in spec.aliases:
                self._aliases[alias] = spec.key
            added.append(spec.key)
        return added

    def _forget(self, key: str) -> None:
        self._entries.pop(key, None)
        self._models.pop(key, None)
        for alias in [a for a, k in self._aliases.items() if k == key]:
            del self._aliases[alias]
            self._models.pop(alias, None)

    def _host_record(self) -> PluginRecord:
        for record in self._plugins:
            if record.name == HOST:
                return record
        record = PluginRecord(HOST)
        self._plugins.append(record)
        return record


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry, created on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Registry()
    return _default


def get(key: str) -> Model:
    """``default_registry().get(key)``."""
    return default_registry().get(key)


def embedder(key: str) -> ImageEmbedder:
    """``default_registry().embedder(key)``: typed for image-embedding models."""
    return default_registry().embedder(key)


def generator(key: str) -> ImageGenerator:
    """``default_registry().generator(key)``: typed for text-to-image models."""
    return default_registry().generator(key)
