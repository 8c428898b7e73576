"""What a rollback from this process would leave undone: the rolled-back steps whose
compensation it cannot run.

:meth:`App.rollback` runs the compensations of the rolled-back steps it has registered;
a process that does not register a step (``crashsafe rollback``, ``crashsafe
dashboard``: they open the store and nothing else) cannot know whether that step has
a compensation, let alone run it, and the rollback still releases the step's effect
key, so the re-run applies the effect again. The command line and the dashboard ask
:func:`unrunnable` first and refuse unless told to go ahead without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _checkpoint as _ckpt
from .stores.base import JournalEntry

if TYPE_CHECKING:
    from ._app import App

_UNDOES = "undoes step "


def cut_index(journal: list[JournalEntry], to: int | str | None) -> int:
    """The first journal index :meth:`App.rollback` rolls back for ``to`` (raises
    CheckpointNotFoundError as it does)."""
    if isinstance(to, int) and not isinstance(to, bool):
        return to
    return _ckpt.resolve(journal, to).index + 1


def unrunnable(app: App, workflow_id: str, to: int | str | None) -> list[JournalEntry]:
    """The completed steps a rollback of ``workflow_id`` to ``to`` would roll back whose
    code ``app`` does not register (so any compensation they have cannot run here),
    oldest first. Steps that failed, took another workflow's result for their key
    (``deduplicated``) or were compensated already (by a cancellation) are left out,
    as :meth:`App.rollback` leaves them out."""
    app.get_workflow(workflow_id)  # UnknownWorkflowError for an unknown id
    journal = app.store.load_journal(workflow_id)
    cut = cut_index(journal, to)
    undone = {int(note[len(_UNDOES):]) for e in journal if e.kind == "compensate"
              and (note := e.note or "").startswith(_UNDOES) and note[len(_UNDOES):].isdigit()}
    return [e for e in journal
            if e.index >= cut and e.kind == "step" and e.error is None
            and not (e.note or "").startswith("deduplicated:") and e.index not in undone
            and e.name not in app._steps]


def describe(entries: list[JournalEntry], limit: int = 5) -> str:
    """``'pay' (#2), 'ship' (#4)``: the steps, for a message (at most ``limit``)."""
    shown = ", ".join(f"{e.name!r} (#{e.index})" for e in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def refusal(workflow_id: str, entries: list[JournalEntry], force: str) -> str:
    """Why a rollback was refused, and the two ways on (``force`` names the override:
    ``--force`` or ``"force": true``)."""
    return (f"rolling back {workflow_id} would undo completed step(s) {describe(entries)} "
            "whose code this process does not register, so their compensations (if they "
            "have any) cannot run here: what those steps did would stay done while the "
            "resumed workflow does it again; run the rollback from a process that registers the "
            f"workflow's code (app.rollback(...)), or pass {force} to roll back without "
            "those compensations")


__all__ = ["cut_index", "describe", "refusal", "unrunnable"]
