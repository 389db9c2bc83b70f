"""A credit window for generation streams: Ray's streams have none of their own.

A replica's generation may run ``window`` chunks ahead of what its consumer has taken and no
further: before sending chunk ``n + window + 1`` it waits for the consumer's word that it took
chunk ``n + 1``. The consumer says so after each chunk (a call it does not wait on). The word
goes through one small actor per :class:`~limner.ray.RayRuntime`, since a later call through
Serve's handle could reach another replica. Closing a stream wakes its waiting producer with
``False``: the replica stops, and its pool stops the pipeline at its next step.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

__all__ = ["Credits"]

_REMEMBER_CLOSED = 4096


class Credits:
    """Per stream: how many chunks its consumer took; producers wait on it. (A Ray actor.)"""

    def __init__(self) -> None:
        self._taken: dict[str, int] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()

    async def ack(self, stream: str, taken: int) -> None:
        if stream in self._closed:
            return
        self._taken[stream] = max(self._taken.get(stream, 0), taken)
        self._event(stream).set()

    async def wait(self, stream: str, taken: int) -> bool:
        """Until the consumer took ``taken`` chunks (True) or closed the stream (False)."""
        while stream not in self._closed:
            if self._taken.get(stream, 0) >= taken:
                return True
            event = self._event(stream)
            event.clear()
            await event.wait()
        return False

    async def close(self, stream: str) -> None:
        self._closed[stream] = None
        while len(self._closed) > _REMEMBER_CLOSED:
            self._closed.popitem(last=False)
        self._taken.pop(stream, None)
        event = self._changed.pop(stream, None)
        if event is not None:
            event.set()

    async def open_streams(self) -> int:
        return len(self._taken)

    def _event(self, stream: str) -> asyncio.Event:
        event = self._changed.get(stream)
        if event is None:
            event = self._changed[stream] = asyncio.Event()
        return event
