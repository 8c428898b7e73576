"""Progress reporting for long operations, kept apart from how it is shown.

Library functions (``collect``, ``rotate``, ``verify``, the demo, the chaos campaign)
take an optional callback and call it as the work advances; the command line turns
the calls into a progress bar on a terminal and into nothing otherwise, so pipes, logs
and ``--json`` output stay clean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    """``progress(done, total, note=None)``: ``done`` never decreases; ``total`` may be
    None while unknown; ``note`` is a short description of the current state."""

    def __call__(self, done: int, total: int | None, note: str | None = None) -> None: ...


def quiet(done: int, total: int | None, note: str | None = None) -> None:
    """A progress callback that shows nothing."""


Simple = Callable[[int, int], None]
"""The two-argument form ``progress(done, total)`` that ``rotate`` and ``verify`` take."""
