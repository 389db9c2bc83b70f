"""limner's public API holds still: every name its public modules exported at the stored
snapshot still imports, with a compatible signature, or warns that it moved.

The snapshot, ``tests/public_api.txt``, has one line per public name and per public member
of a public class: ``module.Name kind signature``. A name may leave ``__all__`` only through a
deprecation (importing it warns, naming its new home and the release that removes it); a
signature may grow parameters with defaults, never lose one, reorder positional ones or drop
a default. Adding a name is allowed, but the snapshot must then be written again, on purpose
(names that left ``__all__`` through a deprecation stay in it, still checked)::

    python tests/test_public_api.py --write

(the API a host application or a plugin programs against changed: say so in the commit).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import inspect
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import limner

SNAPSHOT = Path(__file__).with_name("public_api.txt")

#: The modules whose ``__all__`` is a promise: to host applications, plugin authors, and
#: runtime and server authors.
PUBLIC_MODULES = (
    "limner",
    "limner.diffusion",
    "limner.diffusion.testing",
    "limner.errors",
    "limner.inputs",
    "limner.plugin",
    "limner.plugin.testing",
    "limner.ray",
    "limner.runtime",
    "limner.server",
    "limner.testing",
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One line of the snapshot: a public name or a public member of a public class."""

    path: str  # module.Name or module.Name.member
    kind: str  # class, function, method, property, attribute, constant, module, ...
    signature: str = ""  # ours, see `describe_signature`; empty where there is none

    def line(self) -> str:
        return " ".join(part for part in (self.path, self.kind, self.signature) if part)

    @classmethod
    def parse(cls, line: str) -> Entry:
        path, kind, *rest = line.split(" ", 2)
        return cls(path, kind, rest[0] if rest else "")


