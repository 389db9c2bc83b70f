"""How limner's public modules present their names: each object under its public home, and
names that moved or went kept answering for a while.

A name a public module exported is a promise to host applications and plugin authors. When
it moves, the old name keeps working for at least one minor release and warns, naming where
it lives now and the release that removes it; ``tests/test_public_api.py`` checks that no
exported name goes without that.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "REMOVED_IN",
    "CallsOfTheLastRelease",
    "Moved",
    "Removed",
    "deprecated_names",
    "present_as_public",
    "warn_deprecated",
]

REMOVED_IN = "0.3"
"""The release that removes the names deprecated in this one."""


@dataclass(frozen=True)
class Moved:
    """A name that lives in ``home`` now (under ``name`` there, if it was renamed)."""

    home: str
    name: str | None = None
    advice: str = ""


@dataclass(frozen=True)
class Removed:
    """A name that went without a replacement of the same shape: importing it is an error
    that says what to use instead."""

    advice: str


def deprecated_names(module: str, names: Mapping[str, Moved | Removed]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module`` that answers the old ``names``."""

    def __getattr__(name: str) -> Any:
        entry = names.get(name)
        if entry is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        if isinstance(entry, Removed):
            # An ImportError, not AttributeError: `from limner import X` would replace an
            # AttributeError's message with its own "cannot import name".
            raise ImportError(f"{module}.{name} was removed: {entry.advice}", name=module)
        new_name = entry.name or name
        advice = entry.advice or f"use {entry.home}.{new_name}"
        warnings.warn(
            f"{module}.{name} is deprecated and will be removed in limner {REMOVED_IN}: {advice}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(entry.home), new_name)

    return __getattr__


def warn_deprecated(old: str, advice: str, *, stacklevel: int = 3) -> None:
    """Say that ``old`` is deprecated, when it goes, and what to do instead; the warning
    points at the caller of the deprecated function (``stacklevel`` 3 from inside it)."""
    warnings.warn(
        f"{old} is deprecated and will be removed in limner {REMOVED_IN}: {advice}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


#: What :func:`present_as_public` gave a public home (not what a public module defines).
_presented: weakref.WeakSet[Any] = weakref.WeakSet()


def present_as_public(
    module: str, namespace: MutableMapping[str, Any], names: Iterable[str], *, first: bool = False
) -> None:
    """Give each of ``names`` that a private module defines ``module`` as its home, as anyio
    does: ``repr``, help and tracebacks then show ``limner.Pool``, where users import it, not
    ``limner._pool._pool.Pool``. A name two public modules share keeps the home it got
    first, unless ``first``: the ``limner`` package takes every name it shares with another
    (``limner.ModelSpec``, not ``limner.plugin.ModelSpec``, whichever was imported first)."""
    for name in names:
        value = namespace[name]
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue  # constants and type aliases have no home of their own to set
        home = value.__module__
        private = home.startswith("limner.") and any(p.startswith("_") for p in home.split("."))
        if private:
            if inspect.isclass(value):
                _evaluate_annotations(value, sys.modules[home].__dict__)
            _presented.add(value)
            value.__module__ = module
        elif first and value in _presented:
            value.__module__ = module


def _evaluate_annotations(cls: type, namespace: dict[str, Any]) -> None:
    """Turn a class's string annotations into the objects they name, in the module that
    wrote them: ``typing.get_type_hints`` (pydantic, FastAPI, cattrs) looks names up in the
    class's ``__module__``, which is about to be a public module that lacks most of them.
    A name only imported for type checkers stays a string, as unresolvable as before."""
    resolved = dict(inspect.get_annotations(cls))
    for name, annotation in resolved.items():
        if isinstance(annotation, str):
            try:
                resolved[name] = eval(annotation, namespace, dict(vars(cls)))
            except NameError:
                continue
    cls.__annotations__ = resolved
    if dataclasses.is_dataclass(cls):  # pydantic reads a dataclass's fields' types
        for field in dataclasses.fields(cls):
            if isinstance(field.type, str) and field.name in resolved:
                field.type = resolved[field.name]


class _CarriesCalls(Protocol):
    async def run_batch(self, backend: Any, call: Any) -> Any: ...

    def run_stream(self, backend: Any, call: Any) -> Any: ...


class CallsOfTheLastRelease:
    """The two calls runtimes carried before ``run_batch`` and ``run_stream``, kept working
    on limner's own runtimes until limner 0.3: each warns, and makes the call it was."""

    async def embed(self: _CarriesCalls, backend: Any, kind: str, items: Sequence[Any]) -> Any:
        """Deprecated: ``run_batch(backend, BatchCall("embed_prepared" or "embed_texts",
        items))``."""
        from limner.runtime import BatchCall

        name = type(self).__name__
        warn_deprecated(f"{name}.embed", f"use {name}.run_batch(backend, BatchCall(...))")
        method = "embed_prepared" if kind == "image" else "embed_texts"
        return await self.run_batch(backend, BatchCall(method, items))

    def generate(self: _CarriesCalls, backend: Any, prompt: str, config: Any) -> Any:
        """Deprecated: ``run_stream(backend, StreamCall("generate", (prompt, config)))``."""
        from limner.runtime import StreamCall

        name = type(self).__name__
        warn_deprecated(f"{name}.generate", f"use {name}.run_stream(backend, StreamCall(...))")
        return self.run_stream(backend, StreamCall("generate", (prompt, config)))
