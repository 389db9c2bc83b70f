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
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import numpy.typing as npt
from anyio.abc import AsyncResource, TaskGroup

from limner._backends import Backend, TextToImageBackend
from limner._generation_types import GenerationChunk, ImageGenerationConfig
from limner._readings import Clock, MemoryProbe, MonotonicClock, SystemMemory
from limner._runtime import KeyStats, RequestKind, repeat_every
from limner.errors import (
    Cancelled,
    LimnerError,
    PoolBusy,
)

from ._batching import RequestQueue, submit
from ._keys import KeyState
from ._policy import is_expired
from ._residency import Residency
from ._serving import run_generation, serve_batches
from ._threads import ThreadExecutor

__all__ = ["Pool", "current_pool"]

log = logging.getLogger("limner.pool")

Vector = npt.NDArray[np.float32]

_current: contextvars.ContextVar[Pool | None] = contextvars.ContextVar(
    "limner_current_pool", default=None
)


def current_pool() -> Pool | None:
    """The pool of the innermost ``async with Pool()`` block around this task, if any."""
    return _current.get()


class Pool(AsyncResource):
    """Serves models from a memory budget, in this process. Use as ``async with Pool():``.

    Keyword-only options: ``memory_budget_fraction`` of each device's total memory (0.8), or
    an absolute ``memory_budget_mb``; ``keep_alive`` seconds before an idle model is evicted
    (``keep_alive_per_key`` overrides it per key); ``max_queue`` requests waiting per key
    before ``PoolBusy``; ``max_batch_wait`` seconds a batch may wait to fill while other
    batches run; ``max_workers`` per key (2); ``max_threads`` running at once;
    ``drain_timeout`` seconds ``__aexit__`` lets work finish before cancelling it. ``memory``
    and ``clock`` let tests swap the readings and the time.
    """

    def __init__(
        self,
        *,
        memory_budget_fraction: float = 0.8,
        memory_budget_mb: float | None = None,
        keep_alive: float = 300.0,
        keep_alive_per_key: Mapping[str, float] | None = None,
        max_queue: int = 1024,
        max_batch_wait: float = 0.002,
        max_workers: int = 2,
        max_threads: int = 4,
        maintenance_interval: float = 5.0,
        drain_timeout: float = 30.0,
        load_retry_backoff: tuple[float, float] = (1.0, 60.0),
        memory: MemoryProbe | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not 0 < memory_budget_fraction <= 1:
            raise ValueError("memory_budget_fraction must be in (0, 1]")
        if max_queue < 1 or max_workers < 1 or max_threads < 1:
            raise ValueError("max_queue, max_workers and max_threads must be at least 1")
        self.keep_alive = keep_alive
        self.keep_alive_per_key = dict(keep_alive_per_key or {})
        self.max_queue = max_queue
        self.max_batch_wait = max_batch_wait
        self.maintenance_interval = maintenance_interval
        self.drain_timeout = drain_timeout
        self.clock: Clock = clock or MonotonicClock()
        self.executor = ThreadExecutor(max_threads=max_threads)
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
            budget_fraction=memory_budget_fraction,
            budget_mb=memory_budget_mb,
            max_workers=max_workers,
            retry_backoff=load_retry_backoff,
            spawn=self._spawn,
            worker=self._worker,
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
                await self._progress.wait()
        shut_down = Cancelled("the pool shut down")
        for state in self._keys.values():
            state.queue.answer_all(shut_down)
        self._task_group.cancel_scope.cancel()
        try:
            await self._task_group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            for state in self._keys.values():  # queued while the tasks were winding down
                state.queue.answer_all(shut_down)
            with anyio.CancelScope(shield=True):
                for state in self._keys.values():
                    if state.loaded:
                        await self._residency.unload(state, reason="pool shut down")
            self.executor.close()

    @property
    def memory_budget_mb(self) -> float | None:
        """The absolute budget per device this pool was given, if any."""
        return self._residency.budget_mb

    @property
    def memory_budget_fraction(self) -> float:
        """The share of each device's memory this pool may fill without an absolute budget."""
        return self._residency.budget_fraction

    @property
    def running(self) -> bool:
        return self._task_group is not None and not self._closing

    # -- the runtime ----------------------------------------------------------------------

    @contextlib.contextmanager
    def decoding(self, backend: Backend, count: int) -> Iterator[None]:
        """A front is decoding ``count`` inputs for ``backend`` to submit next: an idle
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

    async def embed(self, backend: Backend, kind: RequestKind, items: Sequence[Any]) -> Vector:
        """Embed prepared images (``kind="image"``) or texts; rows in the order given.

        A call larger than the model's batch is split into chunks, admitted together and
        answered as one call.
        """
        state = self._state(backend)
        size = backend.spec.info.max_batch_size
        chunks = [list(items[start : start + size]) for start in range(0, len(items), size)]
        results = await submit(state.queue, kind, chunks, ready=lambda: self._ready(state))
        return results[0] if len(results) == 1 else np.concatenate(results)

    async def generate(
        self, backend: Backend, prompt: str, config: ImageGenerationConfig
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a generation's chunks; one generation per worker at a time.

        Closing the iterator (or cancelling its consumer) stops the run at the next step and
        frees the worker once the pipeline has returned.
        """
        assert isinstance(backend, TextToImageBackend)
        state = self._state(backend)
        await self._residency.ensure_ready(state)
        if state.waiting_generations >= self.max_queue:
            raise PoolBusy(backend.spec.key, queue_size=self.max_queue)
        if self._task_group is None:
            raise Cancelled("the pool shut down")
        send, receive = anyio.create_memory_object_stream[GenerationChunk | BaseException](1)
        cancel = threading.Event()
        state.waiting_generations += 1
        self._task_group.start_soon(self._generation, state, prompt, config, send, cancel)
        try:
            async with receive:
                async for chunk in receive:
                    if isinstance(chunk, BaseException):
                        raise chunk
                    yield chunk
        finally:
            cancel.set()

    async def load(self, backend: Backend) -> None:
        """Cold-start a model now (preloading), so its first request finds it warm."""
        await self._residency.ensure_ready(self._state(backend))

    def stats(self) -> dict[str, KeyStats]:
        """A frozen snapshot per key."""
        snapshot: dict[str, KeyStats] = {}
        for state in self._keys.values():
            key = state.spec.key
            while key in snapshot:  # the same key from two registries
                key += "'"
            snapshot[key] = state.snapshot()
        return snapshot

    async def evict(self, key: str) -> bool:
        """Evict one model now if it is idle; return whether it was."""
        found = False
        for state in list(self._keys.values()):
            if state.spec.key == key and state.idle:
                await self._residency.unload(state, reason="evicted on request")
                found = True
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

    async def _ready(self, state: KeyState) -> None:
        await self._residency.ensure_ready(state)
        if self._task_group is None:
            raise Cancelled("the pool shut down")

    # -- tasks --------------------------------------------------------------------------

    def _spawn(self, function: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._task_group is None:
            raise Cancelled("the pool shut down")
        self._task_group.start_soon(function, *args)

    async def _worker(self, state: KeyState, scope: anyio.CancelScope) -> None:
        with scope:
            await serve_batches(
                state,
                self.executor,
                max_batch_wait=self.max_batch_wait,
                clock=self.clock,
                shutting_down=lambda: not self.running,
                on_progress=self._made_progress,
            )
            # A batch killed this worker (out of memory twice): the others carry on; the
            # last one's going unloads the key, and the next request cold-starts it.
            state.workers.remove(scope)
            log.error("a worker of %s died; %d left", state.spec.key, len(state.workers))
            if not state.workers:
                self._spawn(self._residency.release, state, self._residency.retire(state))

    def _made_progress(self) -> None:
        """A batch or generation finished. Looked up on each call: ``aclose`` waits on a
        fresh event each round, so an event bound when a worker started would wake nobody
        (the drain then sat out its whole ``drain_timeout``)."""
        self._progress.set()

    async def _generation(self, state: KeyState, *args: Any) -> None:
        await run_generation(
            state, self.executor, *args, clock=self.clock, on_progress=self._made_progress
        )
