"""Turns: one task that shares each device's budget between the models callers wait for.

Whenever something changes (a caller queues for a cold model, work finishes, memory frees,
a load ends) the scheduler looks again: models whose turn was drained and whose work is done
are unloaded, then, per device, the cold models with waiting callers are planned in line
(oldest caller first) with ``_policy.plan_turn``: load, evict an idle model, drain busy ones
whose turn is over, wait, or refuse (``MemoryExhausted``). The decisions are the policy's;
this module only reads the state and does what it says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn

import anyio

from limner._pool._readings import Clock
from limner.errors import MemoryExhausted, ModelLoadError
from limner.plugin._backends import Backend

from ._keys import KeyState
from ._options import PoolOptions
from ._policy import (
    Drain,
    Evict,
    NoRoom,
    Resident,
    Start,
    next_in_line,
    plan_reclaim,
    plan_turn,
    retry_after,
    turn_seconds,
)
from ._residency import Residency, answer_waiters, claimed_elsewhere

__all__ = ["PATIENCE_SHARE", "RECHECK_SECONDS", "Scheduler", "backoff_error"]

log = logging.getLogger("limner.pool")

#: A model whose oldest caller has waited this share of ``max_wait`` loads before those with
#: more callers waiting (see ``_policy.next_in_line``).
PATIENCE_SHARE = 0.25

#: While callers wait, the scheduler looks again at least this often: memory readings (the
#: floor) change without telling it.
RECHECK_SECONDS = 1.0


class Scheduler:
    """Decides which models hold memory, for one pool; ``run`` is its task."""

    def __init__(
        self,
        *,
        owner: object,
        keys: dict[Backend, KeyState],
        residency: Residency,
        options: PoolOptions,
        clock: Clock,
        spawn: Callable[..., None],
    ) -> None:
        self.owner = owner
        self.keys = keys
        self.residency = residency
        self.options = options
        self.clock = clock
        self.spawn = spawn
        self._wake = anyio.Event()

    def kick(self) -> None:
        """Something changed: look again soon (the next round runs once this task yields)."""
        self._wake.set()

    def turn_seconds(self, state: KeyState) -> float:
        return turn_seconds(
            min_turn=self.options.min_turn,
            load_seconds=state.last_load_seconds,
            max_wait=self.options.max_wait,
        )

    def retry_after(self, state: KeyState) -> float:
        """What a caller refused for ``state`` is told to wait before trying again."""
        if state.serving:
            return 1.0
        return retry_after(turn_s=self.turn_seconds(state), load_s=state.last_load_seconds)

    async def run(self) -> NoReturn:
        while True:
            self._wake = anyio.Event()
            try:
                until, waiting = await self._round()
            except Exception:
                log.exception("the pool's scheduler failed; looking again in a moment")
                until, waiting = None, True
            delay = None if until is None else max(0.0, until - self.clock.now())
            if waiting:
                delay = RECHECK_SECONDS if delay is None else min(delay, RECHECK_SECONDS)
            with anyio.move_on_after(delay if delay is not None else float("inf")):
                await self._wake.wait()

    async def _round(self) -> tuple[float | None, bool]:
        """One look at every key; returns when to look again at the latest (on the pool's
        clock) and whether any caller is still waiting."""
        for state in list(self.keys.values()):
            if state.draining and state.phase == "ready" and state.quiescent:
                state.swaps += 1
                await self.residency.unload(state, reason="its turn is over; others wait")
        now = self.clock.now()
        by_device: dict[str, list[tuple[KeyState, float, int]]] = {}
        waiting = False
        for state in list(self.keys.values()):
            count, oldest = state.waiting()
            waiting = waiting or count > 0
            if state.decoding:  # callers decoding their inputs for it queue in a moment
                count, oldest = count + state.decoding, now if oldest is None else oldest
            if state.phase != "cold" or oldest is None:
                state.promised = False  # loading, loaded, or nobody waits for it any more
                continue
            if not self._may_load(state, now):
                continue
            assert state.device is not None
            by_device.setdefault(state.device, []).append((state, oldest, count))
        wake: list[float] = []
        patience = self.options.max_wait * PATIENCE_SHARE
        for device, cold in by_device.items():
            arrived = {id(state): oldest for state, oldest, _ in cold}
            promised = [state for state, _, _ in cold if state.promised]
            for state in next_in_line(cold, now=now, patience=patience, promised=promised):
                try:
                    blocked, until = await self._admit(state, device, arrived[id(state)])
                except Exception as error:  # a reading or a claim failed: its callers hear it
                    self.residency.failed(state, error)
                    continue
                if until is not None:
                    wake.append(until)
                if blocked:  # the next in line waits behind it: room goes to it first
                    break
        return min(wake, default=None), waiting

    def _may_load(self, state: KeyState, now: float) -> bool:
        """Whether a cold key with callers takes its place in line; callers who cannot have
        it are answered here, and a key not yet checked starts its check (until it is done,
        the key holds its place and those behind it wait)."""
        if state.load_error is not None and now < state.retry_at:
            answer_waiters(state, backoff_error(state, now))
            return False
        elsewhere = claimed_elsewhere(state.backend, self.owner)
        if elsewhere is not None:
            answer_waiters(state, elsewhere)
            return False
        if not state.prepared and not state.preparing:
            state.preparing = True
            self.spawn(self.residency.prepare, state)
        return state.device is not None  # known once its first caller came

    async def _admit(
        self, state: KeyState, device: str, waited_since: float
    ) -> tuple[bool, float | None]:
        """Plan the cold key ``state`` until it loads, is refused, or must wait; returns
        whether it must wait (blocking those behind it) and until when at most."""
        key = state.spec.key
        if not state.prepared:
            return True, None  # its weights check ends with a kick
        dropped: set[tuple[int, str]] = set()
        while True:
            # Parts loaded models can drop (LoRA adapters) go before any model does.
            shortfall = self.residency.need(state, 1) - self.residency.room(device).free_mb
            parts = [
                part
                for part in self.residency.reclaimable(device)
                if (id(part.model), part.name) not in dropped
            ]
            chosen = plan_reclaim(shortfall_mb=shortfall, parts=parts)
            if chosen:
                dropped.update((id(part.model), part.name) for part in chosen)
                await self.residency.reclaim(chosen)
                continue
            plan = plan_turn(
                need_mb=[
                    self.residency.need(state, n) for n in range(1, self.options.max_workers + 1)
                ],
                room=self.residency.room(device),
                residents=self._residents(state, device),
                waited_since=waited_since,
                now=self.clock.now(),
            )
            if isinstance(plan, Start):
                self.residency.begin_load(state, plan.workers, plan.need_mb)
                return False, None
            if isinstance(plan, NoRoom):
                error = MemoryExhausted(key, need_mb=plan.need_mb, available_mb=plan.available_mb)
                state.load_error = error
                answer_waiters(state, error)
                return False, None
            if isinstance(plan, Evict):
                victim: KeyState = plan.victim
                victim.swaps += 1
                await self.residency.unload(victim, reason=f"idle; making room for {key}")
                continue
            if isinstance(plan, Drain):
                for victim in plan.victims:
                    self._drain(victim, key)
                state.promised = True  # the room the drains make is this key's
                return True, None
            return True, plan.until

    def _residents(self, state: KeyState, device: str) -> list[Resident[KeyState]]:
        residents = []
        for other in self.keys.values():
            if other is state or other.device != device or other.phase != "ready":
                continue
            _, oldest = other.waiting()
            residents.append(
                Resident(
                    model=other,
                    memory_mb=other.accounted_mb,
                    turn_started=other.turn_started,
                    turn_seconds=self.turn_seconds(other),
                    served=other.served_in_turn,
                    last_used=other.last_used,
                    idle=other.idle,
                    draining=other.draining,
                    oldest_wait=oldest,
                )
            )
        return residents

    def _drain(self, state: KeyState, waiting_key: str) -> None:
        """End ``state``'s turn: it starts nothing new, finishes what it runs, then goes
        (at a later round); its own waiting callers wait for its next turn."""
        state.draining = True
        state.queue.poke()  # idle workers stop waiting for work and end
        state.notify()
        log.info(
            "%s's turn is over after %.1f s (%d served): draining it for %s",
            *(state.spec.key, self.clock.now() - state.turn_started, state.served_in_turn),
            waiting_key,
        )
        self.kick()


def backoff_error(state: KeyState, now: float) -> ModelLoadError:
    """The answer for a caller of a key whose last load failed, within its backoff."""
    wait = state.retry_at - now
    return ModelLoadError(f"{state.load_error} (next try in {wait:.1f} s)")
