"""Agent-state checkpoints: incremental snapshots in the journal, read back at any point.

``crashsafe.checkpoint(state, label=None)`` inside a workflow records the agent's state
(message history, memory, tool results) as a journal entry of kind ``checkpoint``.
The entry holds a **delta** against the previous checkpoint when that is smaller — a
message list that grew is stored as the appended messages, a dict as its changed and
removed keys — with a full snapshot every ``App(checkpoint_full_every=10)``
checkpoints, so reading any checkpoint applies at most that many deltas. Like every
payload it is sealed by the store (compressed, checksummed, encrypted with a keyring).

Each checkpoint records its metadata: its ordinal, label, the SHA-256 of the state's
canonical bytes, its size before and after the delta, and the time. On replay after a
crash the workflow's code calls ``checkpoint`` again with the state it rebuilt; its
hash must equal the recorded one, or the run has *silently diverged* (same calls, a
different state): :class:`StateDivergenceError` is raised, sticky like any
nondeterminism, and the workflow is parked as a dead letter rather than continuing
from a state that never existed.

Handles that cannot survive a restart (open files, sockets, API clients) do not belong
in a checkpoint: crash-only code re-acquires them when it resumes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from . import _codec
from ._context import workflow_context
from .exceptions import CrashsafeError, NondeterminismError, NotInWorkflowError
from .stores.base import JournalEntry

if TYPE_CHECKING:
    from ._context import WorkflowContext

KIND = "checkpoint"


class StateDivergenceError(NondeterminismError):
    """A replayed checkpoint's state differs from the one recorded at the same point."""


class CheckpointNotFoundError(CrashsafeError, LookupError):
    """No checkpoint matches the given index, ordinal or label."""


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """One recorded checkpoint, as :meth:`App.checkpoints` lists it."""

    index: int
    """Its journal index (a fork or ``show --at`` can name it)."""
    n: int
    """Its ordinal among the workflow's checkpoints, from 0."""
    label: str | None
    hash: str
    """SHA-256 of the state's canonical bytes."""
    size: int
    """Bytes of the state before the delta."""
    stored: int
    """Bytes of what was stored (the delta or the full snapshot, before sealing)."""
    full: bool
    at: float


# -- deltas ---------------------------------------------------------------------------------
def diff(old: Any, new: Any) -> Any:
    """A delta that :func:`patch` turns ``old`` into ``new`` with, or ``{"=": new}``."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed = {k: (diff(old[k], v) if k in old else {"=": v}) for k, v in new.items()
                   if k not in old or old[k] != v}
        removed = [k for k in old if k not in new]
        out: dict[str, Any] = {}
        if changed:
            out["set"] = changed
        if removed:
            out["del"] = removed
        if all(isinstance(k, str) for k in new) and all(isinstance(k, str) for k in old):
            return {"dict": out}
    if isinstance(old, list) and isinstance(new, list) and len(new) >= len(old) \
            and new[:len(old)] == old:
        return {"append": new[len(old):]}
    return {"=": new}


def patch(old: Any, delta: Any) -> Any:
    if "=" in delta:
        return delta["="]
    if "append" in delta:
        return [*old, *delta["append"]]
    body = delta["dict"]
    out = dict(old)
    for k in body.get("del", ()):
        out.pop(k, None)
    for k, d in body.get("set", {}).items():
        out[k] = patch(out.get(k), d)
    return out


def state_hash(state: Any) -> tuple[str, int, bytes]:
    """SHA-256 of the state's canonical bytes (keys sorted), its size, and those bytes."""
    data, _ = _codec.encode(state, "checkpoint state")
    canonical = msgspec.json.encode(msgspec.json.decode(data), order="sorted")
    return hashlib.sha256(canonical).hexdigest(), len(canonical), data


