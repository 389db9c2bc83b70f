"""Requests, the per-key queue, and forming batches from it.

A request leaves the queue only into a batch, and a batch's requests stay counted as taken
until the worker holding them has answered every one: that count is what makes a model busy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt

from limner._runtime import RequestKind
from limner.errors import ModelError, PoolBusy

__all__ = ["MAX_REQUEUES", "Request", "RequestQueue", "Requeue", "submit"]

Vector = npt.NDArray[np.float32]

#: How often one request may be handed back by retirements before its caller gets an error.
MAX_REQUEUES = 3


class Requeue(Exception):
    """Private answer to a request whose model was retired before running it: submit again."""


class Request:
    """One caller's items (a whole call, or one chunk of a split one), answered exactly once."""

    __slots__ = ("cancelled", "done", "error", "items", "kind", "result")

    def __init__(self, kind: RequestKind, items: list[Any]) -> None:
        self.kind = kind
        self.items = items
        self.done = anyio.Event()
        self.result: Vector | None = None
        self.error: BaseException | None = None
        self.cancelled = False

    def finish(self, *, result: Vector | None = None, error: BaseException | None = None) -> None:
        """Answer the caller; only the first answer counts."""
        if self.done.is_set():
            return
        self.result = result
        self.error = error
        self.done.set()


class RequestQueue:
    """A bounded FIFO of requests that workers can peek into (a stream cannot put back).

    ``taken`` counts requests that left the queue for a batch and are not yet answered.
    """

    def __init__(self, key: str, maxsize: int) -> None:
        self.key = key
        self.maxsize = maxsize
        self.items: deque[Request] = deque()
        self.taken = 0
        self._event = anyio.Event()

    def __len__(self) -> int:
        return len(self.items)

    def put_all(self, requests: list[Request]) -> None:
        """Queue one caller's requests (a large call split at the batch size) all or none.

        Admission is per call: a split call is refused only when the queue is already full,
        so a call larger than the queue is not refused forever.
        """
        if len(self.items) >= self.maxsize:
            raise PoolBusy(self.key, queue_size=self.maxsize)
        self.items.extend(requests)
        self._event.set()

    def answer_all(self, error: BaseException) -> None:
        """Empty the queue, answering every waiting caller with ``error``."""
        while self.items:
            self.items.popleft().finish(error=error)

    def has_waiting(self) -> bool:
        """Whether a request nobody has cancelled is still queued."""
        return any(not request.cancelled for request in self.items)

    async def wait(self) -> None:
        while not self.items:
            await self._changed()

    async def _changed(self) -> None:
        """Until something is queued or :meth:`poke` is called."""
        if self._event.is_set():
            self._event = anyio.Event()
        await self._event.wait()

    def poke(self) -> None:
        """Wake whoever waits in :meth:`top_up_while` to look again (nothing was queued)."""
        self._event.set()

    async def top_up_while(
        self, batch: list[Request], *, max_items: int, pending: Callable[[], bool], wait: float
    ) -> None:
        """The model is idle but callers are still decoding inputs for it: wait up to
        ``wait`` seconds, while ``pending()``, for their requests to join this batch."""
        with anyio.move_on_after(wait):
            while sum(len(request.items) for request in batch) < max_items and pending():
                if not self.items:
                    await self._changed()
                self.take(batch, max_items=max_items)
                if self.items:  # the next request does not fit this batch: run it as it is
                    return

    def take(self, batch: list[Request], *, max_items: int) -> int:
        """Move queued requests into ``batch`` while they fit (one kind, ``max_items`` items);
        return how many moved. Cancelled requests are dropped on the way."""
        size = sum(len(request.items) for request in batch)
        moved = 0
        while self.items:
            head = self.items[0]
            if head.cancelled:
                self.items.popleft()
                continue
            if batch and (head.kind != batch[0].kind or size + len(head.items) > max_items):
                break
            batch.append(self.items.popleft())
            size += len(head.items)
            moved += 1
        self.taken += moved
        return moved

    async def top_up(self, batch: list[Request], *, max_items: int, wait: float) -> None:
        """Other batches are running: wait up to ``wait`` seconds for this one to fill up."""
        with anyio.move_on_after(wait):
            while sum(len(request.items) for request in batch) < max_items:
                await self.wait()
                if not self.take(batch, max_items=max_items):
                    break

    def settle(self, batch: list[Request], *, error: BaseException) -> None:
        """The batch's worker is done with it: answer whoever it left unanswered with
        ``error``, and stop counting the batch as taken."""
        for request in batch:
            request.finish(error=error)
        self.taken -= len(batch)


async def submit(
    queue: RequestQueue,
    kind: RequestKind,
    chunks: list[list[Any]],
    *,
    ready: Callable[[], Awaitable[None]],
) -> list[Vector]:
    """Queue one call's chunks once ``ready()`` (the model serves), and wait for every
    answer, in order.

    A chunk handed back because its model was retired before running it is submitted again
    (``ready()`` cold-starts it anew), a bounded number of times.
    """
    results: list[Vector | None] = [None] * len(chunks)
    pending = list(range(len(chunks)))
    for _ in range(MAX_REQUEUES + 1):
        await ready()
        requests = [(index, Request(kind, chunks[index])) for index in pending]
        queue.put_all([request for _, request in requests])
        try:
            for _, request in requests:
                await request.done.wait()
                if request.error is not None and not isinstance(request.error, Requeue):
                    raise request.error
        except BaseException:
            for _, request in requests:
                request.cancelled = True
            raise
        pending = [index for index, request in requests if isinstance(request.error, Requeue)]
        for index, request in requests:
            results[index] = request.result
        if not pending:
            return [result for result in results if result is not None]
    raise ModelError(
        f"{queue.key} was unloaded {MAX_REQUEUES + 1} times before it could run this "
        "request; the pool is evicting it faster than it serves (raise the memory budget or "
        "keep_alive)"
    )
