"""Where a key's replicas may run: their resources, and whether any node can hold one.

Plain functions of plain values (no ray here), so the rules are tested without a cluster:
what a replica asks Ray for, whether a node fits it, and the error naming the need and the
largest room when none does (which key gives its room up is :mod:`limner.ray._eviction`'s).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from limner import ModelSettings, ModelSpec, Pool
from limner.errors import MemoryExhausted

__all__ = [
    "GPU_MB",
    "NoRoomInCluster",
    "RayKeyOptions",
    "ReplicaResources",
    "check_fits",
    "fits",
    "replica_resources",
]

GPU_MB = "limner_gpu_mb"
"""The custom resource a node declares for its GPU memory in MB
(``ray start --resources='{"limner_gpu_mb": 81920}'``); a GPU replica asks for its
``memory_mb`` of it when the cluster has any, so two 30 GB models share one 80 GB card."""

_MIB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class RayKeyOptions:
    """How one key runs on the cluster: its replicas' resources and scaling.

    ``num_cpus`` per replica is a whole number of cores for CPU models (Ray sets the
    replica's ``OMP_NUM_THREADS`` to it); ``num_gpus`` ``None`` means one GPU when the key's
    device is ``cuda*`` and none otherwise; ``memory_mb`` ``None`` means what the spec
    declares for one worker (on the GPU for GPU replicas, in RAM otherwise).
    ``min_replicas`` 0 lets an idle key scale to zero ``keep_alive`` seconds after its last
    request; ``max_replicas`` bounds scaling up, at ``target_ongoing_requests`` requests per
    replica. ``max_ongoing_requests`` per replica is what its pool may batch from.
    ``pool_options`` are the replica's :class:`~limner.Pool` arguments.
    """

    num_cpus: float = 1
    num_gpus: float | None = None
    memory_mb: float | None = None
    min_replicas: int = 0
    max_replicas: int = 1
    keep_alive: float = 300.0
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 2.0
    max_ongoing_requests: int = 256
    pool_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ValueError("num_cpus and num_gpus must be >= 0")
        if self.memory_mb is not None and self.memory_mb < 0:
            raise ValueError("memory_mb must be >= 0")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if not (self.keep_alive >= 0 and self.target_ongoing_requests > 0):
            raise ValueError("keep_alive must be >= 0 and target_ongoing_requests > 0")
        if self.max_ongoing_requests < 1:
            raise ValueError("max_ongoing_requests must be at least 1")
        try:  # checked here, not in a replica's log
            inspect.signature(Pool).bind(**self.pool_options)
        except TypeError as error:
            raise ValueError(f"pool_options are not options of Pool: {error}") from None

    def autoscaling_config(self) -> dict[str, Any]:
        """Serve's autoscaling for the key: a deploy starts one replica at least (the caller
        who deployed it needs one), idle keys scale to ``min_replicas`` after keep-alive."""
        keep_alive = self.keep_alive if math.isfinite(self.keep_alive) else 10**9
        # Serve decides on the load averaged over ``look_back_period_s``, as pushed every
        # ``metrics_interval_s``: both short for a short keep-alive, so an idle key goes
        # about keep-alive seconds after its last request, not half a minute later.
        interval = min(10.0, max(0.5, keep_alive / 4))
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": max(1, self.min_replicas),
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": keep_alive,
            "downscale_to_zero_delay_s": keep_alive,
            "metrics_interval_s": interval,
            "look_back_period_s": max(2 * interval, min(30.0, keep_alive)),
        }


@dataclass(frozen=True)
class ReplicaResources:
    """What one replica of a key asks Ray for."""

    num_cpus: float
    num_gpus: float
    memory_mb: float
    gpu_memory_mb: float = 0.0

    def ray_actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_mb:
            options["memory"] = int(self.memory_mb * _MIB)
        if self.gpu_memory_mb:
            options["resources"] = {GPU_MB: self.gpu_memory_mb}
        return options

    def as_ray(self) -> dict[str, float]:
        """The need in Ray's units (memory in bytes), zero amounts left out."""
        need = {
            "CPU": self.num_cpus,
            "GPU": self.num_gpus,
            "memory": self.memory_mb * _MIB,
            GPU_MB: self.gpu_memory_mb,
        }
        return {name: amount for name, amount in need.items() if amount}


