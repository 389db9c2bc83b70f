"""What limner's loads print: nothing of their libraries' bars and advice, in any process.

transformers, diffusers and huggingface_hub print loading bars ("Loading weights",
"Loading pipeline components...") and advisory warnings (a missing torchvision, twice) on
every load. Two scopes keep them out of sight:

- a command line owns its process: it quiets the libraries before they are imported, for
  the rest of the process, unless ``--verbose`` (:func:`quiet_third_parties`);
- a host application (a script, a service under its own ASGI server) keeps its logging
  configuration: each load quiets only the thread it runs in, only while it runs, and the
  last load to end puts back what the first changed (:func:`quiet_loading`).
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.util
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

__all__ = ["QUIET_ENVIRONMENT", "quiet_loading", "quiet_third_parties", "verbose_logging"]

QUIET_ENVIRONMENT = {
    # huggingface_hub's download bars, and transformers' bars, which follow this switch.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DIFFUSERS_VERBOSITY": "error",
    # diffusers' "Loading pipeline components..." bar has no switch of its own: every tqdm bar
    # whose caller did not choose is off. limner's own bars pass ``disable`` explicitly.
    "TQDM_DISABLE": "1",
}


def quiet_third_parties(environ: MutableMapping[str, str] = os.environ) -> None:
    """Silence libraries' bars, warnings and log records for the rest of the process.

    Call it before transformers, diffusers, huggingface_hub or tqdm are imported; variables
    the user set already are kept. Log records nobody handles (limner's own included, which a
    command reports as its error line instead) are dropped rather than printed as Python's
    last resort.
    """
    for name, value in QUIET_ENVIRONMENT.items():
        environ.setdefault(name, value)
    warnings.simplefilter("ignore")
    logging.getLogger().addHandler(logging.NullHandler())


def verbose_logging() -> None:
    """Show limner's log (loads, evictions) and whatever its libraries print, loads
    included."""
    global _loads_quiet
    _loads_quiet = False
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


# -- one load at a time ------------------------------------------------------------------------

_loads_quiet = True
"""Whether :func:`quiet_loading` quiets anything: ``limner --verbose`` turns it off."""

_lock = threading.Lock()
_quiet_threads: collections.Counter[int] = collections.Counter()
"""Threads in a quiet load (by ident), each with how many quiet scopes it is in."""
_undo: dict[str, list[Callable[[], None]]] = {}
"""Per library quieted: what puts back what quieting it changed, run when no load is left."""


@contextmanager
def quiet_loading(*libraries: str) -> Iterator[None]:
    """While this thread loads a model, keep ``libraries``' loading bars and their log records
    below ERROR out of the output (``"transformers"``, ``"diffusers"``: each one is imported
    here if it is installed, as the load would import it).

    Other threads print as before, a host's handlers of its own and its levels are left as
    they are, and when the last quiet load in the process ends, every filter and hook it
    added is gone. A backend wraps its ``load`` in it.
    """
    if not _loads_quiet:
        yield
        return
    me = threading.get_ident()
    # Imported before the lock is taken: an import can take seconds.
    modules = {library: _logging_module(library) for library in libraries}
    with _lock:
        for library, module in modules.items():
            if library not in _undo:
                _undo[library] = _quiet(library, module) if module is not None else []
        _quiet_threads[me] += 1
    try:
        yield
    finally:
        with _lock:
            _quiet_threads[me] -= 1
            if _quiet_threads[me] == 0:
                del _quiet_threads[me]
            if not _quiet_threads:
                for undo in (undo for undos in _undo.values() for undo in undos):
                    undo()
                _undo.clear()


def _in_quiet_load() -> bool:
    return threading.get_ident() in _quiet_threads


class _QuietLoadFilter(logging.Filter):
    """Drops a record of ``library`` below ERROR logged from a thread in a quiet load."""

    def __init__(self, library: str) -> None:
        super().__init__()
        self.library = library

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not _in_quiet_load():
            return True
        name = record.name
        return not (name == self.library or name.startswith(self.library + "."))


def _handlers_reached(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of ``logger`` reaches: its own and, while it propagates, its
    ancestors' (a host's root handlers among them)."""
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        handlers.extend(h for h in current.handlers if h not in handlers)
        current = current.parent if current.propagate else None
    return handlers


def _logging_module(library: str) -> Any:
    """``library.utils.logging``, which sets up the library's own handler; None when the
    library is not installed."""
    if importlib.util.find_spec(library) is None:
        return None
    return importlib.import_module(f"{library}.utils.logging")


def _quiet(library: str, module: Any) -> list[Callable[[], None]]:
    """Quiet ``library`` (its ``utils.logging`` module given) for threads in quiet loads;
    what undoes it."""
    undo: list[Callable[[], None]] = []
    # The library's loggers send their records to the handlers of its root logger (its own
    # stderr handler, and any the host added there), and propagate no further by default;
    # transformers propagates to the host's root handlers where CI is set in the environment.
    record_filter = _QuietLoadFilter(library)
    for handler in _handlers_reached(logging.getLogger(library)):
        handler.addFilter(record_filter)
        undo.append(functools.partial(handler.removeFilter, record_filter))
    set_hook = getattr(module, "set_tqdm_hook", None)
    if set_hook is not None:  # transformers: its bars ask a hook, if one is set
        undo.append(_hook_bars(set_hook))
    elif callable(getattr(module, "tqdm", None)):  # diffusers: its bars come from module.tqdm
        undo.append(_wrap_bars(module))
    return undo


def _hook_bars(set_hook: Callable[[Any], Any]) -> Callable[[], None]:
    """Install a tqdm hook that turns the bars of quiet loads off and leaves the others to
    the hook that was there before; what puts that one back."""

    def hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if _in_quiet_load():
            kwargs = {**kwargs, "disable": True}
        if previous is not None:
            return previous(factory, args, kwargs)
        return factory(*args, **kwargs)

    previous = set_hook(hook)

    def undo() -> None:
        current = set_hook(previous)
        if current is not hook:  # someone else's since: theirs stays
            set_hook(current)

    return undo


class _QuietBars:
    """A library's tqdm factory whose bars are off in quiet loads."""

    def __init__(self, factory: Callable[..., Any]) -> None:
        self.factory = factory

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _in_quiet_load():
            kwargs["disable"] = True
        return self.factory(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # set_lock, get_lock
        return getattr(self.factory, name)


def _wrap_bars(module: Any) -> Callable[[], None]:
    """Put :class:`_QuietBars` in place of ``module.tqdm``; what puts the factory back."""
    wrapped = _QuietBars(module.tqdm)
    module.tqdm = wrapped

    def undo() -> None:
        if module.tqdm is wrapped:
            module.tqdm = wrapped.factory

    return undo
