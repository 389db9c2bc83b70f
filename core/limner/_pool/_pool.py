"""The in-process runtime: memory-budgeted cold starts, batching, idle eviction, answers.

Per model key the pool keeps a bounded queue and a set of workers over one loaded copy of
the weights. This module orchestrates; the rules are in ``_policy``, the queue and batches
in ``_batching``, the workers in ``_serving``, and the threads in ``_threads``. See
docs/architecture.md for the policy in one page.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import numpy as np
import numpy.typing as npt
from anyio.abc import AsyncResource, TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from limner._exports import CallsOfTheLastRelease, warn_deprecated
from limner._pool._readings import Clock, MemoryProbe, MonotonicClock, SystemMemory
from limner.errors import (
    Cancelled,
    InvalidInput,
    LimnerError,
    PoolBusy,
    WaitTimeout,
)
from limner.plugin._backends import Backend
from limner.plugin._generation import GenerationChunk
from limner.runtime import (
    BatchCall,
    KeyStats,
    StreamCall,
    backend_method,
    repeat_every,
)

from ._batching import RequestQueue, submit
from ._keys import KeyState, Ticket
from ._options import PoolOptions
from ._policy import is_expired
from ._residency import Residency, answer_waiters, claimed_elsewhere
from ._scheduler import Scheduler, backoff_error
from ._serving import GROUP_PATIENCE_SHARE, run_streamed, serve_batches, take_turn
from ._threads import ThreadExecutor

__all__ = ["Pool", "current_pool", "max_wait"]

log = logging.getLogger("limner.pool")

Vector = npt.NDArray[np.float32]

_current: contextvars.ContextVar[Pool | None] = contextvars.ContextVar(
    "limner_current_pool", default=None
)


def current_pool() -> Pool | None:
    """The pool of the innermost ``async with Pool()`` block around this task, if any."""
    return _current.get()


class Pool(CallsOfTheLastRelease, AsyncResource):
    """Serves models from a memory budget, in this process. Use as ``async with Pool():``.

    Keyword-only options (see :class:`~limner.PoolOptions`, which holds them as one value:
    ``Pool(options=...)``): ``memory_budget_fraction`` of each device's total memory (0.8),
    or an absolute ``memory_budget_mb``, is what the pool's models may hold;
    ``memory_floor_mb`` is kept available to the rest of the machine; ``keep_alive``
    seconds before an idle model is evicted (``keep_alive_per_key`` overrides it per key);
    ``max_queue`` callers waiting per key before ``PoolBusy``; ``max_wait`` seconds a call
    may wait for its turn before ``WaitTimeout``; ``min_turn`` seconds a model with work
    keeps its memory while others wait; ``max_batch_wait`` seconds a batch may wait to fill
    while other batches run; ``max_workers`` per key (2); ``max_threads`` running at once;
    ``drain_timeout`` seconds ``__aexit__`` lets work finish before cancelling it.
    ``memory`` and ``clock`` let tests swap the readings and the time.
    """

    def __init__(
        self,
        *,
        options: PoolOptions | None = None,
        memory_budget_fraction: float = 0.8,
        memory_budget_mb: float | None = None,
        memory_floor_mb: float | None = None,
        keep_alive: float = 300.0,
        keep_alive_per_key: Mapping[str, float] | None = None,
        max_queue: int = 1024,
        max_wait: float = 60.0,
        min_turn: float | None = None,
        max_batch_wait: float = 0.002,
        max_workers: int = 2,
        max_threads: int = 4,
        maintenance_interval: float = 5.0,
        drain_timeout: float = 30.0,
        load_retry_backoff: tuple[float, float] = (1.0, 60.0),
        memory: MemoryProbe | None = None,
        clock: Clock | None = None,
    ) -> None:
        given = PoolOptions(
            memory_budget_fraction=memory_budget_fraction,
            memory_budget_mb=memory_budget_mb,
            memory_floor_mb=memory_floor_mb,
            keep_alive=keep_alive,
            keep_alive_per_key=keep_alive_per_key or {},
            max_queue=max_queue,
            max_wait=max_wait,
            min_turn=min_turn,
            max_batch_wait=max_batch_wait,
            max_workers=max_workers,
            max_threads=max_threads,
            maintenance_interval=maintenance_interval,
            drain_timeout=drain_timeout,
            load_retry_backoff=load_retry_backoff,
        )
        if options is None:
            options = given
        elif given != PoolOptions():
            raise TypeError("pass the pool's options as `options=` or as keywords, not both")
        self.options = options
        self.keep_alive = options.keep_alive
        self.keep_alive_per_key = dict(options.keep_alive_per_key)
        self.max_queue = options.max_queue
        self.max_batch_wait = options.max_batch_wait
        self.maintenance_interval = options.maintenance_interval
        self.drain_timeout = options.drain_timeout
        self.clock: Clock = clock or MonotonicClock()
        self.executor = ThreadExecutor(max_threads=options.max_threads)
        self._keys: dict[Backend, KeyState] = {}  # by backend: two registries may share a key
        self._task_group: TaskGroup | None = None
        self._token: contextvars.Token[Pool | None] | None = None
        self._closing = False
        self._progress = anyio.Event()  # set whenever a batch or generation finishes
        # Which models are loaded, and where: the memory budget's side of the policy.
        self._residency = Residency(
            owner=self,
            keys=self._keys,
            memory=memory or SystemMemory(),
            clock=self.clock,
            executor=self.executor,
            options=options,
            spawn=self._spawn,
            worker=self._worker,
            changed=self._changed,
        )
        # Who holds the memory when: turns between the models callers wait for.
        self._scheduler = Scheduler(
            owner=self,
            keys=self._keys,
            residency=self._residency,
            options=options,
            clock=self.clock,
            spawn=self._spawn,
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        if self._task_group is not None:
            raise LimnerError("this pool is already running")
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(
            repeat_every, self.maintenance_interval, self.evict_idle, log, "pool maintenance"
        )
        self._task_group.start_soon(self._scheduler.run)
        self._token = _current.set(self)
        return self

    async def aclose(self) -> None:
        """Stop taking work, let it drain for ``drain_timeout``, then cancel and unload all.

        A body's exception leaves ``async with`` as itself: the task group is told nothing of
        it, so it never comes back wrapped in an ExceptionGroup.
        """
        if self._task_group is None:
            return
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        self._closing = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.drain_timeout):
            while any(state.has_work for state in self._keys.values()):
                self._progress = anyio.Event()
                with anyio.move_on_after(_DRAIN_LOOK):  # callers may also give up
                    await self._progress.wait()
        shut_down = Cancelled("the pool shut down")
        for state in self._keys.values():
            answer_waiters(state, shut_down)
        self._task_group.cancel_scope.cancel()
        try:
            await self._task_group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            for state in self._keys.values():  # queued while the tasks were winding down
                answer_waiters(state, shut_down)
            with anyio.CancelScope(shield=True):
                for state in self._keys.values():
                    if state.loaded:
                        await self._residency.unload(state, reason="pool shut down")
            self.executor.close()

    @property
    def memory_budget_mb(self) -> float | None:
        """The absolute budget per device this pool was given, if any."""
        return self.options.memory_budget_mb

    @property
    def memory_budget_fraction(self) -> float:
        """The share of each device's memory this pool may fill without an absolute budget."""
        return self.options.memory_budget_fraction

    @property
    def running(self) -> bool:
        return self._task_group is not None and not self._closing

    # -- the runtime ----------------------------------------------------------------------

    @contextlib.contextmanager
    def preparing(self, backend: Backend, count: int) -> Iterator[None]:
        """A front is preparing ``count`` inputs for ``backend`` to submit next: an idle
        worker about to run a batch waits for them (a burst of single requests then runs as
        one batch, not one request and then the rest). Call from the pool's event loop."""
        if not self.running:
            yield
            return
        state = self._state(backend)
        state.decoding += count
        try:
            yield
        finally:
            state.decoding -= count
            state.queue.poke()

    def decoding(self, backend: Backend, count: int) -> AbstractContextManager[None]:
        """Deprecated: :meth:`preparing`."""
        warn_deprecated("Pool.decoding", "use Pool.preparing")
        return self.preparing(backend, count)

    async def run_batch(self, backend: Backend, call: BatchCall) -> Vector:
        """Rows from ``backend``'s batched method ``call.method``, in the order of
        ``call.items``; batched with other callers' calls of that method.

        A call larger than the model's batch is split into chunks, admitted together and
        answered as one call. A call for a model that is not loaded waits for its turn, at
        most ``max_wait`` seconds (``WaitTimeout`` after), in a queue of at most
        ``max_queue`` (``PoolBusy`` beyond).
        """
        backend_method(backend, call)  # one the capability offers, before anything queues
        state = self._state(backend)
        self._refuse_at_once(state)
        await self._residency.resolve_device(state)
        items, size = call.items, backend.spec.info.max_batch_size
        chunks = [list(items[start : start + size]) for start in range(0, len(items), size)]
        results = await submit(
            state.queue,
            call.method,
            chunks,
            arrived=self.clock.now(),
            max_wait=self._max_wait(),
            queued=lambda: self._wanted(state),
            timed_out=lambda waited: self._timed_out(state, waited),
        )
        return results[0] if len(results) == 1 else np.concatenate(results)

    async def run_stream(
        self, backend: Backend, call: StreamCall
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the chunks of one run of ``backend``'s streamed method ``call.method`` (a
        generation); one per worker at a time, and never beside a call of another
        ``call.group`` (calls of the running group may go ahead of others' for a while).

        It waits for its model's turn like a batched call (``max_wait``, ``max_queue``).
        Closing the iterator (or cancelling its consumer) stops the run at the next step and
        frees the worker once the backend has returned.
        """
        backend_method(backend, call)
        state = self._state(backend)
        self._refuse_at_once(state)
        await self._residency.resolve_device(state)
        send, receive = anyio.create_memory_object_stream[GenerationChunk | BaseException](1)
        cancel = threading.Event()
        ticket = Ticket("generation", arrived=self.clock.now(), group=call.group)
        state.tickets.append(ticket)
        self._wanted(state)
        try:
            self._spawn(self._streamed, state, ticket, self._max_wait(), call, send, cancel)
            async with receive:
                async for chunk in receive:
                    if isinstance(chunk, BaseException):
                        raise chunk
                    yield chunk
        finally:
            cancel.set()
            _drop(state, ticket)
            state.notify()  # its task, if still waiting for a turn, stops

    async def load(self, backend: Backend) -> None:
        """Cold-start a model now (preloading), so its first request finds it warm; it
        waits for its turn like a call (``max_wait``)."""
        state = self._state(backend)
        self._refuse_at_once(state)
        await self._residency.resolve_device(state)
        ticket = Ticket("load", arrived=self.clock.now())
        state.tickets.append(ticket)
        self._wanted(state)
        max_wait, began = self._max_wait(), anyio.current_time()
        try:
            with anyio.move_on_after(max_wait):
                while not (state.phase == "ready" and state.workers):
                    if ticket.error is not None:
                        raise ticket.error
                    await state.changed()
            if not (state.phase == "ready" and state.workers):
                raise self._timed_out(state, anyio.current_time() - began)
        finally:
            _drop(state, ticket)

    def stats(self) -> dict[str, KeyStats]:
        """A frozen snapshot per key."""
        snapshot: dict[str, KeyStats] = {}
        for state in self._keys.values():
            key = state.spec.key
            while key in snapshot:  # the same key from two registries
                key += "'"
            snapshot[key] = state.snapshot(self.clock.now())
        return snapshot

    async def evict(self, key: str) -> bool:
        """Evict one model now if it is idle; return whether it was."""
        found = False
        for state in list(self._keys.values()):
            if state.spec.key == key and state.idle:
                await self._residency.unload(state, reason="evicted on request")
                found = True
        self._scheduler.kick()
        return found

    async def evict_idle(self) -> list[str]:
        """Evict every model idle for longer than its keep-alive; return their keys.

        The maintenance task calls this periodically; tests call it with a fake clock.
        """
        now, evicted = self.clock.now(), []
        for state in list(self._keys.values()):
            key = state.spec.key
            keep_alive = self.keep_alive_per_key.get(key, self.keep_alive)
            if state.idle and is_expired(last_used=state.last_used, now=now, keep_alive=keep_alive):
                await self._residency.unload(
                    state, reason=f"idle for {now - (state.last_used or now):.0f} s"
                )
                evicted.append(key)
        self._scheduler.kick()
        return evicted

    # -- requests -----------------------------------------------------------------------

    def _state(self, backend: Backend) -> KeyState:
        if not self.running:
            raise LimnerError("the pool is not running; use it inside `async with Pool()`")
        state = self._keys.get(backend)
        if state is None:
            queue = RequestQueue(backend.spec.key, self.max_queue)
            state = KeyState(spec=backend.spec, backend=backend, queue=queue)
            self._keys[backend] = state
        return state

    def _refuse_at_once(self, state: KeyState) -> None:
        """What a caller is told without waiting: a shut-down pool, weights another pool
        holds, a failed load within its backoff, a full queue."""
        if self._task_group is None:
            raise Cancelled("the pool shut down")
        elsewhere = claimed_elsewhere(state.backend, self)
        if elsewhere is not None:
            raise elsewhere
        now = self.clock.now()
        if state.phase == "cold" and state.load_error is not None and now < state.retry_at:
            raise backoff_error(state, now)
        waiting, _ = state.waiting()
        if waiting >= self.max_queue:
            retry = self._scheduler.retry_after(state)
            raise PoolBusy(state.spec.key, queue_size=self.max_queue, retry_after=retry)

    def _wanted(self, state: KeyState) -> None:
        """Callers wait for ``state``: if it does not serve now, its turn must be planned."""
        if not state.serving:
            self._scheduler.kick()

    def _max_wait(self) -> float:
        override = _max_wait.get()
        return self.options.max_wait if override is None else override

    def _timed_out(self, state: KeyState, waited: float) -> WaitTimeout:
        state.wait_timeouts += 1
        self._progress.set()  # a draining pool looks again at who still waits
        return WaitTimeout(
            state.spec.key,
            waited=waited,
            max_wait=self._max_wait(),
            retry_after=self._scheduler.retry_after(state),
        )

    def _changed(self) -> None:
        self._scheduler.kick()
        self._progress.set()

    # -- tasks --------------------------------------------------------------------------

    def _spawn(self, function: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._task_group is None:
            raise Cancelled("the pool shut down")
        self._task_group.start_soon(function, *args)

    async def _worker(self, state: KeyState, scope: anyio.CancelScope) -> None:
        with scope:
            died = await serve_batches(
                state,
                self.executor,
                max_batch_wait=self.max_batch_wait,
                clock=self.clock,
                shutting_down=lambda: not self.running,
                on_progress=self._changed,
            )
            state.workers.remove(scope)
            if died:
                # A batch killed this worker (out of memory twice): the others carry on; the
                # last one's going unloads the key, and its queue waits for a fresh load.
                log.error("a worker of %s died; %d left", state.spec.key, len(state.workers))
                if not state.workers:
                    self._spawn(self._residency.release, state, self._residency.retire(state))
            self._scheduler.kick()  # a drained key with no workers left can go

    async def _streamed(
        self,
        state: KeyState,
        ticket: Ticket,
        max_wait: float,
        call: StreamCall,
        send: MemoryObjectSendStream[GenerationChunk | BaseException],
        cancel: threading.Event,
    ) -> None:
        async with send:
            began, slots = anyio.current_time(), None
            try:
                with anyio.move_on_after(max_wait):
                    patience = self.options.max_wait * GROUP_PATIENCE_SHARE
                    slots = await take_turn(
                        state, ticket, cancel, clock=self.clock, patience=patience
                    )
            except LimnerError as answered:  # the scheduler's answer: no room, a failed load
                await _tell(send, answered)
                return
            except anyio.get_cancelled_exc_class():
                await _tell(send, Cancelled("the pool shut down"))
                raise
            finally:
                _drop(state, ticket)
            if slots is not None:
                await run_streamed(
                    state,
                    self.executor,
                    slots,
                    call,
                    send,
                    cancel,
                    clock=self.clock,
                    on_progress=self._changed,
                    measured=lambda: self._residency.remeasure(state),
                    reserve=lambda mb, what: self._residency.reserve(state, mb, what),
                )
            elif not cancel.is_set():  # not the consumer leaving: the wait ran out
                await _tell(send, self._timed_out(state, anyio.current_time() - began))


async def _tell(
    send: MemoryObjectSendStream[GenerationChunk | BaseException], error: BaseException
) -> None:
    """Hand a generation's consumer its error, if it still listens (never blocks)."""
    with contextlib.suppress(
        anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError
    ):
        send.send_nowait(error)


def _drop(state: KeyState, ticket: Ticket) -> None:
    """The ticket's caller no longer waits (it started, gave up, or was answered)."""
    if ticket in state.tickets:
        state.tickets.remove(ticket)


#: How often a pool that is closing looks at who still waits, besides on progress.
_DRAIN_LOOK = 0.05

_max_wait: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "limner_max_wait", default=None
)


@contextlib.contextmanager
def max_wait(seconds: float) -> Iterator[None]:
    """Within the block, calls wait at most ``seconds`` for their model's turn (instead of
    the pool's ``max_wait``), then raise :class:`~limner.WaitTimeout`::

        with limner.max_wait(2.0):
            vector = await model.embed_image("cat.jpg")

    It reaches pools on the caller's event loop (``async with Pool()``, a server's pool).
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise InvalidInput(f"must be seconds, more than 0, got {seconds!r}", field="max_wait")
    token = _max_wait.set(float(seconds))
    try:
        yield
    finally:
        _max_wait.reset(token)
