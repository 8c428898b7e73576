"""Effect steps: intent before effect, the deduplication table, unknown outcomes.

An effect step (``@app.step(effect=True)``, or any step given ``on_unknown=`` or
``reconcile=``) records its *intent* durably before its body runs, and commits its
outcome under its idempotency key in the same transaction as its journal entry. So
after a crash there are three cases, never confused:

* the journal has the step: replay returns it, the body does not run;
* no intent: the body never started; run it;
* an intent but no outcome: the outcome is **unknown** (the process died after the
  body started and before its result was recorded). The step's ``on_unknown`` rule
  decides, and the decision is written into the timeline:

  - ``retry`` (default): run the body again with the same key, for receivers that
    deduplicate on it;
  - ``reconcile``: call ``reconcile(key, *args, **kwargs)``, which asks the receiver
    what happened and returns the result, or :data:`NOT_APPLIED` to run the body;
  - ``escalate``: park the workflow as ``waiting`` until a person sends the signal
    ``resolve:<step index>`` with ``{"action": "retry"}``, ``{"action": "skip",
    "result": ...}`` or ``{"action": "fail", "message": "..."}``.

A key given by the user (``refund(order, amount, key="refund:order-123")``) is shared
across workflows: a second step using it gets the first one's recorded result instead
of a second effect, and using it with different arguments is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from . import _codec
from ._context import _STEP, Current, WorkflowContext, idempotency_key
from ._errors import error_payload, step_failure
from ._escalation import ask
from .exceptions import (
    ConfigurationError,
    EffectFailedError,
    IdempotencyKeyConflictError,
    InvalidStateError,
    SerializationError,
)
from .stores.base import CompleteEffect, EffectRow, JournalEntry

if TYPE_CHECKING:
    from ._step import Step

OnUnknown = Literal["retry", "reconcile", "escalate"]
UNKNOWN_RULES = ("retry", "reconcile", "escalate")
NOTE_PREFIX = "outcome unknown after a crash: "


class _NotApplied:
    def __repr__(self) -> str:
        return "crashsafe.NOT_APPLIED"


NOT_APPLIED: Any = _NotApplied()
"""Returned by a ``reconcile`` function when the receiver never applied the effect."""


@dataclass(slots=True)
class Plan:
    """How to proceed with an effect step before (or instead of) running its body."""

    key: str
    note: str | None = None
    done: bool = False
    """The outcome is settled without running the body (deduplicated, reconciled, or
    decided by a person): ``value`` or ``error`` holds it."""
    value: Any = None
    error: BaseException | None = None
    own_row: bool = True
    """Whether the key's row is this step's (so its outcome is recorded under it)."""


def check_signature(step_name: str, fn: Any) -> None:
    if "key" in inspect.signature(fn).parameters:
        raise ConfigurationError(
            f"effect step {step_name!r} has a parameter named 'key', which crashsafe "
            "reserves for a caller-given idempotency key; rename the parameter"
        )


def args_hash(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    try:
        data, _ = _codec.encode({"args": list(args), "kwargs": kwargs}, "step arguments")
    except SerializationError:
        return "-"  # arguments crashsafe cannot store cannot be compared either
    return hashlib.sha256(data).hexdigest()


def prepare(step: Step[Any, Any], ctx: WorkflowContext, idx: int, args: tuple[Any, ...],
            kwargs: dict[str, Any], user_key: str | None) -> Plan:
    """Record the intent (one durable commit) and decide what to do. Blocking."""
    key = user_key or idempotency_key(ctx.workflow_id, idx)
    digest = args_hash(args, kwargs)
    while True:
        start = ctx.app.store.begin_effect(ctx.workflow_id, idx, step.name, key, digest,
                                           time.time())
        if start.holder is None:
            break
        holder = start.holder
        if holder.args_hash not in (digest, "-") and digest != "-":
            raise IdempotencyKeyConflictError(
                f"step {step.name!r} of workflow {ctx.workflow_id!r} uses key {key!r}, which "
                f"step {holder.step!r} of workflow {holder.workflow_id!r} already used with "
                "different arguments; use a key that names this effect exactly"
            )
        if holder.state == "done":
            return _from_holder(step, key, holder)
        _wait_for_holder(ctx, key, holder)
    if not start.unknown:
        return Plan(key)
    return _resolve_unknown(step, ctx, idx, key, args, kwargs)


def _wait_for_holder(ctx: WorkflowContext, key: str, holder: EffectRow) -> None:
    """Another step is applying ``key`` right now: wait (reading, not writing) until it
    records its outcome; refuse clearly if its workflow stopped without one."""
    poll = 0.05
    while True:
        ctx.check_interrupt()
        row = ctx.app.store.get_effect(key)
        if row is None or row.state == "done" or (row.workflow_id, row.index) != (
                holder.workflow_id, holder.index):
            return  # settled, purged or handed over: look again with begin_effect
        owner = ctx.app.store.get_workflow(holder.workflow_id)
        if owner is None or not owner.status.active:
            status = owner.status if owner is not None else "gone"
            raise InvalidStateError(
                f"step {holder.step!r} of workflow {holder.workflow_id!r} holds key {key!r} "
                f"but stopped ({status}) before recording the effect's outcome, so whether "
                f"it was applied is unknown; resume {holder.workflow_id!r} to settle it, or "
                "use another key once you know"
            )
        ctx.cancel_event.wait(poll)
        poll = min(poll * 2, 1.0)


def _from_holder(step: Step[Any, Any], key: str, holder: EffectRow) -> Plan:
    note = (f"deduplicated: key {key!r} was already applied by step {holder.step!r} of "
            f"workflow {holder.workflow_id!r}")
    if holder.error is not None:
        return Plan(key, note, done=True, error=step_failure(step.name, holder.error),
                    own_row=False)
    value = _codec.decode(holder.output or b"null", f"recorded result of key {key!r}")
    value = _codec.rebuild(value, step.return_type, f"result of step {step.name!r}")
    return Plan(key, note, done=True, value=value, own_row=False)


def _resolve_unknown(step: Step[Any, Any], ctx: WorkflowContext, idx: int, key: str,
                     args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
    rule = step.on_unknown
    if rule == "retry":
        return Plan(key, NOTE_PREFIX + "retried with the same key")
    if rule == "reconcile":
        assert step.reconcile is not None
        token = _STEP.set(Current(ctx.workflow_id, ctx.workflow_name, idx, step.name, 0))
        try:
            found = step.reconcile(key, *args, **kwargs)
            if inspect.isawaitable(found):
                found = asyncio.run(_awaited(found))
        except Exception as exc:
            why = f"reconcile raised {type(exc).__name__}: {exc}"
            return _escalate(step, ctx, idx, key, why)
        finally:
            _STEP.reset(token)
        if found is NOT_APPLIED:
            return Plan(key, NOTE_PREFIX + "reconciled: not applied, ran the step again")
        return Plan(key, NOTE_PREFIX + "reconciled: the effect had been applied",
                    done=True, value=found)
    return _escalate(step, ctx, idx, key, "the step's rule is to ask a person")


async def _awaited(value: Any) -> Any:
    return await value


def _escalate(step: Step[Any, Any], ctx: WorkflowContext, idx: int, key: str,
              why: str) -> Plan:
    """Park the workflow until a person decides what the unknown outcome becomes."""
    signal = f"resolve:{idx}"
    reason = (
        f"outcome of step {step.name!r} (index {idx}, key {key!r}) is unknown after a "
        f"crash ({why}); decide with `crashsafe signal {ctx.workflow_id} {signal} "
        """'{"action": "retry"}'` (or "skip" with a "result", or "fail" with a "message")"""
    )
    decision = ask(ctx, idx, step.name, signal, reason, ("retry", "skip", "fail"))
    action = decision["action"]
    prefix = f"{NOTE_PREFIX}escalated ({why}); a person chose "
    if action == "skip":
        return Plan(key, prefix + "skip", done=True, value=decision.get("result"))
    if action == "fail":
        message = str(decision.get("message") or "failed by a person after an unknown outcome")
        return Plan(key, prefix + "fail", done=True, error=EffectFailedError(message))
    return Plan(key, prefix + "retry")


def settled_ops(step: Step[Any, Any], ctx: WorkflowContext, idx: int, plan: Plan,
                value: Any, error: BaseException | None, attempts: int, started: float,
                expires: float | None) -> list[Any]:
    """The journal entry (and the key's outcome) for an effect step's result."""
    at = time.time()
    if error is not None:
        err = error_payload(error)
        entry = JournalEntry(ctx.workflow_id, idx, "step", step.name, None, err, attempts,
                             started, ctx.app.clock(), plan.note)  # ``started``'s clock
        out: bytes | None = None
    else:
        entry = step._record_result(ctx, idx, value, attempts, started)
        entry.note = plan.note
        out, err = entry.output, None
    ops: list[Any] = [entry]
    if plan.own_row:
        ops.append(CompleteEffect(plan.key, ctx.workflow_id, idx, out, err, at, expires))
    return ops
