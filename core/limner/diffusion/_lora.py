"""LoRA adapters in a loaded pipeline: loaded on first use, activated per call, dropped when
the pool needs the room; the base weights are never reloaded.

Adapters go into the pipeline's one shared transformer through diffusers' PEFT integration,
one ``adapter_name`` each, and which of them apply (with their scales) is state of that
shared module. So calls with different sets of adapters never run at once: an
:class:`AdapterGate` lets calls of one set run together, and a call of another set waits
until they end, then switches (``set_adapters``: about a millisecond). The pool already
keeps calls of different sets apart (``StreamCall.group``); the gate makes the backend safe
on its own, for direct callers and other runtimes. Torch is imported only inside functions.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from limner.errors import InvalidInput
from limner.plugin import CachedPart, LoraAdapter, quiet_loading, reserve_memory

if TYPE_CHECKING:
    from ._pipeline import LoadedPipeline

__all__ = ["AdapterGate", "LoadedAdapters", "Wanted"]

log = logging.getLogger("limner.diffusion")

Wanted = Sequence[tuple[LoraAdapter, float]]
"""A call's adapters with their scales, in the request's order."""


class AdapterGate:
    """Calls of one key share the model; a call of another key waits until they have ended.

    The first call when none runs is the leader: it runs ``switch`` (loading and activating
    its adapters) alone, then the calls of its key run together. Between calls, the adapters
    can be dropped (:meth:`exclusive`), and during a leader's switch while it waits for the
    runtime to make room (:meth:`parked`).
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._key: Hashable = None
        self._running = 0
        self._busy = False  # a switch or a drop is under way
        self._parked = False  # ... a switch waiting for room: drops may go meanwhile
        self.pinned: frozenset[str] = frozenset()  # what the running key (or switch) uses

    @contextlib.contextmanager
    def running(
        self, key: Hashable, pinned: frozenset[str], switch: Callable[[], None]
    ) -> Iterator[None]:
        with self._condition:
            while self._busy or (self._running and self._key != key):
                self._condition.wait()
            leader = self._running == 0
            if leader:
                self._busy, self.pinned = True, pinned
            else:
                self._running += 1
        if leader:
            try:
                switch()
            except BaseException:
                with self._condition:
                    self._busy, self._key, self.pinned = False, None, frozenset()
                    self._condition.notify_all()
                raise
            with self._condition:
                self._busy, self._key = False, key
                self._running += 1
                self._condition.notify_all()
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                if not self._running:
                    self.pinned = frozenset()
                    self._condition.notify_all()

    @contextlib.contextmanager
    def parked(self) -> Iterator[None]:
        """The leader waits (for room) without touching the model: drops may run."""
        with self._condition:
            self._parked = True
        try:
            yield
        finally:
            with self._condition:
                while self._busy and not self._parked:  # a drop took the gate meanwhile
                    self._condition.wait()
                self._parked = False

    def quiet(self) -> bool:
        """Whether nothing uses the model now: no call runs, no switch is at work."""
        with self._condition:
            return not self._running and (not self._busy or self._parked)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[bool]:
        """The model to oneself if it is quiet now (yields True), else nothing (False):
        never waits."""
        with self._condition:
            if self._running or (self._busy and not self._parked):
                took = False
            else:
                took, self._busy, parked = True, True, self._parked
                self._parked = False
        if not took:
            yield False
            return
        try:
            yield True
        finally:
            with self._condition:
                self._busy, self._parked = parked, parked
                self._condition.notify_all()


@dataclass
class _Loaded:
    adapter: LoraAdapter
    internal: str  # its adapter_name in the transformer
    memory_mb: float
    last_used: float


