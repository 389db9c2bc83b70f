"""``RayRuntime``: the runtime seam, served by Ray Serve, one application per model key.

The host keeps only what a caller needs: per key, the Serve handle, what its replicas ask of
the cluster, the calls in flight and when it was last used. Everything that runs a model
runs in the replicas (:mod:`limner.ray._replica`), each a limner :class:`~limner.Pool`.
Ray is imported when a runtime starts, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
import sniffio
from anyio.abc import AsyncResource, TaskGroup

from limner import GenerationChunk, ImageGenerationConfig, KeyStats, ModelSettings, ModelSpec
from limner.errors import (
    Cancelled,
    InvalidInput,
    LimnerError,
    ModelError,
    PluginError,
    PoolBusy,
)
from limner.plugin import Backend, TextToImageBackend
from limner.runtime import ModelState, RequestKind, repeat_every

from ._board import BOARD_NAME, BOARD_NAMESPACE, AppUsage, Board, ReplicaReport, app_usage
from ._placement import (
    GPU_MB,
    RayKeyOptions,
    ReplicaResources,
    check_fits,
    fits,
    least_recently_used,
    replica_resources,
)

__all__ = ["RayRuntime"]

log = logging.getLogger("limner.ray")

Vector = npt.NDArray[np.float32]

_DEPLOYMENT = "LimnerReplica"


def _import_ray() -> Any:
    try:
        import ray
        import ray.serve  # Serve must be installed too
    except ImportError as error:
        raise LimnerError(
            f"the Ray runtime needs Ray Serve: pip install 'limner[ray]' ({error})"
        ) from None
    return ray


@dataclass(frozen=True)
class _Status:
    """One application as Serve last reported it."""

    status: str
    running: int
    message: str = ""


_NOT_DEPLOYED = _Status(status="NOT_STARTED", running=0)


@dataclass
class _Key:
    """What the host knows of one key's application."""

    key: str
    app: str
    spec: ModelSpec
    settings: ModelSettings
    options: RayKeyOptions
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    resources: ReplicaResources | None = None
    handle: Any = None  # a Serve DeploymentHandle while the application is deployed
    replicas: int = 0  # running, as last seen
    status: str = "NOT_STARTED"
    in_flight: int = 0
    last_used: float | None = None
    loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    usage: AppUsage | None = None  # its replicas' reports, summed, as of the last refresh
    owned: bool = True  # deployed by this runtime (deleted when it closes), not adopted

    @property
    def state(self) -> ModelState:
        if self.handle is not None and self.replicas > 0:
            return "ready"
        return "loading" if self.status == "DEPLOYING" else "cold"


