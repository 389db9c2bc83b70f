"""A key's workers at work: batched calls (embeddings), and streamed calls (generations) run
step by step.

These run as tasks of the pool; what they may not leave behind is a caller without an
answer, so every batch taken is settled in a ``finally``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import anyio.abc

from limner._pool._readings import Clock
from limner._pool._vectors import checked_vectors, describe_backend
from limner.errors import Cancelled, LimnerError, ModelError
from limner.plugin._generation import GenerationChunk
from limner.runtime import StreamCall

from ._batching import Request, Requeue
from ._keys import KeyState, Ticket
from ._policy import may_start_streamed
from ._threads import ReserveOnLoop, ThreadExecutor, is_out_of_memory

__all__ = ["DECODE_WAIT", "GROUP_PATIENCE_SHARE", "run_streamed", "serve_batches", "take_turn"]

#: The longest an idle model's batch waits for inputs callers are still decoding (a burst of
#: single-image requests decodes together; without the wait its first request would run
#: alone, then the rest). A lone request never waits: nothing else is decoding.
DECODE_WAIT = 0.1

#: A streamed call of the group running on a model starts ahead of an earlier call of
#: another group only while that call has waited less than this share of ``max_wait``.
GROUP_PATIENCE_SHARE = 0.05


async def serve_batches(
    state: KeyState,
    executor: ThreadExecutor,
    *,
    max_batch_wait: float,
    clock: Clock,
    shutting_down: Callable[[], bool],
    on_progress: Callable[[], None],
) -> bool:
    """Take batches off the key's queue and run them until the key's turn is over (return
    False) or a batch kills the worker (return True)."""
    assert state.slots is not None
    queue, max_items = state.queue, state.spec.info.max_batch_size
    while True:
        await queue.wait(unless=lambda: state.draining)
        if state.draining:
            return False  # what is queued waits for the key's next turn
        # Take the batch only once it can run: whatever queues meanwhile joins it.
        async with state.slots:
            if state.draining:
                return False
            batch: list[Request] = []
            try:
                if not queue.take(batch, max_items=max_items):
                    continue
                if max_batch_wait > 0 and state.busy_workers > 0:
                    await queue.top_up(batch, max_items=max_items, wait=max_batch_wait)
                elif state.decoding > 0:
                    await queue.top_up_while(
                        batch,
                        max_items=max_items,
                        pending=lambda: state.decoding > 0,
                        wait=DECODE_WAIT,
                    )
                    if max_batch_wait > 0:  # the last decoded ones are on their way
                        await queue.top_up(batch, max_items=max_items, wait=max_batch_wait)
                state.busy_workers += 1
                try:
                    died = await _run_batch(state, executor, batch)
                finally:
                    state.busy_workers -= 1
                    state.served_in_turn += 1
                    state.last_used = clock.now()
                    on_progress()
            finally:
                # Whatever stopped this worker (eviction, shutdown, its death), no caller
                # whose request it took is left waiting.
                gone = Cancelled("the pool shut down") if shutting_down() else Requeue()
                queue.settle(batch, error=gone)
        if died:
            return True


async def _run_batch(state: KeyState, executor: ThreadExecutor, batch: list[Request]) -> bool:
    """Run one batch and answer its callers; return True if the worker died of it."""
    backend = state.backend
    items = [item for request in batch for item in request.items]
    source = describe_backend(state.spec.key, backend)
    try:
        # The method was checked against the capability when the call was submitted.
        returned = await executor.run_batch(getattr(backend, batch[0].method), items)
        dimension = state.spec.info.embedding_dimension
        vectors = checked_vectors(returned, rows=len(items), dimension=dimension, source=source)
    except Exception as error:
        failure = error if isinstance(error, ModelError) else None
        if failure is None:
            failure = ModelError(f"{source} failed on a batch of {len(items)}: {error!r}")
            failure.__cause__ = error
        for request in batch:
            request.finish(error=failure)
        return is_out_of_memory(error)
    start = 0
    for request in batch:
        end = start + len(request.items)
        request.finish(result=vectors[start:end])
        start = end
    state.batches += 1
    state.batched_items += len(items)
    return False


async def take_turn(
    state: KeyState, ticket: Ticket, cancel: threading.Event, *, clock: Clock, patience: float
) -> anyio.CapacityLimiter | None:
    """Wait until ``state`` serves (loaded, its turn not over), a compute slot is free and
    the ticket's group may run (``_policy.may_start_streamed``, with ``patience``); return
    the slot, acquired, with the call counted as running, or ``None`` if the consumer left
    meanwhile. The scheduler's answer to the ticket (a failed load, no room) is raised."""
    while True:
        if ticket.error is not None:
            raise ticket.error
        if cancel.is_set():
            return None
        slots = state.slots
        if state.serving and slots is not None and slots.available_tokens >= 1:
            waiting = state.streamed_waiting()
            position = [t for t in state.tickets if t.kind == "generation"].index(ticket)
            if may_start_streamed(
                position=position,
                waiting=waiting,
                running_group=state.group,
                running=state.generations,
                now=clock.now(),
                patience=patience,
            ):
                # No await between the checks and this: the group and the count stay true.
                slots.acquire_nowait()
                state.group = ticket.group
                state.generations += 1
                state.notify()  # the next of its group may join it
                return slots
        await state.changed()


async def run_streamed(
    state: KeyState,
    executor: ThreadExecutor,
    slots: anyio.CapacityLimiter,
    call: StreamCall,
    send: anyio.abc.ObjectSendStream[GenerationChunk | BaseException],
    cancel: threading.Event,
    *,
    clock: Clock,
    on_progress: Callable[[], None],
    measured: Callable[[], None],
    reserve: ReserveOnLoop,
) -> None:
    """One streamed call (a generation) on the slot its caller's turn took (released here):
    its chunks, then its result or typed error, go to ``send``; a consumer that left just
    ends it. ``reserve`` answers the backend's ``reserve_memory`` while it runs, and
    ``measured`` reads its footprint again once it has returned."""
    # The method was checked against the capability when the call was submitted.
    function = getattr(state.backend, call.method)
    try:
        try:
            result = await executor.run_stream(function, call.args, send, cancel, reserve=reserve)
        finally:
            state.generations -= 1  # counted by take_turn
            state.served_in_turn += 1
            state.last_used = clock.now()
            slots.release()
            measured()
            state.notify()  # another group may go now
            on_progress()
        await send.send(result)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, Cancelled):
        return  # the consumer went away or stopped reading: nothing left to tell it
    except Exception as error:
        wrapped = error
        if not isinstance(error, LimnerError):
            wrapped = ModelError(f"{state.spec.key} failed while generating: {error!r}")
            wrapped.__cause__ = error
        try:
            await send.send(wrapped)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the consumer left meanwhile
