"""The pool's decisions, as plain functions of plain values: no threads, no event loop.

The orchestrator reads memory, clocks and its models, asks these functions what to do, and
does it. Each rule is the one on the policy page of docs/architecture.md: the seed's
admission rule (:func:`plan_cold_start`), and around it the turns that share one budget
between models with waiting callers (:func:`plan_turn`, :func:`next_in_line`).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "DEFAULT_FLOOR_SHARE",
    "MAX_DEFAULT_FLOOR_MB",
    "MIN_AUTO_TURN",
    "Drain",
    "Evict",
    "NoRoom",
    "Reclaimable",
    "Resident",
    "Room",
    "Start",
    "Wait",
    "budget_mb",
    "floor_mb",
    "is_expired",
    "may_start_streamed",
    "next_in_line",
    "plan_cold_start",
    "plan_reclaim",
    "plan_turn",
    "retry_after",
    "retry_delay",
    "turn_seconds",
    "workers_need_mb",
]

#: The safety floor when none is set: this share of the device's total memory ...
DEFAULT_FLOOR_SHARE = 0.05
#: ... but never more than this many MB (5% of a 1 TB host would idle 50 GB).
MAX_DEFAULT_FLOOR_MB = 2048.0
#: The shortest turn chosen automatically: a model that loads in 10 ms still serves a while.
MIN_AUTO_TURN = 0.5

Model = TypeVar("Model")


@dataclass(frozen=True)
class Start:
    """Start ``workers`` workers, reserving ``need_mb`` while they load."""

    workers: int
    need_mb: float


@dataclass(frozen=True)
class Evict(Generic[Model]):
    """Evict ``victim`` (the least recently used idle model), then plan again."""

    victim: Model


@dataclass(frozen=True)
class NoRoom:
    """Not even one worker fits and nothing idle can go: the caller gets ``MemoryExhausted``."""

    need_mb: float
    available_mb: float


def workers_need_mb(per_worker_mb: float, overhead_mb: float | None, workers: int) -> float:
    """Memory for ``workers`` workers sharing one copy of the weights.

    Each worker after the first costs ``overhead_mb`` (activations only), or a whole copy
    when the plugin did not say.
    """
    each_extra = per_worker_mb if overhead_mb is None else overhead_mb
    return per_worker_mb + (workers - 1) * each_extra


def plan_cold_start(
    *,
    need_mb: Sequence[float],
    used_mb: float,
    budget_mb: float,
    idle: Sequence[tuple[Model, float | None]],
) -> Start | Evict[Model] | NoRoom:
    """The seed's rule: as many workers as fit (``need_mb[n - 1]`` is what ``n`` cost, most
    first tried), else evict the least recently used idle model, else no room.

    ``idle`` lists the models that may be evicted, each with when it was last used.
    """
    for workers in range(len(need_mb), 0, -1):
        if used_mb + need_mb[workers - 1] <= budget_mb:
            return Start(workers=workers, need_mb=need_mb[workers - 1])
    if idle:
        victim, _ = min(idle, key=lambda entry: entry[1] or 0.0)
        return Evict(victim)
    return NoRoom(need_mb=need_mb[0], available_mb=max(0.0, budget_mb - used_mb))


def is_expired(*, last_used: float | None, now: float, keep_alive: float) -> bool:
    """Whether an idle model has outlived its keep-alive."""
    return last_used is not None and now - last_used > keep_alive


def retry_delay(failures: int, backoff: tuple[float, float]) -> float:
    """Seconds before a failed load is tried again: doubling from ``low`` up to ``high``."""
    low, high = backoff
    return float(min(high, low * 2 ** (failures - 1)))


# -- the budget and the floor -------------------------------------------------------------------


def budget_mb(*, total_mb: float, fraction: float, absolute_mb: float | None) -> float:
    """What the pool's models may hold on a device: ``absolute_mb``, else ``fraction`` of it."""
    return absolute_mb if absolute_mb is not None else total_mb * fraction


def floor_mb(*, total_mb: float, floor: float | None) -> float:
    """The device memory kept available to the rest of the machine: ``floor`` MB when set,
    else :data:`DEFAULT_FLOOR_SHARE` of the total, at most :data:`MAX_DEFAULT_FLOOR_MB`."""
    if floor is not None:
        return floor
    return min(total_mb * DEFAULT_FLOOR_SHARE, MAX_DEFAULT_FLOOR_MB)


# -- turns: sharing the budget between models with waiting callers ------------------------------