def replica_resources(
    spec: ModelSpec,
    settings: ModelSettings,
    options: RayKeyOptions,
    *,
    cluster_has_gpu_mb: bool = False,
) -> ReplicaResources:
    """A replica's resources from the spec's facts, the key's device and its options."""
    on_gpu = settings.device.startswith("cuda")
    num_gpus = options.num_gpus if options.num_gpus is not None else (1.0 if on_gpu else 0.0)
    memory = options.memory_mb if options.memory_mb is not None else spec.info.memory_mb
    if num_gpus:
        return ReplicaResources(
            num_cpus=options.num_cpus,
            num_gpus=num_gpus,
            memory_mb=0.0,
            gpu_memory_mb=memory if cluster_has_gpu_mb else 0.0,
        )
    return ReplicaResources(num_cpus=options.num_cpus, num_gpus=0.0, memory_mb=memory)


class NoRoomInCluster(MemoryExhausted):
    """No node of the cluster can hold one replica of a key, now (``busy``) or ever.

    A :class:`~limner.MemoryExhausted` (the HTTP API answers 503), naming the resource that
    is short, the need and the largest room a node has: ``need_mb`` and ``available_mb``
    are the memory figures whichever resource is short.
    """

    def __init__(
        self,
        key: str,
        *,
        resource: str,
        need: float,
        largest: float,
        need_mb: float,
        available_mb: float,
        busy: bool = False,
    ) -> None:
        super().__init__(key, need_mb=need_mb, available_mb=available_mb)
        self.resource = resource
        self.need = need
        self.largest = largest
        self.busy = busy
        unit, what = _UNITS.get(resource, (f" {resource}", ""))
        where = "the most any node has free now is" if busy else "the largest node has"
        remedy = (
            "Wait for a busy model to finish, add nodes, or lower the key's RayKeyOptions."
            if busy
            else "Add a node that large, or lower the key's RayKeyOptions."
        )
        self.args = (
            f"Cannot place a replica of {key} on the cluster: it needs {_amount(need)}{unit}"
            f"{what}, {where} {_amount(largest)}{unit}. {remedy}",
        )


_UNITS = {"memory": (" MB", " of memory"), GPU_MB: (" MB", f" of GPU memory ({GPU_MB})")}


def _amount(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:g}"


def _in_units(resource: str, amount: float) -> float:
    return amount / _MIB if resource == "memory" else amount


def fits(need: Mapping[str, float], node: Mapping[str, float]) -> bool:
    """Whether a node with these resources holds the need."""
    return all(node.get(name, 0.0) + 1e-9 >= amount for name, amount in need.items())


def check_fits(
    key: str, need: Mapping[str, float], nodes: Sequence[Mapping[str, float]], *, busy: bool
) -> None:
    """Raise :class:`NoRoomInCluster` unless one node holds ``need`` (Ray's units).

    The short resource named is the first one no node has enough of; when each fits some
    node but no node fits all, it is the one the roomiest node lacks.
    """
    if any(fits(need, node) for node in nodes):
        return
    short = next(
        (
            r
            for r, amount in need.items()
            if max((n.get(r, 0.0) for n in nodes), default=0.0) < amount
        ),
        None,
    )
    if short is None:  # each resource fits somewhere, never all on one node
        roomiest = max(nodes, key=lambda n: sum(n.get(r, 0.0) >= a for r, a in need.items()))
        short = next(r for r, amount in need.items() if roomiest.get(r, 0.0) < amount)
        largest = roomiest.get(short, 0.0)
    else:
        largest = max((n.get(short, 0.0) for n in nodes), default=0.0)
    memory_room = max((n.get("memory", 0.0) for n in nodes), default=0.0)
    raise NoRoomInCluster(
        key,
        resource=short,
        need=_in_units(short, need[short]),
        largest=_in_units(short, largest),
        need_mb=need.get("memory", 0.0) / _MIB or need.get(GPU_MB, 0.0),
        available_mb=memory_room / _MIB,
        busy=busy,
    )
