"""Which models are loaded, and the memory they hold.

Loads, unloads and the accounting of memory per device; which model loads or goes when is
the scheduler's decision (``_scheduler``). A key's weights belong to one pool at a time: the
pool that loads a backend claims it, and releasing the weights gives the claim up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from limner._pool._readings import Clock, MemoryProbe
from limner.errors import Cancelled, LimnerError, MemoryExhausted, ModelLoadError
from limner.plugin._backends import Backend
from limner.plugin._weights import check_weights_reachable

from ._keys import KeyState
from ._options import PoolOptions
from ._policy import (
    Evict,
    Reclaimable,
    Room,
    budget_mb,
    floor_mb,
    plan_cold_start,
    plan_reclaim,
    retry_delay,
    workers_need_mb,
)
from ._threads import ThreadExecutor

__all__ = ["Residency", "claimed_elsewhere"]

log = logging.getLogger("limner.pool")

Spawn = Callable[..., None]
"""Starts a task in the pool's task group: ``spawn(function, *args)``."""


class Residency:
    """Loads and unloads models for one pool, and counts the memory they hold."""

    def __init__(
        self,
        *,
        owner: object,
        keys: dict[Backend, KeyState],
        memory: MemoryProbe,
        clock: Clock,
        executor: ThreadExecutor,
        options: PoolOptions,
        spawn: Spawn,
        worker: Callable[[KeyState, anyio.CancelScope], Coroutine[Any, Any, None]],
        changed: Callable[[], None],
    ) -> None:
        self.owner = owner
        self.keys = keys
        self.memory = memory
        self.clock = clock
        self.executor = executor
        self.options = options
        self.spawn = spawn
        self.worker = worker
        self.changed = changed  # tells the scheduler to look again
        self.reserved_mb: dict[str, float] = {}  # by device, for loads in progress
        self.releasing_mb: dict[str, float] = {}  # by device, for unloads in progress

    # -- memory -----------------------------------------------------------------------------

    def room(self, device: str) -> Room:
        """The device's memory as the pool counts it: its models against the budget, the
        machine's available memory against the floor."""
        total = self.memory.total_mb(device)
        reserved = self.reserved_mb.get(device, 0.0)
        releasing = self.releasing_mb.get(device, 0.0)
        held = sum(s.accounted_mb for s in self.keys.values() if s.device == device and s.loaded)
        options = self.options
        return Room(
            budget_mb=budget_mb(
                total_mb=total,
                fraction=options.memory_budget_fraction,
                absolute_mb=options.memory_budget_mb,
            ),
            pool_mb=held + reserved + releasing,
            available_mb=total - self.memory.used_mb(device) - reserved,
            floor_mb=floor_mb(total_mb=total, floor=options.memory_floor_mb),
            loading_mb=reserved,
            releasing_mb=releasing,
        )

    def need(self, state: KeyState, workers: int) -> float:
        per_worker = state.worker_mb if state.worker_mb is not None else state.spec.info.memory_mb
        return workers_need_mb(per_worker, state.spec.info.worker_overhead_mb, workers)

    # -- what loaded models take on and drop while they serve -------------------------------

    def remeasure(self, state: KeyState) -> None:
        """Read a loaded model's footprint again (it loaded or dropped adapters): its
        accounted memory follows."""
        if not state.loaded or state.worker_mb is None:
            return
        measured = state.backend.memory_mb()
        if measured is not None:
            state.accounted_mb += measured - state.worker_mb
            state.worker_mb = measured

    def reclaimable(self, device: str) -> list[Reclaimable[KeyState]]:
        """What the models loaded on ``device`` can drop now (``Backend.caches``)."""
        parts = []
        for state in self.keys.values():
            if state.device != device or not state.loaded or state.phase != "ready":
                continue
            for part in state.backend.caches():
                parts.append(Reclaimable(state, part.name, part.memory_mb, part.last_used))
        return parts

    async def reclaim(self, parts: list[Reclaimable[KeyState]]) -> None:
        """Drop ``parts`` (each model its own, in a thread), then measure those models again."""
        by_model: dict[KeyState, list[str]] = {}
        for part in parts:
            by_model.setdefault(part.model, []).append(part.name)
        for state, names in by_model.items():
            try:
                await anyio.to_thread.run_sync(state.backend.drop_caches, names)
            except Exception:
                log.exception("%s failed to drop %s", state.spec.key, ", ".join(names))
            self.remeasure(state)
            log.info("%s dropped %s to make room", state.spec.key, ", ".join(names))

    async def make_room(self, device: str, need_mb: float, *, exclude: KeyState) -> bool:
        """Free room for ``need_mb`` on ``device``, one step: the least recently used parts
        loaded models can drop, when they are enough; else the least recently used idle
        model other than ``exclude``. Returns whether it did something (look again)."""
        shortfall = need_mb - self.room(device).free_mb
        chosen = plan_reclaim(shortfall_mb=shortfall, parts=self.reclaimable(device))
        if chosen:
            await self.reclaim(chosen)
            return True
        idle = [
            (s, s.last_used)
            for s in self.keys.values()
            if s is not exclude and s.device == device and s.loaded and s.idle and not s.draining
        ]
        plan = plan_cold_start(need_mb=[shortfall], used_mb=0.0, budget_mb=0.0, idle=idle)
        if isinstance(plan, Evict):
            victim: KeyState = plan.victim
            victim.swaps += 1
            await self.unload(victim, reason=f"idle; making room for {exclude.spec.key}")
            return True
        return False

    async def reserve(self, state: KeyState, memory_mb: float, what: str) -> None:
        """A loaded model is about to take on ``memory_mb`` more (``reserve_memory``): make
        the room and count it, or raise ``MemoryExhausted``."""
        assert state.device is not None
        while memory_mb > self.room(state.device).free_mb:
            if not await self.make_room(state.device, memory_mb, exclude=state):
                room = self.room(state.device)
                raise MemoryExhausted(
                    state.spec.key,
                    need_mb=memory_mb,
                    available_mb=max(0.0, room.free_mb),
                    what=what,
                )
        state.accounted_mb += memory_mb
        if state.worker_mb is not None:
            state.worker_mb += memory_mb

    # -- loading ----------------------------------------------------------------------------

    async def resolve_device(self, state: KeyState) -> None:
        """Which device ``state``'s model uses (once per key, when its first caller comes):
        its callers wait in that device's line."""
        async with state.device_lock:
            if state.device is not None:
                return
            try:
                state.device = await self.executor.memory_device(state.backend)
            except LimnerError:
                raise  # the plugin's own words: a device it cannot have, say
            except Exception as error:
                raise ModelLoadError(
                    f"could not tell which device {state.spec.key} uses: {error!r}"
                ) from error

    async def prepare(self, state: KeyState) -> None:
        """Before any talk of memory, at each cold start: are the weights to be had?"""
        try:
            await anyio.to_thread.run_sync(
                check_weights_reachable, state.spec, getattr(state.backend, "settings", None)
            )
            if state.device is None:
                state.device = await self.executor.memory_device(state.backend)
            state.prepared = True
        except Exception as error:
            self.failed(state, error)
        finally:
            state.preparing = False
            self.changed()

    def begin_load(self, state: KeyState, workers: int, need_mb: float) -> None:
        """Load ``state`` with ``workers`` workers, reserving ``need_mb`` until it is done."""
        assert state.device is not None
        _claim(state.backend, self.owner)
        state.phase, state.load_error, state.load_done = "loading", None, anyio.Event()
        self.reserved_mb[state.device] = self.reserved_mb.get(state.device, 0.0) + need_mb
        state.notify()
        self.spawn(self._load, state, workers, need_mb)

    async def _load(self, state: KeyState, workers: int, reserved: float) -> None:
        key, started = state.spec.key, self.clock.now()
        assert state.load_done is not None and state.device is not None
        try:
            if state.released is not None:
                await state.released.wait()  # the previous copy's unload comes first
            state.baseline = dict(vars(state.backend))
            await self.executor.load(state.backend)
            state.loaded = True
            await anyio.lowlevel.checkpoint()  # a shutdown during the load surfaces here
            self._start_workers(state, workers, started)
        except BaseException as error:
            if not state.loaded:
                _disown(state.backend, self.owner)
            if not isinstance(error, Exception):  # the pool is shutting down mid-load
                state.phase = "cold"
                state.load_error = Cancelled(f"the pool shut down while loading {key}")
                raise
            self.failed(state, error)
        finally:
            self.reserved_mb[state.device] -= reserved
            state.load_done.set()
            state.notify()
            self.changed()

    def failed(self, state: KeyState, error: BaseException) -> None:
        """A key could not be had: its waiting callers get the (typed) error, and a load
        that failed is not tried again before its backoff."""
        state.phase, state.prepared = "cold", False
        if not isinstance(error, LimnerError):
            wrapped = ModelLoadError(f"could not load {state.spec.key}: {error!r}")
            wrapped.__cause__ = error
            error = wrapped
        state.load_error = error
        if not isinstance(error, MemoryExhausted):
            state.failures += 1
            state.retry_at = self.clock.now() + retry_delay(
                state.failures, self.options.load_retry_backoff
            )
            log.warning("cold start of %s failed: %s", state.spec.key, error)
        answer_waiters(state, error)

    def _start_workers(self, state: KeyState, workers: int, started: float) -> None:
        took = self.clock.now() - started
        state.load_seconds += took
        state.last_load_seconds = took
        state.loads += 1
        measured = state.backend.memory_mb()
        if measured is not None:
            state.worker_mb = measured
        state.accounted_mb = self.need(state, workers)
        concurrent = state.backend.max_concurrent_calls() or workers
        state.slots = anyio.CapacityLimiter(min(workers, concurrent))
        for _ in range(workers):
            scope = anyio.CancelScope()
            state.workers.append(scope)
            self.spawn(self.worker, state, scope)
        state.phase, state.failures, state.last_used = "ready", 0, self.clock.now()
        state.turn_started, state.served_in_turn, state.draining = self.clock.now(), 0, False
        log.info(
            "loaded %s on %s: %d worker(s), %.0f MB, %.2f s",
            *(state.spec.key, state.device, workers, state.accounted_mb, took),
        )

    # -- unloading --------------------------------------------------------------------------

    def retire(self, state: KeyState) -> anyio.Event:
        """Stop a key's workers and mark it cold now; its weights go in :meth:`release`.

        Its queue stays: whoever waits there waits for the key's next turn. The memory it
        held counts as being released until the weights are gone; the returned event is set
        then, and a cold start of the same key waits for it, so a reload never runs beside
        (or before) the unload it follows.
        """
        for scope in state.workers:
            scope.cancel()
        state.workers.clear()
        if state.device is not None and state.loaded:
            self.releasing_mb[state.device] = (
                self.releasing_mb.get(state.device, 0.0) + state.accounted_mb
            )
        state.phase, state.loaded, state.draining, state.prepared = "cold", False, False, False
        state.released = anyio.Event()
        state.notify()
        return state.released

    async def release(self, state: KeyState, released: anyio.Event) -> None:
        baseline, state.baseline = state.baseline, None
        freed, state.accounted_mb = state.accounted_mb, 0.0
        with anyio.CancelScope(shield=True):
            try:
                await self.executor.unload(state.backend, baseline=baseline)
            except Exception:
                log.exception("unloading %s failed", state.spec.key)
            finally:
                _disown(state.backend, self.owner)
                if state.device is not None and state.device in self.releasing_mb:
                    self.releasing_mb[state.device] -= freed
                released.set()
                self.changed()

    async def unload(self, state: KeyState, *, reason: str) -> None:
        freed = state.accounted_mb
        state.evictions += 1
        await self.release(state, self.retire(state))
        log.info("evicted %s (%s), freed about %.0f MB", state.spec.key, reason, freed)


def answer_waiters(state: KeyState, error: BaseException) -> None:
    """Every caller waiting for ``state`` gets ``error``: queued requests and tickets."""
    state.queue.answer_all(error)
    for ticket in state.tickets:
        ticket.error = error
    state.tickets.clear()
    state.notify()


def claimed_elsewhere(backend: Backend, owner: object) -> LimnerError | None:
    """The error for a caller of ``backend`` when another pool holds its weights."""
    claimed_by = getattr(backend, "_limner_pool", None)
    if claimed_by is not None and claimed_by is not owner:
        return LimnerError(
            f"{backend.spec.key} is loaded in another pool; evict it there first "
            "(`await pool.evict(key)`), or use one pool per process"
        )
    return None


def _claim(backend: Backend, owner: object) -> None:
    """Mark ``backend``'s weights as this pool's; two pools never load one backend at once."""
    error = claimed_elsewhere(backend, owner)
    if error is not None:
        raise error
    backend._limner_pool = owner  # type: ignore[attr-defined]


def _disown(backend: Backend, owner: object) -> None:
    """Give up the claim once the weights are gone, so another pool may load them."""
    if getattr(backend, "_limner_pool", None) is owner:
        del backend._limner_pool  # type: ignore[attr-defined]