@dataclass(eq=False)
class RayRuntime(AsyncResource):
    """A :class:`~limner.Runtime` on a Ray cluster. Use as ``async with RayRuntime():``.

    ``address`` is Ray's: ``None`` joins the cluster this process is connected to, else
    ``RAY_ADDRESS``, else starts a local one (shut down again on exit); ``"auto"`` joins a
    running cluster; ``"ray://host:10001"`` goes through Ray Client. ``init_options`` are
    further ``ray.init`` arguments. Each key's replicas follow ``options_per_key[key]``, else
    ``options`` (:class:`RayKeyOptions`: resources, replicas, keep-alive, the replica's pool
    arguments). A key no node has room for now waits ``room_timeout`` seconds for room
    (after scaling the cluster's least recently used idle keys to zero), then its callers get
    :class:`NoRoomInCluster`; one no node could ever hold gets it at once. A deployment not
    running after ``deploy_timeout`` seconds is deleted and its callers get an error, never
    a hang. A generation runs at most ``stream_window`` chunks
    ahead of its consumer (0: no bound). ``refresh_interval`` is how often ``stats()``'s
    replica counts are read from Serve.
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
    app_prefix: str = "limner:"
    log_level: str = "WARNING"

    def __post_init__(self) -> None:
        if self.stream_window < 0:
            raise InvalidInput("must be >= 0", input=self.stream_window, field="stream_window")
        for name in ("deploy_timeout", "refresh_interval", "room_timeout", "drain_timeout"):
            value = getattr(self, name)
            if not (value > 0 or (value == 0 and name in ("room_timeout", "drain_timeout"))):
                raise InvalidInput("must be positive", input=value, field=name)
        self.options_per_key = dict(self.options_per_key)
        self.init_options = dict(self.init_options)
        self._keys: dict[str, _Key] = {}
        self._task_group: TaskGroup | None = None
        self._closing = False
        self._started_ray = False
        self._credits: Any = None
        self._board: Any = None  # the cluster's Board actor, while connected
        self._settled = anyio.Event()  # set whenever a call ends

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> RayRuntime:
        if self._task_group is not None:
            raise LimnerError("this runtime is already running")
        await anyio.to_thread.run_sync(self._connect)
        self._closing = False
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(
            repeat_every,
            self.refresh_interval,
            self.refresh,
            log,
            "reading the Ray applications' status",
        )
        return self

    async def aclose(self) -> None:
        """Let calls in flight finish (``drain_timeout``), delete this runtime's
        applications, and shut Ray down if this runtime started it."""
        if self._task_group is None:
            return
        self._closing = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.drain_timeout):
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
        ray = _import_ray()
        from ray import serve

        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_options)
            self._started_ray = True
        try:  # Serve's HTTP proxies are not needed: calls go through handles
            serve.start(proxy_location="Disabled", logging_config={"log_level": self.log_level})
            self._board = (
                ray.remote(Board)
                .options(
                    name=BOARD_NAME,
                    namespace=BOARD_NAMESPACE,
                    lifetime="detached",
                    get_if_exists=True,
                    num_cpus=0,
                )
                .remote()
            )
        except BaseException:
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False
            raise

    def _disconnect(self) -> None:
        ray = _import_ray()
        from ray import serve

        try:
            deleting = set()
            for entry in self._keys.values():
                if entry.owned and (entry.handle is not None or entry.status != "NOT_STARTED"):
                    serve.delete(entry.app, _blocking=False)
                    deleting.add(entry.app)
                entry.handle, entry.replicas, entry.status = None, 0, "NOT_STARTED"
            deadline = time.monotonic() + 30
            while deleting & set(self._statuses()) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._credits is not None:
                ray.kill(self._credits)
                self._credits = None
            self._board = None
        finally:
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False

    # -- the runtime ----------------------------------------------------------------------

    async def embed(self, backend: Backend, kind: RequestKind, items: Sequence[Any]) -> Vector:
        """Rows from one replica of the key (its pool batches them with other callers')."""
        rows = await self._call(backend, lambda handle: handle.embed.remote(kind, list(items)))
        # Ray hands back read-only arrays; the in-process pool's rows are the caller's own.
        return np.array(rows, dtype=np.float32)

    async def generate(
        self, backend: Backend, prompt: str, config: ImageGenerationConfig
    ) -> AsyncIterator[GenerationChunk]:
        """A replica's generation, chunk by chunk, at most ``stream_window`` ahead; closing
        this iterator cancels the remote run, which stops at its next step."""
        assert isinstance(backend, TextToImageBackend)
        credits = await self._credit_actor()
        stream = uuid.uuid4().hex
        entry, response, chunk = await self._open_stream(
            backend,
            lambda handle: handle.options(stream=True).generate.remote(
                prompt, config, stream, credits, self.stream_window
            ),
        )
        taken = 0
        try:
            while chunk is not None:
                taken += 1
                if credits is not None:
                    credits.ack.remote(stream, taken)
                yield chunk
                try:
                    chunk = await _next(response, entry.key)
                except StopAsyncIteration:
                    return
        finally:
            self._finished(entry)
            _cancel(response)
            if credits is not None:
                credits.close.remote(stream)

    async def load(self, backend: Backend) -> None:
        """Deploy the key if it is not, and load its weights in one replica now."""
        await self._call(backend, lambda handle: handle.load.remote())

    async def _call(self, backend: Backend, send: Callable[[Any], Any]) -> Any:
        """``send(handle)``'s answer from a replica of the key, deployed again (once) if
        another runtime scaled it to zero since this one last looked."""
        for last_try in (False, True):
            entry = await self._ready(backend)
            entry.in_flight += 1
            try:
                return await _result(send(entry.handle), entry.key)
            except _ApplicationGone:
                if last_try:
                    raise
                self._forget_application(entry)
            finally:
                self._finished(entry)
        raise AssertionError("unreachable")

    async def _open_stream(
        self, backend: Backend, send: Callable[[Any], Any]
    ) -> tuple[_Key, Any, GenerationChunk | None]:
        """The key's stream from ``send(handle)`` and its first chunk (None: it ended), as
        :meth:`_call` retries; the entry's call stays in flight until the caller ends it."""
        for last_try in (False, True):
            entry = await self._ready(backend)
            entry.in_flight += 1
            response = send(entry.handle)
            try:
                return entry, response, await _next(response, entry.key)
            except StopAsyncIteration:
                return entry, response, None
            except BaseException as error:
                self._finished(entry)
                _cancel(response)
                if last_try or not isinstance(error, _ApplicationGone):
                    raise
                self._forget_application(entry)
        raise AssertionError("unreachable")

    def stats(self) -> dict[str, KeyStats]:
        """Per key, as of the last :meth:`refresh` (every ``refresh_interval``): ``workers``
        is its running replicas, ``batches``, ``mean_batch_size`` and ``queue_depth`` summed
        over them (each replica's pool, whoever called it), ``memory_mb`` what they reserve;
        ``in_flight`` is this host's calls now, ``loads`` and ``load_seconds`` its
        deployments by this runtime, ``evictions`` the times this runtime scaled it to
        zero."""
        return {key: _snapshot(entry) for key, entry in sorted(self._keys.items())}

    async def refresh(self) -> dict[str, KeyStats]:
        """Read the replica counts from Serve and the replicas' figures from the cluster's
        board now; return :meth:`stats`."""
        statuses = await anyio.to_thread.run_sync(self._statuses)
        usage = await self._usage()
        for entry in self._keys.values():
            found = statuses.get(entry.app, _NOT_DEPLOYED)
            entry.status = found.status
            if entry.app not in statuses:
                self._forget_application(entry)
            entry.replicas = found.running if entry.handle is not None else 0
            entry.usage = usage.get(entry.app)
        return self.stats()

    async def _usage(self) -> dict[str, AppUsage]:
        """Every limner application's replicas' reports, summed per application."""
        if self._board is None:
            return {}
        with anyio.move_on_after(5):
            reports: list[ReplicaReport] = await _result(
                self._board.reports.remote(self.app_prefix), "the cluster's board"
            )
            return app_usage(reports)
        return {}

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
        entry = self._keys.get(key)
        if entry is None or entry.handle is None or not entry.replicas:
            return None
        stats: KeyStats | None = await _result(entry.handle.stats.remote(), key)
        return stats

    async def replica_node(self, key: str) -> str | None:
        """The Ray node id of one running replica of ``key`` (None when none runs)."""
        entry = self._keys.get(key)
        if entry is None or entry.handle is None or not entry.replicas:
            return None
        node: str = await _result(entry.handle.node.remote(), key)
        return node

    async def evict(self, key: str) -> bool:
        """Scale a key to zero now (its application is deleted) if nothing of this host's
        is in flight on it; return whether it was. Its next call deploys it again."""
        entry = self._keys.get(key)
        if entry is None or entry.handle is None or entry.in_flight:
            return False
        await self._retire(entry, reason="evicted on request")
        return True

    # -- keys -----------------------------------------------------------------------------

    def _forget_application(self, entry: _Key) -> None:
        """The key's application is gone (another runtime scaled it to zero): its next call
        deploys it again. Not while this runtime deploys or retires it."""
        if entry.handle is not None and not entry.lock.locked():
            entry.handle, entry.replicas, entry.status = None, 0, "NOT_STARTED"

    def _finished(self, entry: _Key) -> None:
        entry.in_flight -= 1
        entry.last_used = time.monotonic()
        self._settled.set()

    def _entry(self, backend: Backend) -> _Key:
        if self._task_group is None or self._closing:
            raise LimnerError(
                "the Ray runtime is not running; use it inside `async with RayRuntime()`"
            )
        key = backend.spec.key
        entry = self._keys.get(key)
        if entry is None:
            entry = _Key(
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

    async def _ready(self, backend: Backend) -> _Key:
        """The key's entry with a handle: deployed if it was not, room made if it is at
        zero replicas (the scale from zero then happens on the call itself)."""
        entry = self._entry(backend)
        if entry.handle is not None and entry.replicas > 0:
            return entry
        async with entry.lock:
            if entry.handle is None:
                await self._deploy(entry)
            elif entry.replicas == 0:
                await self._make_room(entry)
                entry.replicas = 1  # the call starts one; the next refresh says for sure
        return entry

    async def _deploy(self, entry: _Key) -> None:
        started = time.monotonic()
        totals = await anyio.to_thread.run_sync(_nodes, "total")
        entry.resources = replica_resources(
            entry.spec,
            entry.settings,
            entry.options,
            cluster_has_gpu_mb=any(GPU_MB in node for node in totals),
        )
        need = entry.resources.as_ray()
        check_fits(entry.key, need, totals, busy=False)
        running = (await anyio.to_thread.run_sync(self._statuses)).get(entry.app)
        if running is not None and running.status == "RUNNING" and running.running:
            # Another runtime (or an HTTP ingress replica) serves it already: share it.
            entry.handle = await anyio.to_thread.run_sync(_app_handle, entry.app)
            entry.replicas, entry.status, entry.owned = running.running, running.status, False
            return
        await self._make_room(entry)
        handle = await anyio.to_thread.run_sync(self._run_application, entry)
        entry.owned = True
        deadline = started + self.deploy_timeout
        while True:
            statuses = await anyio.to_thread.run_sync(self._statuses)
            found = statuses.get(entry.app, _NOT_DEPLOYED)
            entry.status = found.status
            if found.status == "RUNNING" and found.running:
                break
            if found.status in ("DEPLOY_FAILED", "UNHEALTHY") or time.monotonic() > deadline:
                await anyio.to_thread.run_sync(self._delete_application, entry.app)
                entry.status = "NOT_STARTED"
                if found.status != "DEPLOYING":
                    raise PluginError(
                        f"{entry.key} failed to deploy on the cluster: {found.message}"
                    )
                available = await anyio.to_thread.run_sync(_nodes, "available")
                check_fits(entry.key, need, available, busy=True)
                raise LimnerError(
                    f"{entry.key} was not running on the cluster after {self.deploy_timeout:g} "
                    f"s ({found.message or found.status}); its application was deleted"
                )
            await anyio.sleep(0.1)
        entry.handle, entry.replicas = handle, found.running
        entry.loads += 1
        entry.load_seconds += time.monotonic() - started
        log.info("deployed %s in %.1f s", entry.key, time.monotonic() - started)

    async def _make_room(self, entry: _Key) -> None:
        """Until a node has room for one replica: scale the least recently used idle key of
        the cluster to zero (any limner application under ``app_prefix``, whichever runtime
        deployed it); with none left, wait ``room_timeout`` for room, then fail with the
        largest room there is."""
        assert entry.resources is not None
        need = entry.resources.as_ray()
        while True:
            available = await anyio.to_thread.run_sync(_nodes, "available")
            if any(fits(need, node) for node in available):
                return
            victim = await self._least_recently_used_idle(entry)
            if victim is None:
                # Room may still come: a replica stopping here or elsewhere.
                with anyio.move_on_after(self.room_timeout):
                    while not any(fits(need, node) for node in available):
                        await anyio.sleep(0.1)
                        available = await anyio.to_thread.run_sync(_nodes, "available")
                check_fits(entry.key, need, available, busy=True)
                return
            app, freed = victim
            before = _free(available)
            await self._scale_to_zero(app, reason=f"to make room for {entry.key}")
            with anyio.move_on_after(self.room_timeout):  # until Ray counts what it freed
                while not any(fits(need, node) for node in available) and not all(
                    _free(available).get(name, 0.0) + 1e-9 >= before.get(name, 0.0) + amount
                    for name, amount in freed.items()
                ):
                    await anyio.sleep(0.1)
                    available = await anyio.to_thread.run_sync(_nodes, "available")

    async def _least_recently_used_idle(
        self, entry: _Key
    ) -> tuple[str, Mapping[str, float]] | None:
        """The cluster's idle application used longest ago, other than ``entry``'s, and what
        its replicas hold (Ray's units): idle by its replicas' reports and, for this
        runtime's own keys, by the calls in flight here."""
        statuses = await anyio.to_thread.run_sync(self._statuses)
        usage = await self._usage()
        mine = {other.app: other for other in self._keys.values()}
        idle: list[tuple[str, float | None]] = []
        for app, status in statuses.items():
            own = mine.get(app)
            if app == entry.app or not status.running or (own is not None and own.in_flight):
                continue
            found = usage.get(app)
            if found is not None and found.busy:
                continue
            last_used = found.last_used if found is not None else None
            if own is not None and own.last_used is not None:  # this host's calls count too
                last_used = max(last_used or 0.0, _wall_clock(own.last_used))
            idle.append((app, last_used))
        oldest = least_recently_used(idle)
        if oldest is None:
            return None
        own, replicas = mine.get(oldest), statuses[oldest].running
        if own is not None and own.resources is not None:
            return oldest, {name: n * replicas for name, n in own.resources.as_ray().items()}
        return oldest, usage[oldest].resources if oldest in usage else {}

    async def _scale_to_zero(self, app: str, *, reason: str) -> None:
        """Delete an application: this runtime's through its entry, another's directly (that
        runtime deploys it again on its next call)."""
        own = next((other for other in self._keys.values() if other.app == app), None)
        if own is not None and own.handle is not None:
            await self._retire(own, reason=reason)
            return
        log.info("scaling %s to zero: %s", app, reason)
        await anyio.to_thread.run_sync(self._delete_application, app)

    async def _retire(self, entry: _Key, *, reason: str) -> None:
        async with entry.lock:
            if entry.handle is None or entry.in_flight:
                return
            entry.handle, entry.replicas = None, 0  # new calls wait on the lock, then deploy
            log.info("scaling %s to zero: %s", entry.key, reason)
            await anyio.to_thread.run_sync(self._delete_application, entry.app)
            entry.status = "NOT_STARTED"
            entry.evictions += 1

    async def _credit_actor(self) -> Any:
        if self.stream_window == 0:
            return None
        if self._credits is None:
            ray = _import_ray()
            from ._credits import Credits

            self._credits = ray.remote(num_cpus=0)(Credits).remote()
        return self._credits

    # -- Serve, called in threads ---------------------------------------------------------

    def _run_application(self, entry: _Key) -> Any:
        from ray import cloudpickle, serve

        from ._replica import LimnerReplica

        assert entry.resources is not None
        arguments = (entry.spec, entry.settings, dict(entry.options.pool_options))
        try:
            cloudpickle.dumps(arguments)
        except Exception as error:
            raise LimnerError(
                f"{entry.key}'s spec, settings or pool options do not pickle, so they cannot "
                f"reach a replica: {error!r}"
            ) from None
        with warnings.catch_warnings():  # metrics_interval_s: deprecated, still what counts
            warnings.simplefilter("ignore", DeprecationWarning)
            deployment = self._deployment(serve, LimnerReplica, entry)
            return serve._run(
                deployment.bind(*arguments, True),
                name=entry.app,
                route_prefix=None,
                _blocking=False,
            )

    def _deployment(self, serve: Any, replica: type, entry: _Key) -> Any:
        assert entry.resources is not None
        return serve.deployment(replica).options(
            name=_DEPLOYMENT,
            ray_actor_options=entry.resources.ray_actor_options(),
            autoscaling_config=entry.options.autoscaling_config(),
            max_ongoing_requests=entry.options.max_ongoing_requests,
            logging_config={"log_level": self.log_level, "enable_access_log": False},
            graceful_shutdown_wait_loop_s=0.1,
        )

    def _delete_application(self, app: str) -> None:
        from ray import serve

        serve.delete(app)

    def _statuses(self) -> dict[str, _Status]:
        """Each application of ours as Serve sees it."""
        from ray import serve

        found: dict[str, _Status] = {}
        for name, status in serve.status().applications.items():
            if not name.startswith(self.app_prefix):
                continue
            deployments = status.deployments.values()
            running = sum(int(d.replica_states.get("RUNNING", 0)) for d in deployments)
            messages = [status.message] + [d.message for d in deployments]
            found[name] = _Status(
                status=str(getattr(status.status, "value", status.status)),
                running=running,
                message="; ".join(m for m in messages if m),
            )
        return found


def _nodes(kind: str) -> list[dict[str, float]]:
    """Each live node's total or available resources."""
    from ray._private import state

    if kind == "total":
        per_node = state.total_resources_per_node()
    else:
        per_node = state.available_resources_per_node()
    return [dict(resources) for resources in per_node.values()]


def _free(nodes: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each resource summed over the nodes."""
    total: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def _app_handle(app: str) -> Any:
    from ray import serve

    return serve.get_app_handle(app)


def _wall_clock(monotonic: float) -> float:
    """A ``time.monotonic()`` reading of this process as wall-clock time, which the
    replicas' reports use."""
    return time.time() - (time.monotonic() - monotonic)


def _snapshot(entry: _Key) -> KeyStats:
    usage = entry.usage
    memory = 0.0
    if entry.resources is not None:
        memory = entry.resources.memory_mb or entry.resources.gpu_memory_mb
    return KeyStats(
        key=entry.key,
        state=entry.state,
        workers=entry.replicas,
        queue_depth=usage.queue_depth if usage else 0,
        in_flight=entry.in_flight,
        batches=usage.batches if usage else 0,
        mean_batch_size=usage.mean_batch_size if usage else 0.0,
        loads=entry.loads,
        load_seconds=entry.load_seconds,
        evictions=entry.evictions,
        memory_mb=memory * entry.replicas,
        device="ray",
        last_used=entry.last_used,
    )


def _on_asyncio() -> bool:
    try:
        return sniffio.current_async_library() == "asyncio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


def _cancel(response: Any) -> None:
    """Cancel a Serve request; one whose application is gone has nothing left to cancel."""
    with contextlib.suppress(Exception):
        response.cancel()


async def _result(response: Any, key: str) -> Any:
    """A Serve response's value, its errors typed; cancelling the caller cancels it."""
    try:
        if _on_asyncio():
            return await response
        return await anyio.to_thread.run_sync(response.result, abandon_on_cancel=True)
    except Exception as error:
        raise typed_error(error, key) from None
    except BaseException:
        _cancel(response)
        raise


async def _next(stream: Any, key: str) -> Any:
    """A Serve stream's next chunk (``StopAsyncIteration`` at its end), errors typed."""
    try:
        if _on_asyncio():
            return await stream.__anext__()

        def step() -> tuple[bool, Any]:
            try:
                return True, next(stream)
            except StopIteration:
                return False, None

        more, item = await anyio.to_thread.run_sync(step, abandon_on_cancel=True)
    except StopAsyncIteration:
        raise
    except Exception as error:
        raise typed_error(error, key) from None
    if not more:
        raise StopAsyncIteration
    return item


class _ApplicationGone(ModelError):
    """A key's application was deleted (by another runtime, making room) after this runtime
    took its handle: deploying it again answers the call."""


def typed_error(error: BaseException, key: str) -> BaseException:
    """What a caller of the runtime sees: the replica's own :class:`~limner.LimnerError`,
    out of Ray's wrappers, or Ray's and Serve's failures as limner's errors."""
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    seen: BaseException = error
    while isinstance(seen, ray_errors.RayTaskError) and getattr(seen, "cause", None) is not None:
        seen = seen.cause
    if isinstance(seen, LimnerError):
        return seen
    if isinstance(seen, serve_errors.BackPressureError):
        queued = seen.args[1] if len(seen.args) > 1 else 0
        retry = seen.args[3] if len(seen.args) > 3 and seen.args[3] else 1.0
        return PoolBusy(key, queue_size=int(queued), retry_after=float(retry))
    if isinstance(seen, serve_errors.DeploymentUnavailableError):
        return _ApplicationGone(f"{key}'s application on the cluster is gone: {seen!r}")
    if isinstance(seen, (serve_errors.RequestCancelledError, ray_errors.TaskCancelledError)):
        return Cancelled(f"the call to {key} on the cluster was cancelled")
    failure = ModelError(f"{key} failed on the cluster: {seen!r}")
    failure.__cause__ = seen
    return failure
