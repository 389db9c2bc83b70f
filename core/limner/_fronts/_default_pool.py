"""The process-wide default pool, its event-loop thread, and which runtime serves a call.

Host code that never creates a pool still gets one: the default pool runs in an event loop
on a daemon thread (an anyio blocking portal), started on first use. Synchronous callers
block on it; async callers on another loop await it through a cross-loop future, so their
own loop keeps running.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread
from anyio.from_thread import BlockingPortal, start_blocking_portal

from limner._pool import Pool, current_pool
from limner._pool._budget import memory_budget_from_env

if TYPE_CHECKING:
    from limner.plugin._generation import GenerationChunk
    from limner.runtime import Runtime

__all__ = ["default_pool", "in_runtime", "iterate_in_runtime", "run_on_default_loop"]

T = TypeVar("T")


class _DefaultPool:
    """One portal thread hosting one pool, both started lazily and stopped at exit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stack: contextlib.ExitStack | None = None
        self.portal: BlockingPortal | None = None
        self.pool: Pool | None = None
        self.thread_id: int | None = None

    def start(self) -> tuple[BlockingPortal, Pool]:
        if self.portal is not None and self.pool is not None:
            return self.portal, self.pool
        with self.lock:
            if self.portal is None or self.pool is None:
                # LIMNER_MEMORY_BUDGET, read before the thread starts: a bad value fails clean.
                budget = memory_budget_from_env()
                stack = contextlib.ExitStack()
                portal = stack.enter_context(start_blocking_portal())
                # Built on its own loop's thread: its locks and events belong to that loop.
                pool = portal.call(lambda: Pool(**budget))
                stack.enter_context(portal.wrap_async_context_manager(pool))
                self.thread_id = portal.call(threading.get_ident)
                self.stack, self.portal, self.pool = stack, portal, pool
                atexit.register(self.stop)
        return self.portal, self.pool

    def stop(self) -> None:
        with self.lock:
            stack, self.stack, self.portal, self.pool = self.stack, None, None, None
        if stack is not None:
            stack.close()


_default = _DefaultPool()


def default_pool() -> Pool:
    """The process-wide pool that serves models used without a pool of their own."""
    return _default.start()[1]


def _on_portal_thread() -> bool:
    return _default.thread_id == threading.get_ident()


async def _await_future(future: concurrent.futures.Future[T]) -> T:
    """Await a future from another loop without blocking this one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio or another loop: wait in a worker thread instead
        return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
    try:
        return await asyncio.wrap_future(future)
    except BaseException:
        future.cancel()
        raise


async def in_runtime(bound: Runtime | None, function: Callable[[Runtime], Awaitable[T]]) -> T:
    """Run ``function`` on the runtime serving this call: ``bound`` (a model's ``using``),
    else the innermost ``async with Pool()``, else the default pool across loops."""
    runtime = bound or current_pool()
    if runtime is not None:
        return await function(runtime)
    portal, default = _default.start()
    if _on_portal_thread():
        return await function(default)
    future = portal.start_task_soon(function, default)
    return await _await_future(future)


async def iterate_in_runtime(
    bound: Runtime | None,
    make: Callable[[Runtime], AsyncIterator[GenerationChunk]],
) -> AsyncGenerator[GenerationChunk, None]:
    """Iterate a stream from the runtime serving this call (resolved as by
    :func:`in_runtime`); from the default pool on another loop, one cross-loop hop per item."""
    runtime: Runtime | None = bound or current_pool()
    portal: BlockingPortal | None = None
    if runtime is None:
        portal, runtime = _default.start()
        if _on_portal_thread():
            portal = None
    stream = make(runtime)
    try:
        if portal is None:
            async for item in stream:
                yield item
            return
        while True:
            try:
                item = await _await_future(portal.start_task_soon(stream.__anext__))
            except StopAsyncIteration:
                return
            yield item
    finally:
        with anyio.CancelScope(shield=True):
            if portal is None:
                await _aclose(stream)
            else:
                await _await_future(portal.start_task_soon(_aclose, stream))


async def _aclose(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


def run_on_default_loop(function: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``function`` to completion on the default pool's loop, from a thread with no loop."""
    portal, _ = _default.start()
    return portal.call(function, *args)
