"""``python -m limner``: the same as the ``limner`` command."""

from limner._cli import main

main()
