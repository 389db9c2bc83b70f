"""Checking what a plugin returns before a caller sees it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from limner.errors import ModelError

__all__ = ["checked_vectors", "describe_backend"]

log = logging.getLogger("limner.pool")

#: How far a row's norm may stray from 1 before it is renormalised.
_NORM_TOLERANCE = 1e-3


def describe_backend(key: str, backend: object) -> str:
    """Names the plugin code behind a key, for errors that are the plugin's fault."""
    kind = type(backend)
    return f"{key} (plugin backend {kind.__module__}.{kind.__qualname__})"


def checked_vectors(
    returned: Any, *, rows: int, dimension: int | None, source: str
) -> npt.NDArray[np.float32]:
    """A plugin's batch as the contract promises callers: ``(rows, dimension)`` float32,
    finite, each row of unit length.

    Floating rows of another precision are cast and rows slightly off unit length are
    renormalised; anything else (wrong shape, not floating point, NaN or infinity, a zero
    row) is the plugin's bug and raises :class:`ModelError` naming it.
    """
    try:
        vectors = np.asarray(returned)
    except Exception as error:  # e.g. a CUDA tensor: numpy cannot read it
        raise ModelError(f"{source} returned {type(returned).__name__}, not an array") from error
    expected = f"({rows}, {dimension if dimension is not None else 'd'})"
    if vectors.ndim != 2 or vectors.shape[0] != rows:
        raise ModelError(
            f"{source} returned shape {vectors.shape} for {rows} inputs; want {expected}"
        )
    if dimension is not None and vectors.shape[1] != dimension:
        raise ModelError(
            f"{source} returned {vectors.shape[1]}-dimensional rows, but declares "
            f"embedding_dimension={dimension}; want {expected}"
        )
    if not np.issubdtype(vectors.dtype, np.floating):
        raise ModelError(f"{source} returned {vectors.dtype} rows; want float32")
    vectors = vectors.astype(np.float32, copy=False)
    if not np.isfinite(vectors).all():
        raise ModelError(f"{source} returned NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1)
    if rows and (norms <= 1e-12).any():
        raise ModelError(f"{source} returned an all-zero row, which has no direction")
    if rows and (np.abs(norms - 1.0) > _NORM_TOLERANCE).any():
        log.debug("%s returned rows that are not unit length; normalising them", source)
        vectors = vectors / norms[:, None]
    return vectors