@dataclass(frozen=True)
class Drain(Generic[Model]):
    """Stop ``victims`` taking new work; each is evicted once what it runs has finished."""

    victims: tuple[Model, ...]


@dataclass(frozen=True)
class Wait:
    """Nothing more can be done for the waiting model now: plan again when something
    changes (work finishes, memory frees), or at ``until`` on the pool's clock."""

    until: float | None = None


@dataclass(frozen=True)
class Resident(Generic[Model]):
    """A loaded model, as a turn sees it."""

    model: Model
    memory_mb: float
    turn_started: float
    """When it became ready: its turn began."""
    turn_seconds: float
    """How long it keeps its memory while it has work (:func:`turn_seconds`)."""
    served: int
    """Batches and generations it finished this turn."""
    last_used: float | None
    idle: bool
    """Nothing queued, taken or running."""
    draining: bool = False
    oldest_wait: float | None = None
    """When its own oldest waiting caller arrived; ``None`` when nobody waits for it."""


@dataclass(frozen=True)
class Room:
    """A device's memory as the pool counts it, in MB."""

    budget_mb: float
    pool_mb: float
    """What the pool's models hold or will: accounted footprints, loads in progress, and
    unloads not yet finished."""
    available_mb: float
    """The device's available memory now, less what loads in progress will still take."""
    floor_mb: float
    loading_mb: float = 0.0
    """Reserved by loads in progress (part of ``pool_mb``)."""
    releasing_mb: float = 0.0
    """Held by unloads under way (part of ``pool_mb``): room that comes by itself."""

    @property
    def free_mb(self) -> float:
        """Room for another model now: within the budget, and above the floor."""
        return min(self.budget_mb - self.pool_mb, self.available_mb - self.floor_mb)


def turn_seconds(*, min_turn: float | None, load_seconds: float, max_wait: float) -> float:
    """How long a loaded model with work keeps its memory while others wait.

    ``min_turn`` when set; else three times what its load took (so at most about a quarter
    of the time goes to swapping), at least :data:`MIN_AUTO_TURN`, and at most a quarter of
    ``max_wait`` (so callers of the other models get their turn before they give up).
    """
    if min_turn is not None:
        return min_turn
    return min(max(MIN_AUTO_TURN, 3 * load_seconds), max_wait / 4)


def next_in_line(
    waiting: Sequence[tuple[Model, float, int]],
    *,
    now: float,
    patience: float,
    promised: Collection[Model] = (),
) -> list[Model]:
    """Cold models with waiting callers, in the order they should load. Each comes with when
    its oldest caller arrived and how many wait.

    A model other models were drained for comes first: the room they make is its (without
    this, a drained model with more callers would take its memory straight back). Then a
    model whose oldest caller has waited ``patience`` seconds, oldest first, so that nobody
    starves behind busier models. Then the model with the most callers waiting: one load
    serves the most of them. On a tie, the one whose callers came last: callers that move
    from model to model together (each just answered by the previous one) then catch up
    with the group ahead of them, and one load serves both groups from then on.
    """

    def rank(entry: tuple[Model, float, int]) -> tuple[int, float, float]:
        model, arrived, count = entry
        if model in promised:
            return (0, arrived, 0.0)
        if now - arrived >= patience:
            return (1, arrived, 0.0)
        return (2, -count, -arrived)

    return [model for model, _, _ in sorted(waiting, key=rank)]