class LoadedAdapters:
    """The adapters loaded into one pipeline, which are active, and the gate over them."""

    def __init__(self) -> None:
        self.gate = AdapterGate()
        self._loaded: dict[str, _Loaded] = {}
        self._active: tuple[tuple[str, float], ...] | None = None  # None: unknown
        self._lock = threading.Lock()  # the table and the transformer's adapter modules
        self._names = itertools.count(1)
        self.loads = 0  # adapter files loaded, for tests and benchmarks

    @property
    def memory_mb(self) -> float:
        return sum(entry.memory_mb for entry in list(self._loaded.values()))

    def names(self) -> list[str]:
        return sorted(self._loaded)

    @contextlib.contextmanager
    def use(self, loaded: LoadedPipeline, wanted: Wanted, *, key: str) -> Iterator[None]:
        """Within the block the pipeline applies ``wanted`` (none: every adapter off), loading
        any not yet loaded (or changed on disk) first."""
        chosen = tuple(sorted((adapter.name, scale) for adapter, scale in wanted))
        files = tuple(sorted((a.name, a.fingerprint) for a, _ in wanted))
        pinned = frozenset(name for name, _ in chosen)
        with self.gate.running((chosen, files), pinned, lambda: self._switch(loaded, wanted, key)):
            yield

    def _switch(self, loaded: LoadedPipeline, wanted: Wanted, key: str) -> None:
        """Load what ``wanted`` needs and make it the active set (canonical order: by name,
        so that the same set always sums in the same order and makes the same pixels)."""
        now = time.monotonic()
        for index, (adapter, _) in enumerate(wanted):
            entry = self._loaded.get(adapter.name)
            if entry is not None and entry.adapter.fingerprint != adapter.fingerprint:
                with self._lock:  # the file changed since it was loaded
                    self._delete(loaded.pipeline, [adapter.name])
                entry = None
            if entry is None:
                self._load(loaded, adapter, key=key, field=f"loras[{index}].name")
        pipeline = loaded.pipeline
        chosen = sorted((adapter.name, scale) for adapter, scale in wanted)
        with self._lock:
            for name, _ in chosen:
                self._loaded[name].last_used = now
            active = tuple(chosen)
            if active == self._active:
                return
            if not chosen:
                if self._loaded:
                    pipeline.disable_lora()
            else:
                pipeline.enable_lora()
                pipeline.set_adapters(
                    [self._loaded[name].internal for name, _ in chosen],
                    [scale for _, scale in chosen],
                )
            self._active = active

    def _load(self, loaded: LoadedPipeline, adapter: LoraAdapter, *, key: str, field: str) -> None:
        what = f"LoRA adapter {adapter.name!r} ({adapter.path})"
        with self.gate.parked():  # the pool may drop other adapters of this model meanwhile
            reserve_memory(adapter.memory_mb(loaded.dtype.itemsize), what=what)
        internal = f"limner_{next(self._names)}_"  # no name is a substring of a module path
        pipeline = loaded.pipeline
        folder, file_name = os.path.split(adapter.path)
        with self._lock, quiet_loading("diffusers"):
            before = loaded.device_mb()
            try:
                pipeline.load_lora_weights(folder, weight_name=file_name, adapter_name=internal)
            except Exception as error:
                # A file can half-load (diffusers only logs keys it did not place): undo it.
                with contextlib.suppress(Exception):
                    if self._loaded:
                        pipeline.delete_adapters(internal)
                    else:
                        pipeline.unload_lora_weights()
                self._active = None
                reason = " ".join(str(error).split())
                raise InvalidInput(
                    f"{adapter.path} could not be loaded into {key}: {reason}", field=field
                ) from None
            self._active = None  # loading activates the new adapter: the set is put back
            grown = loaded.device_mb() - before
            memory = grown if grown > 0 else adapter.memory_mb(loaded.dtype.itemsize)
            self._loaded[adapter.name] = _Loaded(adapter, internal, memory, time.monotonic())
            self.loads += 1
        log.info("loaded %s into %s: %.1f MB", what, key, memory)

    def caches(self) -> list[CachedPart]:
        """The adapters no call uses now (the model quiet, or a switch waiting for room)."""
        if not self.gate.quiet():
            return []
        pinned = self.gate.pinned
        return [
            CachedPart(name, entry.memory_mb, entry.last_used)
            for name, entry in list(self._loaded.items())
            if name not in pinned
        ]

    def drop(self, loaded: LoadedPipeline, names: Sequence[str]) -> None:
        """Drop ``names`` if the model is quiet now and no switch needs them; else keep them."""
        with self.gate.exclusive() as took:
            if not took:
                return
            with self._lock:
                self._delete(loaded.pipeline, [n for n in names if n not in self.gate.pinned])

    def _delete(self, pipeline: Any, names: Sequence[str]) -> None:
        entries = [self._loaded.pop(name) for name in names if name in self._loaded]
        if not entries:
            return
        if self._loaded:
            pipeline.delete_adapters([entry.internal for entry in entries])
        else:
            pipeline.unload_lora_weights()  # the last one: plain Linear layers again
        self._active = None
