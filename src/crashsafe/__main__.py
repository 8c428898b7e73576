"""``python -m crashsafe`` is the ``crashsafe`` command."""

from .cli import main

main()
