"""The pool: memory-budgeted cold starts, dynamic batching, idle eviction, fault isolation.

Every capability call routes through a pool. Per model key it keeps a bounded queue and a
set of workers: asyncio/trio tasks that take batches off the queue and run them in threads,
over one loaded copy of the weights. See docs/architecture.md for the policy in one page.
"""

from __future__ import annotations

import contextvars
import ctypes
import gc
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import numpy as np
import numpy.typing as npt
from anyio.abc import TaskGroup

from ._backends import Backend, ImageEmbeddingBackend, TextToImageBackend
from ._generation import GenerationChunk, GenerationResult, ImageGenerationConfig, Progress
from ._memory import Clock, MemoryProbe, MonotonicClock, SystemMemory
from ._spec import ModelSpec
from ._vectors import checked_vectors, describe_backend
from .errors import (
    Cancelled,
    LimnerError,
    MemoryExhausted,
    ModelError,
    ModelLoadError,
    PoolBusy,
)

__all__ = ["KeyStats", "Placement", "Pool", "ThreadPlacement", "current_pool"]

log = logging.getLogger("limner.pool")

T = TypeVar("T")
Vector = npt.NDArray[np.float32]
RequestKind = Literal["image", "text"]

_current: contextvars.ContextVar[Pool | None] = contextvars.ContextVar(
    "limner_current_pool", default=None
)


def current_pool() -> Pool | None:
    """The pool of the innermost ``async with Pool()`` block around this task, if any."""
    return _current.get()


# -- placement: the seam for running workers elsewhere (threads here; a cluster later) --------


class Placement(Protocol):
    """Where a model's work runs. The pool only loads, calls and unloads through this.

    The default runs everything in threads of this process; a distributed backend (Ray
    actors, say) would implement the same three methods without callers noticing.
    """

    async def load(self, backend: Backend) -> None: ...

    async def call(self, function: Callable[..., T], *args: Any) -> T: ...

    async def unload(self, backend: Backend, *, baseline: dict[str, Any] | None = None) -> None:
        """Unload, then drop whatever ``load`` attached that is not in ``baseline``."""


class ThreadPlacement:
    """Runs loads, batches and generations in worker threads, never on the event loop."""

    def __init__(self, *, max_threads: int) -> None:
        self.limiter = anyio.CapacityLimiter(max_threads)
        self._loads = anyio.CapacityLimiter(2)

    async def load(self, backend: Backend) -> None:
        await anyio.to_thread.run_sync(backend.load, limiter=self._loads)

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)

    async def unload(self, backend: Backend, *, baseline: dict[str, Any] | None = None) -> None:
        await anyio.to_thread.run_sync(_unload_and_collect, backend, baseline, limiter=self._loads)


def _unload_and_collect(backend: Backend, baseline: dict[str, Any] | None) -> None:
    backend.unload()
    if baseline is not None:
        restore_attributes(backend, baseline)
    gc.collect()
    _trim_heap()


_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def restore_attributes(backend: Backend, baseline: dict[str, Any]) -> None:
    """Put a backend's attributes back as they were before ``load``.

    Eviction must free the weights whatever the plugin's ``unload`` does (the default does
    nothing): every attribute ``load`` or serving added is deleted, and every one rebound to
    another object is reset. Plain values (flags, counters, strings) are kept, and so are
    objects changed in place, which hold no weights that were not there before the load.
    """
    current = vars(backend)
    for name in list(current):
        if name not in baseline:
            del current[name]
        elif current[name] is not baseline[name] and not isinstance(current[name], _PLAIN):
            current[name] = baseline[name]


def _claim(backend: Backend, pool: Pool) -> None:
    """Mark ``backend``'s weights as this pool's; two pools never load one backend at once."""
    owner = getattr(backend, "_limner_pool", None)
    if owner is not None and owner is not pool:
        raise LimnerError(
            f"{backend.spec.key} is loaded in another pool; evict it there first "
            "(`await pool.evict(key)`), or use one pool per process"
        )
    backend._limner_pool = pool  # type: ignore[attr-defined]


