"""What a workflow does when one of its stored records fails its checksum or authentication.

Every record is verified when it is read (:mod:`crashsafe._seal`); a damaged one raises
:class:`~crashsafe.CorruptRecordError` naming it (workflow id, index, kind). When that
happens while a workflow is loaded for recovery, or while it runs, its ``on_corrupt``
policy (``@app.workflow(on_corrupt=...)``, default ``App(on_corrupt="rollback")``)
decides:

``"rollback"``
    Roll back to the last good checkpoint before the damaged record (the start of the
    workflow when no checkpoint precedes it), exactly as :meth:`App.rollback` does: the
    journal entries from there on, the damaged one included, are kept for audit
    (``app.rewound(id)``, ``crashsafe show``) under a reason that names the damaged
    record and the point rolled back to; the compensations of rolled-back steps that
    have one run (not the damaged step's: its result cannot be read); then the workflow
    resumes and re-runs the later steps. Only records that the rollback removes can be
    rolled back: a journal entry's result or error, a recorded attempt, an effect of this
    workflow. A damaged workflow record (its arguments), a damaged signal, or another
    workflow's effect shared through a key cannot be repaired by rewinding, and the
    workflow fails as with ``"fail"``, saying why. After :data:`MAX_ROLLBACKS` rollbacks
    for corruption the workflow fails too, so damage that keeps coming back can never
    make it loop.
``"fail"``
    The workflow ends ``failed`` with the :class:`~crashsafe.CorruptRecordError`;
    nothing else changes (the damaged bytes stay where they are, for forensics and for
    ``crashsafe verify``).
``"escalate"``
    The workflow is parked (``waiting``) for a person, through the same mechanism as an
    unknown effect outcome: the app's ``on_escalate`` hook is called once, and the
    decision arrives as the signal :data:`SIGNAL` with ``{"action": "rollback"}``,
    ``{"action": "fail"}`` or ``{"action": "retry"}`` (read the records again, after
    restoring the damaged bytes from a backup).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import _codec
from ._context import WorkflowContext, _Shutdown
from ._errors import error_payload
from .exceptions import ConfigurationError, CorruptRecordError, CrashsafeError, WorkflowCancelled
from .stores.base import FinishWorkflow, JournalEntry, MarkWaiting, Status, WorkflowRecord
from .stores.sealed import SealedStore

if TYPE_CHECKING:
    from ._app import App
    from ._workflow import Outcome, Workflow

log = logging.getLogger("crashsafe")

POLICIES = ("rollback", "fail", "escalate")
"""The values ``on_corrupt`` accepts."""
SIGNAL = "crashsafe.corrupt"
"""The signal that carries a person's decision about an escalated corrupt record."""
MAX_ROLLBACKS = 5
"""Rollbacks for corruption one workflow may take before it fails instead."""
_REASON = "corrupt record: "
_REMOVABLE = ("output", "error", "effect-output", "effect-error")


def check_policy(value: object, where: str) -> str:
    if value not in POLICIES:
        raise ConfigurationError(f"{where}: on_corrupt must be one of "
                                 f"{', '.join(map(repr, POLICIES))}, got {value!r}")
    return str(value)


def _policy(app: App, wf: Workflow[Any, Any] | None) -> str:
    chosen = getattr(wf, "on_corrupt", None)
    return chosen if chosen is not None else app.on_corrupt


def _removable(workflow_id: str, exc: CorruptRecordError) -> bool:
    """Whether rewinding the workflow from ``exc.index`` removes the damaged record."""
    if exc.workflow_id != workflow_id or exc.index is None or exc.index < 0:
        return False
    kind = exc.kind or ""
    return kind in _REMOVABLE or kind.startswith("attempt-error:")


def _cut(journal: Sequence[JournalEntry], bad_index: int) -> tuple[int, str]:
    """Where to roll back to: just after the last checkpoint before ``bad_index``."""
    from ._checkpoint import KIND

    for e in sorted(journal, key=lambda e: -e.index):
        if e.kind == KIND and e.index < bad_index:
            try:
                label = _codec.decode(e.output or b"{}", "checkpoint").get("label")
            except (CrashsafeError, AttributeError):
                continue  # unreadable as a checkpoint: not a good one
            name = f"checkpoint {label!r} (index {e.index})" if label \
                else f"the checkpoint at index {e.index}"
            return e.index + 1, name
    return 0, "the start (no good checkpoint precedes the damaged record)"


