"""The ``limner`` command line: list models, embed images and texts, generate, serve."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click
import numpy as np
import numpy.typing as npt

from . import __version__
from ._budget import MEMORY_BUDGET_ENV, MemoryBudget, parse_memory_budget
from ._defaults import ENV_VARS, default_model, write_default
from ._quiet import quiet_third_parties, verbose_logging
from ._registry import Registry, default_registry
from ._spec import Capability
from .errors import InvalidInput, LimnerError, describe_input

if TYPE_CHECKING:
    from ._embedder import ImageEmbedder
    from ._generator import ImageGenerator

__all__ = ["main"]

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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``limner`` script: limner's own lines on stderr, each error on one
    line, no traceback unless --debug, no libraries' bars or warnings unless --verbose."""
    args = list(argv if argv is not None else sys.argv[1:])
    leading = _leading_options(args)
    debug = "--debug" in leading
    if debug or {"-v", "--verbose"} & set(leading):
        verbose_logging()
    else:
        quiet_third_parties()  # before transformers, diffusers or tqdm are imported
    try:
        cli.main(args=args, prog_name="limner", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except _Failed:
        sys.exit(1)
    except LimnerError as error:
        if debug:
            raise
        click.echo(f"Error: {_one_line(str(error))}", err=True)
        sys.exit(1)


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
        help="Memory the pool may fill with models: a fraction of the device's (0.9), a "
        "percentage (90%), or megabytes (20000, 20GB). Default: 80%.",
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


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List the models installed plugins serve, and plugins that failed to load.

    \b
    Examples:
      limner models
      limner models --json
      limner models default limner/tiny-clip    # embed without --model from now on
    """
    if ctx.invoked_subcommand is not None:
        return
    registry = default_registry()
    entries = registry.entries()
    plugins = registry.plugins()
    conflicts = registry.conflicts()
    if as_json:
        document = {
            "models": [
                {
                    "key": entry.key,
                    "capability": str(entry.capability),
                    "aliases": list(entry.spec.aliases),
                    "embedding_dimension": entry.spec.info.embedding_dimension,
                    "memory_mb": entry.spec.info.memory_mb,
                    "max_batch_size": entry.spec.info.max_batch_size,
                    "tiny": entry.spec.info.tiny,
                    "plugin": entry.plugin.name,
                    "distribution": entry.plugin.distribution,
                    "version": entry.plugin.version,
                    "source_repo": entry.spec.info.source_repo,
                    "revision": entry.spec.info.revision,
                    "license": entry.spec.info.license,
                    "description": entry.spec.info.description,
                }
                for entry in entries
            ],
            "plugins": [
                {
                    "name": p.name,
                    "distribution": p.distribution,
                    "version": p.version,
                    "keys": list(p.keys),
                    "error": p.error,
                }
                for p in plugins
            ],
            "conflicts": {
                key: [first.label, second.label] for key, (first, second) in conflicts.items()
            },
        }
        click.echo(json.dumps(document, indent=2))
        return
    if not entries:
        click.echo(f"No models: no limner plugin is installed. {PLUGIN_HINT}.", err=True)
    rows = [("KEY", "CAPABILITY", "DIM", "MEMORY", "PLUGIN", "ALIASES")]
    for entry in entries:
        info = entry.spec.info
        rows.append(
            (
                entry.key + (" (tiny)" if info.tiny else ""),
                str(entry.capability),
                str(info.embedding_dimension or "-"),
                f"{info.memory_mb:,.0f} MB",
                entry.plugin.label,
                ", ".join(entry.spec.aliases) or "-",
            )
        )
    if entries:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for plugin in plugins:
        if plugin.error:
            click.echo(f"Broken plugin {plugin.label}: {plugin.error}", err=True)
    for key, (first, second) in conflicts.items():
        click.echo(f"Conflict: {key} is claimed by {first.label} and {second.label}", err=True)


@models.command("default")
@click.argument("key", required=False)
@click.option("--clear", is_flag=True, help="Forget the saved defaults.")
def models_default(key: str | None, clear: bool) -> None:
    """Show the default models, or make KEY the default of its capability.

    `limner embed` and `limner generate` use the default when --model is not given.
    LIMNER_EMBED_MODEL and LIMNER_GENERATE_MODEL, when set, win over the saved defaults.

    \b
    Examples:
      limner models default                      # show them
      limner models default limner/tiny-clip     # the default for limner embed
      limner models default flux-schnell         # the default for limner generate
      limner models default --clear
    """
    if clear:
        if key is not None:
            raise click.UsageError("give KEY or --clear, not both")
        path = None
        for capability in Capability:
            path = write_default(capability, None)
        click.echo(f"Cleared the saved defaults in {path}.", err=True)
        return
    if key is not None:
        spec = default_registry().spec(key)
        assert spec.capability is not None  # the registry derives it for every registered spec
        path = write_default(spec.capability, spec.key)
        click.echo(f"{spec.capability}: {spec.key}")
        click.echo(f"Saved in {path}.", err=True)
        return
    for capability in Capability:
        found = default_model(capability)
        click.echo(f"{capability}: {found[0]}  (from {found[1]})" if found else f"{capability}: -")


@cli.command(
    epilog="""\b
Examples:
  limner embed photo.jpg logo.png https://example.com/cat.jpg --model limner/tiny-clip
  limner embed ./photos --npy photos.npy --model limner/tiny-clip
  find photos -name '*.jpg' | limner embed - --json --model limner/tiny-clip
  limner embed - --model limner/tiny-clip < photo.jpg
  echo 'a red fox' | limner embed --text - --model limner/tiny-clip
"""
)
@click.argument("inputs", nargs=-1, required=True)
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one object per input.")
@click.option(
    "--npy",
    "npy_path",
    type=click.Path(path_type=Path),  # checked by _check_writable, in one line
    help="Write an (n, d) float32 array to this .npy file; print the row order.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Inputs per call to the model.",
)
@click.option("--text", "as_text", is_flag=True, help="Treat INPUTS as texts (CLIP text tower).")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a TTY)."
)
def embed(
    inputs: tuple[str, ...],
    model_key: str | None,
    device: str | None,
    dtype: str | None,
    memory_budget: MemoryBudget | None,
    as_json: bool,
    npy_path: Path | None,
    batch_size: int,
    as_text: bool,
    progress: bool | None,
) -> None:
    """Embed images (files, directories, http(s) URLs, base64, data URLs) or texts.

    A directory is searched recursively for image files. `-` reads stdin: an image piped in,
    or one input per line (one text per line with --text). By default each line of output
    is the input, a tab, and the vector's floats separated by spaces.
    """
    if as_json and npy_path is not None:
        raise click.UsageError("choose one of --json and --npy")
    if npy_path is not None:
        _check_writable(npy_path, "--npy")
    key = _model_key(model_key, Capability.IMAGE_EMBEDDING)
    registry = default_registry()
    _configure(registry, key, device, dtype)
    model = registry.embedder(key)
    entries = _embed_entries(inputs, as_text)
    if not entries:
        raise click.UsageError("no inputs (the directories or stdin held none)")
    show_progress = progress if progress is not None else sys.stderr.isatty()
    rows: list[tuple[str, npt.NDArray[np.float32]]] = []

    def emit(entry: tuple[str, Any], vector: npt.NDArray[np.float32]) -> None:
        label, value = entry
        if npy_path is not None:
            rows.append((label, vector))
        elif as_json:
            shown = value if as_text else label  # a text in full; an image by its description
            record = {"input": shown, "model": model.key, "embedding": vector.tolist()}
            click.echo(json.dumps(record))
        else:
            click.echo(label + "\t" + " ".join(f"{x:.6g}" for x in vector.tolist()))

    async def run() -> int:
        from tqdm import tqdm

        failed = 0
        async with _pool(memory_budget):
            await _load(model, show_progress)
            with tqdm(
                total=len(entries),
                unit="img" if not as_text else "text",
                disable=not show_progress,
                file=sys.stderr,
                desc=model.key,
            ) as bar:
                for start in range(0, len(entries), batch_size):
                    # Positions in the whole run, so errors number inputs as the user gave them.
                    pending = list(range(start, min(start + batch_size, len(entries))))
                    while pending:
                        values = [entries[i][1] for i in pending]
                        try:
                            if as_text:
                                vectors = await model.embed_text(values)
                            else:
                                vectors = await model.embed_images(values)
                        except InvalidInput as error:
                            if len(pending) == 1:
                                bad = 0
                            elif error.index is not None:
                                bad = error.index
                            else:
                                raise  # not about one input: nothing to skip
                            if len(entries) > 1:
                                error.at_index(pending[bad])
                            bar.clear()
                            click.echo(f"Error: {_one_line(str(error))}", err=True)
                            failed += 1
                            bar.update(1)
                            del pending[bad]
                            continue
                        for index, vector in zip(pending, vectors):
                            emit(entries[index], vector)
                        bar.update(len(pending))
                        pending = []
        return failed

    failures = anyio.run(run)
    if npy_path is not None and rows:
        try:
            npy_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(npy_path, np.stack([vector for _, vector in rows]).astype(np.float32))
        except OSError as error:
            raise click.ClickException(f"cannot write {npy_path}: {_os_reason(error)}") from None
        for index, (label, _) in enumerate(rows):
            click.echo(f"{index}\t{label}")
        click.echo(f"Wrote {len(rows)} x {model.embedding_dimension} to {npy_path}", err=True)
    if failures:
        click.echo(f"{failures} of {len(entries)} inputs failed.", err=True)
        raise _Failed()


@cli.command(
    epilog="""\b
Examples:
  limner generate "a lighthouse at dusk" --model limner/tiny-flux --out lighthouse.png
  limner generate "a red fox" -m flux-schnell --seed 42 --steps 4 -o fox.png
  limner generate "a red fox" -m sd35-medium --num-images 4 -o foxes/fox.webp
"""
)
@click.argument("prompt")
@_model_options
@click.option(
    "-o",
    "--out",
    "out_path",
    required=True,
    type=click.Path(path_type=Path),  # checked by _check_writable, in one line
    help="Output file, .png, .jpg or .webp (a .png carries the prompt, seed and settings); "
    "-1, -2, ... are added for several images.",
)
@click.option("--width", type=int, help="Image width in pixels (default: the model's).")
@click.option("--height", type=int, help="Image height in pixels (default: the model's).")
@click.option("--steps", type=int, help="Denoising steps (default: the model's).")
@click.option("--seed", type=int, help="Random seed (default: drawn, and printed).")
@click.option("--guidance", type=float, help="Guidance scale (default: the model's).")
@click.option(
    "--num-images",
    type=int,
    default=1,
    show_default=True,
    help="Images from the one prompt, each with the next seed.",
)
@click.option("--negative-prompt", help="What to avoid, for models that support it.")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a TTY)."
)
def generate(
    prompt: str,
    model_key: str | None,
    device: str | None,
    dtype: str | None,
    memory_budget: MemoryBudget | None,
    out_path: Path,
    width: int | None,
    height: int | None,
    steps: int | None,
    seed: int | None,
    guidance: float | None,
    num_images: int,
    negative_prompt: str | None,
    progress: bool | None,
) -> None:
    """Generate images from PROMPT with a text-to-image model and save them.

    Everything is checked before the model loads: the model, the settings and where the
    images go. The seed is printed on stderr, so the image can be made again.
    """
    from tqdm import tqdm

    from ._generation_types import GenerationResult, ImageGenerationConfig, Progress

    _check_image_path(out_path)
    key = _model_key(model_key, Capability.TEXT_TO_IMAGE)
    registry = default_registry()
    _configure(registry, key, device, dtype)
    model = registry.generator(key)
    config = model.resolve_config(
        ImageGenerationConfig(
            width=width,
            height=height,
            steps=steps,
            seed=seed,
            guidance=guidance,
            num_images=num_images,
            negative_prompt=negative_prompt,
        )
    )
    show_progress = progress if progress is not None else sys.stderr.isatty()

    async def run() -> GenerationResult:
        result: GenerationResult | None = None
        async with _pool(memory_budget):
            await _load(model, show_progress)
            with tqdm(
                total=config.steps,
                unit="step",
                desc=model.key,
                file=sys.stderr,
                disable=not show_progress,
            ) as bar:
                async for chunk in model.generate_image(prompt, config):
                    if isinstance(chunk, Progress):
                        bar.update(chunk.step - bar.n)
                    else:
                        result = chunk
        if result is None:
            raise LimnerError(f"{model.key} finished without a result")
        return result

    result = anyio.run(run)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        written = result.save_all(out_path)
    except OSError as error:
        raise click.ClickException(f"cannot write {out_path}: {_os_reason(error)}") from None
    for target in written:
        click.echo(str(target))
    seconds = result.timings.get("generate")
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    click.echo(f"seed {result.seed}{took}", err=True)


def _pool(memory_budget: MemoryBudget | None) -> Any:
    """The command's pool: the memory budget asked for, else the pool's default."""
    from ._pool import Pool

    return Pool(**(memory_budget or MemoryBudget()))


async def _load(model: ImageEmbedder | ImageGenerator, show: bool) -> None:
    """Load the weights before any bar starts, saying so on a terminal:
    ``loading KEY ... 3.2 s``."""
    if not show:
        await model.load()
        return
    started = time.perf_counter()
    click.echo(f"loading {model.key} ...", err=True, nl=False)
    try:
        await model.load()
    except BaseException:
        click.echo(err=True)  # the error gets a line of its own
        raise
    click.echo(f" {time.perf_counter() - started:.1f} s", err=True)


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


@cli.command(
    epilog="""\b
Examples:
  limner serve --models limner/tiny-clip,limner/tiny-flux --preload limner/tiny-clip
  LIMNER_API_KEY=change-me limner serve --host 0.0.0.0 --port 9000
  limner serve --models flux-schnell --memory-budget 90%
"""
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Only this machine can connect by default; 0.0.0.0 opens it to the "
    "network (set an API key).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on; 0 picks a free one (printed).",
)
@click.option("--models", "models", help="Comma-separated keys or aliases to serve (default: all).")
@click.option("--preload", help="Comma-separated keys to load at startup; /readyz waits for them.")
@click.option(
    "--api-key",
    envvar="LIMNER_API_KEY",
    show_envvar=True,
    help="Require 'Authorization: Bearer KEY' on every route but /healthz and /readyz. Prefer "
    "the environment variable: a command line is visible to other users.",
)
@click.option(
    "--allow-private-urls",
    is_flag=True,
    help="Let URL inputs reach private, loopback and link-local addresses (off: SSRF guard).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Allow browsers on this origin to call the API (repeatable; default: no CORS).",
)
@click.option("--no-ui", is_flag=True, help="Do not serve the playground page at /.")
@_memory_option
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
    help="Least severe log lines shown (info: start-up, loads, one line per request).",
)
def serve(
    host: str,
    port: int,
    models: str | None,
    preload: str | None,
    api_key: str | None,
    allow_private_urls: bool,
    cors_origins: tuple[str, ...],
    no_ui: bool,
    memory_budget: MemoryBudget | None,
    log_level: str,
) -> None:
    """Serve the models over HTTP: OpenAI-compatible embeddings and image generation.

    Routes: /v1/models, /v1/embeddings, /v1/images/generations (stream: true for progress
    events), /v1/pool, /metrics, /healthz, /readyz; the OpenAPI schema at /openapi.json; a
    playground page at / to try the models in a browser. Start-up says which models are
    served, whether a key is needed, and when the preloads are loaded.
    """
    try:
        import uvicorn

        from .server import ServerSettings, create_app
        from .server._heap import limit_malloc_arenas
    except ImportError as error:
        raise click.ClickException(
            f"the server needs its extra: pip install 'limner[server]' ({error})"
        ) from None
    try:
        settings = ServerSettings(
            models=_names(models),
            preload=_names(preload) or (),
            api_key=api_key or None,
            allow_private_urls=allow_private_urls,
            cors_origins=cors_origins,
            ui=not no_ui,
            pool_options=memory_budget or {},
        )
    except InvalidInput as error:
        if error.field != "api_key":
            raise
        hint = "'--api-key' / LIMNER_API_KEY"
        raise click.BadParameter(error.reason, param_hint=hint) from None
    app = create_app(settings=settings)
    limit_malloc_arenas(2)  # before the worker threads start: a flat heap under steady load
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"Warning: serving on {host} without an API key (--api-key).", err=True)
    listener = _listen(host, port)  # a port in use fails here, in one line
    _log_to_stderr(log_level)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=30)
    server = _announcing_server(uvicorn.Server)(config)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass  # uvicorn already stopped gracefully; Ctrl-C is the way to stop
    finally:
        listener.close()
    if not server.started:
        raise click.ClickException("the server failed to start; see the log above")


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, for uvicorn to serve on; a one-line error if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        advice = ""
        if error.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            advice = "; another program listens there: pick another --port (0 picks a free one)"
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {_os_reason(error)}{advice}"
        ) from None
    listener.set_inheritable(True)
    return listener


def _announcing_server(base: type[Any]) -> type[Any]:
    """uvicorn's server, saying where it listens once it serves: it does not when given a
    socket bound by someone else."""

    class Server(base):  # type: ignore[misc]
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and sockets:
                import logging

                bound_host, bound_port = sockets[0].getsockname()[:2]
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                logging.getLogger("limner.server").info(
                    "running on http://%s:%d (Ctrl-C to quit)", shown, bound_port
                )

    return Server


def _log_to_stderr(log_level: str) -> None:
    """limner's server log beside uvicorn's, in its format: ``INFO:     serving ...``."""
    import logging

    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=None))
    logger = logging.getLogger("limner")
    logger.addHandler(handler)
    logger.setLevel(log_level.upper())
    logger.propagate = False


def _configure(registry: Registry, key: str, device: str | None, dtype: str | None) -> None:
    if device is not None or dtype is not None:
        registry.configure(key, device=device, dtype=dtype)


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


# -- new-plugin: a plugin distribution to start from (limner._scaffold) ----------------------


@cli.command("new-plugin")
@click.argument("name")
@click.option(
    "--capability",
    type=click.Choice(["image-embedding", "text-to-image"]),
    required=True,
    help="image-embedding: a transformers model; text-to-image: a diffusers pipeline.",
)
@click.option(
    "-d",
    "--directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where to write limner-NAME/.",
)
def new_plugin(name: str, capability: str, directory: Path) -> None:
    """Write a new plugin distribution, limner-NAME/: its pyproject with the entry point, a
    package serving a real key and a tiny random-weight model, tests running limner's
    conformance suite, and a README. `pip install -e limner-NAME` and `pytest` pass at once;
    then make it serve your model. See docs/plugins.md."""
    from ._scaffold import write_plugin

    try:
        target = write_plugin(name, capability, directory)
    except InvalidInput as error:
        raise click.BadParameter(error.reason, param_hint="NAME") from None
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        click.echo(f"wrote {path}")
    click.echo(f"Next: pip install -e '{target}[test]' && (cd {target} && pytest)", err=True)
