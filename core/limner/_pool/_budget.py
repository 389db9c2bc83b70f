"""The memory budget as people write it: ``0.9``, ``90%``, ``20000``, ``20000MB``, ``20GB``.

One parser for ``--memory-budget`` and ``LIMNER_MEMORY_BUDGET``, giving the keyword arguments
of :class:`~limner.Pool` (``memory_budget_fraction`` or ``memory_budget_mb``), and one for a
plain size (``--memory-floor``).
"""

from __future__ import annotations

import math
import os
import re
from typing import TypedDict

from limner.errors import InvalidInput

__all__ = [
    "MEMORY_BUDGET_ENV",
    "MemoryBudget",
    "memory_budget_from_env",
    "parse_memory_budget",
    "parse_memory_size",
]


class MemoryBudget(TypedDict, total=False):
    """The pool's options a budget sets: one of the two."""

    memory_budget_fraction: float
    memory_budget_mb: float


MEMORY_BUDGET_ENV = "LIMNER_MEMORY_BUDGET"

_UNITS = {"": 1.0, "m": 1.0, "mb": 1.0, "mib": 1.0, "g": 1024.0, "gb": 1024.0, "gib": 1024.0}
_FORM = re.compile(r"^([0-9]*\.?[0-9]+)\s*(%|[a-z]*)$")
_HELP = (
    "a fraction of each device's memory (0.9), a percentage (90%), or megabytes "
    "(20000, 20000MB, 20GB; 1 GB = 1024 MB)"
)


def parse_memory_budget(value: str, *, field: str = "memory_budget") -> MemoryBudget:
    """``{"memory_budget_fraction": f}`` or ``{"memory_budget_mb": mb}`` for ``value``.

    A plain number up to 1 is a fraction, above 1 a size in MB. ``InvalidInput`` naming
    ``field`` for anything else.
    """
    text = value.strip().lower()
    found = _FORM.match(text)
    if found is None or found.group(2) not in (*_UNITS, "%"):
        raise InvalidInput(f"must be {_HELP}, got {value!r}", field=field)
    number, unit = float(found.group(1)), found.group(2)
    if not math.isfinite(number) or number <= 0:
        raise InvalidInput(f"must be positive, got {value!r}", field=field)
    if unit == "%":
        if number > 100:
            raise InvalidInput(f"a percentage must be at most 100%, got {value!r}", field=field)
        return {"memory_budget_fraction": number / 100}
    if unit == "" and number <= 1:
        return {"memory_budget_fraction": number}
    return {"memory_budget_mb": number * _UNITS[unit]}


def parse_memory_size(value: str, *, field: str) -> float:
    """Megabytes for ``value`` (``500``, ``500MB``, ``2GB``; 0 allowed); ``InvalidInput``
    naming ``field`` for anything else."""
    found = _FORM.match(value.strip().lower())
    if found is None or found.group(2) not in _UNITS:
        raise InvalidInput(
            f"must be a size in megabytes (500, 500MB, 2GB; 1 GB = 1024 MB), got {value!r}",
            field=field,
        )
    return float(found.group(1)) * _UNITS[found.group(2)]


def memory_budget_from_env() -> MemoryBudget:
    """The pool options ``LIMNER_MEMORY_BUDGET`` asks for; ``{}`` when it is unset or empty."""
    value = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    return parse_memory_budget(value, field=MEMORY_BUDGET_ENV) if value else {}
