"""The process-wide default pool, its event-loop thread, and the blocking facades.

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
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread
from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._pool import Pool, current_pool
from .errors import BlockingCallInEventLoop

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from ._capabilities import ImageInput
    from ._embedder import ImageEmbedder
    from ._generation import GenerationChunk, GenerationResult, ImageGenerationConfig
    from ._generator import ImageGenerator

__all__ = [
    "BlockingImageEmbedder",
    "BlockingImageGenerator",
    "default_pool",
    "ensure_no_running_loop",
    "in_pool",
    "iterate_in_pool",
]

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
                stack = contextlib.ExitStack()
                portal = stack.enter_context(start_blocking_portal())
                pool = Pool()
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


def ensure_no_running_loop(what: str) -> None:
    """Raise if called from inside a running event loop, where blocking would freeze it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise BlockingCallInEventLoop(
            f"{what} blocks, and was called from inside a running event loop; "
            "await the async API instead (drop .blocking())"
        )


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


async def in_pool(bound: Pool | None, function: Callable[[Pool], Awaitable[T]]) -> T:
    """Run ``function`` on the pool serving this call: ``bound`` (a model's ``using``), else
    the innermost ``async with Pool()``, else the default pool across loops."""
    pool = bound or current_pool()
    if pool is not None:
        return await function(pool)
    portal, default = _default.start()
    if _on_portal_thread():
        return await function(default)
    future = portal.start_task_soon(function, default)
    return await _await_future(future)


async def iterate_in_pool(
    bound: Pool | None,
    make: Callable[[Pool], AsyncIterator[GenerationChunk]],
) -> AsyncGenerator[GenerationChunk, None]:
    """Iterate a stream from the pool serving this call (resolved as by :func:`in_pool`);
    from the default pool on another loop, one cross-loop hop per item."""
    pool = bound or current_pool()
    portal: BlockingPortal | None = None
    if pool is None:
        portal, pool = _default.start()
        if _on_portal_thread():
            portal = None
    stream = make(pool)
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


def _call(what: str, function: Callable[..., Awaitable[T]], *args: Any) -> T:
    ensure_no_running_loop(what)
    portal, _ = _default.start()
    return portal.call(function, *args)


class BlockingImageEmbedder:
    """The same methods as :class:`~limner.ImageEmbedder`, as plain blocking calls.

    Safe to use from many threads at once: every call is handed to the default pool's loop.
    """

    def __init__(self, model: ImageEmbedder) -> None:
        self.model = model

    def __repr__(self) -> str:
        return f"<BlockingImageEmbedder {self.model.key}>"

    @property
    def key(self) -> str:
        return self.model.key

    @property
    def embedding_dimension(self) -> int:
        return self.model.embedding_dimension

    def embed_image(self, path: str | os.PathLike[str]) -> npt.NDArray[np.float32]:
        return _call("embed_image", self.model.embed_image, path)

    def embed_image_url(self, url: str) -> npt.NDArray[np.float32]:
        return _call("embed_image_url", self.model.embed_image_url, url)

    def embed_image_base64(self, data: str | bytes) -> npt.NDArray[np.float32]:
        return _call("embed_image_base64", self.model.embed_image_base64, data)

    def batch_embed_images(
        self, paths: Sequence[str | os.PathLike[str]]
    ) -> npt.NDArray[np.float32]:
        return _call("batch_embed_images", self.model.batch_embed_images, paths)

    def embed_images(self, inputs: Sequence[ImageInput]) -> npt.NDArray[np.float32]:
        return _call("embed_images", self.model.embed_images, inputs)

    def embed_text(self, texts: str | Sequence[str]) -> npt.NDArray[np.float32]:
        return _call("embed_text", self.model.embed_text, texts)


class BlockingImageGenerator:
    """:class:`~limner.ImageGenerator` as a blocking call with a progress callback."""

    def __init__(self, model: ImageGenerator) -> None:
        self.model = model

    def __repr__(self) -> str:
        return f"<BlockingImageGenerator {self.model.key}>"

    @property
    def key(self) -> str:
        return self.model.key

    def generate(
        self,
        prompt: str,
        config: ImageGenerationConfig | None = None,
        *,
        on_progress: Callable[[GenerationChunk], None] | None = None,
    ) -> GenerationResult:
        """Generate and return the result; ``on_progress`` sees each chunk on the loop thread."""
        return _call("generate", self.model.generate, prompt, config, on_progress)
