"""``RayRuntime``: the runtime seam, served by Ray Serve, one application per model key.

The host keeps only what a caller needs: per key, the Serve handle, what its replicas ask of
the cluster, the calls in flight and when it was last used. Everything that runs a model
runs in the replicas (:mod:`limner.ray._replica`), each a limner :class:`~limner.Pool`.
Ray is imported when a runtime starts, never when this module is imported.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
import sniffio
from anyio.abc import TaskGroup

from limner._backends import Backend, TextToImageBackend
from limner._generation_types import GenerationChunk, ImageGenerationConfig
from limner._runtime import KeyStats, ModelState, RequestKind
from limner._spec import ModelSettings, ModelSpec
from limner.errors import Cancelled, LimnerError, ModelError, PluginError, PoolBusy

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
    replica_stats: KeyStats | None = None

    @property
    def state(self) -> ModelState:
        if self.handle is not None and self.replicas > 0:
            return "ready"
        return "loading" if self.status == "DEPLOYING" else "cold"


class RayRuntime:
    """A :class:`~limner.Runtime` on a Ray cluster. Use as ``async with RayRuntime():``.

    ``address`` is Ray's: ``None`` joins the cluster this process is connected to, else
    ``RAY_ADDRESS``, else starts a local one (shut down again on exit); ``"auto"`` joins a
    running cluster; ``"ray://host:10001"`` goes through Ray Client. ``init_options`` are
    further ``ray.init`` arguments. Each key's replicas follow ``options_per_key[key]``, else
    ``options`` (:class:`RayKeyOptions`: resources, replicas, keep-alive, the replica's pool
    arguments). A key no node has room for now waits ``room_timeout`` seconds for room
    (after scaling this runtime's least recently used idle key to zero), then its callers get
    :class:`NoRoomInCluster`; one no node could ever hold gets it at once. A deployment not
    running after ``deploy_timeout`` seconds is deleted and its callers get an error, never
    a hang. A generation runs at most ``stream_window`` chunks
    ahead of its consumer (0: no bound). ``refresh_interval`` is how often ``stats()``'s
    replica counts are read from Serve.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        options: RayKeyOptions | None = None,
        options_per_key: Mapping[str, RayKeyOptions] | None = None,
        init_options: Mapping[str, Any] | None = None,
        deploy_timeout: float = 300.0,
        room_timeout: float = 10.0,
        stream_window: int = 4,
        refresh_interval: float = 5.0,
        drain_timeout: float = 30.0,
        app_prefix: str = "limner:",
        log_level: str = "WARNING",
    ) -> None:
        if stream_window < 0:
            raise ValueError("stream_window must be >= 0")
        if not (
            deploy_timeout > 0 and refresh_interval > 0 and min(room_timeout, drain_timeout) >= 0
        ):
            raise ValueError("timeouts and refresh_interval must be positive")
        self.address = address
        self.options = options or RayKeyOptions()
        self.options_per_key = dict(options_per_key or {})
        self.init_options = dict(init_options or {})
        self.deploy_timeout = deploy_timeout
        self.room_timeout = room_timeout
        self.stream_window = stream_window
        self.refresh_interval = refresh_interval
        self.drain_timeout = drain_timeout
        self.app_prefix = app_prefix
        self.log_level = log_level
        self._keys: dict[str, _Key] = {}
        self._task_group: TaskGroup | None = None
        self._closing = False
        self._started_ray = False
        self._credits: Any = None
        self._settled = anyio.Event()  # set whenever a call ends

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> RayRuntime:
        if self._task_group is not None:
            raise LimnerError("this runtime is already running")
        await anyio.to_thread.run_sync(self._connect)
        self._closing = False
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._refresh_periodically)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

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
                if entry.handle is not None or entry.status != "NOT_STARTED":
                    entry.handle, entry.replicas, entry.status = None, 0, "NOT_STARTED"
                    serve.delete(entry.app, _blocking=False)
                    deleting.add(entry.app)
            deadline = time.monotonic() + 30
            while deleting & set(self._statuses()) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._credits is not None:
                ray.kill(self._credits)
                self._credits = None
        finally:
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False

    # -- the runtime ----------------------------------------------------------------------

    async def embed(self, backend: Backend, kind: RequestKind, items: Sequence[Any]) -> Vector:
        """Rows from one replica of the key (its pool batches them with other callers')."""
        entry = await self._ready(backend)
        entry.in_flight += 1
        try:
            response = entry.handle.embed.remote(kind, list(items))
            rows = await _result(response, entry.key)
        finally:
            self._finished(entry)
        # Ray hands back read-only arrays; the in-process pool's rows are the caller's own.
        return np.array(rows, dtype=np.float32)

    async def generate(
        self, backend: Backend, prompt: str, config: ImageGenerationConfig
    ) -> AsyncIterator[GenerationChunk]:
        """A replica's generation, chunk by chunk, at most ``stream_window`` ahead; closing
        this iterator cancels the remote run, which stops at its next step."""
        assert isinstance(backend, TextToImageBackend)
        entry = await self._ready(backend)
        credits = await self._credit_actor()
        stream = uuid.uuid4().hex
        entry.in_flight += 1
        response = entry.handle.options(stream=True).generate.remote(
            prompt, config, stream, credits, self.stream_window
        )
        taken = 0
        try:
            while True:
                try:
                    chunk = await _next(response, entry.key)
                except StopAsyncIteration:
                    return
                taken += 1
                if credits is not None:
                    credits.ack.remote(stream, taken)
                yield chunk
        finally:
            self._finished(entry)
            response.cancel()
            if credits is not None:
                credits.close.remote(stream)

    async def load(self, backend: Backend) -> None:
        """Deploy the key if it is not, and load its weights in one replica now."""
        entry = await self._ready(backend)
        entry.in_flight += 1
        try:
            await _result(entry.handle.load.remote(), entry.key)
        finally:
            self._finished(entry)

    def stats(self) -> dict[str, KeyStats]:
        """Per key: ``workers`` is its running replicas (as last read from Serve, see
        ``refresh_interval``), ``in_flight`` this host's calls, ``loads`` and
        ``load_seconds`` its deployments by this runtime, ``evictions`` the times this
        runtime scaled it to zero, ``memory_mb`` what its replicas reserve; batches are one
        replica's, as of the last :meth:`refresh`."""
        return {key: _snapshot(entry) for key, entry in sorted(self._keys.items())}

    async def refresh(self, *, replica_stats: bool = True) -> dict[str, KeyStats]:
        """Read the replica counts from Serve now (and, when ``replica_stats``, one
        replica's pool figures per running key); return :meth:`stats`."""
        statuses = await anyio.to_thread.run_sync(self._statuses)
        for entry in self._keys.values():
            found = statuses.get(entry.app, _NOT_DEPLOYED)
            entry.status = found.status
            entry.replicas = found.running if entry.handle is not None else 0
            if replica_stats and entry.state == "ready":
                with anyio.move_on_after(5):
                    entry.replica_stats = await self.replica_stats(entry.key)
        return self.stats()

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
        await self._make_room(entry)
        handle = await anyio.to_thread.run_sync(self._run_application, entry)
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
        this runtime to zero; with none left, fail with the largest room there is."""
        assert entry.resources is not None
        need = entry.resources.as_ray()
        while True:
            available = await anyio.to_thread.run_sync(_nodes, "available")
            if any(fits(need, node) for node in available):
                return
            idle = [
                (other.key, other.last_used)
                for other in self._keys.values()
                if other is not entry
                and other.handle is not None
                and other.replicas > 0
                and other.in_flight == 0
            ]
            victim = least_recently_used(idle)
            if victim is None:
                # Room may still come: a replica stopping here or elsewhere.
                with anyio.move_on_after(self.room_timeout):
                    while not any(fits(need, node) for node in available):
                        await anyio.sleep(0.1)
                        available = await anyio.to_thread.run_sync(_nodes, "available")
                check_fits(entry.key, need, available, busy=True)
                return
            retired = self._keys[victim]
            freed = retired.resources.as_ray() if retired.resources is not None else {}
            before = _free(available)
            await self._retire(retired, reason=f"to make room for {entry.key}")
            with anyio.move_on_after(self.room_timeout):  # until Ray counts what it freed
                while not any(fits(need, node) for node in available) and not all(
                    _free(available).get(name, 0.0) + 1e-9 >= before.get(name, 0.0) + amount
                    for name, amount in freed.items()
                ):
                    await anyio.sleep(0.1)
                    available = await anyio.to_thread.run_sync(_nodes, "available")

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
                deployment.bind(*arguments), name=entry.app, route_prefix=None, _blocking=False
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

    async def _refresh_periodically(self) -> None:
        while True:
            await anyio.sleep(self.refresh_interval)
            try:
                await self.refresh(replica_stats=False)
            except Exception:
                log.exception("reading the Ray applications' status failed")


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


def _snapshot(entry: _Key) -> KeyStats:
    sample = entry.replica_stats
    memory = 0.0
    if entry.resources is not None:
        memory = entry.resources.memory_mb or entry.resources.gpu_memory_mb
    return KeyStats(
        key=entry.key,
        state=entry.state,
        workers=entry.replicas,
        queue_depth=0,
        in_flight=entry.in_flight,
        batches=sample.batches if sample else 0,
        mean_batch_size=sample.mean_batch_size if sample else 0.0,
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


async def _result(response: Any, key: str) -> Any:
    """A Serve response's value, its errors typed; cancelling the caller cancels it."""
    try:
        if _on_asyncio():
            return await response
        return await anyio.to_thread.run_sync(response.result, abandon_on_cancel=True)
    except Exception as error:
        raise typed_error(error, key) from None
    except BaseException:
        response.cancel()
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
    if isinstance(seen, (serve_errors.RequestCancelledError, ray_errors.TaskCancelledError)):
        return Cancelled(f"the call to {key} on the cluster was cancelled")
    failure = ModelError(f"{key} failed on the cluster: {seen!r}")
    failure.__cause__ = seen
    return failure
