"""``python -m limner``: the same as the ``limner`` command."""

from ._cli import main

main()
