"""The ``limner`` command line: list models, embed images."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
import numpy as np
import numpy.typing as npt

from . import __version__
from ._registry import Registry, default_registry
from .errors import InvalidInput, LimnerError, describe_input

__all__ = ["main"]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif"}
)

F = TypeVar("F", bound=Callable[..., Any])


class _Failed(Exception):
    """Some inputs failed; each was already reported on stderr."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``limner`` script: errors on stderr, no traceback unless --debug."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    if not sys.stderr.isatty():
        # Weight-loading bars from transformers and huggingface_hub only clutter logs; our own
        # bars follow --progress. Must be set before those libraries are imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        cli.main(args=argv, prog_name="limner", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except _Failed:
        sys.exit(1)
    except LimnerError as error:
        if debug:
            raise
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="limner")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """limner: serve image models from Python, extended by plugins.

    Models come from installed plugins (pip install 'limner[clip]'). Run `limner models` to
    see them.
    """


def _model_options(function: F) -> F:
    function = click.option(
        "--dtype", help="Weights dtype: float32, bfloat16, float16 (default: auto)."
    )(function)
    function = click.option("--device", help="Device: cpu, cuda, cuda:1 (default: auto).")(function)
    return click.option(
        "-m",
        "--model",
        "model_key",
        required=True,
        help="Model key or alias (see `limner models`).",
    )(function)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the models installed plugins serve, and plugins that failed to load."""
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
        click.echo("No models. Install a plugin, e.g. pip install 'limner[clip]'.", err=True)
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


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one object per input.")
@click.option(
    "--npy",
    "npy_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write an (n, d) float32 array to this .npy file; print the row order.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--text", "as_text", is_flag=True, help="Treat INPUTS as texts (CLIP text tower).")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a TTY)."
)
def embed(
    inputs: tuple[str, ...],
    model_key: str,
    device: str | None,
    dtype: str | None,
    as_json: bool,
    npy_path: Path | None,
    batch_size: int,
    as_text: bool,
    progress: bool | None,
) -> None:
    """Embed images (files, directories, http(s) URLs, base64, data URLs) or texts.

    A directory is searched recursively for image files. By default each line is the input,
    a tab, and the vector's floats separated by spaces.
    """
    if as_json and npy_path is not None:
        raise click.UsageError("choose one of --json and --npy")
    registry = default_registry()
    _configure(registry, model_key, device, dtype)
    model = registry.embedder(model_key)
    items = list(inputs) if as_text else list(_expand_inputs(inputs))
    if not items:
        raise click.UsageError("no inputs (the directories held no image files)")
    show_progress = progress if progress is not None else sys.stderr.isatty()
    rows: list[tuple[str, npt.NDArray[np.float32]]] = []

    def emit(source: str, vector: npt.NDArray[np.float32]) -> None:
        label = source if as_text else describe_input(source)
        if npy_path is not None:
            rows.append((label, vector))
        elif as_json:
            record = {"input": label, "model": model.key, "embedding": vector.tolist()}
            click.echo(json.dumps(record))
        else:
            click.echo(label + "\t" + " ".join(f"{x:.6g}" for x in vector.tolist()))

    async def run() -> int:
        from tqdm import tqdm

        failed = 0
        with tqdm(
            total=len(items),
            unit="img" if not as_text else "text",
            disable=not show_progress,
            file=sys.stderr,
            desc=model.key,
        ) as bar:
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                while batch:
                    try:
                        if as_text:
                            vectors = await model.embed_text(batch)
                        else:
                            vectors = await model.embed_images(batch)
                    except InvalidInput as error:
                        if len(batch) == 1:
                            bad = 0
                        elif error.index is not None:
                            bad = error.index
                        else:
                            raise  # not about one input: nothing to skip
                        click.echo(f"Error: {error}", err=True)
                        failed += 1
                        bar.update(1)
                        batch = batch[:bad] + batch[bad + 1 :]
                        continue
                    for source, vector in zip(batch, vectors):
                        emit(source, vector)
                    bar.update(len(batch))
                    batch = []
        return failed

    failures = anyio.run(run)
    if npy_path is not None and rows:
        npy_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy_path, np.stack([vector for _, vector in rows]).astype(np.float32))
        for index, (label, _) in enumerate(rows):
            click.echo(f"{index}\t{label}")
        click.echo(f"Wrote {len(rows)} x {model.embedding_dimension} to {npy_path}", err=True)
    if failures:
        click.echo(f"{failures} of {len(items)} inputs failed.", err=True)
        raise _Failed()


@cli.command()
@click.argument("prompt")
@_model_options
@click.option(
    "-o",
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Output file (.png carries the prompt, seed and settings); -N is added for several.",
)
@click.option("--width", type=int, help="Image width in pixels (default: the model's).")
@click.option("--height", type=int, help="Image height in pixels (default: the model's).")
@click.option("--steps", type=int, help="Denoising steps (default: the model's).")
@click.option("--seed", type=int, help="Random seed (default: drawn, and printed).")
@click.option("--guidance", type=float, help="Guidance scale (default: the model's).")
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--negative-prompt", help="What to avoid, for models that support it.")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a TTY)."
)
def generate(
    prompt: str,
    model_key: str,
    device: str | None,
    dtype: str | None,
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
    """Generate images from PROMPT with a text-to-image model and save them."""
    from tqdm import tqdm

    from ._generation_types import GenerationResult, ImageGenerationConfig, Progress

    registry = default_registry()
    _configure(registry, model_key, device, dtype)
    model = registry.generator(model_key)
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
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for index in range(len(result.images)):
        target = out_path
        if len(result.images) > 1:
            target = out_path.with_name(f"{out_path.stem}-{index + 1}{out_path.suffix}")
        result.save(target, index=index)
        click.echo(str(target))
    seconds = result.timings.get("generate")
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    click.echo(f"seed {result.seed}{took}", err=True)


def _names(value: str | None) -> tuple[str, ...] | None:
    """``"a, b"`` as ``("a", "b")``; None when the option was not given."""
    if value is None:
        return None
    return tuple(name.strip() for name in value.split(",") if name.strip())


@cli.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Only this machine can connect by default; 0.0.0.0 opens it to the "
    "network (set an API key).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
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
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
@click.option(
    "--runtime",
    "runtime_name",
    type=click.Choice(["pool", "ray"]),
    default="pool",
    show_default=True,
    help="Where models run: this process's pool, or a Ray cluster (pip install 'limner[ray]').",
)
@click.option(
    "--address",
    help="With --runtime ray: the cluster, 'auto' or ray://HOST:PORT (default: RAY_ADDRESS, "
    "else a local cluster started for the server).",
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
    log_level: str,
    runtime_name: str = "pool",
    address: str | None = None,
) -> None:
    """Serve the models over HTTP: OpenAI-compatible embeddings and image generation.

    Routes: /v1/models, /v1/embeddings, /v1/images/generations (stream: true for progress
    events), /v1/pool, /metrics, /healthz, /readyz; the OpenAPI schema at /openapi.json; a
    playground page at / to try the models in a browser.
    """
    try:
        import uvicorn

        from .server import ServerSettings, create_app
    except ImportError as error:
        raise click.ClickException(
            f"the server needs its extra: pip install 'limner[server]' ({error})"
        ) from None
    if address is not None and runtime_name != "ray":
        raise click.UsageError("--address needs --runtime ray")
    try:
        settings = ServerSettings(
            models=_names(models),
            preload=_names(preload) or (),
            api_key=api_key or None,
            allow_private_urls=allow_private_urls,
            cors_origins=cors_origins,
            ui=not no_ui,
            runtime=_ray_runtime(address, _names(preload)) if runtime_name == "ray" else None,
        )
    except InvalidInput as error:
        if error.field != "api_key":
            raise
        hint = "'--api-key' / LIMNER_API_KEY"
        raise click.BadParameter(error.reason, param_hint=hint) from None
    app = create_app(settings=settings)
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"Warning: serving on {host} without an API key (--api-key).", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)


def _ray_runtime(address: str | None, preload: tuple[str, ...] | None) -> Callable[[], Any]:
    """What makes the server's Ray runtime, once Ray Serve is known to be installed.
    Preloaded keys keep a replica, as the pool keeps them loaded."""
    try:
        import ray.serve  # noqa: F401

        from .ray import RayKeyOptions, RayRuntime
    except ImportError as error:
        raise click.ClickException(
            f"--runtime ray needs Ray Serve: pip install 'limner[ray]' ({error})"
        ) from None

    def make() -> RayRuntime:
        registry = default_registry()
        kept = {registry.spec(name).key: RayKeyOptions(min_replicas=1) for name in preload or ()}
        return RayRuntime(address=address, options_per_key=kept)

    return make


def _configure(registry: Registry, key: str, device: str | None, dtype: str | None) -> None:
    if device is not None or dtype is not None:
        registry.configure(key, device=device, dtype=dtype)


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
