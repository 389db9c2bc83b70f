"""The in-process runtime: a pool of workers per model key, within a memory budget."""

from ._pool import Pool, current_pool

__all__ = ["Pool", "current_pool"]
