"""``RayRuntime``: the runtime seam, served by Ray Serve, one application per model key.

The host keeps only what a caller needs: per key, the Serve handle, what its replicas ask of
the cluster, the calls in flight and when it was last used (:mod:`limner.ray._keys`).
Everything that runs a model runs in the replicas (:mod:`limner.ray._replica`), each a
limner :class:`~limner.Pool`. This class orchestrates: Ray's and Serve's blocking calls are
in :mod:`limner.ray._cluster`, which key makes room in :mod:`limner.ray._eviction`, and a
call's answer and errors in :mod:`limner.ray._calls`. Ray is imported when a runtime
starts, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
from anyio.abc import AsyncResource, TaskGroup

from limner import GenerationChunk, KeyStats
from limner._exports import CallsOfTheLastRelease
from limner.errors import InvalidInput, LimnerError
from limner.plugin import Backend
from limner.runtime import (
    BatchCall,
    StreamCall,
    backend_method,
    repeat_every,
)

from . import _cluster as cluster
from ._applications import Applications
from ._calls import call as call_remote
from ._calls import cancel, next_chunk, open_stream, result
from ._health import ControlPlaneWatch
from ._keys import KeyEntry, snapshot
from ._placement import RayKeyOptions

__all__ = ["RayRuntime"]

log = logging.getLogger("limner.ray")

Vector = npt.NDArray[np.float32]


@dataclass(eq=False)
class RayRuntime(CallsOfTheLastRelease, AsyncResource):
    """A :class:`~limner.Runtime` on a Ray cluster. Use as ``async with RayRuntime():``.

    ``address`` is Ray's: ``None`` joins the cluster this process is connected to, else
    ``RAY_ADDRESS``, else starts a local one (shut down again on exit); ``"auto"`` joins a
    running cluster; ``"ray://host:10001"`` goes through Ray Client. ``init_options`` are
    further ``ray.init`` arguments. Each key's replicas follow ``options_per_key[key]``, else
    ``options`` (:class:`RayKeyOptions`: resources, replicas, keep-alive, the replica's pool
    arguments). A key no node has room for now waits up to ``room_timeout`` seconds for room,
    looking again every fraction of a second: the cluster's least recently used idle key is
    scaled to zero for it, else, when every key is busy, the one that has held its room
    longest once it has held it ``min_hold`` seconds (its calls finish first); then its
    callers get :class:`NoRoomInCluster`. One no node could ever hold gets it at once. A
    deployment not running after ``deploy_timeout`` seconds is deleted and its callers get
    an error, never a hang. A generation runs at most ``stream_window`` chunks ahead of its
    consumer (0: no bound). ``refresh_interval`` is how often ``stats()``'s replica counts
    are read from Serve.

    Every ``health_interval`` seconds the runtime checks that the cluster's control plane
    (the GCS, and this node's raylet) takes connections. While it does not,
    :meth:`unavailable` says why (a server's ``/readyz`` answers 503) and calls that need it
    fail with :class:`~limner.RuntimeUnavailable`; if it comes back (Ray reconnects), all is
    as before. After ``control_plane_timeout`` seconds without it the runtime gives up: one
    line is logged, every later call fails so, and ``on_control_plane_lost(reason)`` is
    called (``limner serve`` exits then). The runtime never ends Ray processes it did not
    start.
    """

    address: str | None = None
    _: KW_ONLY
    options: RayKeyOptions = field(default_factory=RayKeyOptions)
    options_per_key: Mapping[str, RayKeyOptions] = field(default_factory=dict)
    init_options: Mapping[str, Any] = field(default_factory=dict)
    deploy_timeout: float = 300.0
    room_timeout: float = 10.0
    stream_window: int = 4
    refresh_interval: float = 5.0
    drain_timeout: float = 30.0
    min_hold: float = 5.0
    health_interval: float = 1.0
    control_plane_timeout: float = 10.0
    on_control_plane_lost: Callable[[str], object] | None = None
    app_prefix: str = "limner:"
    log_level: str = "WARNING"

    def __post_init__(self) -> None:
        if self.stream_window < 0:
            raise InvalidInput("must be >= 0", input=self.stream_window, field="stream_window")
        may_be_zero = ("room_timeout", "drain_timeout", "min_hold", "control_plane_timeout")
        for name in (
            "deploy_timeout",
            "refresh_interval",
            "health_interval",
            *may_be_zero,
        ):
            value = getattr(self, name)
            if not (value > 0 or (value == 0 and name in may_be_zero)):
                raise InvalidInput("must be positive", input=value, field=name)
        self.options_per_key = dict(self.options_per_key)
        self.init_options = dict(self.init_options)
        self._keys: dict[str, KeyEntry] = {}
        self._task_group: TaskGroup | None = None
        self._closing = False
        self._started_ray = False
        self._credits: Any = None
        self._control_plane: list[tuple[str, str, int]] = []
        self._applications = Applications(
            self._keys,
            self.app_prefix,
            self.log_level,
            self.deploy_timeout,
            self.room_timeout,
            self.min_hold,
        )
        self._settled = anyio.Event()  # set whenever a call ends

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> RayRuntime:
        if self._task_group is not None:
            raise LimnerError("this runtime is already running")
        await anyio.to_thread.run_sync(self._connect)
        self._closing = False
        self._applications.health = ControlPlaneWatch(timeout=self.control_plane_timeout)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(
            repeat_every,
            self.refresh_interval,
            self.refresh,
            log,
            "reading the Ray applications' status",
        )
        if self._control_plane:
            self._task_group.start_soon(self._watch_control_plane)
        return self

    async def aclose(self) -> None:
        """Let calls in flight finish (``drain_timeout``), delete this runtime's
        applications, and shut Ray down if this runtime started it."""
        if self._task_group is None:
            return
        self._closing = True
        drain = 0.0 if self._applications.health.lost else self.drain_timeout
        with anyio.CancelScope(shield=True), anyio.move_on_after(drain):
            while any(entry.in_flight for entry in self._keys.values()):
                self._settled = anyio.Event()
                await self._settled.wait()
        self._task_group.cancel_scope.cancel()
        try:
            await self._task_group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._disconnect)

    def _connect(self) -> None:
        self._started_ray, self._applications.board = cluster.connect(
            self.address, self.init_options, self.log_level
        )
        self._control_plane = cluster.control_plane()

    def _disconnect(self) -> None:
        deleting = []
        for entry in self._keys.values():
            if entry.owned and (entry.handle is not None or entry.status != "NOT_STARTED"):
                deleting.append(entry.app)
            entry.handle, entry.replicas, entry.status = None, 0, "NOT_STARTED"
        kill = [self._credits] if self._credits is not None else []
        try:
            cluster.disconnect(
                deleting,
                self.app_prefix,
                kill=kill,
                shutdown=self._started_ray,
                reachable=self._applications.health.problem is None,
            )
        finally:
            self._credits = self._applications.board = None
            self._started_ray = False

    async def _watch_control_plane(self) -> None:
        """Probe the control plane every ``health_interval`` seconds until the runtime
        closes or gives up on it; say when it goes, comes back or is given up on."""
        health = self._applications.health
        while not health.lost:
            await anyio.sleep(self.health_interval)
            problem = await anyio.to_thread.run_sync(
                cluster.unreachable,
                self._control_plane,
                min(self.health_interval, 2.0),
                abandon_on_cancel=True,
            )
            verdict = health.observe(problem, time.monotonic())
            if verdict == "unreachable":
                self._applications.cut_waits()
                log.warning(
                    "the Ray cluster's control plane does not answer (%s): not ready; giving "
                    "up in %g s unless it comes back",
                    problem,
                    self.control_plane_timeout,
                )
            elif verdict == "back":
                log.warning("the Ray cluster's control plane answers again: ready")
            elif verdict == "lost":
                self._applications.cut_waits()
                reason = (
                    f"lost the Ray cluster's control plane: {problem} for "
                    f"{self.control_plane_timeout:g} s"
                )
                log.error("%s; calls fail from now on", reason)
                if self.on_control_plane_lost is not None:
                    self.on_control_plane_lost(reason)

    def unavailable(self) -> str | None:
        """Why the runtime cannot serve now (its cluster's control plane does not answer),
        or None: a server's readiness reads it."""
        problem = self._applications.health.problem
        if problem is None:
            return None
        verdict = "gone" if self._applications.health.lost else "not answering"
        return f"the Ray cluster's control plane is {verdict}: {problem}"

    # -- the runtime ----------------------------------------------------------------------

    async def run_batch(self, backend: Backend, call: BatchCall) -> Vector:
        """Rows from one replica of the key (its pool batches them with other callers')."""
        backend_method(backend, call)  # one its capability offers, checked before it travels
        sent = BatchCall(call.method, list(call.items))
        rows = await call_remote(
            lambda: self._ready(backend),
            lambda handle: handle.run_batch.remote(sent),
            self._finished,
        )
        # Ray hands back read-only arrays; the in-process pool's rows are the caller's own.
        return np.array(rows, dtype=np.float32)

    async def run_stream(
        self, backend: Backend, call: StreamCall
    ) -> AsyncIterator[GenerationChunk]:
        """A replica's run (a generation), chunk by chunk, at most ``stream_window`` ahead;
        closing this iterator cancels the remote run, which stops at its next step."""
        backend_method(backend, call)
        credits = await self._credit_actor()
        stream = uuid.uuid4().hex
        entry, response, chunk = await open_stream(
            lambda: self._ready(backend),
            lambda handle: handle.options(stream=True).run_stream.remote(
                call, stream, credits, self.stream_window
            ),
            self._finished,
        )
        taken = 0
        try:
            while chunk is not None:
                taken += 1
                if credits is not None:
                    credits.ack.remote(stream, taken)
                yield chunk
                try:
                    chunk = await next_chunk(response, entry.key)
                except StopAsyncIteration:
                    return
        finally:
            self._finished(entry)
            cancel(response)
            if credits is not None:
                credits.close.remote(stream)

    @contextlib.contextmanager
    def preparing(self, backend: Backend, count: int) -> Iterator[None]:
        """Nothing to hold here: each replica's own pool batches what reaches it."""
        yield

    async def load(self, backend: Backend) -> None:
        """Deploy the key if it is not, and load its weights in one replica now."""
        await call_remote(lambda: self._ready(backend), lambda h: h.load.remote(), self._finished)

    def stats(self) -> dict[str, KeyStats]:
        """Per key, as of the last :meth:`refresh` (every ``refresh_interval``): ``workers``
        is its running replicas, ``batches``, ``mean_batch_size`` and ``queue_depth`` summed
        over them (each replica's pool, whoever called it), ``memory_mb`` what they reserve;
        ``in_flight`` is this host's calls now, ``loads`` and ``load_seconds`` its
        deployments by this runtime, ``evictions`` the times this runtime scaled it to
        zero."""
        return {key: snapshot(entry) for key, entry in sorted(self._keys.items())}

    async def refresh(self) -> dict[str, KeyStats]:
        """Read the replica counts from Serve and the replicas' figures from the cluster's
        board now; return :meth:`stats`."""
        if self._applications.health.problem is not None:
            return self.stats()  # Serve cannot say: the figures stay as last read
        statuses = await self._applications.statuses()
        usage = await self._applications.usage()
        for entry in self._keys.values():
            found = statuses.get(entry.app, cluster.NOT_DEPLOYED)
            entry.status = found.status
            if entry.app not in statuses:
                entry.forget_application()
            entry.replicas = found.running if entry.handle is not None else 0
            if usage is not None:
                entry.usage = usage.get(entry.app)
        return self.stats()

    async def wait_for_replicas(self, key: str, count: int, *, poll: float = 0.2) -> None:
        """Until ``key`` runs ``count`` replicas, as read from Serve every ``poll`` seconds:
        a scale to zero after keep-alive, say (bound it with ``anyio.fail_after``)."""
        while True:
            stats = (await self.refresh()).get(key)
            if stats is not None and stats.workers == count:
                return
            await anyio.sleep(poll)

    async def replica_stats(self, key: str) -> KeyStats | None:
        """One running replica's pool figures for ``key`` (None when none runs, as last
        seen: asking would start one)."""
        stats: KeyStats | None = await self._ask_running(key, lambda h: h.stats.remote())
        return stats

    async def replica_node(self, key: str) -> str | None:
        """The Ray node id of one running replica of ``key`` (None when none runs)."""
        node: str | None = await self._ask_running(key, lambda h: h.node.remote())
        return node

    async def _ask_running(self, key: str, send: Callable[[Any], Any]) -> Any:
        entry = self._keys.get(key)
        if entry is None or entry.handle is None or not entry.replicas:
            return None
        return await result(send(entry.handle), key)

    async def evict(self, key: str) -> bool:
        """Scale a key to zero now (its application is deleted) if nothing of this host's
        is in flight on it; return whether it was. Its next call deploys it again."""
        entry = self._keys.get(key)
        if entry is None or entry.handle is None or entry.in_flight:
            return False
        return await self._applications.retire(entry, reason="evicted on request")

    # -- keys -----------------------------------------------------------------------------

    def _finished(self, entry: KeyEntry) -> None:
        entry.in_flight -= 1
        entry.last_used = time.monotonic()
        self._settled.set()

    def _entry(self, backend: Backend) -> KeyEntry:
        if self._task_group is None or self._closing:
            raise LimnerError(
                "the Ray runtime is not running; use it inside `async with RayRuntime()`"
            )
        key = backend.spec.key
        if self._applications.health.lost:
            self._applications.check_reachable(key)
        entry = self._keys.get(key)
        if entry is None:
            entry = KeyEntry(
                key=key,
                app=self.app_prefix + key,
                spec=backend.spec,
                settings=backend.settings,
                options=self.options_per_key.get(key, self.options),
            )
            self._keys[key] = entry
        elif entry.spec != backend.spec or entry.settings != backend.settings:
            raise LimnerError(
                f"{key} is already served by this runtime with another spec or settings; "
                "use one registry's model per runtime"
            )
        return entry

    async def _ready(self, backend: Backend) -> KeyEntry:
        entry = self._entry(backend)
        await self._applications.ready(entry)
        return entry

    async def _credit_actor(self) -> Any:
        if self.stream_window == 0:
            return None
        if self._credits is None:
            ray = cluster.import_ray()
            from ._stream_window import Credits

            self._credits = ray.remote(num_cpus=0)(Credits).remote()
        return self._credits
