"""Each workflow's recovery events: when a process took it over from a dead one.

A takeover is decided by the claim (``Store.claim_workflows``); right after it, the
claimer appends an event to the workflow's log in the store's shared values under
``recovery:<workflow id>``: when it claimed (``at``, the store's clock), whose it was
(``from``), when that owner was last seen alive (``seen``: its last heartbeat), who
took it (``by``) and the outcome (``claimed``, or ``dead_letter`` when it had been
recovered too often without progress). The crash happened between ``seen`` and
``at``; the first journal entry started after ``at`` is the resumed work. So
``crashsafe stats`` measures recovery time per recovery, across processes and
restarts, instead of guessing it from pauses in the journal.

Written after the claim, not in its transaction: a process killed between the two
loses one event (the metrics then fall back to the journal for that workflow). The
log keeps the last :data:`KEEP` events of a workflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _codec
from .exceptions import CrashsafeError

if TYPE_CHECKING:
    from .stores.base import Store

PREFIX = "recovery:"
KEEP = 50
"""Events kept per workflow (the oldest are dropped first)."""


def key(workflow_id: str) -> str:
    return f"{PREFIX}{workflow_id}"


def append(store: Store, workflow_id: str, event: dict[str, Any]) -> None:
    """Add ``event`` to the workflow's log (one small durable write)."""
    def add(cur: bytes | None, now: float) -> tuple[bytes, None]:
        old = _decode(cur)
        return _codec.encode([*old[-(KEEP - 1):], event], "recovery events")[0], None

    store.update_shared(key(workflow_id), add)


def events(store: Store, workflow_id: str) -> list[dict[str, Any]]:
    """The workflow's recovery events, oldest first (see the module docstring)."""
    raw, _ = store.read_shared(key(workflow_id))
    return _decode(raw)


def _decode(raw: bytes | None) -> list[dict[str, Any]]:
    if raw is None:
        return []
    try:
        found = _codec.decode(raw, "recovery events")
    except CrashsafeError:
        return []  # a damaged log only costs the metrics their precision
    return [e for e in found if isinstance(e, dict)] if isinstance(found, list) else []