def plan_turn(
    *,
    need_mb: Sequence[float],
    room: Room,
    residents: Sequence[Resident[Model]],
    waited_since: float,
    now: float,
) -> Start | Evict[Model] | Drain[Model] | Wait | NoRoom:
    """What to do for the next cold model in line, whose oldest caller arrived at
    ``waited_since`` (``need_mb`` as for :func:`plan_cold_start`).

    1. The seed's rule within the room: as many workers as fit, else evict the least
       recently used idle model (and plan again).
    2. ``NoRoom`` only when the model could not fit even with every other model gone.
    3. If drains and unloads under way will make room, wait for them.
    4. Else drain the models whose turn is over, enough of them to make room: a model's
       turn is over once it has served at least once and held its memory ``turn_seconds``,
       and it is not drained for a caller who came after its own oldest waiting caller.
       Those nobody waits for go first, then the one that has held memory longest.
    5. Else wait until the first turn ends.
    """
    free = room.free_mb
    idle = [(r.model, r.last_used) for r in residents if r.idle and not r.draining]
    admission = plan_cold_start(need_mb=need_mb, used_mb=0.0, budget_mb=free, idle=idle)
    if not isinstance(admission, NoRoom):
        return admission
    held = sum(r.memory_mb for r in residents)
    most = free + held + room.loading_mb + room.releasing_mb
    if need_mb[0] > most:
        return NoRoom(need_mb=need_mb[0], available_mb=max(0.0, most))
    coming = room.releasing_mb + sum(r.memory_mb for r in residents if r.draining)
    if need_mb[0] <= free + coming:
        return Wait()
    over = [r for r in residents if _turn_over(r, now=now, waited_since=waited_since)]
    over.sort(key=lambda r: (r.oldest_wait is not None, r.turn_started))
    victims: list[Model] = []
    for resident in over:
        victims.append(resident.model)
        coming += resident.memory_mb
        if need_mb[0] <= free + coming:
            return Drain(tuple(victims))
    ends = [
        r.turn_started + r.turn_seconds
        for r in residents
        if not r.draining and not r.idle and r.served and now < r.turn_started + r.turn_seconds
    ]
    return Wait(min(ends) if ends else None)


def _turn_over(resident: Resident[Model], *, now: float, waited_since: float) -> bool:
    if resident.draining or resident.idle or not resident.served:
        return False
    if now - resident.turn_started < resident.turn_seconds:
        return False
    return resident.oldest_wait is None or resident.oldest_wait >= waited_since


def retry_after(*, turn_s: float, load_s: float) -> float:
    """Seconds a caller told to come back should wait: about one other model's turn and
    this one's load, at least a second."""
    return max(1.0, turn_s + load_s)


# -- cached parts: what loaded models drop before any model goes --------------------------------


@dataclass(frozen=True)
class Reclaimable(Generic[Model]):
    """A part ``name`` that loaded ``model`` can drop (a LoRA adapter), the memory it holds
    and when it was last used."""

    model: Model
    name: str
    memory_mb: float
    last_used: float


def plan_reclaim(
    *, shortfall_mb: float, parts: Sequence[Reclaimable[Model]]
) -> list[Reclaimable[Model]] | None:
    """The least recently used ``parts``, just enough to free ``shortfall_mb``; ``None`` when
    all of them would not (then dropping them is no use: a model must go anyway), and no
    parts when nothing is short."""
    if shortfall_mb <= 0:
        return []
    chosen, freed = [], 0.0
    for part in sorted(parts, key=lambda part: part.last_used):
        chosen.append(part)
        freed += part.memory_mb
        if freed >= shortfall_mb:
            return chosen
    return None


# -- groups: streamed calls that may share a loaded model ----------------------------------------


def may_start_streamed(
    *,
    position: int,
    waiting: Sequence[tuple[Hashable, float]],
    running_group: Hashable,
    running: int,
    now: float,
    patience: float,
) -> bool:
    """Whether the waiting streamed call at ``position`` of ``waiting`` (each call's group
    and arrival, in the order they came) may start now, a compute slot being free.

    Calls of different groups never share the model: while ``running`` calls of
    ``running_group`` run, only calls of that group start. Within a group, calls start in the
    order they came. A call of the running group (the last to run, even once its calls have
    ended) starts ahead of an earlier call of another group only while that call has waited
    less than ``patience`` seconds: so one group's stream of calls keeps the model from
    another for at most ``patience`` plus the calls already running. Otherwise, once the
    model is free, the call of another group that has waited longest goes.
    """
    group, arrived = waiting[position]
    if any(other == group for other, _ in waiting[:position]):
        return False  # an earlier call of its own group goes first
    if group == running_group:
        return _goes_ahead(arrived, group, waiting, now=now, patience=patience)
    if running:
        return False
    first = next((since for other, since in waiting if other == running_group), None)
    if first is not None and _goes_ahead(first, running_group, waiting, now=now, patience=patience):
        return False  # the running group's next call keeps the model
    others = [index for index, (other, _) in enumerate(waiting) if other != running_group]
    return position == others[0]


def _goes_ahead(
    arrived: float,
    group: Hashable,
    waiting: Sequence[tuple[Hashable, float]],
    *,
    now: float,
    patience: float,
) -> bool:
    """Whether a call of ``group`` that arrived at ``arrived`` may go before the calls of
    other groups waiting: it came first, or the oldest of them has waited less than
    ``patience``."""
    others = [since for other, since in waiting if other != group]
    return not others or arrived <= min(others) or now - min(others) < patience
