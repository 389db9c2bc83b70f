"""One replica of one model key: limner's own pool, over a backend built on the replica.

Serve runs this class (``serve.deployment`` wraps it when a key is deployed). It receives the
key's spec and settings, frozen data, and builds its backend here: from the replica's own
registry when the plugin installed on its node serves the key, else from the spec shipped
(a host-registered key, whose factory is an import path or an importable class). The
plugin's blocking code then runs exactly as in one process: a :class:`~limner.Pool` holds
the weights, batches, halves out-of-memory batches and stops a generation at its next step
when its stream is closed, which is what Serve does to this replica's stream when the
caller goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from limner import (
    GenerationChunk,
    KeyStats,
    ModelSettings,
    ModelSpec,
    Pool,
    default_registry,
)
from limner.errors import LimnerError, PluginError
from limner.plugin import Backend
from limner.runtime import BatchCall, StreamCall, row_for

__all__ = ["LimnerReplica", "build_backend"]

log = logging.getLogger("limner.ray")


def build_backend(spec: ModelSpec, settings: ModelSettings) -> Backend:
    """The key's backend, built here (cheaply: no weights) with the host's settings."""
    local = _local_spec(spec.key)
    if local is not None and local != spec:
        log.warning(
            "the plugin on this node declares %s differently from the host's; using this "
            "node's (install the same plugin versions everywhere)",
            spec.key,
        )
    chosen = local or spec
    factory: Any = chosen.factory
    if isinstance(factory, str):
        module_name, _, attribute = factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except Exception as error:
            raise PluginError(
                f"a replica of {spec.key} could not import its factory {chosen.factory!r}: "
                f"{error!r}; install the plugin on every node"
            ) from error
    try:
        backend: Backend = factory(chosen, settings)
    except LimnerError:
        raise
    except Exception as error:
        raise PluginError(f"a replica failed to build {spec.key}: {error!r}") from error
    assert chosen.capability is not None, "registered specs have their capability"
    row = row_for(chosen.capability)
    if not isinstance(backend, row.backend):
        raise PluginError(
            f"the factory of {spec.key} returned {type(backend).__name__}, "
            f"not an {row.backend.__name__}"
        )
    return backend


def _find_board(app: str) -> Any:
    """The cluster's board actor, or None when there is none now."""
    import ray

    from ._usage import BOARD_NAME, BOARD_NAMESPACE

    try:
        return ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
    except ValueError:
        log.debug("no %s actor on this cluster now: %s reports nothing", BOARD_NAME, app)
        return None


def _local_spec(key: str) -> ModelSpec | None:
    try:
        return default_registry().spec(key)
    except LimnerError:
        return None


class LimnerReplica:
    """A Serve deployment's class: one backend, one pool, started on the first call."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: ModelSettings,
        pool_options: Mapping[str, Any],
        report: bool = False,
    ) -> None:
        """``report``: say what this replica does to the cluster's board (see ``_usage``)
        every ``REPORT_SECONDS``, from now until it stops."""
        self.backend = build_backend(spec, settings)
        self.key = spec.key
        self._pool_options = {"drain_timeout": 10.0, **pool_options}
        self._pool: Pool | None = None
        self._host: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._error: BaseException | None = None
        self._calls = 0
        self._last_used: float | None = None  # wall clock: compared across nodes
        self._reporter: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # a call started on an idle replica, or the last ended
        if report:
            self._reporter = asyncio.get_running_loop().create_task(self._report_periodically())

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        self._calls += 1
        if self._calls == 1:
            self._changed.set()
        try:
            yield
        finally:
            self._calls -= 1
            self._last_used = time.time()
            if not self._calls:
                self._changed.set()

    async def _running(self) -> Pool:
        """The pool, entered by a task of its own that lives as long as the replica."""
        if self._pool is not None:
            return self._pool
        if self._host is None:
            self._host = asyncio.get_running_loop().create_task(self._hold_pool())
        await self._ready.wait()
        if self._pool is None:
            raise LimnerError(f"the pool of a replica of {self.key} did not start: {self._error}")
        return self._pool

    async def _hold_pool(self) -> None:
        try:
            async with Pool(**self._pool_options) as pool:
                self._pool = pool
                self._ready.set()
                await self._stop.wait()
        except BaseException as error:
            self._error = error
            raise
        finally:
            self._pool = None
            self._ready.set()

    async def run_batch(self, call: BatchCall) -> npt.NDArray[np.float32]:
        with self._call():
            pool = await self._running()
            return await pool.run_batch(self.backend, call)

    async def run_stream(
        self, call: StreamCall, stream: str, credits: Any, window: int
    ) -> AsyncIterator[GenerationChunk]:
        """The pool's stream, at most ``window`` chunks ahead of the consumer (``credits``
        is the window's actor, or None for no window)."""
        with self._call():
            pool = await self._running()
            chunks = pool.run_stream(self.backend, call)
            sent = 0
            try:
                async for chunk in chunks:
                    if (
                        credits is not None
                        and sent >= window
                        and not await credits.wait.remote(stream, sent - window + 1)
                    ):
                        return  # the consumer closed the stream
                    sent += 1
                    yield chunk
            finally:
                # Serve cancels this generator when the caller goes away: closing the pool's
                # stream makes the pipeline's next step raise, and frees the worker.
                await chunks.aclose()  # type: ignore[attr-defined]

    async def load(self) -> None:
        with self._call():
            pool = await self._running()
            await pool.load(self.backend)

    async def node(self) -> str:
        """The id of the Ray node this replica runs on."""
        import ray

        node_id: str = ray.get_runtime_context().get_node_id()
        return node_id

    async def stats(self) -> KeyStats | None:
        """This replica's pool figures (None before its first call)."""
        pool = self._pool
        if pool is None:
            return None
        return next(iter(pool.stats().values()), None)

    async def _report_periodically(self) -> None:
        """Until the replica stops: tell the board what this replica does, every
        ``REPORT_SECONDS`` and soon after it turns busy or idle (at most ten times a
        second); its row goes when it stops. A board that is gone (or not made yet) is
        looked up again every period: a runtime makes a new one."""
        import ray
        from ray import serve

        from ._usage import REPORT_SECONDS, ReplicaReport

        context = serve.get_replica_context()
        app, replica = context.app_name, context.replica_id.unique_id
        started = time.time()
        board: Any = None
        resources = dict(ray.get_runtime_context().get_assigned_resources())
        try:
            while not self._stop.is_set():
                self._changed.clear()
                if board is None:
                    board = await asyncio.to_thread(_find_board, app)
                report = ReplicaReport(
                    app=app,
                    replica=replica,
                    calls=self._calls,
                    stats=await self.stats(),
                    last_used=self._last_used,
                    resources=resources,
                    started=started,
                    reported=time.time(),
                )
                if board is not None:
                    try:
                        await board.report.remote(report)
                    except Exception as error:  # gone: look it up again next time
                        log.debug("reporting to the board failed: %r", error)
                        board = None
                await asyncio.sleep(0.1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), REPORT_SECONDS)
        finally:
            if board is not None:
                with contextlib.suppress(Exception):
                    await board.forget.remote(app, replica)

    async def __del__(self) -> None:
        """Serve's shutdown hook: drain and close the pool, unloading the weights."""
        self._stop.set()
        self._changed.set()
        if self._reporter is not None:
            with contextlib.suppress(BaseException):
                await self._reporter
        if self._host is not None:
            try:
                await self._host
            except BaseException as error:  # closing anyway; say why
                log.warning("the pool of %s closed with %r", self.key, error)
