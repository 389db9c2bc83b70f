"""`limner embed`: files, folders, URLs, stdin or texts to vectors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import click
import numpy as np
import numpy.typing as npt

from limner._inputs._decode import ImageLimits, check_image_file
from limner._inputs._kinds import InputKind, classify_input
from limner._pool._budget import MemoryBudget
from limner._registry._spec import Capability
from limner.errors import InvalidInput

from ._app import (
    _check_writable,
    _chosen_model,
    _embed_entries,
    _Failed,
    _loaded,
    _model_options,
    _one_line,
    _writing,
    cli,
)


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
    registry, key = _chosen_model(model_key, Capability.IMAGE_EMBEDDING, device, dtype)
    model = registry.embedder(key)
    entries = _embed_entries(inputs, as_text)
    if not entries:
        raise click.UsageError("no inputs (the directories or stdin held none)")
    # Inputs that cannot be read are told now, before the model loads; if none is left, it
    # never loads.
    unreadable = {} if as_text else _unreadable_images(entries, model.limits)
    for error in unreadable.values():
        click.echo(f"Error: {_one_line(str(error))}", err=True)
    todo = [index for index in range(len(entries)) if index not in unreadable]
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
        async with _loaded(model, memory_budget, show_progress):
            with tqdm(
                total=len(todo),
                unit="img" if not as_text else "text",
                disable=not show_progress,
                file=sys.stderr,
                desc=model.key,
            ) as bar:
                for start in range(0, len(todo), batch_size):
                    # Positions in the whole run, so errors number inputs as the user gave them.
                    pending = todo[start : start + batch_size]
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

    failures = len(unreadable) + (anyio.run(run) if todo else 0)
    if npy_path is not None and rows:
        with _writing(npy_path):
            np.save(npy_path, np.stack([vector for _, vector in rows]).astype(np.float32))
        for index, (label, _) in enumerate(rows):
            click.echo(f"{index}\t{label}")
        click.echo(f"Wrote {len(rows)} x {model.embedding_dimension} to {npy_path}", err=True)
    if failures:
        click.echo(f"{failures} of {len(entries)} inputs failed.", err=True)
        raise _Failed()


def _unreadable_images(
    entries: list[tuple[str, Any]], limits: ImageLimits
) -> dict[int, InvalidInput]:
    """The image inputs that cannot be read, by position, found without reading any: an
    unsupported URL scheme, a missing file, a directory, a file over the size limit."""
    found: dict[int, InvalidInput] = {}
    for index, (_, value) in enumerate(entries):
        try:
            if classify_input(value, allow_paths=True, texts=False) is InputKind.PATH:
                check_image_file(value, limits=limits)
        except InvalidInput as error:
            found[index] = error.at_index(index) if len(entries) > 1 else error
    return found
