"""Check-only replay: run recorded journals against the current code, write nothing.

This is the check to run before deploying new workflow code: every in-flight (or
finished) workflow in a database is replayed up to the end of its journal; a call
that differs from what the journal recorded is reported as nondeterminism.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import _codec
from ._context import WorkflowContext
from ._workflow import run_async, run_sync
from .exceptions import CrashsafeError, NondeterminismError
from .stores.base import Status, WorkflowRecord

if TYPE_CHECKING:
    from ._app import App


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """The verdict for one workflow."""

    workflow_id: str
    name: str
    verdict: str
    """``ok``, ``nondeterminism``, ``result-differs``, ``error`` or ``skipped``."""
    detail: str = ""

    @property
    def problem(self) -> bool:
        return self.verdict not in ("ok", "skipped")


def replay_workflow(app: App, rec: WorkflowRecord) -> ReplayReport:
    """Replay one workflow's journal against the code registered on ``app``."""
    wf = app._lookup(rec.name, rec.version)
    if wf is None:
        return ReplayReport(rec.id, rec.name, "skipped", "workflow not registered in this code")
    try:
        args, kwargs = wf.decode_inputs(rec.inputs, rec.id)
        journal = app.store.load_journal(rec.id)
    except CrashsafeError as exc:
        return ReplayReport(rec.id, rec.name, "error", f"cannot read the record: {exc}")
    ctx = WorkflowContext(app, rec.id, rec.name, journal, is_async=wf.is_async, check_only=True)
    if wf.is_async:
        outcome = asyncio.run(run_async(wf, ctx, args, kwargs))
    else:
        outcome = run_sync(wf, ctx, args, kwargs)
    if outcome.kind == "aborted":
        return ReplayReport(rec.id, rec.name, "ok", f"replayed {ctx.replayed} recorded calls")
    if isinstance(outcome.error, NondeterminismError):
        return ReplayReport(rec.id, rec.name, "nondeterminism", str(outcome.error))
    if outcome.kind == "ok":
        if rec.status is Status.SUCCEEDED:
            stored = _codec.decode(rec.output or b"null", "recorded result")
            fresh = _codec.decode(wf.encode_result(outcome.value), "replayed result")
            if stored != fresh:
                return ReplayReport(rec.id, rec.name, "result-differs",
                                    f"recorded {stored!r}, replay returned {fresh!r}")
        return ReplayReport(rec.id, rec.name, "ok", f"replayed {ctx.replayed} recorded calls")
    if rec.status is Status.FAILED:
        return ReplayReport(rec.id, rec.name, "ok", "failed again, as recorded")
    return ReplayReport(rec.id, rec.name, "error",
                        f"replay raised {type(outcome.error).__name__}: {outcome.error}")