def describe_signature(function: Any) -> str:
    """Parameters as ``(a, b=, /, c, *args, d=, **kwargs)``: names, kinds and whether each
    has a default. Annotations are left out (they are checked by mypy, not here)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return ""
    parts: list[str] = []
    seen_keyword_only = False
    kinds = inspect.Parameter
    for index, parameter in enumerate(signature.parameters.values()):
        if parameter.kind is kinds.KEYWORD_ONLY and not seen_keyword_only:
            parts.append("*")
            seen_keyword_only = True
        if parameter.kind is kinds.VAR_POSITIONAL:
            parts.append(f"*{parameter.name}")
            seen_keyword_only = True
            continue
        if parameter.kind is kinds.VAR_KEYWORD:
            parts.append(f"**{parameter.name}")
            continue
        default = "=" if parameter.default is not kinds.empty else ""
        parts.append(f"{parameter.name}{default}")
        following = list(signature.parameters.values())[index + 1 :]
        if parameter.kind is kinds.POSITIONAL_ONLY and (
            not following or following[0].kind is not kinds.POSITIONAL_ONLY
        ):
            parts.append("/")
    return "(" + ",".join(parts) + ")"


def _kind(value: Any) -> str:
    if getattr(type(value), "__module__", "") in ("typing", "types") and not inspect.isclass(value):
        return "alias"  # Union[...], X | Y: a type for annotations, not a callable
    if inspect.ismodule(value):
        return "module"
    if inspect.isclass(value):
        if issubclass(value, BaseException):
            return "exception"
        if issubclass(value, enum.Enum):
            return "enum"
        return "class"
    if callable(value) and not isinstance(value, type):
        return "function"
    return "constant"


def _members(path: str, cls: type) -> Iterator[Entry]:
    """A public class's public methods, properties and fields (those it or a base in
    limner defines: what ``object``, ``Exception`` or ``Enum`` give every class is not ours
    to promise)."""
    if issubclass(cls, enum.Enum):
        for member in cls:
            yield Entry(f"{path}.{member.name}", "member")
        return
    fields = (
        {field.name for field in dataclasses.fields(cls)}
        if dataclasses.is_dataclass(cls)
        else set()
    )
    names: set[str] = set(fields)
    for base in cls.__mro__:
        if base.__module__.split(".")[0] != "limner":
            continue
        names.update(name for name in vars(base) if not name.startswith("_"))
        names.update(getattr(base, "__annotations__", {}))
    for name in sorted(names):
        if name.startswith("_"):
            continue
        raw = inspect.getattr_static(cls, name, None)
        if isinstance(raw, property):
            yield Entry(f"{path}.{name}", "property")
        elif isinstance(raw, (staticmethod, classmethod)) or inspect.isfunction(raw):
            yield Entry(f"{path}.{name}", "method", describe_signature(getattr(cls, name)))
        else:
            yield Entry(f"{path}.{name}", "attribute")


@functools.cache
def snapshot() -> list[Entry]:
    """The public API as it is now."""
    entries: list[Entry] = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            path = f"{module_name}.{name}"
            kind = _kind(value)
            if kind in ("class", "exception"):
                entries.append(Entry(path, kind, describe_signature(value)))
                entries.extend(_members(path, value))
            elif kind == "function":
                entries.append(Entry(path, kind, describe_signature(value)))
            else:
                entries.append(Entry(path, kind))
    return entries


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # positional-only, positional, keyword-only, *args, **kwargs
    default: bool


def parse_signature(text: str) -> list[Parameter]:
    """The parameters :func:`describe_signature` wrote."""
    parameters: list[Parameter] = []
    names = [part for part in text.strip("()").split(",") if part]
    keyword_only = False
    positional_only_until = names.index("/") if "/" in names else 0
    for index, part in enumerate(names):
        if part == "/":
            continue
        if part == "*":
            keyword_only = True
        elif part.startswith("**"):
            parameters.append(Parameter(part[2:], "**kwargs", False))
        elif part.startswith("*"):
            parameters.append(Parameter(part[1:], "*args", False))
            keyword_only = True
        else:
            kind = (
                "keyword-only"
                if keyword_only
                else "positional-only"
                if index < positional_only_until
                else "positional"
            )
            parameters.append(Parameter(part.rstrip("="), kind, part.endswith("=")))
    return parameters


def incompatibilities(old: str, new: str) -> list[str]:
    """Why a caller of ``old`` may break against ``new`` (empty when it cannot)."""
    if not old or not new:
        return []
    before, after = parse_signature(old), parse_signature(new)
    problems: list[str] = []
    positional_after = [p.name for p in after if p.kind in ("positional-only", "positional")]
    by_name = {p.name: p for p in after}
    takes_args = any(p.kind == "*args" for p in after)
    takes_kwargs = any(p.kind == "**kwargs" for p in after)
    for index, parameter in enumerate(p for p in before if p.kind != "keyword-only"):
        if parameter.kind in ("*args", "**kwargs"):
            if not any(p.kind == parameter.kind for p in after):
                problems.append(f"no longer takes {parameter.kind}")
            continue
        if index >= len(positional_after):
            if not takes_args:
                problems.append(f"positional parameter {parameter.name!r} went")
        elif parameter.kind == "positional" and positional_after[index] != parameter.name:
            problems.append(f"positional parameter {parameter.name!r} moved or went")
    for parameter in before:
        if parameter.kind in ("*args", "**kwargs", "positional-only"):
            continue
        found = by_name.get(parameter.name)
        if found is None:
            if not takes_kwargs:
                problems.append(f"parameter {parameter.name!r} went")
            continue
        if found.kind == "positional-only":
            problems.append(f"parameter {parameter.name!r} became positional-only")
        if parameter.default and not found.default:
            problems.append(f"parameter {parameter.name!r} lost its default")
    names_before = {p.name for p in before}
    positional_before = sum(p.kind in ("positional-only", "positional") for p in before)
    for index, parameter in enumerate(after):
        added = (
            index >= positional_before
            if parameter.kind == "positional-only"
            else parameter.name not in names_before and parameter.kind != "*args"
        )
        if added and parameter.kind != "**kwargs" and not parameter.default:
            problems.append(f"new parameter {parameter.name!r} has no default")
    return problems


def _stored() -> list[Entry]:
    return [Entry.parse(line) for line in SNAPSHOT.read_text().splitlines() if line.strip()]


def _resolve(path: str) -> tuple[Any, list[warnings.WarningMessage]]:
    """The object at ``path`` (``module.Name`` or ``module.Name.member``), and the warnings
    getting it gave."""
    for split in range(path.count("."), 0, -1):
        parts = path.split(".")
        module_name, attributes = ".".join(parts[:split]), parts[split:]
        try:
            value: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for attribute in attributes:
                value = getattr(value, attribute)
        return value, caught
    raise ImportError(path)


def test_the_snapshot_is_current() -> None:
    """A name added since the snapshot was written is written into it on purpose."""
    stored = {entry.path for entry in _stored()}
    added = sorted(entry.path for entry in snapshot() if entry.path not in stored)
    assert not added, (
        f"new public names {added}: if they are meant to be public, run "
        "`python tests/test_public_api.py --write` and commit tests/public_api.txt"
    )


def breakage(entry: Entry, now: dict[str, Entry], stored: dict[str, Entry]) -> str | None:
    """Why ``entry`` of the snapshot no longer holds, or ``None`` if it does."""
    current = now.get(entry.path)
    if current is None:
        # Gone from __all__: it must still import, with a DeprecationWarning naming where
        # it went (a deprecated class's members are checked where the class now is).
        member = entry.kind in ("method", "property", "attribute", "member")
        owner = entry.path.rsplit(".", 1)[0] if member else entry.path
        if member and owner in now:
            return f"{entry.path} went from {owner}, which is still public"
        try:
            _, caught = _resolve(owner)
        except (ImportError, AttributeError) as error:
            return f"{entry.path} was public and no longer imports: {error}"
        if member:
            return None  # checked with the deprecated class
        deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
        if not deprecations:
            return f"{entry.path} left the public API without a DeprecationWarning"
        message = str(deprecations[0].message)
        if "removed in" not in message or "limner." not in message:
            return f"{entry.path}'s warning names no new home or release: {message}"
        return None
    if current.kind != entry.kind:
        return f"{entry.path} was a {entry.kind}, is a {current.kind}"
    problems = incompatibilities(entry.signature, current.signature)
    if problems:
        return f"{entry.path}{current.signature}: " + "; ".join(problems)
    return None


def test_every_stored_name_still_works() -> None:
    stored = {entry.path: entry for entry in _stored()}
    now = {entry.path: entry for entry in snapshot()}
    broken = [problem for entry in stored.values() if (problem := breakage(entry, now, stored))]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize(
    ("old", "new", "broken"),
    [
        ("(a,b=)", "(a,b=,c=)", False),
        ("(a,b=)", "(a,b=,*,c=)", False),
        ("(a,b=)", "(a,b)", True),  # lost a default
        ("(a,b=)", "(b=,a)", True),  # reordered
        ("(a,b=)", "(a)", True),  # went
        ("(a,b=)", "(a,c)", True),  # went, and a new one without default
        ("(a,*,b=)", "(a,*,c=,b=)", False),
        ("(a,*,b=)", "(a,b=)", False),  # keyword-only may become positional at the end
        ("(a,/,b=)", "(x,/,b=)", False),  # positional-only names are not the caller's
        ("(a,**kwargs)", "(a)", True),
        ("(a,b=)", "(a,b=,**kwargs)", False),
        ("(a,b=)", "(a,/,b=)", True),
    ],
)
def test_the_check_itself(old: str, new: str, broken: bool) -> None:
    assert bool(incompatibilities(old, new)) is broken


#: Fields typed with names imported only for type checkers (PIL and torch types, which
#: importing limner must not import, and one import cycle): unresolvable anywhere.
TYPE_CHECKING_ONLY = {
    "limner.GenerationResult.images",
    "limner.Progress.preview",
    "limner.diffusion.LatentRGB.factors",
    "limner.diffusion.LatentRGB.bias",
    "limner.diffusion.LoadedPipeline.device",
    "limner.diffusion.LoadedPipeline.dtype",
    "limner.diffusion.LoadedPipeline.preview",
    # the fronts import the pool, which imports the table: limner.Model is named for type
    # checkers only there
    "limner.runtime.CapabilityRow.front",
}


def test_public_dataclasses_have_resolved_field_types() -> None:
    """A dataclass shown under a public module (``limner.KeyStats``) has field types that
    resolve where it says it lives: pydantic and FastAPI (the server's /v1/pool answers
    ``KeyStats``) look its names up there."""
    unresolved = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if not (inspect.isclass(value) and dataclasses.is_dataclass(value)):
                continue
            namespace = vars(sys.modules[value.__module__])
            for field in dataclasses.fields(value):
                path = f"{value.__module__}.{value.__qualname__}.{field.name}"
                if not isinstance(field.type, str) or path in TYPE_CHECKING_ONLY:
                    continue
                try:
                    eval(field.type, dict(namespace))
                except NameError:
                    unresolved.append(path)
    assert unresolved == []
    pydantic = pytest.importorskip("pydantic", reason="pydantic comes with the server extra")
    stats = pydantic.TypeAdapter(list[limner.KeyStats]).validate_python(
        [
            {
                **{field.name: 0 for field in dataclasses.fields(limner.KeyStats)},
                "key": "a",
                "state": "ready",
                "device": None,
                "last_used": None,
            }
        ]
    )
    assert stats[0].state == "ready"


def test_shared_names_live_in_limner() -> None:
    """A name limner and limner.plugin share shows limner as its home, whichever module was
    imported first; a name a public module defines keeps that module."""
    assert limner.ModelSpec.__module__ == "limner"
    assert limner.GenerationResult.__module__ == "limner"
    assert limner.Pool.__module__ == "limner"
    assert limner.InvalidInput.__module__ == "limner.errors"
    assert limner.KeyStats.__module__ == "limner.runtime"


def write() -> None:
    """The snapshot as it is now, plus every stored name that left ``__all__`` and still
    works (a deprecated name stays checked until the release that removes it)."""
    now = {entry.path: entry for entry in snapshot()}
    stored = {entry.path: entry for entry in _stored()} if SNAPSHOT.exists() else {}
    broken = [
        problem
        for entry in stored.values()
        if entry.path not in now and (problem := breakage(entry, now, stored))
    ]
    if broken:
        raise SystemExit("not written: " + "\n".join(broken))
    kept = {path: entry for path, entry in stored.items() if path not in now}
    lines = sorted(entry.line() for entry in {**kept, **now}.values())
    SNAPSHOT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
        print(f"wrote {SNAPSHOT}")
    else:
        print(__doc__)