def _event_key(workflow_id: str) -> str:
    return f"corruption:{workflow_id}"


def record_event(app: App, workflow_id: str, exc: CorruptRecordError, action: str,
                 detail: str) -> None:
    """Append to the workflow's corruption events (kept in the store's shared values:
    a rollback that moves no journal entry still leaves its trace)."""
    event = {"at": app.clock(), "record": str(exc).split(" was not used:")[0],
             "index": exc.index, "kind": exc.kind, "action": action, "detail": detail}

    def add(cur: bytes | None, now: float) -> tuple[bytes, None]:
        events = _codec.decode(cur, "corruption events") if cur is not None else []
        if not isinstance(events, list):
            events = []
        return _codec.encode([*events, event], "corruption events")[0], None

    app.store.update_shared(_event_key(workflow_id), add)


def events(app: App, workflow_id: str) -> list[dict[str, Any]]:
    """The corruption events of a workflow, oldest first: ``at``, ``record`` (which one
    was damaged), ``index``, ``kind``, ``action`` (``rollback``, ``fail`` or
    ``escalate``) and ``detail`` (where it rolled back to, or why it failed)."""
    raw, _ = app.store.read_shared(_event_key(workflow_id))
    found = _codec.decode(raw, "corruption events") if raw is not None else []
    return [e for e in found if isinstance(e, dict)] if isinstance(found, list) else []


def _rollbacks(app: App, workflow_id: str) -> int:
    return sum(1 for e in events(app, workflow_id) if e.get("action") == "rollback")


def compensate(app: App, rolled: Sequence[JournalEntry]) -> tuple[int, list[str]]:
    """Run the compensations of the rolled-back steps that have one, newest first;
    return how many ran and the failures (``app.rollback`` shares this)."""
    failed: list[str] = []
    undone = 0
    for e in sorted(rolled, key=lambda e: -e.index):
        step = app._steps.get(e.name)
        if e.kind != "step" or e.error is not None or step is None \
                or step.compensate is None or (e.note or "").startswith("deduplicated:"):
            continue
        value = _codec.rebuild(_codec.decode(e.output or b"null", "step result"),
                               step.return_type, f"result of step {e.name!r}")
        try:
            outcome = step.compensate(value)
            if asyncio.iscoroutine(outcome):
                asyncio.run(outcome)
            undone += 1
        except Exception as exc:
            failed.append(f"{e.name} (step {e.index}): {type(exc).__name__}: {exc}")
    return undone, failed


# -- the three outcomes ------------------------------------------------------------------
def _roll_back(app: App, workflow_id: str, journal: Sequence[JournalEntry], cut: int,
               where: str, exc: CorruptRecordError) -> str:
    undone, failed = compensate(app, [e for e in journal if e.index >= cut])
    reason = f"{_REASON}{exc}; rolled back to {where}"
    if undone or failed:
        reason += f"; {undone} compensation(s) ran" + (
            f", {len(failed)} failed: {'; '.join(failed)}" if failed else "")
    if exc.kind in ("output", "effect-output"):
        reason += "; the damaged step's own compensation could not run (its result is unreadable)"
    record_event(app, workflow_id, exc, "rollback", f"rolled back to {where}")
    app.store.rewind(workflow_id, cut, reason, app.clock())
    log.warning("workflow %s: %s", workflow_id, reason)
    return reason


def _fail_op(app: App, workflow_id: str, token: int | None, exc: CorruptRecordError,
             why: str = "") -> FinishWorkflow:
    reason = f"{_REASON}{exc}" + (f" ({why})" if why else "")
    record_event(app, workflow_id, exc, "fail", why or "on_corrupt='fail'")
    log.error("workflow %s failed: %s", workflow_id, reason)
    return FinishWorkflow(workflow_id, app.executor_id, Status.FAILED, None,
                          error_payload(exc), reason, time.time(), token)


def _decide(app: App, wf: Workflow[Any, Any] | None, workflow_id: str,
            exc: CorruptRecordError) -> tuple[str, str]:
    """The action to take (``rollback``, ``fail`` or ``escalate``) and, for a policy
    that could not be followed, why."""
    policy = _policy(app, wf)
    if policy != "rollback":
        return policy, ""
    if not _removable(workflow_id, exc):
        return "fail", "rolling back cannot remove this record, so on_corrupt='rollback' fails"
    if _rollbacks(app, workflow_id) >= MAX_ROLLBACKS:
        return "fail", (f"already rolled back {MAX_ROLLBACKS} times for corrupt records; "
                        "check the disk and the backups")
    return "rollback", ""


