"""The one error hierarchy of limner.

Every error limner raises on purpose derives from :class:`LimnerError`, and each message says
what went wrong and what to do about it. Errors about the caller's input also derive from
:class:`ValueError`, so code that already catches ``ValueError`` keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "BlockingCallInEventLoop",
    "Cancelled",
    "FetchError",
    "InvalidInput",
    "LimnerError",
    "MemoryExhausted",
    "ModelError",
    "ModelLoadError",
    "PluginError",
    "PoolBusy",
    "RuntimeUnavailable",
    "UnknownModelError",
    "WaitTimeout",
    "describe_input",
]

_MAX_INPUT_CHARS = 80


def describe_input(value: object, *, limit: int = _MAX_INPUT_CHARS) -> str:
    """A short, printable description of an input, for error messages.

    Base64 strings and raw bytes can be megabytes long; an error names them without
    flooding a log.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        return f"{text[: limit - 20]}...({len(text)} chars)"
    return text


def _rebuild(kind: type[LimnerError], args: tuple[object, ...], state: dict[str, object]) -> Any:
    """Unpickle an error without calling its ``__init__`` (some take keyword-only fields)."""
    error = kind.__new__(kind)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class LimnerError(Exception):
    """Base class of every error limner raises on purpose.

    Every one pickles with its fields, so it crosses a process boundary (a runtime on a
    cluster) as itself, ``except`` clauses and all.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class UnknownModelError(LimnerError, KeyError):
    """No installed plugin serves the requested model key."""

    def __init__(self, key: str, *, suggestions: Sequence[str] = (), plugins: Sequence[str] = ()):
        self.key = key
        self.suggestions = tuple(suggestions)
        self.plugins = tuple(plugins)
        message = f"Unknown model {key!r}."
        if self.suggestions:
            message += " Did you mean: " + ", ".join(self.suggestions) + "?"
        if self.plugins:
            message += " Installed plugins: " + ", ".join(self.plugins) + "."
        else:
            message += (
                " No limner plugins are installed; from a clone of limner, try "
                "`pip install ./plugins/clip`."
            )
        message += " Run `limner models` to list every key."
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0])


class PluginError(LimnerError):
    """A plugin failed to load, raised in its hook, or clashed with another plugin."""


class InvalidInput(LimnerError, ValueError):
    """The caller's input cannot be used: a bad image, a bad field, a bad setting.

    ``input`` is a short description of the offending value, ``index`` its position in a
    batch (when it came in one) and ``field`` the name of the offending field (for configs).
    """

    def __init__(
        self,
        message: str,
        *,
        input: object = None,
        index: int | None = None,
        field: str | None = None,
    ):
        self.input = None if input is None else describe_input(input)
        self.index = index
        self.field = field
        self.reason = message
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.index is not None:
            parts.append(f"input #{self.index}")
        if self.input is not None:
            parts.append(repr(self.input) if not self.input.startswith("<") else self.input)
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        prefix = " ".join(parts)
        return f"{prefix}: {self.reason}" if prefix else self.reason

    def at_index(self, index: int) -> InvalidInput:
        """The same error, located at ``index`` of a batch."""
        self.index = index
        self.args = (self._render(),)
        return self

    def in_field(self, field: str) -> InvalidInput:
        """The same error, located in the request's ``field`` (an edit's ``image`` or
        ``mask``, say); a field it already names stays."""
        if self.field is None:
            self.field = field
            self.args = (self._render(),)
        return self


class FetchError(InvalidInput):
    """An image URL could not be fetched: bad status, timeout, too large, not an image."""


class ModelLoadError(LimnerError):
    """A model's weights could not be loaded (missing from the cache, corrupt, out of memory)."""


class ModelError(LimnerError):
    """A model raised while running a request; ``__cause__`` holds the original exception."""


class MemoryExhausted(LimnerError):
    """There is not enough memory to start a worker for a model, even after evicting idle ones;
    or, with ``what``, for something a loaded model would take on (a LoRA adapter)."""

    def __init__(self, key: str, *, need_mb: float, available_mb: float, what: str | None = None):
        self.key = key
        self.need_mb = need_mb
        self.available_mb = available_mb
        self.what = what
        doing = f"Cannot load {what} in {key}" if what else f"Cannot spawn workers for {key}"
        smaller = "a smaller model" if what is None else "a smaller adapter"
        super().__init__(
            f"{doing}. Need {need_mb:.0f} MB, only {available_mb:.0f} MB "
            "available. Free memory, raise the memory budget (--memory-budget or "
            "LIMNER_MEMORY_BUDGET for limner's commands, Pool(memory_budget_mb=...) in code), "
            f"or use {smaller}."
        )


class PoolBusy(LimnerError):
    """A model's request queue is full; retry after a short wait."""

    def __init__(self, key: str, *, queue_size: int, retry_after: float = 1.0):
        self.key = key
        self.queue_size = queue_size
        self.retry_after = retry_after
        super().__init__(
            f"Model {key} is busy: {queue_size} requests already queued. Retry in "
            f"{retry_after:g} s, or raise the pool's queue size."
        )


class RuntimeUnavailable(LimnerError):
    """Where a model runs failed under a request, not the model: a replica on a cluster died,
    or the cluster's control plane is unreachable. Retry after ``retry_after`` seconds (the
    HTTP API answers 503 with ``Retry-After``); ``key`` is the model's, when one was asked.
    """

    def __init__(self, message: str, *, key: str | None = None, retry_after: float = 1.0):
        self.key = key
        self.retry_after = retry_after
        super().__init__(message)


class WaitTimeout(LimnerError):
    """A call waited ``max_wait`` seconds and the pool had not started on it: other models
    held the memory (or the model's queue was that long). Retry after ``retry_after`` s."""

    def __init__(self, key: str, *, waited: float, max_wait: float, retry_after: float = 1.0):
        self.key = key
        self.waited = waited
        self.max_wait = max_wait
        self.retry_after = retry_after
        super().__init__(
            f"Model {key} did not get its turn within max_wait ({max_wait:g} s; waited "
            f"{waited:.1f} s): other models held the memory, or its queue was that long. "
            f"Retry in {retry_after:g} s, raise max_wait, or raise the memory budget."
        )


class Cancelled(LimnerError):
    """A request was cancelled before it finished (the consumer stopped or went away)."""


class BlockingCallInEventLoop(LimnerError, RuntimeError):
    """A blocking-facade method was called from inside a running event loop.

    Blocking there would freeze the loop (and deadlock if the loop must make progress for the
    call to finish); use the async API instead.
    """
