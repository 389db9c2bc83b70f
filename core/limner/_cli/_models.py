"""`limner models`: what is installed, and the saved defaults."""

from __future__ import annotations

import json

import click

from limner._cli._defaults import default_model, write_default
from limner._registry._registry import PluginRecord, default_registry
from limner._registry._spec import Capability

from ._app import PLUGIN_HINT, cli


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
        _report_problems(plugins, conflicts)  # on stderr too: a script may read only stdout
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
    _report_problems(plugins, conflicts)


def _report_problems(
    plugins: list[PluginRecord], conflicts: dict[str, tuple[PluginRecord, PluginRecord]]
) -> None:
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
