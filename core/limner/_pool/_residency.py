"""Which models are loaded, and the memory they hold.

Cold starts within the memory budget (the plan comes from ``_policy``), eviction, and the
release of weights. A key's weights belong to one pool at a time: the pool that loads a
backend claims it, and releasing the weights gives the claim up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from limner._backends import Backend
from limner._readings import Clock, MemoryProbe
from limner._weights import check_weights_reachable
from limner.errors import Cancelled, LimnerError, MemoryExhausted, ModelLoadError

from ._batching import Requeue
from ._keys import KeyState
from ._policy import Evict, NoRoom, plan_cold_start, retry_delay, workers_need_mb
from ._threads import ThreadExecutor

__all__ = ["Residency"]

log = logging.getLogger("limner.pool")

Spawn = Callable[..., None]
"""Starts a task in the pool's task group: ``spawn(function, *args)``."""


class Residency:
    """Loads and unloads models for one pool, within its memory budget."""

    def __init__(
        self,
        *,
        owner: object,
        keys: dict[Backend, KeyState],
        memory: MemoryProbe,
        clock: Clock,
        executor: ThreadExecutor,
        budget_fraction: float,
        budget_mb: float | None,
        max_workers: int,
        retry_backoff: tuple[float, float],
        spawn: Spawn,
        worker: Callable[[KeyState, anyio.CancelScope], Coroutine[Any, Any, None]],
    ) -> None:
        self.owner = owner
        self.keys = keys
        self.memory = memory
        self.clock = clock
        self.executor = executor
        self.budget_fraction = budget_fraction
        self.budget_mb = budget_mb
        self.max_workers = max_workers
        self.retry_backoff = retry_backoff
        self.spawn = spawn
        self.worker = worker
        self.reserved_mb: dict[str, float] = {}  # by device, for loads in progress
        self.admission = anyio.Lock()  # serialises memory decisions, never held during a load

    async def ensure_ready(self, state: KeyState) -> None:
        while state.phase != "ready" or not state.workers:
            if state.phase == "loading":
                assert state.load_done is not None
                await state.load_done.wait()
                if state.load_error is not None:
                    raise state.load_error
                continue
            if state.load_error is not None and self.clock.now() < state.retry_at:
                wait = state.retry_at - self.clock.now()
                raise ModelLoadError(f"{state.load_error} (next try in {wait:.1f} s)")
            _claim(state.backend, self.owner)
            state.phase, state.load_error, state.load_done = "loading", None, anyio.Event()
            self.spawn(self._cold_start, state)

    async def _cold_start(self, state: KeyState) -> None:
        key, started, reserved = state.spec.key, self.clock.now(), 0.0
        assert state.load_done is not None
        try:
            # Weights that cannot be had are the first thing to say, before any talk of memory.
            await anyio.to_thread.run_sync(
                check_weights_reachable, state.spec, getattr(state.backend, "settings", None)
            )
            if state.device is None:
                state.device = await self.executor.memory_device(state.backend)
            async with self.admission:
                workers, reserved = await self._admit(state, state.device)
                self.reserved_mb[state.device] = self.reserved_mb.get(state.device, 0) + reserved
            if state.released is not None:
                await state.released.wait()  # the previous copy's unload comes first
            state.baseline = dict(vars(state.backend))
            await self.executor.load(state.backend)
            state.loaded = True
            await anyio.lowlevel.checkpoint()  # a shutdown during the load surfaces here
            self._start_workers(state, workers, started)
        except BaseException as error:
            state.phase = "cold"
            if not state.loaded:
                _disown(state.backend, self.owner)
            if not isinstance(error, Exception):  # the pool is shutting down mid-load
                state.load_error = Cancelled(f"the pool shut down while loading {key}")
                raise
            state.load_error = error
            if not isinstance(error, LimnerError):
                state.load_error = ModelLoadError(f"could not load {key}: {error!r}")
                state.load_error.__cause__ = error
            if not isinstance(error, MemoryExhausted):
                state.failures += 1
                delay = retry_delay(state.failures, self.retry_backoff)
                state.retry_at = self.clock.now() + delay
            log.warning("cold start of %s failed: %s", key, state.load_error)
        finally:
            if reserved and state.device is not None:
                self.reserved_mb[state.device] -= reserved
            state.load_done.set()

    async def _admit(self, state: KeyState, device: str) -> tuple[int, float]:
        """How many workers to start and the memory they need, evicting LRU idle models."""
        while True:
            total = self.memory.total_mb(device)
            budget = self.budget_mb or total * self.budget_fraction
            used = self.memory.used_mb(device) + self.reserved_mb.get(device, 0.0)
            idle = [
                (other, other.last_used)
                for other in self.keys.values()
                if other is not state and other.device == device and other.idle
            ]
            needs = [self._need(state, n) for n in range(1, self.max_workers + 1)]
            plan = plan_cold_start(need_mb=needs, used_mb=used, budget_mb=budget, idle=idle)
            if isinstance(plan, Evict):
                await self.unload(plan.victim, reason=f"making room for {state.spec.key}")
            elif isinstance(plan, NoRoom):
                raise MemoryExhausted(
                    state.spec.key, need_mb=plan.need_mb, available_mb=plan.available_mb
                )
            else:
                return plan.workers, plan.need_mb

    def _need(self, state: KeyState, workers: int) -> float:
        per_worker = state.worker_mb if state.worker_mb is not None else state.spec.info.memory_mb
        return workers_need_mb(per_worker, state.spec.info.worker_overhead_mb, workers)

    def _start_workers(self, state: KeyState, workers: int, started: float) -> None:
        state.load_seconds += self.clock.now() - started
        state.loads += 1
        measured = state.backend.memory_mb()
        if measured is not None:
            state.worker_mb = measured
        state.accounted_mb = self._need(state, workers)
        concurrent = state.backend.max_concurrent_calls() or workers
        state.slots = anyio.CapacityLimiter(min(workers, concurrent))
        for _ in range(workers):
            scope = anyio.CancelScope()
            state.workers.append(scope)
            self.spawn(self.worker, state, scope)
        state.phase, state.failures, state.last_used = "ready", 0, self.clock.now()
        log.info(
            "loaded %s on %s: %d worker(s), %.0f MB, %.2f s",
            *(state.spec.key, state.device, workers, state.accounted_mb),
            self.clock.now() - started,
        )

    def retire(self, state: KeyState) -> anyio.Event:
        """Stop a key's workers and mark it cold now; its weights go in ``_release``.

        Its queue is handed back to the callers, who submit again (a fresh cold start). The
        returned event is set once the weights are gone: a cold start of the same key waits
        for it, so a reload never runs beside (or before) the unload it follows.
        """
        for scope in state.workers:
            scope.cancel()
        state.workers.clear()
        state.queue.answer_all(Requeue())
        state.phase, state.loaded, state.accounted_mb = "cold", False, 0.0
        state.released = anyio.Event()
        return state.released

    async def release(self, state: KeyState, released: anyio.Event) -> None:
        baseline, state.baseline = state.baseline, None
        with anyio.CancelScope(shield=True):
            try:
                await self.executor.unload(state.backend, baseline=baseline)
            except Exception:
                log.exception("unloading %s failed", state.spec.key)
            finally:
                _disown(state.backend, self.owner)
                released.set()

    async def unload(self, state: KeyState, *, reason: str) -> None:
        freed = state.accounted_mb
        state.evictions += 1
        await self.release(state, self.retire(state))
        log.info("evicted %s (%s), freed about %.0f MB", state.spec.key, reason, freed)


def _claim(backend: Backend, owner: object) -> None:
    """Mark ``backend``'s weights as this pool's; two pools never load one backend at once."""
    claimed_by = getattr(backend, "_limner_pool", None)
    if claimed_by is not None and claimed_by is not owner:
        raise LimnerError(
            f"{backend.spec.key} is loaded in another pool; evict it there first "
            "(`await pool.evict(key)`), or use one pool per process"
        )
    backend._limner_pool = owner  # type: ignore[attr-defined]


def _disown(backend: Backend, owner: object) -> None:
    """Give up the claim once the weights are gone, so another pool may load them."""
    if getattr(backend, "_limner_pool", None) is owner:
        del backend._limner_pool  # type: ignore[attr-defined]