def _disown(backend: Backend, pool: Pool) -> None:
    """Give up the claim once the weights are gone, so another pool may load them."""
    if getattr(backend, "_limner_pool", None) is pool:
        del backend._limner_pool  # type: ignore[attr-defined]


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise), so memory
    readings after an eviction show the room it made."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to trim
    libc.malloc_trim(0)


# -- statistics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyStats:
    """A snapshot of one model key in a pool."""

    key: str
    state: Literal["cold", "loading", "ready"]
    workers: int
    queue_depth: int
    in_flight: int
    batches: int
    mean_batch_size: float
    loads: int
    load_seconds: float
    evictions: int
    memory_mb: float
    device: str | None
    last_used: float | None


# -- requests and per-key state -------------------------------------------------------------


class _Requeue(Exception):
    """Private answer to a request whose model was retired before running it: submit again."""


#: How often one request may be handed back by retirements before its caller gets an error.
_MAX_REQUEUES = 3


class _Request:
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


class _Queue:
    """A bounded FIFO of requests that workers can peek into (a stream cannot put back)."""

    def __init__(self, key: str, maxsize: int) -> None:
        self.key = key
        self.maxsize = maxsize
        self.items: deque[_Request] = deque()
        self._event = anyio.Event()

    def __len__(self) -> int:
        return len(self.items)

    def put_all(self, requests: list[_Request]) -> None:
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

    async def wait(self) -> None:
        while not self.items:
            if self._event.is_set():
                self._event = anyio.Event()
            await self._event.wait()

    def discard_cancelled(self) -> None:
        while self.items and self.items[0].cancelled:
            self.items.popleft()


@dataclass
class _KeyState:
    spec: ModelSpec
    backend: Backend
    queue: _Queue
    state: Literal["cold", "loading", "ready"] = "cold"
    device: str | None = None
    workers: list[anyio.CancelScope] = field(default_factory=list)
    busy_workers: int = 0
    in_flight: int = 0
    generations: int = 0
    waiting_generations: int = 0
    slots: anyio.CapacityLimiter | None = None  # generations running at once
    compute: anyio.CapacityLimiter | None = None  # batches running at once
    load_done: anyio.Event | None = None
    load_error: BaseException | None = None
    retry_at: float = 0.0
    failures: int = 0
    batches: int = 0
    batched_items: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    worker_mb: float | None = None
    accounted_mb: float = 0.0
    last_used: float | None = None
    loaded: bool = False
    released: anyio.Event | None = None  # set when the last unload has finished
    baseline: dict[str, Any] | None = None  # the backend's attributes before its load

    @property
    def idle(self) -> bool:
        return (
            self.state == "ready"
            and not self.queue.items
            and self.in_flight == 0
            and self.generations == 0
            and self.waiting_generations == 0
        )


# -- the pool ---------------------------------------------------------------------------------


