"""`limner loras`: the LoRA adapters in adapter folders, and the models each fits."""

from __future__ import annotations

import json

import click

from ._app import _lora_dirs_option, cli, lora_registry


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


@cli.command(
    epilog="""\b
Examples:
  limner loras --lora-dir ~/loras
  LIMNER_LORA_DIRS=~/loras:/srv/loras limner loras --json
"""
)
@_lora_dirs_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def loras(lora_dirs: tuple[str, ...], as_json: bool) -> None:
    """List the LoRA adapters in the --lora-dir folders: each one's family, the installed
    models it fits, its rank, size and file. An adapter no model can use is said on stderr,
    with the reason. Reads each file's header only: no torch, no weights.

    `limner generate --lora NAME:SCALE` and `limner serve --lora-dir` use them.
    """
    if not lora_dirs:
        raise click.UsageError("name a folder of adapters: --lora-dir DIR (or LIMNER_LORA_DIRS)")
    entries = lora_registry(lora_dirs).loras()
    if as_json:
        document = [
            {
                "name": entry.name,
                "family": entry.family,
                "models": list(entry.models),
                "rank": entry.adapter.rank,
                "size_bytes": entry.adapter.tensor_bytes,
                "path": entry.adapter.path,
                "reason": entry.reason,
            }
            for entry in entries
        ]
        click.echo(json.dumps(document, indent=2))
    else:
        rows = [("NAME", "FAMILY", "RANK", "SIZE", "MODELS", "FILE")]
        for entry in entries:
            if entry.models:
                adapter = entry.adapter
                rank, size = str(adapter.rank), _size(adapter.tensor_bytes)
                models = ", ".join(entry.models)
                rows.append((entry.name, entry.family or "-", rank, size, models, adapter.path))
        if len(rows) > 1:
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            for row in rows:
                line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths))
                click.echo(line.rstrip())
        elif not any(entry.reason for entry in entries):
            click.echo(f"No LoRA adapters in {', '.join(lora_dirs)}.", err=True)
    for entry in entries:
        if entry.reason:
            click.echo(f"Unusable adapter {entry.name}: {entry.reason}", err=True)
