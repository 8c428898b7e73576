"""The ``crashsafe`` command line."""

from __future__ import annotations


def main() -> None:
    from .main import run

    run()
