"""Calls and streams to a key's replicas on either event loop: retried once when the
key's application is gone, their errors translated into limner's.

Kept apart from the runtime so that what a caller sees when a replica fails, is busy, is
cancelled or is gone is decided in one place, the same for calls and streams. Ray is
imported only when an error is translated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import sniffio

from limner import GenerationChunk
from limner.errors import Cancelled, LimnerError, ModelError, PoolBusy, RuntimeUnavailable

from ._keys import KeyEntry

__all__ = [
    "REPLACEMENT_SECONDS",
    "ApplicationGone",
    "call",
    "cancel",
    "next_chunk",
    "open_stream",
    "result",
    "typed_error",
]

REPLACEMENT_SECONDS = 2.0
"""The ``retry_after`` of a call whose replica died: about what Serve takes to start another."""

Ready = Callable[[], Awaitable[KeyEntry]]
"""The key's entry, its application deployed (or room made for it) if need be."""


def _on_asyncio() -> bool:
    try:
        return sniffio.current_async_library() == "asyncio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


def cancel(response: Any) -> None:
    """Cancel a Serve request; one whose application is gone has nothing left to cancel."""
    with contextlib.suppress(Exception):
        response.cancel()


async def result(response: Any, key: str) -> Any:
    """A Serve response's value, its errors typed; cancelling the caller cancels it."""
    try:
        if _on_asyncio():
            return await response
        return await anyio.to_thread.run_sync(response.result, abandon_on_cancel=True)
    except Exception as error:
        raise typed_error(error, key) from None
    except BaseException:
        cancel(response)
        raise


async def next_chunk(stream: Any, key: str) -> Any:
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


async def call(
    ready: Ready, send: Callable[[Any], Any], finished: Callable[[KeyEntry], None]
) -> Any:
    """``send(handle)``'s answer from a replica of the key, deployed again (once) if
    another runtime scaled it to zero since this one last looked; ``finished`` ends the
    entry's call in flight."""
    for last_try in (False, True):
        entry = await ready()
        entry.in_flight += 1
        try:
            return await result(send(entry.handle), entry.key)
        except ApplicationGone:
            if last_try:
                raise
            entry.forget_application()
        finally:
            finished(entry)
    raise AssertionError("unreachable")


async def open_stream(
    ready: Ready, send: Callable[[Any], Any], finished: Callable[[KeyEntry], None]
) -> tuple[KeyEntry, Any, GenerationChunk | None]:
    """The key's stream from ``send(handle)`` and its first chunk (None: it ended), as
    :func:`call` retries; the entry's call stays in flight until the caller ends it."""
    for last_try in (False, True):
        entry = await ready()
        entry.in_flight += 1
        response = send(entry.handle)
        try:
            return entry, response, await next_chunk(response, entry.key)
        except StopAsyncIteration:
            return entry, response, None
        except BaseException as error:
            finished(entry)
            cancel(response)
            if last_try or not isinstance(error, ApplicationGone):
                raise
            entry.forget_application()
    raise AssertionError("unreachable")


class ApplicationGone(ModelError):
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
        return ApplicationGone(f"{key}'s application on the cluster is gone: {seen!r}")
    if isinstance(seen, (serve_errors.RequestCancelledError, ray_errors.TaskCancelledError)):
        return Cancelled(f"the call to {key} on the cluster was cancelled")
    lost = (
        ray_errors.RayActorError,
        ray_errors.WorkerCrashedError,
        ray_errors.NodeDiedError,
        ray_errors.LocalRayletDiedError,
        serve_errors.ReplicaUnavailableError,
    )
    if isinstance(seen, lost):
        unavailable = RuntimeUnavailable(
            f"the replica of {key} running the call died ({type(seen).__name__}): Serve "
            f"starts another; retry in {REPLACEMENT_SECONDS:g} s",
            key=key,
            retry_after=REPLACEMENT_SECONDS,
        )
        unavailable.__cause__ = seen
        return unavailable
    failure = ModelError(f"{key} failed on the cluster: {seen!r}")
    failure.__cause__ = seen
    return failure
