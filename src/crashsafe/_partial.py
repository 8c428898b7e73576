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

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

from . import _codec
from ._context import _STEP, _WORKFLOW
from ._seal import RecordContext
from .exceptions import NotInWorkflowError

PREFIX = "partial:"
"""Partial outputs live in the store's shared values under ``partial:<workflow id>:<step
index>``, sealed for ``RecordContext(workflow id, step index, "partial")``."""


def record_context(key: str) -> RecordContext | None:
    """Where the partial output stored under ``key`` is sealed for (None: not one)."""
    if not key.startswith(PREFIX):
        return None
    wid, _, index = key[len(PREFIX):].rpartition(":")
    if not index.lstrip("-").isdigit():
        return None
    return RecordContext(wid, int(index), "partial")


def _where(what: str) -> tuple[Any, str, RecordContext]:
    step = _STEP.get()
    ctx = _WORKFLOW.get()
    if step is None or ctx is None or step.step_index is None:
        raise NotInWorkflowError(f"{what} is called inside a step")
    key = f"{PREFIX}{ctx.workflow_id}:{step.step_index}"
    return ctx, key, RecordContext(ctx.workflow_id, step.step_index, "partial")


def save_partial(value: Any) -> None:
    """Durably remember the running step's partial output (see the module docs)."""
    ctx, key, where = _where("crashsafe.save_partial()")
    data, _ = _codec.encode(value, "partial output")
    store = ctx.app.store
    sealer = getattr(store, "sealer", None)
    redactor = getattr(store, "redactor", None)
    if redactor is not None and sealer is not None:  # credentials masked, Secrets checked
        data = redactor.value(data, encrypted=sealer.encrypted, what="partial output")
    stored = sealer.seal(data, where) if sealer is not None else data
    store.update_shared(key, lambda cur, now: (stored, None))
    ctx.partials.add(key)


def stream_partial(chunks: Iterable[str], *, every: int = 50) -> Iterator[str]:
    """Pass a step's text stream through, saving the text so far every ``every`` chunks.

    Yields the chunks unchanged. The text saved is what a re-run of the step after a
    crash finds in ``crashsafe.current().partial`` *plus* the chunks since, so a step
    that asks the model to continue from ``partial`` keeps one growing text across any
    number of crashes. The last save is at most ``every - 1`` chunks behind; nothing is
    saved at the end (the step's result is recorded then)."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"stream_partial: every must be an int >= 1, not {every!r}")
    text = _prefix("crashsafe.stream_partial()")
    for n, chunk in enumerate(chunks, 1):
        text += _chunk(chunk)
        if n % every == 0:
            save_partial(text)
        yield chunk


async def astream_partial(chunks: AsyncIterable[str], *,
                          every: int = 50) -> AsyncIterator[str]:
    """:func:`stream_partial` for an async stream (an async SDK's token stream)."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"astream_partial: every must be an int >= 1, not {every!r}")
    text = _prefix("crashsafe.astream_partial()")
    n = 0
    async for chunk in chunks:
        n += 1
        text += _chunk(chunk)
        if n % every == 0:
            save_partial(text)  # one small durable write, as from sync code
        yield chunk


def _prefix(what: str) -> str:
    saved = load_partial()
    if saved is None:
        return ""
    if not isinstance(saved, str):
        raise TypeError(f"{what}: the saved partial output is a {type(saved).__name__}, "
                        "not text; use crashsafe.save_partial() for other values")
    return saved


def _chunk(chunk: object) -> str:
    if not isinstance(chunk, str):
        raise TypeError(f"stream_partial: chunks must be str, got {type(chunk).__name__}; "
                        "map the stream to its text first (e.g. the delta's content)")
    return chunk


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