class Pool:
    """Serves models from a memory budget. Use as ``async with Pool() as pool:``.

    Keyword-only options: ``memory_budget_fraction`` of each device's total memory (0.8), or
    an absolute ``memory_budget_mb``; ``keep_alive`` seconds before an idle model is evicted
    (``keep_alive_per_key`` overrides it per key); ``max_queue`` requests waiting per key
    before ``PoolBusy``; ``max_batch_wait`` seconds a batch may wait to fill while other
    batches run; ``max_workers`` per key (2); ``max_threads`` running at once;
    ``drain_timeout`` seconds ``__aexit__`` lets work finish before cancelling it. ``memory``,
    ``clock`` and ``placement`` let tests and other runtimes swap the readings and the
    execution.
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
        placement: Placement | None = None,
    ) -> None:
        if not 0 < memory_budget_fraction <= 1:
            raise ValueError("memory_budget_fraction must be in (0, 1]")
        if max_queue < 1 or max_workers < 1 or max_threads < 1:
            raise ValueError("max_queue, max_workers and max_threads must be at least 1")
        self.memory_budget_fraction = memory_budget_fraction
        self.memory_budget_mb = memory_budget_mb
        self.keep_alive = keep_alive
        self.keep_alive_per_key = dict(keep_alive_per_key or {})
        self.max_queue = max_queue
        self.max_batch_wait = max_batch_wait
        self.max_workers = max_workers
        self.maintenance_interval = maintenance_interval
        self.drain_timeout = drain_timeout
        self.load_retry_backoff = load_retry_backoff
        self.memory: MemoryProbe = memory or SystemMemory()
        self.clock: Clock = clock or MonotonicClock()
        self.placement: Placement = placement or ThreadPlacement(max_threads=max_threads)
        self._states: dict[Backend, _KeyState] = {}  # by backend: two registries may share a key
        self._reserved_mb: dict[str, float] = {}
        self._task_group: TaskGroup | None = None
        self._token: contextvars.Token[Pool | None] | None = None
        self._closing = False
        self._admission = anyio.Lock()  # serialises memory decisions, never held during a load
        self._progress = anyio.Event()  # set whenever a batch or generation finishes

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        if self._task_group is not None:
            raise LimnerError("this pool is already running")
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._maintenance)
        self._token = _current.set(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        self._closing = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.drain_timeout):
            while self._has_work():
                self._progress = anyio.Event()
                await self._progress.wait()
        shut_down = Cancelled("the pool shut down")
        for state in self._states.values():
            state.queue.answer_all(shut_down)
        self._task_group.cancel_scope.cancel()
        try:
            # The body's own exception is re-raised by ``async with`` as itself: the task
            # group is told nothing of it, so it never comes back wrapped in an ExceptionGroup.
            await self._task_group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            for state in self._states.values():  # queued while the tasks were winding down
                state.queue.answer_all(shut_down)
            with anyio.CancelScope(shield=True):
                for state in self._states.values():
                    if state.loaded:
                        await self._unload(state, reason="pool shut down")
        return None

    def _has_work(self) -> bool:
        return any(
            s.in_flight or s.generations or any(not r.cancelled for r in s.queue.items)
            for s in self._states.values()
        )

    @property
    def running(self) -> bool:
        return self._task_group is not None and not self._closing

    # -- public API ---------------------------------------------------------------------

    async def embed(
        self, spec: ModelSpec, backend: ImageEmbeddingBackend, kind: RequestKind, items: list[Any]
    ) -> Vector:
        """Embed prepared images (``kind="image"``) or texts; rows in the order given."""
        state = self._state(spec, backend)
        size = spec.info.max_batch_size
        chunks = [items[start : start + size] for start in range(0, len(items), size)]
        results = await self._submit(state, kind, chunks)
        return results[0] if len(results) == 1 else np.concatenate(results)

    async def generate(
        self,
        spec: ModelSpec,
        backend: TextToImageBackend,
        prompt: str,
        config: ImageGenerationConfig,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a generation's chunks; one generation per worker at a time.

        Closing the iterator (or cancelling its consumer) stops the run at the next step and
        frees the worker once the pipeline has returned.
        """
        state = self._state(spec, backend)
        await self._ensure_ready(state)
        if state.waiting_generations >= self.max_queue:
            raise PoolBusy(spec.key, queue_size=self.max_queue)
        send, receive = anyio.create_memory_object_stream[GenerationChunk | BaseException](1)
        cancel = threading.Event()
        if self._task_group is None:
            raise Cancelled("the pool shut down")
        state.waiting_generations += 1
        self._task_group.start_soon(
            self._run_generation, state, backend, prompt, config, send, cancel
        )
        try:
            async with receive:
                async for chunk in receive:
                    if isinstance(chunk, BaseException):
                        raise chunk
                    yield chunk
        finally:
            cancel.set()

    async def load(self, spec: ModelSpec, backend: Backend) -> None:
        """Cold-start a model now (preloading), so its first request finds it warm."""
        await self._ensure_ready(self._state(spec, backend))

    def stats(self) -> dict[str, KeyStats]:
        """A frozen snapshot per key."""
        snapshot: dict[str, KeyStats] = {}
        for state in self._states.values():
            key = state.spec.key
            while key in snapshot:  # the same key from two registries
                key += "'"
            snapshot[key] = self._stats(state)
        return snapshot

    async def evict_idle(self) -> list[str]:
        """Evict every model idle for longer than its keep-alive; return their keys.

        The maintenance task calls this periodically; tests call it with a fake clock.
        """
        now = self.clock.now()
        evicted = []
        for state in list(self._states.values()):
            key = state.spec.key
            keep_alive = self.keep_alive_per_key.get(key, self.keep_alive)
            if state.idle and state.last_used is not None and now - state.last_used > keep_alive:
                await self._unload(state, reason=f"idle for {now - state.last_used:.0f} s")
                evicted.append(key)
        return evicted

    async def evict(self, key: str) -> bool:
        """Evict one model now if it is idle; return whether it was."""
        found = False
        for state in list(self._states.values()):
            if state.spec.key == key and state.idle:
                await self._unload(state, reason="evicted on request")
                found = True
        return found

    # -- cold start ---------------------------------------------------------------------

    def _state(self, spec: ModelSpec, backend: Backend) -> _KeyState:
        if not self.running:
            raise LimnerError("the pool is not running; use it inside `async with Pool()`")
        state = self._states.get(backend)
        if state is None:
            state = _KeyState(spec=spec, backend=backend, queue=_Queue(spec.key, self.max_queue))
            self._states[backend] = state
        return state

    async def _ensure_ready(self, state: _KeyState) -> None:
        while state.state != "ready" or not state.workers:
            if state.state == "loading":
                assert state.load_done is not None
                await state.load_done.wait()
                if state.load_error is not None:
                    raise state.load_error
                continue
            if state.load_error is not None and self.clock.now() < state.retry_at:
                wait = state.retry_at - self.clock.now()
                raise ModelLoadError(f"{state.load_error} (next try in {wait:.1f} s)")
            _claim(state.backend, self)
            state.state = "loading"
            state.load_error = None
            state.load_done = anyio.Event()
            assert self._task_group is not None
            self._task_group.start_soon(self._cold_start, state)

    async def _cold_start(self, state: _KeyState) -> None:
        key = state.spec.key
        assert state.load_done is not None
        reserved = 0.0
        try:
            if state.device is None:
                state.device = await anyio.to_thread.run_sync(state.backend.memory_device)
            device = state.device
            async with self._admission:
                count, need = await self._fit(state, device)
                reserved = need
                self._reserved_mb[device] = self._reserved_mb.get(device, 0.0) + need
            if state.released is not None:
                await state.released.wait()  # the previous copy's unload comes first
            started = self.clock.now()
            state.baseline = dict(vars(state.backend))
            await self.placement.load(state.backend)
            state.loaded = True
            await anyio.lowlevel.checkpoint()  # a shutdown during the load surfaces here
            state.load_seconds += self.clock.now() - started
            state.loads += 1
            measured = state.backend.memory_mb()
            if measured is not None:
                state.worker_mb = measured
            state.accounted_mb = self._need(state, count)
            concurrent = state.backend.max_concurrent_calls() or count
            state.slots = anyio.CapacityLimiter(min(count, concurrent))
            state.compute = anyio.CapacityLimiter(min(count, concurrent))
            assert self._task_group is not None
            for _ in range(count):
                scope = anyio.CancelScope()
                state.workers.append(scope)
                self._task_group.start_soon(self._worker, state, scope)
            state.state = "ready"
            state.failures = 0
            state.last_used = self.clock.now()
            log.info(
                "loaded %s on %s: %d worker(s), %.0f MB, %.2f s",
                key,
                device,
                count,
                state.accounted_mb,
                self.clock.now() - started,
            )
        except BaseException as error:
            state.state = "cold"
            if not state.loaded:
                _disown(state.backend, self)
            if not isinstance(error, Exception):  # the pool is shutting down mid-load
                state.load_error = Cancelled(f"the pool shut down while loading {key}")
                raise
            if isinstance(error, LimnerError):
                state.load_error = error
            else:
                wrapped = ModelLoadError(f"could not load {key}: {error!r}")
                wrapped.__cause__ = error
                state.load_error = wrapped
            if not isinstance(error, MemoryExhausted):
                state.failures += 1
                low, high = self.load_retry_backoff
                state.retry_at = self.clock.now() + min(high, low * 2 ** (state.failures - 1))
            log.warning("cold start of %s failed: %s", key, state.load_error)
        finally:
            if reserved and state.device is not None:
                self._reserved_mb[state.device] -= reserved
            state.load_done.set()

    def _per_worker_mb(self, state: _KeyState) -> float:
        return state.worker_mb if state.worker_mb is not None else state.spec.info.memory_mb

    def _need(self, state: _KeyState, workers: int) -> float:
        first = self._per_worker_mb(state)
        overhead = state.spec.info.worker_overhead_mb
        each_extra = first if overhead is None else overhead
        return first + (workers - 1) * each_extra

    def _room(self, device: str) -> tuple[float, float]:
        """(used including in-progress loads, budget) for a device, in MB."""
        total = self.memory.total_mb(device)
        budget = self.memory_budget_mb or total * self.memory_budget_fraction
        used = self.memory.used_mb(device) + self._reserved_mb.get(device, 0.0)
        return used, budget

    async def _fit(self, state: _KeyState, device: str) -> tuple[int, float]:
        """How many workers to start: 2 if they fit, else 1, evicting LRU idle models."""
        while True:
            used, budget = self._room(device)
            for count in range(self.max_workers, 0, -1):
                need = self._need(state, count)
                if used + need <= budget:
                    return count, need
            victim = self._least_recently_used_idle(device, exclude=state)
            if victim is None:
                raise MemoryExhausted(
                    state.spec.key, need_mb=self._need(state, 1), available_mb=max(0, budget - used)
                )
            await self._unload(victim, reason=f"making room for {state.spec.key}")

    def _least_recently_used_idle(self, device: str, *, exclude: _KeyState) -> _KeyState | None:
        idle = [
            s for s in self._states.values() if s is not exclude and s.device == device and s.idle
        ]
        return min(idle, key=lambda s: s.last_used or 0.0, default=None)

    def _retire(self, state: _KeyState) -> anyio.Event:
        """Stop a key's workers and mark it cold now; its weights go in ``_release``.

        The returned event is set once they are gone: a cold start of the same key waits for
        it, so a reload never runs beside (or before) the unload it follows.
        """
        for scope in state.workers:
            scope.cancel()
        state.workers.clear()
        # Nobody serves this queue any more: its callers submit again (and cold-start it).
        state.queue.answer_all(_Requeue())
        state.state = "cold"
        state.loaded = False
        state.accounted_mb = 0.0
        state.released = anyio.Event()
        return state.released

    async def _release(self, state: _KeyState, released: anyio.Event) -> None:
        baseline, state.baseline = state.baseline, None
        with anyio.CancelScope(shield=True):
            try:
                await self.placement.unload(state.backend, baseline=baseline)
            except Exception:
                log.exception("unloading %s failed", state.spec.key)
            finally:
                _disown(state.backend, self)
                released.set()

    async def _unload(self, state: _KeyState, *, reason: str) -> None:
        freed = state.accounted_mb
        state.evictions += 1
        await self._release(state, self._retire(state))
        log.info("evicted %s (%s), freed about %.0f MB", state.spec.key, reason, freed)

    # -- workers ------------------------------------------------------------------------

    async def _submit(
        self, state: _KeyState, kind: RequestKind, chunks: list[list[Any]]
    ) -> list[Vector]:
        """Queue one call's chunks and wait for every answer, in order.

        A chunk handed back because its model was retired before running it is submitted
        again (after a fresh cold start), a bounded number of times.
        """
        results: list[Vector | None] = [None] * len(chunks)
        pending = list(range(len(chunks)))
        for _ in range(_MAX_REQUEUES + 1):
            await self._ensure_ready(state)
            if self._task_group is None:
                raise Cancelled("the pool shut down")
            requests = [(index, _Request(kind, chunks[index])) for index in pending]
            state.queue.put_all([request for _, request in requests])
            try:
                for _, request in requests:
                    await request.done.wait()
                    if request.error is not None and not isinstance(request.error, _Requeue):
                        raise request.error
            except BaseException:
                for _, request in requests:
                    request.cancelled = True
                raise
            pending = []
            for index, request in requests:
                if isinstance(request.error, _Requeue):
                    pending.append(index)
                else:
                    results[index] = request.result
            if not pending:
                return [result for result in results if result is not None]
        raise ModelError(
            f"{state.spec.key} was unloaded {_MAX_REQUEUES + 1} times before it could run "
            "this request; the pool is evicting it faster than it serves (raise the memory "
            "budget or keep_alive)"
        )

    async def _worker(self, state: _KeyState, scope: anyio.CancelScope) -> None:
        assert state.compute is not None
        with scope:
            while True:
                await state.queue.wait()
                # Take the batch only once it can run: whatever queues meanwhile joins it.
                async with state.compute:
                    batch: list[_Request] = []
                    try:
                        self._take_batch(state, batch)
                        if not batch:
                            continue
                        if self.max_batch_wait > 0 and state.busy_workers > 0:
                            await self._top_up(state, batch)
                        state.busy_workers += 1
                        try:
                            died = await self._run_batch(state, batch)
                        finally:
                            state.busy_workers -= 1
                    finally:
                        # Whatever stopped this worker (eviction, shutdown, death), no caller
                        # whose request it took is left waiting.
                        self._answer_unfinished(batch)
                        state.in_flight -= len(batch)
                if died:
                    self._worker_died(state, scope)
                    return

    def _answer_unfinished(self, batch: list[_Request]) -> None:
        unanswered = [request for request in batch if not request.done.is_set()]
        if not unanswered:
            return
        error: BaseException = (
            Cancelled("the pool shut down") if self._closing or not self.running else _Requeue()
        )
        for request in unanswered:
            request.finish(error=error)

    def _take_batch(self, state: _KeyState, batch: list[_Request]) -> None:
        """Move requests from the queue into ``batch`` while they fit.

        Taken requests count as in flight at once, so a model holding a batch that waits to
        fill up never looks idle to eviction.
        """
        size = sum(len(r.items) for r in batch)
        limit = state.spec.info.max_batch_size
        queue = state.queue
        queue.discard_cancelled()
        while queue.items:
            head = queue.items[0]
            if head.cancelled:
                queue.items.popleft()
                continue
            if batch and (head.kind != batch[0].kind or size + len(head.items) > limit):
                break
            batch.append(queue.items.popleft())
            state.in_flight += 1
            size += len(head.items)

    async def _top_up(self, state: _KeyState, batch: list[_Request]) -> None:
        """Other batches are running: wait briefly for this one to fill up."""
        limit = state.spec.info.max_batch_size
        with anyio.move_on_after(self.max_batch_wait):
            while sum(len(r.items) for r in batch) < limit:
                await state.queue.wait()
                before = len(batch)
                self._take_batch(state, batch)
                if len(batch) == before:
                    break

    async def _run_batch(self, state: _KeyState, batch: list[_Request]) -> bool:
        """Run one batch and answer its callers; return True if the worker died."""
        backend = state.backend
        assert isinstance(backend, ImageEmbeddingBackend)
        function = backend.embed_prepared if batch[0].kind == "image" else backend.embed_texts
        items = [item for request in batch for item in request.items]
        try:
            try:
                returned = await self._call_with_oom_retry(function, items)
                vectors = checked_vectors(
                    returned,
                    rows=len(items),
                    dimension=state.spec.info.embedding_dimension,
                    source=describe_backend(state.spec.key, backend),
                )
            except Exception as error:
                failure = error if isinstance(error, ModelError) else None
                if failure is None:
                    failure = ModelError(
                        f"{describe_backend(state.spec.key, backend)} failed on a batch of "
                        f"{len(items)}: {error!r}"
                    )
                    failure.__cause__ = error
                for request in batch:
                    request.finish(error=failure)
                return _is_out_of_memory(error)
            start = 0
            for request in batch:
                end = start + len(request.items)
                request.finish(result=vectors[start:end])
                start = end
            state.batches += 1
            state.batched_items += len(items)
            return False
        finally:
            state.last_used = self.clock.now()
            self._progress.set()

    async def _call_with_oom_retry(
        self, function: Callable[[list[Any]], Vector], items: list[Any]
    ) -> Vector:
        try:
            return await self.placement.call(function, items)
        except Exception as error:
            if not _is_out_of_memory(error) or len(items) < 2:
                raise
            log.warning("out of memory on a batch of %d; retrying as two halves", len(items))
            half = len(items) // 2
            first = await self.placement.call(function, items[:half])
            second = await self.placement.call(function, items[half:])
            return np.concatenate([first, second])

    def _worker_died(self, state: _KeyState, scope: anyio.CancelScope) -> None:
        if scope in state.workers:
            state.workers.remove(scope)
        log.error("a worker of %s died; %d left", state.spec.key, len(state.workers))
        if not state.workers:
            assert self._task_group is not None
            self._task_group.start_soon(self._release, state, self._retire(state))

    # -- generation ---------------------------------------------------------------------

    async def _run_generation(
        self,
        state: _KeyState,
        backend: TextToImageBackend,
        prompt: str,
        config: ImageGenerationConfig,
        send: anyio.abc.ObjectSendStream[GenerationChunk | BaseException],
        cancel: threading.Event,
    ) -> None:
        async with send:
            try:
                assert state.slots is not None
                async with state.slots:
                    state.waiting_generations -= 1
                    state.generations += 1
                    try:
                        result = await self._generate_in_thread(
                            backend, prompt, config, send, cancel
                        )
                    finally:
                        state.generations -= 1
                        state.last_used = self.clock.now()
                        self._progress.set()
                await send.send(result)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the consumer went away; nothing left to tell it
            except Cancelled:
                pass  # the consumer cancelled; the thread stopped at a step
            except Exception as error:
                wrapped = (
                    error
                    if isinstance(error, LimnerError)
                    else ModelError(f"{state.spec.key} failed while generating: {error!r}")
                )
                if wrapped is not error:
                    wrapped.__cause__ = error
                try:
                    await send.send(wrapped)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    log.info("generation error after the consumer left: %r", error)

    async def _generate_in_thread(
        self,
        backend: TextToImageBackend,
        prompt: str,
        config: ImageGenerationConfig,
        send: anyio.abc.ObjectSendStream[GenerationChunk | BaseException],
        cancel: threading.Event,
    ) -> GenerationResult:
        def on_step(progress: Progress) -> None:
            if cancel.is_set():
                raise Cancelled("the consumer stopped reading")
            try:
                anyio.from_thread.run(send.send, progress)  # blocks: backpressure
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as gone:
                raise Cancelled("the consumer went away") from gone
            if cancel.is_set():
                raise Cancelled("the consumer stopped reading")

        def run() -> GenerationResult:
            return backend.generate(prompt, config, on_step=on_step)

        return await self.placement.call(run)

    # -- maintenance --------------------------------------------------------------------

    async def _maintenance(self) -> None:
        while True:
            await anyio.sleep(self.maintenance_interval)
            try:
                await self.evict_idle()
            except Exception:
                log.exception("pool maintenance failed")

    def _stats(self, state: _KeyState) -> KeyStats:
        return KeyStats(
            key=state.spec.key,
            state=state.state,
            workers=len(state.workers),
            queue_depth=len(state.queue),
            in_flight=state.in_flight + state.generations,
            batches=state.batches,
            mean_batch_size=state.batched_items / state.batches if state.batches else 0.0,
            loads=state.loads,
            load_seconds=state.load_seconds,
            evictions=state.evictions,
            memory_mb=state.accounted_mb,
            device=state.device,
            last_used=state.last_used,
        )


def _is_out_of_memory(error: BaseException) -> bool:
    """MemoryError, or torch's CUDA out-of-memory error (matched by name: no torch import)."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
