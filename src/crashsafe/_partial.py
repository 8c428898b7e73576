"""Streaming steps: keep a step's partial output across a crash.

A step that streams (LLM tokens, a long download) calls
``crashsafe.save_partial(text_so_far)`` every so often (say every 50 tokens). If the
process dies before the step's result is recorded, the re-run step finds what was
saved in ``crashsafe.current().partial`` and can continue from there instead of
starting over (e.g. ask the model to continue the text). Each save is one small
durable write, sealed like every payload (encrypted with a keyring); it is dropped
once the step's result is recorded.
"""

from __future__ import annotations

from typing import Any

from . import _codec
from ._context import _STEP, _WORKFLOW
from ._seal import RecordContext
from .exceptions import NotInWorkflowError


def _where(what: str) -> tuple[Any, str, RecordContext]:
    step = _STEP.get()
    ctx = _WORKFLOW.get()
    if step is None or ctx is None or step.step_index is None:
        raise NotInWorkflowError(f"{what} is called inside a step")
    key = f"partial:{ctx.workflow_id}:{step.step_index}"
    return ctx, key, RecordContext(ctx.workflow_id, step.step_index, "partial")


def save_partial(value: Any) -> None:
    """Durably remember the running step's partial output (see the module docs)."""
    ctx, key, where = _where("crashsafe.save_partial()")
    data, _ = _codec.encode(value, "partial output")
    store = ctx.app.store
    sealer = getattr(store, "sealer", None)
    stored = sealer.seal(data, where) if sealer is not None else data
    store.update_shared(key, lambda cur, now: (stored, None))
    ctx.partials.add(key)


def load_partial() -> Any:
    """What the running step saved before a crash, or None."""
    ctx, key, where = _where("crashsafe.current().partial")
    store = ctx.app.store
    raw, _ = store.read_shared(key)
    if raw is None:
        return None
    sealer = getattr(store, "sealer", None)
    data = sealer.open(raw, where) if sealer is not None else raw
    return _codec.decode(data, "partial output")


def drop_partials(ctx: Any) -> None:
    """After a step's result is recorded: its partial output is no longer needed."""
    keys, ctx.partials = ctx.partials, set()
    for key in keys:
        ctx.app.store.update_shared(key, lambda cur, now: (None, None))