# -- recording ----------------------------------------------------------------------------
def checkpoint(state: Any, label: str | None = None) -> None:
    """Record the agent's state here (see the module documentation)."""
    ctx = workflow_context("crashsafe.checkpoint()")
    if _in_step():
        raise NotInWorkflowError("crashsafe.checkpoint() is called from workflow code, "
                                 "not inside a step")
    if label is not None and (not isinstance(label, str) or not label):
        raise ValueError("checkpoint label must be a non-empty string or None")
    digest, size, data = state_hash(state)
    idx, entry = ctx.begin(KIND, label or KIND)
    plain = _codec.decode(data)
    if entry is not None:
        meta = _codec.decode(entry.output or b"{}", "checkpoint")
        if meta.get("hash") != digest:
            ctx.diverged = StateDivergenceError(
                ctx.workflow_id, idx, f"checkpoint {label or KIND!r} with state hash "
                f"{digest[:12]}", f"state hash {str(meta.get('hash'))[:12]}")
            raise ctx.diverged
        ctx.checkpoint_state = (plain, int(meta.get("n", 0)), meta.get("full_n", 0))
        return
    ctx.commit([_entry(ctx, idx, label, plain, digest, size)])


def _in_step() -> bool:
    from ._context import _STEP

    return _STEP.get() is not None


def _entry(ctx: WorkflowContext, idx: int, label: str | None, state: Any, digest: str,
           size: int) -> JournalEntry:
    previous = ctx.checkpoint_state
    every = ctx.app.checkpoint_full_every
    n = 0 if previous is None else previous[1] + 1
    doc: dict[str, Any] = {"n": n, "label": label, "hash": digest, "size": size}
    if previous is None or n - int(previous[2]) >= every:
        doc["full"] = state
        doc["full_n"] = n
        doc["stored"] = size
    else:
        delta = diff(previous[0], state)
        delta_size = len(_codec.encode(delta, "checkpoint delta")[0])
        if delta_size < size:  # ``size`` is the state's own encoded length
            doc["delta"] = delta
            doc["full_n"] = previous[2]
            doc["stored"] = delta_size
        else:
            doc["full"] = state
            doc["full_n"] = n
            doc["stored"] = size
    data, _ = _codec.encode(doc, "checkpoint")
    ctx.checkpoint_state = (state, n, doc["full_n"])
    at = ctx.app.clock()
    return JournalEntry(ctx.workflow_id, idx, KIND, label or KIND, data, None, 1, at, at)


# -- reading ----------------------------------------------------------------------------------
def infos(journal: list[JournalEntry]) -> list[CheckpointInfo]:
    out = []
    for e in journal:
        if e.kind != KIND:
            continue
        meta = _codec.decode(e.output or b"{}", "checkpoint")
        out.append(CheckpointInfo(e.index, int(meta["n"]), meta.get("label"),
                                  str(meta["hash"]), int(meta["size"]),
                                  int(meta.get("stored", 0)), "full" in meta, e.started_at))
    return out


def resolve(journal: list[JournalEntry], at: int | str | None) -> CheckpointInfo:
    """The checkpoint ``at`` names: a label, ``"#N"`` (ordinal), an int journal index
    (the last checkpoint at or before it), or None (the latest)."""
    found = infos(journal)
    if not found:
        raise CheckpointNotFoundError("this workflow has recorded no checkpoint")
    if at is None:
        return found[-1]
    if isinstance(at, str) and at.startswith("#") and at[1:].isdigit():
        match = [c for c in found if c.n == int(at[1:])]
    elif isinstance(at, str):
        match = [c for c in found if c.label == at][-1:]
    else:
        match = [c for c in found if c.index <= at][-1:]
    if not match:
        raise CheckpointNotFoundError(
            f"no checkpoint {at!r}; recorded: "
            + ", ".join(f"#{c.n} at index {c.index}" + (f" ({c.label})" if c.label else "")
                        for c in found))
    return match[0]


def state_at(journal: list[JournalEntry], info: CheckpointInfo) -> Any:
    """Rebuild the state of checkpoint ``info``: its last full snapshot, then at most
    ``checkpoint_full_every`` deltas."""
    chain: list[dict[str, Any]] = []
    for e in reversed([e for e in journal if e.kind == KIND and e.index <= info.index]):
        meta = _codec.decode(e.output or b"{}", "checkpoint")
        chain.append(meta)
        if "full" in meta:
            break
    if not chain or "full" not in chain[-1]:
        raise CrashsafeError(f"checkpoint #{info.n} has no full snapshot before it")
    state = chain[-1]["full"]
    for meta in reversed(chain[:-1]):
        state = patch(state, meta["delta"])
    return state
