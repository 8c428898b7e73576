"""Asking a person: park the workflow, notify once, wait for a decision signal.

Used when an effect's outcome is unknown after a crash (``on_unknown="escalate"``) and
when a retry policy with ``escalate=True`` gives up on a failure a person can fix
(auth, quota, content policy, attempts exhausted). The workflow becomes ``waiting``
with a reason that says what to send; the app's ``on_escalate`` hook, if any, is
called with an :class:`Escalation` whose ``key`` is stable across crashes, and the
call is marked done in the store afterwards, so after a crash in between the hook is
called again with the same key (effectively once for a receiver that deduplicates).
Only an answer sent after this escalation counts, and an answer that is not a valid
decision is reported in the reason while the workflow keeps waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import _codec
from ._context import WorkflowContext
from .stores.base import MarkWaiting

log = logging.getLogger("crashsafe")


@dataclass(frozen=True, slots=True)
class Escalation:
    """What an ``on_escalate`` hook receives."""

    workflow_id: str
    workflow_name: str
    step_index: int
    step_name: str
    signal: str
    """The signal name that carries the decision."""
    actions: tuple[str, ...]
    reason: str
    key: str
    """Stable across crashes: use it to deduplicate notifications."""


def ask(ctx: WorkflowContext, idx: int, step_name: str, signal: str, reason: str,
        actions: Sequence[str]) -> dict[str, Any]:
    """Park the workflow until a signal ``signal`` carries ``{"action": one of actions}``.
    Blocking; returns the decision."""
    store = ctx.app.store
    nth = 0
    while store.get_signal(ctx.workflow_id, signal, nth) is not None:
        nth += 1
    ctx.commit([MarkWaiting(ctx.workflow_id, ctx.app.executor_id, reason)])
    _notify(ctx, Escalation(ctx.workflow_id, ctx.workflow_name, idx, step_name, signal,
                            tuple(actions), reason, f"{ctx.workflow_id}:{signal}:{nth}"))
    poll = 0.05
    while True:
        ctx.check_interrupt()
        ctx.signal_event.clear()
        payload = store.get_signal(ctx.workflow_id, signal, nth)
        if payload is None:
            ctx.signal_event.wait(poll)
            poll = min(poll * 2, 1.0)
            continue
        decision = _codec.decode(payload, f"signal {signal!r}")
        if isinstance(decision, dict) and decision.get("action") in actions:
            break
        nth += 1  # not a decision: say so and keep waiting for one
        ctx.commit([MarkWaiting(ctx.workflow_id, ctx.app.executor_id,
                                f"{reason}; the last answer {decision!r} was not understood")])
    ctx.commit([MarkWaiting(ctx.workflow_id, ctx.app.executor_id, None)])
    return decision


def _notify(ctx: WorkflowContext, esc: Escalation) -> None:
    hook = ctx.app.on_escalate
    if hook is None:
        return
    store = ctx.app.store
    mark = f"notified:{esc.key}"
    if store.read_shared(mark)[0] is not None:
        return
    try:
        hook(esc)
    except Exception as exc:  # a broken hook must not lose the escalation itself
        log.warning("on_escalate hook failed for %s: %s", esc.key, exc, exc_info=True)
        return
    store.update_shared(mark, lambda cur, now: (b"1", None))


def describe_actions(ctx: WorkflowContext, signal: str, actions: Sequence[str]) -> str:
    shown = " | ".join(actions)
    return (f"decide with `crashsafe signal {ctx.workflow_id} {signal} "
            f"'{{\"action\": \"{actions[0]}\"}}'` (actions: {shown})")
