"""The ``limner`` command line: list models, embed images and texts, generate, serve."""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from limner import __version__
from limner._cli._defaults import ENV_VARS, default_model
from limner._pool._budget import MEMORY_BUDGET_ENV, MemoryBudget, parse_memory_budget
from limner._registry._registry import Registry, default_registry
from limner._registry._spec import Capability
from limner.errors import InvalidInput, LimnerError, describe_input
from limner.plugin._quiet import quiet_third_parties, verbose_logging

if TYPE_CHECKING:
    from limner._fronts._embedder import ImageEmbedder
    from limner._fronts._generator import ImageGenerator

__all__ = ["cli", "main"]


IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif"}
)
# What an image file starts with, to tell an image piped to `limner embed -` from a list.
_IMAGE_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"RIFF",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)

F = TypeVar("F", bound=Callable[..., Any])

PLUGIN_HINT = (
    "From a clone of limner: pip install ./plugins/clip (or ./plugins/flux, ./plugins/sd35); "
    "from its wheels: pip install --find-links dist 'limner[clip]'"
)


class _Failed(Exception):
    """Some inputs failed; each was already reported on stderr."""


class _BadValue(click.ClickException):
    """A bad option value, reported on one line (no usage text around it); exit code 2."""

    exit_code = 2


def _one_line(text: str) -> str:
    """A message on one line: libraries' errors may span several."""
    return " ".join(text.split())


def _leading_options(args: Sequence[str]) -> list[str]:
    """The options before the command name: ``limner --debug embed ...`` gives --debug."""
    leading = []
    for arg in args:
        if not arg.startswith("-"):
            break
        leading.append(arg)
    return leading


_cli_process = False
"""Whether this process is the ``limner`` command's own (:func:`main` says so), rather than a
host's that runs the commands (tests, click's CliRunner): only then may a command change the
garbage collector for the rest of the process."""

# Objects made between two collections of the youngest generation (CPython's default: 700).
# Loading a model imports torch, transformers and diffusers, which make millions of objects
# that live until the process ends; the default walks them over and over while they are made
# (0.5 to 0.8 s of CPU time of a tiny model's command here).
_LOADING_GC_THRESHOLD = 50_000


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``limner`` script: limner's own lines on stderr, each error on one
    line, no traceback unless --debug, no libraries' bars or warnings unless --verbose."""
    global _cli_process
    _cli_process = True
    args = list(argv if argv is not None else sys.argv[1:])
    leading = _leading_options(args)
    if {"--debug", "-v", "--verbose"} & set(leading):
        verbose_logging()
    else:
        quiet_third_parties()  # before transformers, diffusers or tqdm are imported
    sys.exit(run(args))


def run(args: Sequence[str]) -> int:
    """Run the command ``args`` in this process and give its exit status: what :func:`main`
    does, without what belongs to a process of its own (quieting the libraries for good, the
    garbage collector, ``sys.exit``). Tests run commands so."""
    args = list(args)
    debug = "--debug" in _leading_options(args)
    try:
        cli.main(args=args, prog_name="limner", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("Aborted.", err=True)
        return 130
    except _Failed:
        return 1
    except LimnerError as error:
        if debug:
            raise
        click.echo(f"Error: {_one_line(str(error))}", err=True)
        return 1
    return 0


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="limner")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors (implies --verbose).")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Show limner's log and what its libraries print (loading bars, warnings).",
)
def cli(debug: bool, verbose: bool) -> None:
    """limner: serve image models from Python, extended by plugins.

    Models come from installed plugins; `limner models` lists them. Errors are one line on
    stderr, with exit code 1 (2 for bad usage).

    \b
    Examples:
      limner models
      limner embed photo.jpg --model limner/tiny-clip
      limner generate "a lighthouse at dusk" --model limner/tiny-flux --out lighthouse.png
      limner serve --models limner/tiny-clip
    """


if TYPE_CHECKING:
    _BudgetParam = click.ParamType[MemoryBudget]
else:
    _BudgetParam = click.ParamType  # generic only in recent click


class _MemoryBudget(_BudgetParam):
    """``--memory-budget``: a fraction, a percentage or megabytes, as the pool's options."""

    name = "BUDGET"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, dict):
            return value
        try:
            return parse_memory_budget(str(value), field="--memory-budget")
        except InvalidInput as error:
            self.fail(error.reason, param, ctx)


def _memory_option(function: F) -> F:
    return click.option(
        "--memory-budget",
        "memory_budget",
        type=_MemoryBudget(),
        envvar=MEMORY_BUDGET_ENV,
        show_envvar=True,
        help="Memory the pool's models may hold on each device (their footprints, not the "
        "machine's used memory): a fraction of the device's (0.9), a percentage (90%), or "
        "megabytes (20000, 20GB). Default: 80%.",
    )(function)


def _model_options(function: F) -> F:
    function = _memory_option(function)
    function = click.option(
        "--dtype", help="Weights dtype: float32, bfloat16, float16 (default: auto)."
    )(function)
    function = click.option("--device", help="Device: cpu, cuda, cuda:1 (default: auto).")(function)
    return click.option(
        "-m",
        "--model",
        "model_key",
        help="Model key or alias (see `limner models`; default: `limner models default`).",
    )(function)


def _model_key(given: str | None, capability: Capability) -> str:
    """``--model``, else the default for the capability; a usage error naming both ways."""
    if given:
        return given
    found = default_model(capability)
    if found is None:
        raise click.UsageError(
            f"no model given: pass --model KEY, or set a default {capability} model with "
            f"`limner models default KEY` (or {ENV_VARS[capability]}); `limner models` lists "
            "the keys"
        )
    return found[0]


