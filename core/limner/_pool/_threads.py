"""Running plugin code in this process: worker threads, never the event loop.

Loads, batches and generations run in threads; a generation's steps cross back to the loop
through a one-slot stream, which is both its progress channel and its backpressure.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import gc
import logging
import threading
import types
import weakref
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import numpy as np
import numpy.typing as npt

from limner.errors import Cancelled
from limner.plugin._backends import Backend
from limner.plugin._generation import (
    GenerationChunk,
    GenerationResult,
    Progress,
)
from limner.plugin._memory import reserving_memory

__all__ = ["ReserveOnLoop", "ThreadExecutor", "is_out_of_memory", "restore_attributes"]

Vector = npt.NDArray[np.float32]

ReserveOnLoop = Callable[[float, str], Coroutine[Any, Any, None]]
"""The pool's answer to a backend's ``reserve_memory`` (MB, what), run on its event loop."""

log = logging.getLogger("limner.pool")

_one_load_at_a_time = threading.Lock()
"""Held by every load in the process. transformers' and diffusers' ``from_pretrained`` set
torch's process-wide default dtype while they build a model and put back what they found:
two loads at once (bf16 both, or bf16 and fp32) can leave the whole process in bf16, and
every model any thread builds afterwards with it."""


def _load_alone(backend: Backend) -> None:
    with _one_load_at_a_time:
        backend.load()


class ThreadExecutor:
    """Runs one pool's plugin calls in threads: at most ``max_threads`` batches or
    generations at once, at most two loads or unloads, and one load at a time in the
    process.

    Batches run on ``max_threads`` threads of their own, not on whichever of anyio's worker
    threads is free: glibc gives each thread its own malloc arena, and a forward pass whose
    activations landed in another cold arena each call (anyio hands out the thread that last
    decoded an image) ran about 15% slower than the same pass on a steady thread.
    """

    def __init__(self, *, max_threads: int) -> None:
        self._calls = anyio.CapacityLimiter(max_threads)
        self._loads = anyio.CapacityLimiter(2)
        self._max_threads = max_threads
        self._batch_threads: concurrent.futures.ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Let the batch threads end (they finish what they run; nothing waits for them)."""
        threads, self._batch_threads = self._batch_threads, None
        if threads is not None:
            threads.shutdown(wait=False)

    async def _on_batch_thread(self, function: Any, items: Sequence[Any]) -> Any:
        if self._batch_threads is None:
            self._batch_threads = concurrent.futures.ThreadPoolExecutor(
                self._max_threads, thread_name_prefix="limner-batch"
            )
        submit = self._batch_threads.submit
        return await anyio.to_thread.run_sync(
            lambda: submit(function, items).result(), limiter=self._calls
        )

    async def memory_device(self, backend: Backend) -> str:
        return await anyio.to_thread.run_sync(backend.memory_device)

    async def load(self, backend: Backend) -> None:
        await anyio.to_thread.run_sync(_load_alone, backend, limiter=self._loads)

    async def unload(self, backend: Backend, *, baseline: dict[str, Any] | None) -> None:
        """Unload, drop whatever loading attached (see :func:`restore_attributes`), and give
        the memory back."""
        await anyio.to_thread.run_sync(_unload_and_collect, backend, baseline, limiter=self._loads)

    async def run_batch(
        self, function: Callable[[Sequence[Any]], Any], items: Sequence[Any]
    ) -> Any:
        """One batch of a backend's batched method; an out-of-memory batch is retried once
        as two halves."""
        try:
            return await self._on_batch_thread(function, items)
        except Exception as error:
            if not is_out_of_memory(error) or len(items) < 2:
                raise
            log.warning("out of memory on a batch of %d; retrying as two halves", len(items))
            half = len(items) // 2
            first = await self._on_batch_thread(function, items[:half])
            second = await self._on_batch_thread(function, items[half:])
            return np.concatenate([np.asarray(first), np.asarray(second)])

    async def run_stream(
        self,
        function: Callable[..., GenerationResult],
        args: tuple[Any, ...],
        send: anyio.abc.ObjectSendStream[GenerationChunk | BaseException],
        cancel: threading.Event,
        *,
        reserve: ReserveOnLoop | None = None,
    ) -> GenerationResult:
        """One run of a backend's streamed method, sending each step's progress; the send
        blocks the thread until the consumer has room, and a consumer that left stops the
        run at its next step. The backend's ``reserve_memory`` asks ``reserve`` (on the
        loop), when given."""

        def on_step(progress: Progress) -> None:
            if cancel.is_set():
                raise Cancelled("the consumer stopped reading")
            try:
                anyio.from_thread.run(send.send, progress)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as gone:
                raise Cancelled("the consumer went away") from gone
            if cancel.is_set():
                raise Cancelled("the consumer stopped reading")

        def ask(memory_mb: float, what: str) -> None:
            assert reserve is not None
            anyio.from_thread.run(reserve, memory_mb, what)

        def run() -> GenerationResult:
            if reserve is None:
                return function(*args, on_step=on_step)
            with reserving_memory(ask):
                return function(*args, on_step=on_step)

        return await anyio.to_thread.run_sync(run, limiter=self._calls)


def _unload_and_collect(backend: Backend, baseline: dict[str, Any] | None) -> None:
    attached = _watch_attached(backend, baseline)
    backend.unload()
    if baseline is not None:
        restore_attributes(backend, baseline)
    if attached is None or any(watched() is not None for watched in attached):
        gc.collect()  # something outlived its references (a cycle), or nothing was watched
    _trim_heap()


_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)


def _watch_attached(
    backend: Backend, baseline: dict[str, Any] | None
) -> list[weakref.ref[Any]] | None:
    """Weak references to what loading attached to ``backend``, and to what that holds one
    level down; ``None`` when none of it can be watched.

    When all of it is gone once the backend is unloaded and restored, reference counting has
    freed the weights, and the full collection that would find them in a cycle is skipped:
    in a process with torch imported it takes a quarter of a second of the GIL, on the path
    of every swap between models.
    """
    if baseline is None:
        return None
    held: list[Any] = []
    for name, value in vars(backend).items():
        if isinstance(value, _PLAIN) or (name in baseline and value is baseline[name]):
            continue
        held.append(value)
        if isinstance(value, dict):
            held.extend(value.values())
        elif isinstance(value, (list, tuple)):
            held.extend(value)
        elif hasattr(value, "__dict__"):
            held.extend(vars(value).values())
    watched = []
    for item in held:
        if isinstance(item, (*_PLAIN, *_SHARED)):
            continue
        try:
            watched.append(weakref.ref(item))
        except TypeError:
            continue  # not weakly referable (a dtype, a device): it holds no weights
    return watched or None


def restore_attributes(backend: Backend, baseline: dict[str, Any]) -> None:
    """Put a backend's attributes back as they were before ``load``.

    Eviction must free the weights whatever the plugin's ``unload`` does (the default does
    nothing): every attribute ``load`` or serving added is deleted, and every one rebound to
    another object is reset. Plain values (flags, counters, strings) are kept, and so are
    objects changed in place, which hold no weights that were not there before the load.
    """
    current = vars(backend)
    for name in list(current):
        if name not in baseline:
            del current[name]
        elif current[name] is not baseline[name] and not isinstance(current[name], _PLAIN):
            current[name] = baseline[name]


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise), so memory
    readings after an eviction show the room it made."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to trim
    libc.malloc_trim(0)


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError, or torch's CUDA out-of-memory error (matched by name: no torch import)."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