def _first_bad(workflow_id: str, exc: CorruptRecordError,
               store: SealedStore) -> tuple[list[JournalEntry], CorruptRecordError]:
    """The readable journal and the earliest damaged record (``exc`` if the journal
    itself reads back whole, for example when the damage is in an attempt)."""
    good, bad = store.scan_journal(workflow_id)
    own = [b for b in bad if b.index is not None]
    if own:
        first = min(own, key=lambda b: b.index if b.index is not None else 0)
        if exc.index is None or not _removable(workflow_id, exc) \
                or (first.index is not None and first.index < exc.index):
            exc = first
    return good, exc


def _sealed(app: App) -> SealedStore:
    store = app.store
    if not isinstance(store, SealedStore):  # pragma: no cover - App always seals
        raise TypeError("the App's store is not sealed")
    return store


# -- entry points ------------------------------------------------------------------------
def on_load(app: App, wf: Workflow[Any, Any], rec: WorkflowRecord,
            exc: CorruptRecordError) -> bool:
    """Recovery met a damaged record while loading ``rec`` (claimed by this process).
    Returns True if the workflow runs (or waits for a person) here."""
    store = _sealed(app)
    journal, first = _first_bad(rec.id, exc, store)
    action, why = _decide(app, wf, rec.id, first)
    if action == "rollback":
        assert first.index is not None  # _removable checked it
        cut, where = _cut(journal, first.index)
        _roll_back(app, rec.id, journal, cut, where, first)
        return resume_now(app, rec.id)
    if action == "escalate":
        return _escalate_later(app, wf, rec.id, rec.name, rec.token, first)
    app._committer.commit([_fail_op(app, rec.id, rec.token, first, why)])
    return False


def on_unreadable_record(app: App, workflow_id: str) -> bool:
    """The workflow's own row (its arguments, result or error) is damaged; it was just
    claimed, or is owned, by this process."""
    store = _sealed(app)
    raw = store.inner.get_workflow(workflow_id)
    if raw is None or not raw.status.active:
        return False
    try:
        store._open_record(raw)
    except CorruptRecordError as exc:
        error = exc
    else:  # readable again (restored meanwhile): resume normally
        return app._resume(raw)
    wf = app._lookup(raw.name, raw.version)
    action, why = _decide(app, wf, workflow_id, error)
    if action == "escalate" and wf is not None:
        return _escalate_later(app, wf, workflow_id, raw.name, raw.token, error)
    app._committer.commit([_fail_op(app, workflow_id, raw.token, error, why)])
    return False


def on_run(wf: Workflow[Any, Any], ctx: WorkflowContext, exc: CorruptRecordError) -> Outcome:
    """A running workflow read a damaged record (an attempt, an effect, a signal)."""
    from ._workflow import Outcome

    app = ctx.app
    wid = ctx.workflow_id
    action, why = _decide(app, wf, wid, exc)
    if action == "fail":
        try:
            ctx.commit([_fail_op(app, wid, ctx.token, exc, why)])
        except CrashsafeError as store_exc:
            log.error("workflow %s: could not fail it for a corrupt record: %s", wid, store_exc)
            return Outcome("store_error", error=store_exc)
        return Outcome("error", error=exc)
    # Rolling back (compensations, possibly async ones) and waiting for a person happen
    # on their own thread once this run has ended (this may be the event loop's thread);
    # meanwhile the recovery sweep leaves the workflow alone.
    token = ctx.token
    with app._lock:
        app._suspended[wid] = float("inf")

    def then() -> object:
        with app._lock:
            app._suspended.pop(wid, None)
        if action == "escalate":
            return _escalate_later(app, wf, wid, ctx.workflow_name, token, exc)
        journal, first = _first_bad(wid, exc, _sealed(app))
        cut, where = _cut(journal, first.index if first.index is not None else 0)
        _roll_back(app, wid, journal, cut, where, first)
        return resume_now(app, wid)

    _after(app, wid, then)
    return Outcome("aborted", error=exc)