def _chosen_model(
    given: str | None,
    capability: Capability,
    device: str | None,
    dtype: str | None,
    *,
    lora_dirs: Sequence[str] = (),
) -> tuple[Registry, str]:
    """The default registry (one of its own with ``--lora-dir`` folders), and the key of
    the model the command runs (see :func:`_model_key`), set to ``--device`` and ``--dtype``
    when given."""
    key = _model_key(given, capability)
    registry = lora_registry(lora_dirs)
    if device is not None or dtype is not None:
        registry.configure(key, device=device, dtype=dtype)
    return registry, key


def lora_registry(lora_dirs: Sequence[str]) -> Registry:
    """The default registry, or, with adapter folders, a registry of the installed plugins
    that looks adapters up there."""
    return Registry(lora_dirs=lora_dirs) if lora_dirs else default_registry()


def _lora_dirs_option(function: F) -> F:
    return click.option(
        "--lora-dir",
        "lora_dirs",
        multiple=True,
        type=click.Path(exists=True, file_okay=False),
        envvar="LIMNER_LORA_DIRS",
        show_envvar=True,
        help="A folder of LoRA adapters: NAME.safetensors, or NAME/pytorch_lora_weights."
        "safetensors, is adapter NAME (repeatable; the variable takes several, separated "
        f"by {os.pathsep!r}).",
    )(function)


@asynccontextmanager
async def _loaded(
    model: ImageEmbedder | ImageGenerator, memory_budget: MemoryBudget | None, show: bool
) -> AsyncIterator[float]:
    """The command's pool (the memory budget asked for, else the pool's default), with the
    model's weights loaded before any bar starts, saying so on a terminal:
    ``loading KEY ... 3.2 s``. Gives the seconds the load took."""
    from limner._pool import Pool

    if _cli_process:
        gc.set_threshold(_LOADING_GC_THRESHOLD, *gc.get_threshold()[1:])
    async with Pool(**(memory_budget or MemoryBudget())):
        started = time.perf_counter()
        if show:
            click.echo(f"loading {model.key} ...", err=True, nl=False)
        try:
            await model.load()
        except BaseException:
            if show:
                click.echo(err=True)  # the error gets a line of its own
            raise
        seconds = time.perf_counter() - started
        if show:
            click.echo(f" {seconds:.1f} s", err=True)
        try:
            yield seconds
        finally:
            if _cli_process:
                # Nothing the process holds now needs collecting before it ends: the full
                # collections of the unload below and of the interpreter's shutdown would
                # walk every object torch and its libraries made (1.5 s of a tiny model's
                # command), and find little to free.
                gc.freeze()


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Make ``path``'s folder, then write it in the block; a failed write is one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as error:
        raise click.ClickException(f"cannot write {path}: {_os_reason(error)}") from None


def _os_reason(error: OSError) -> str:
    return error.strerror or str(error)


def _bad_option(option: str, message: str) -> _BadValue:
    return _BadValue(f"Invalid value for {option}: {message}")


def _check_writable(path: Path, option: str) -> None:
    """Fail now, before any model loads, if ``path`` cannot be written: a file is made and
    removed where it will go (permissions alone say nothing to root, or of /proc)."""
    if path.is_dir():
        raise _bad_option(option, f"{path} is a directory")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _bad_option(option, f"{ancestor} is not a directory")
    try:
        if path.exists():
            with path.open("ab"):
                pass
        else:
            with tempfile.TemporaryFile(dir=ancestor, prefix=".limner-"):
                pass
    except OSError as error:
        where = path if path.exists() else ancestor
        raise _bad_option(option, f"cannot write in {where}: {_os_reason(error)}") from None


def _check_image_path(path: Path) -> None:
    """The suffix must name a format Pillow writes, and the place must be writable."""
    from PIL import Image

    Image.init()
    suffix = path.suffix.lower()
    format_name = Image.registered_extensions().get(suffix)
    if not suffix or format_name not in Image.SAVE:
        what = f"{suffix!r} is not an image format" if suffix else "it has no suffix"
        raise _bad_option(
            "'-o' / '--out'",
            f"{path}: {what}; end it in .png, .jpg or .webp (the suffix picks the format)",
        )
    _check_writable(path, "'-o' / '--out'")


def _names(value: str | None) -> tuple[str, ...] | None:
    """``"a, b"`` as ``("a", "b")``; None when the option was not given."""
    if value is None:
        return None
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _embed_entries(inputs: tuple[str, ...], as_text: bool) -> list[tuple[str, Any]]:
    """Each input as (label for the output, value for the model), ``-`` read from stdin."""
    entries: list[tuple[str, Any]] = []
    for value in inputs:
        if value == "-":
            entries.extend(_stdin_entries(as_text))
        elif as_text:
            entries.append((_text_label(value), value))
        else:
            entries.extend((describe_input(item), item) for item in _expand_inputs((value,)))
    return entries


def _stdin_entries(as_text: bool) -> list[tuple[str, Any]]:
    """An image piped in (its bytes), or one input per line (one text per line)."""
    data = sys.stdin.buffer.read()
    if not as_text and data.startswith(_IMAGE_SIGNATURES):
        return [("-", data)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(
            "stdin is neither an image (PNG, JPEG, GIF, WebP, BMP, TIFF) nor UTF-8 text with "
            "one input per line"
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if as_text:
        return [(_text_label(line), line) for line in lines]
    return [(describe_input(item), item) for item in _expand_inputs(tuple(lines))]


def _text_label(text: str) -> str:
    """A text as one field of a tab-separated line."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _expand_inputs(inputs: tuple[str, ...]) -> Iterator[str]:
    for value in inputs:
        if os.path.isdir(value):
            found = sorted(
                str(path)
                for path in Path(value).rglob("*")
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
            )
            yield from found
        else:
            yield value
