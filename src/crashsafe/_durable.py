"""Journaled values and durable timers for workflow code.

Inside a workflow (and outside any step), these record what they returned so a
replay returns the same thing. Outside a workflow, or inside a step body (which is
never replayed), they behave like their ordinary counterparts.

Journaled values are not committed on their own: they ride along with the
workflow's next commit, and a step body never starts before they are durable (a
body may send them out, as an idempotency key for instance). A crash before that
commit loses a value nothing outside the workflow has seen, so a fresh one is
equally valid.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random as _random
import time
import uuid as _uuid
from datetime import timedelta
from typing import Any

from . import _codec
from ._context import _STEP, _WORKFLOW, WorkflowContext
from ._errors import error_payload, step_failure
from ._step import seconds
from .exceptions import NotInWorkflowError, WaitTimeoutError
from .stores.base import JournalEntry, MarkWaiting, Op

_rng = _random.SystemRandom()


def _workflow_only() -> WorkflowContext | None:
    if _STEP.get() is not None:
        return None
    return _WORKFLOW.get()


def _journaled(ctx: WorkflowContext, kind: str, make: Any) -> Any:
    idx, entry = ctx.begin(kind, kind)
    if entry is not None:
        return _codec.decode(entry.output or b"null", f"journaled {kind}")
    value = make()
    data, _ = _codec.encode(value, f"journaled {kind}")
    at = time.time()
    ctx.pending.append(JournalEntry(ctx.workflow_id, idx, kind, kind, data, None, 1, at, at))
    return value


def now() -> dt.datetime:
    """The current UTC time; journaled inside a workflow so replay sees the same instant."""
    ctx = _workflow_only()
    if ctx is None:
        return dt.datetime.now(dt.UTC)
    value: dt.datetime = _journaled(ctx, "now", lambda: dt.datetime.now(dt.UTC))
    return value


def uuid4() -> _uuid.UUID:
    """A random UUID; journaled inside a workflow."""
    ctx = _workflow_only()
    if ctx is None:
        return _uuid.uuid4()
    value: _uuid.UUID = _journaled(ctx, "uuid", _uuid.uuid4)
    return value


def random() -> float:
    """A float in [0, 1); journaled inside a workflow."""
    ctx = _workflow_only()
    if ctx is None:
        return _rng.random()
    value: float = _journaled(ctx, "random", _rng.random)
    return value


def _plan_sleep(ctx: WorkflowContext, secs: float) -> tuple[float, JournalEntry | None]:
    """When this sleep ends, and the record to commit before sleeping (None on replay:
    the recorded wake-up time stands, so a crash never restarts the timer)."""
    idx, entry = ctx.begin("sleep", "sleep")
    if entry is not None:
        return float(_codec.decode(entry.output or b"0", "durable sleep")), None
    at = ctx.app.clock()
    wake = at + secs
    data, _ = _codec.encode(wake, "durable sleep")
    return wake, JournalEntry(ctx.workflow_id, idx, "sleep", "sleep", data, None, 1, at, at)


def sleep(duration: float | timedelta) -> None:
    """Sleep durably: after a crash, the workflow wakes at the originally planned time.

    In an ``async def`` workflow use ``await crashsafe.sleep_async(...)``.
    """
    secs = seconds(duration, "sleep duration") or 0.0
    ctx = _workflow_only()
    if ctx is None:
        time.sleep(secs)
        return
    if ctx.is_async:
        raise NotInWorkflowError(
            "crashsafe.sleep() blocks; in an async workflow use "
            "`await crashsafe.sleep_async(...)`"
        )
    wake, record = _plan_sleep(ctx, secs)
    if record is not None:
        ctx.commit([record])
    if ctx.check_only:
        return
    while (remaining := wake - ctx.app.clock()) > 0:
        if ctx.cancel_event.wait(min(remaining, 1.0)):
            break
        if ctx.shutdown:
            break
    ctx.check_interrupt()


async def sleep_async(duration: float | timedelta) -> None:
    """The async form of :func:`sleep`, for ``async def`` workflows."""
    secs = seconds(duration, "sleep duration") or 0.0
    ctx = _workflow_only()
    if ctx is None:
        await asyncio.sleep(secs)
        return
    wake, record = _plan_sleep(ctx, secs)
    if record is not None:
        await ctx.commit_async([record])
    if ctx.check_only:
        return
    while (remaining := wake - ctx.app.clock()) > 0:
        await asyncio.sleep(min(remaining, 0.5))
        ctx.check_interrupt()
    ctx.check_interrupt()


def _check_wait(name: str, timeout: float | timedelta | None, what: str,
                is_async: bool) -> tuple[WorkflowContext, float | None]:
    ctx = _workflow_only()
    if ctx is None:
        raise NotInWorkflowError(f"{what} only makes sense in workflow code (outside steps)")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: the signal name must be a non-empty string, got {name!r}")
    if ctx.is_async and not is_async:
        raise NotInWorkflowError(
            "crashsafe.wait_for() blocks; in an async workflow use "
            "`await crashsafe.wait_for_async(...)`"
        )
    return ctx, seconds(timeout, f"{what} timeout")


def _begin_wait(ctx: WorkflowContext, name: str, secs: float | None
                ) -> tuple[int, float | None, list[Op]]:
    """Take this wait's number among waits for ``name``, and its deadline (recorded
    when the wait first began, so a crash does not restart the clock)."""
    nth = ctx.waits.get(name, 0)
    ctx.waits[name] = nth + 1
    idx, entry = ctx.begin("wait", name)
    if entry is not None:
        deadline = _codec.decode(entry.output or b"null", "durable wait")
        return nth, (float(deadline) if deadline is not None else None), []
    at = ctx.app.clock()
    deadline = None if secs is None else at + secs
    data, _ = _codec.encode(deadline, "durable wait")
    return nth, deadline, [
        JournalEntry(ctx.workflow_id, idx, "wait", name, data, None, 1, at, at),
        MarkWaiting(ctx.workflow_id, ctx.app.executor_id, f"waiting for signal {name!r}"),
    ]


def _settle_wait(ctx: WorkflowContext, idx: int, name: str, nth: int,
                 deadline: float | None) -> tuple[list[Op], Any] | None:
    """The ops that record how the wait ended and its outcome, or None to keep waiting."""
    payload = ctx.app.store.get_signal(ctx.workflow_id, name, nth)
    at = ctx.app.clock()
    resume = MarkWaiting(ctx.workflow_id, ctx.app.executor_id, None)
    if payload is not None:
        entry = JournalEntry(ctx.workflow_id, idx, "signal", name, payload, None, 1, at, at)
        return [entry, resume], _codec.decode(payload, f"signal {name!r}")
    if deadline is not None and at >= deadline:
        err = WaitTimeoutError(f"no signal {name!r} arrived for workflow "
                               f"{ctx.workflow_id!r} before its deadline")
        entry = JournalEntry(ctx.workflow_id, idx, "signal", name, None, error_payload(err), 1,
                             at, at)
        return [entry, resume], err
    return None


def _recorded_signal(entry: JournalEntry, name: str) -> Any:
    if entry.error is not None:
        raise step_failure(f"wait_for({name!r})", entry.error)
    return _codec.decode(entry.output or b"null", f"signal {name!r}")


def _outcome(value: Any) -> Any:
    if isinstance(value, WaitTimeoutError):
        raise value
    return value


def wait_for(name: str, timeout: float | timedelta | None = None) -> Any:
    """Wait durably for the signal ``name`` and return its payload.

    Send it with ``app.signal(workflow_id, name, payload)`` or
    ``crashsafe signal ID NAME JSON``, from any process. While it waits the workflow's
    status is ``waiting``; a crash does not lose the wait nor restart its ``timeout``
    (seconds or a timedelta), after which :class:`~crashsafe.WaitTimeoutError` is
    raised. The n-th ``wait_for(name)`` of a workflow receives the n-th signal of that
    name, whenever it was sent. In an ``async def`` workflow use
    ``await crashsafe.wait_for_async(...)``.
    """
    ctx, secs = _check_wait(name, timeout, "crashsafe.wait_for()", False)
    nth, deadline, ops = _begin_wait(ctx, name, secs)
    if ops:
        ctx.commit(ops)
    idx, entry = ctx.begin("signal", name)
    if entry is not None:
        return _recorded_signal(entry, name)
    poll = 0.05
    while True:
        ctx.check_interrupt()
        ctx.signal_event.clear()  # before looking: a signal sent after the look wakes us
        settled = _settle_wait(ctx, idx, name, nth, deadline)
        if settled is not None:
            ops, value = settled
            ctx.commit(ops)
            return _outcome(value)
        left = None if deadline is None else max(0.0, deadline - ctx.app.clock())
        ctx.signal_event.wait(poll if left is None else min(poll, left))
        poll = min(poll * 2, 1.0)


async def wait_for_async(name: str, timeout: float | timedelta | None = None) -> Any:
    """The async form of :func:`wait_for`, for ``async def`` workflows."""
    ctx, secs = _check_wait(name, timeout, "crashsafe.wait_for_async()", True)
    nth, deadline, ops = _begin_wait(ctx, name, secs)
    if ops:
        await ctx.commit_async(ops)
    idx, entry = ctx.begin("signal", name)
    if entry is not None:
        return _recorded_signal(entry, name)
    poll = 0.05
    while True:
        ctx.check_interrupt()
        ctx.signal_event.clear()  # before looking: a signal sent after the look wakes us
        settled = await asyncio.to_thread(_settle_wait, ctx, idx, name, nth, deadline)
        if settled is not None:
            ops, value = settled
            await ctx.commit_async(ops)
            return _outcome(value)
        left = None if deadline is None else max(0.0, deadline - ctx.app.clock())
        await ctx.sleep_until_woken(poll if left is None else min(poll, left))
        poll = min(poll * 2, 1.0)


def patched(patch_id: str) -> bool:
    """Whether this workflow run takes the new code path named ``patch_id``.

    Workflows that reach this point for the first time take the new path (True) and
    record that; workflows whose journal was written by the old code (which had no
    patch here) replay the old path (False).

    Retiring a patch takes two deploys: once no workflow that started before the
    patch is in flight, delete the *old path* but keep the ``patched(...)`` call
    (its journal marker must still be met by workflows that recorded it); once those
    have finished too, delete the call. ``crashsafe replay`` checks either step.
    """
    ctx = _workflow_only()
    if ctx is None:
        raise NotInWorkflowError("crashsafe.patched() only makes sense inside a workflow")
    known = ctx.patches.get(patch_id)
    if known is not None:
        return known
    entry = ctx.peek()
    if entry is not None and not (entry.kind == "patch" and entry.name == patch_id):
        ctx.patches[patch_id] = False
        return False
    _journaled_patch(ctx, patch_id)
    ctx.patches[patch_id] = True
    return True


def _journaled_patch(ctx: WorkflowContext, patch_id: str) -> None:
    idx, entry = ctx.begin("patch", patch_id)
    if entry is None:
        at = time.time()
        ctx.pending.append(JournalEntry(ctx.workflow_id, idx, "patch", patch_id, b"true", None,
                                        1, at, at))
