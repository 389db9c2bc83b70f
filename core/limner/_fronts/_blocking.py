"""What the blocking facades of the fronts share: the front they wrap, and each call refused
inside an event loop, else run on the default pool's loop (see ``_default_pool``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import sniffio

from limner._fronts._default_pool import run_on_default_loop
from limner.errors import BlockingCallInEventLoop

__all__ = ["BlockingFront", "call_blocking", "ensure_no_running_loop"]

T = TypeVar("T")


class _Front(Protocol):
    @property
    def key(self) -> str: ...


FrontT = TypeVar("FrontT", bound=_Front)


class BlockingFront(Generic[FrontT]):
    """A blocking facade over an async front (``model``), named by the front's key."""

    def __init__(self, model: FrontT) -> None:
        self.model = model

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.model.key}>"

    @property
    def key(self) -> str:
        return self.model.key


def ensure_no_running_loop(what: str) -> None:
    """Raise if called from inside a running event loop, where blocking would freeze it."""
    try:
        library = sniffio.current_async_library()  # asyncio, trio, or anything sniffio knows
    except sniffio.AsyncLibraryNotFoundError:
        pass
    else:
        raise BlockingCallInEventLoop(
            f"{what} blocks, and was called from inside a running {library} event loop; "
            "await the async API instead (drop .blocking())"
        )


def call_blocking(what: str, function: Callable[..., Awaitable[T]], *args: Any) -> T:
    ensure_no_running_loop(what)
    return run_on_default_loop(function, *args)