def resume_now(app: App, workflow_id: str) -> bool:
    """Claim a workflow left unowned (by a rollback) and resume it here."""
    for res in app.store.claim_workflows([(workflow_id, None)], app.executor_id,
                                         app.max_recoveries):
        if res.claimed and res.record is not None:
            return app._resume(res.record)
        if res.claimed:
            return on_unreadable_record(app, workflow_id)
    return False


def _after(app: App, workflow_id: str, then: Callable[[], object]) -> None:
    """Call ``then`` once the workflow's current run in this process has ended."""
    def wait() -> None:
        deadline = time.monotonic() + 60.0
        while workflow_id in app._executions and time.monotonic() < deadline:
            time.sleep(0.01)
        if app._closing.is_set():
            return  # the next process resumes it
        try:
            then()
        except Exception as exc:  # the recovery sweep tries again
            log.warning("workflow %s: resuming after a corrupt record failed: %s",
                        workflow_id, exc, exc_info=True)

    threading.Thread(target=wait, name=f"crashsafe-corrupt-{workflow_id[:32]}",
                     daemon=True).start()


# -- escalation --------------------------------------------------------------------------
def _escalate_later(app: App, wf: Workflow[Any, Any], workflow_id: str, name: str,
                    token: int | None, exc: CorruptRecordError) -> bool:
    """Park the workflow and wait for a person's decision on a worker thread."""
    from ._app import Execution
    from ._escalation import ask, describe_actions

    ctx = WorkflowContext(app, workflow_id, name, [], is_async=False, token=token)
    ex = Execution(ctx)
    with app._lock:
        if workflow_id in app._executions:
            return False
        app._executions[workflow_id] = ex
    removable = _removable(workflow_id, exc)
    record_event(app, workflow_id, exc, "escalate", f"waiting for signal {SIGNAL!r}")
    actions = ("rollback", "fail", "retry") if removable else ("fail", "retry")
    reason = (f"{_REASON}{exc}; a person decides: "
              f"{describe_actions(ctx, SIGNAL, actions)}")

    def target() -> None:
        from ._workflow import Outcome

        outcome = Outcome("aborted")
        then: Callable[[], object] | None = None
        try:
            decision = ask(ctx, exc.index if exc.index is not None else -1, exc.kind or "",
                           SIGNAL, reason, actions)
            action = decision["action"]
            if action == "fail":
                ctx.commit([_fail_op(app, workflow_id, token, exc, "decided by a person")])
                outcome = Outcome("error", error=exc)
            elif action == "rollback":
                journal, first = _first_bad(workflow_id, exc, _sealed(app))
                cut, where = _cut(journal, first.index if first.index is not None else 0)
                _roll_back(app, workflow_id, journal, cut, where, first)
                then = lambda: resume_now(app, workflow_id)  # noqa: E731
            else:  # retry: read the (restored) records again
                then = lambda: _resume_owned(app, workflow_id)  # noqa: E731
        except WorkflowCancelled:
            ctx.commit([FinishWorkflow(workflow_id, app.executor_id, Status.CANCELLED,
                                       reason="cancelled while waiting for a decision on a "
                                              "corrupt record", at=time.time(), token=token)])
            outcome = Outcome("cancelled", error=WorkflowCancelled("cancelled"))
        except _Shutdown as stop:
            outcome = Outcome("aborted", error=stop)
        except CrashsafeError as store_exc:
            log.error("workflow %s: escalation of a corrupt record failed: %s", workflow_id,
                      store_exc)
            outcome = Outcome("store_error", error=store_exc)
        app._finish(ex, outcome)
        if then is not None and not app._closing.is_set():
            try:
                then()
            except Exception as err:  # the recovery sweep tries again
                log.warning("workflow %s: resuming after a decision failed: %s",
                            workflow_id, err, exc_info=True)

    app._threads.submit(target)
    return True


def _resume_owned(app: App, workflow_id: str) -> bool:
    try:
        rec = app.store.get_workflow(workflow_id)
    except CorruptRecordError:
        return on_unreadable_record(app, workflow_id)
    if rec is None or not rec.status.active or rec.owner != app.executor_id:
        return False
    if rec.status is Status.WAITING:
        app._committer.commit([MarkWaiting(workflow_id, app.executor_id, None)])
    return app._resume(rec)


__all__ = ["MAX_ROLLBACKS", "POLICIES", "SIGNAL", "check_policy", "compensate", "events",
           "on_load", "on_run", "on_unreadable_record", "resume_now"]
