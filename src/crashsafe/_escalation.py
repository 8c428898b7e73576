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

import asyncio
import logging
from collections.abc import Callable, Sequence
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


def _marker(ctx: WorkflowContext, signal: str) -> str:
    return f"escalation:{ctx.workflow_id}:{signal}"


def _first_answer(ctx: WorkflowContext, signal: str) -> int:
    """The number of the first signal that answers this escalation. Kept in the store
    from the moment the escalation starts until it is decided, so after a crash the
    same escalation keeps its number (an answer sent while the process was down
    counts, and the notification key stays the same); a later escalation of the same
    step starts after the answers already used."""
    store = ctx.app.store
    raw, _ = store.read_shared(_marker(ctx, signal))
    if raw is not None:
        return int(raw)
    nth = 0
    while store.get_signal(ctx.workflow_id, signal, nth) is not None:
        nth += 1
    chosen = str(nth).encode()

    def keep_first(cur: bytes | None, now: float) -> tuple[bytes | None, bytes]:
        return (cur, cur) if cur is not None else (chosen, chosen)

    return int(store.update_shared(_marker(ctx, signal), keep_first))


def _move_marker(ctx: WorkflowContext, signal: str, nth: int | None) -> None:
    value = None if nth is None else str(nth).encode()
    ctx.app.store.update_shared(_marker(ctx, signal), lambda cur, now: (value, None))


Check = Callable[[dict[str, Any]], str | None]
"""Looks at a decision; returns why it cannot be used, or None."""


def _decision(payload: bytes, signal: str, actions: Sequence[str],
              check: Check | None) -> tuple[dict[str, Any] | None, str]:
    decision = _codec.decode(payload, f"signal {signal!r}")
    if not isinstance(decision, dict) or decision.get("action") not in actions:
        return None, "was not understood"
    if decision["action"] == "value" and "value" not in decision:
        return None, 'was not understood ("value" needs a "value")'
    problem = check(decision) if check is not None else None
    if problem is not None:
        return None, f"cannot be used: {problem}"
    return decision, ""


def _not_understood(reason: str, payload: bytes, why: str) -> str:
    return f"{reason}; the last answer {_codec.decode(payload)!r} {why}"


def ask(ctx: WorkflowContext, idx: int, step_name: str, signal: str, reason: str,
        actions: Sequence[str], check: Check | None = None) -> dict[str, Any]:
    """Park the workflow until a signal ``signal`` carries ``{"action": one of actions}``.
    Blocking; returns the decision."""
    store = ctx.app.store
    nth = _first_answer(ctx, signal)
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
        decision, why = _decision(payload, signal, actions, check)
        if decision is not None:
            break
        nth += 1  # not a usable decision: say so and keep waiting for one
        _move_marker(ctx, signal, nth)
        ctx.commit([MarkWaiting(ctx.workflow_id, ctx.app.executor_id,
                                _not_understood(reason, payload, why))])
    ctx.commit([MarkWaiting(ctx.workflow_id, ctx.app.executor_id, None)])
    _move_marker(ctx, signal, None)
    return decision


async def ask_async(ctx: WorkflowContext, idx: int, step_name: str, signal: str,
                    reason: str, actions: Sequence[str],
                    check: Check | None = None) -> dict[str, Any]:
    """:func:`ask` for async workflows: the wait awaits and holds no thread."""
    store = ctx.app.store
    nth = await asyncio.to_thread(_first_answer, ctx, signal)
    await ctx.commit_async([MarkWaiting(ctx.workflow_id, ctx.app.executor_id, reason)])
    await asyncio.to_thread(
        _notify, ctx, Escalation(ctx.workflow_id, ctx.workflow_name, idx, step_name, signal,
                                 tuple(actions), reason, f"{ctx.workflow_id}:{signal}:{nth}"))
    poll = 0.05
    while True:
        ctx.check_interrupt()
        ctx.signal_event.clear()
        payload = await asyncio.to_thread(store.get_signal, ctx.workflow_id, signal, nth)
        if payload is None:
            await ctx.sleep_until_woken(poll)
            poll = min(poll * 2, 1.0)
            continue
        decision, why = _decision(payload, signal, actions, check)
        if decision is not None:
            break
        nth += 1
        await asyncio.to_thread(_move_marker, ctx, signal, nth)
        await ctx.commit_async([MarkWaiting(ctx.workflow_id, ctx.app.executor_id,
                                            _not_understood(reason, payload, why))])
    await ctx.commit_async([MarkWaiting(ctx.workflow_id, ctx.app.executor_id, None)])
    await asyncio.to_thread(_move_marker, ctx, signal, None)
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
