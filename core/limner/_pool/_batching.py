"""Requests, the per-key queue, and forming batches from it.

A request leaves the queue only into a batch, and a batch's requests stay counted as taken
until the worker holding them has answered every one: that count is what makes a model busy.
The queue outlives its model's turns: callers queued for a model that is cold, or whose turn
ended, wait in it for the model's next turn.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt

from limner.errors import ModelError, PoolBusy

__all__ = ["MAX_REQUEUES", "Request", "RequestQueue", "Requeue", "submit"]

Vector = npt.NDArray[np.float32]

#: How often one request may be handed back by retirements before its caller gets an error.
MAX_REQUEUES = 3


class Requeue(Exception):
    """Private answer to a request whose model was retired before running it: submit again."""


class Request:
    """One caller's items (a whole call, or one chunk of a split one), answered exactly once.

    ``arrived`` is when its call arrived (the pool's clock): the scheduler serves the model
    whose oldest caller arrived first. ``started`` is set once a worker takes it (or it is
    answered): from then on ``max_wait`` no longer applies.
    """

    __slots__ = ("arrived", "cancelled", "done", "error", "items", "method", "result", "started")

    def __init__(self, method: str, items: list[Any], *, arrived: float = 0.0) -> None:
        self.method = method  # the backend's batched method: requests of one method batch
        self.items = items
        self.arrived = arrived
        self.started = anyio.Event()
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
        self.started.set()
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

    def withdraw(self, requests: list[Request]) -> None:
        """Take a caller's requests that no worker took back out of the queue (it gave up):
        they no longer count against ``maxsize`` or as waiting."""
        gone = {id(request) for request in requests}
        self.items = deque(request for request in self.items if id(request) not in gone)

    async def wait(self, *, unless: Callable[[], bool] | None = None) -> None:
        """Until something is queued, or until ``unless()`` holds (looked at on each
        :meth:`poke`)."""
        while not self.items and not (unless is not None and unless()):
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
        """Move queued requests into ``batch`` while they fit (one method, ``max_items`` items);
        return how many moved. Cancelled requests are dropped on the way."""
        size = sum(len(request.items) for request in batch)
        moved = 0
        while self.items:
            head = self.items[0]
            if head.cancelled:
                self.items.popleft()
                continue
            if batch and (head.method != batch[0].method or size + len(head.items) > max_items):
                break
            batch.append(self.items.popleft())
            head.started.set()
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
    method: str,
    chunks: list[list[Any]],
    *,
    arrived: float,
    max_wait: float,
    queued: Callable[[], None],
    timed_out: Callable[[float], BaseException],
) -> list[Vector]:
    """Queue one call's chunks, and wait for every answer, in order.

    ``queued()`` tells the scheduler the key has callers. The call waits at most
    ``max_wait`` seconds (wall time) for the pool to start on it, its first chunk taken into
    a batch; past that its chunks leave the queue and ``timed_out(waited)`` is raised. Once
    started, its chunks run in order. A chunk handed back because its worker stopped before
    running it is queued again, a bounded number of times.
    """
    results: list[Vector | None] = [None] * len(chunks)
    pending = list(range(len(chunks)))
    for _ in range(MAX_REQUEUES + 1):
        requests = [(index, Request(method, chunks[index], arrived=arrived)) for index in pending]
        queue.put_all([request for _, request in requests])
        queued()
        try:
            first = requests[0][1]
            began = anyio.current_time()
            with anyio.move_on_after(max_wait):
                await first.started.wait()
            if not first.started.is_set():
                raise timed_out(anyio.current_time() - began)
            for _, request in requests:
                await request.done.wait()
                if request.error is not None and not isinstance(request.error, Requeue):
                    raise request.error
        except BaseException:
            for _, request in requests:
                request.cancelled = True
            queue.withdraw([request for _, request in requests])
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
