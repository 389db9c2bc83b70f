"""`limner new-plugin`: a plugin distribution to start from."""

from __future__ import annotations

from pathlib import Path

import click

from limner.errors import InvalidInput

from ._app import _os_reason, cli


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
@click.option(
    "--force",
    is_flag=True,
    help="Write it even if a distribution or package of the same name is installed (the new "
    "plugin would shadow it).",
)
def new_plugin(name: str, capability: str, directory: Path, force: bool) -> None:
    """Write a new plugin distribution, limner-NAME/: its pyproject with the entry point, a
    package serving a real key and a tiny random-weight model, tests running limner's
    conformance suite, and a README. `pip install -e limner-NAME` and `pytest` pass at once;
    then make it serve your model. See docs/plugins.md.

    \b
    Examples:
      limner new-plugin acme-vision --capability image-embedding
      limner new-plugin acme-diffusion --capability text-to-image -d ~/src
    """
    from limner._scaffold import write_plugin

    try:
        target = write_plugin(name, capability, directory, force=force)
    except InvalidInput as error:
        raise click.BadParameter(error.reason, param_hint="NAME") from None
    except OSError as error:
        where = error.filename or directory
        raise click.ClickException(f"cannot write {where}: {_os_reason(error)}") from None
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        click.echo(f"wrote {path}")
    click.echo(f"Next: pip install -e '{target}[test]' && (cd {target} && pytest)", err=True)
