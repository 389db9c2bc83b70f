"""The in-process runtime: a pool of workers per model key, within a memory budget."""

from ._options import PoolOptions
from ._pool import Pool, current_pool, max_wait

__all__ = ["Pool", "PoolOptions", "current_pool", "max_wait"]
