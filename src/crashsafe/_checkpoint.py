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

Automatic checkpoints (:mod:`crashsafe._checkpoint_policy`) go through the same
:func:`record` and are verified the same way; a :class:`Selective`
(:mod:`crashsafe._checkpoint_select`) chooses what of the state is kept. Metadata that
is not known (token usage, model, a step failure, a selection) is not stored at all.

Handles that cannot survive a restart (open files, sockets, API clients) do not belong
in a checkpoint: crash-only code re-acquires them when it resumes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from . import _checkpoint_pack as _pack
from . import _codec
from ._context import workflow_context
from ._redaction import for_tag
from .exceptions import (
    ConfigurationError,
    CorruptRecordError,
    CrashsafeError,
    NondeterminismError,
    NotInWorkflowError,
)
from .stores.base import JournalEntry

if TYPE_CHECKING:
    from ._checkpoint_select import Selective
    from ._context import WorkflowContext

KIND = "checkpoint"
AUTO = "auto"
"""The journal name of an automatic checkpoint (an explicit one is named by its label)."""
METADATA = ("tok", "model", "err", "sel", "us", "next", "rd")
"""Recorded fields besides the state: kept when retention drops the state (a replay of
an adaptive policy reads its interval, ``next``, back; ``rd`` names the redaction
settings the hash was taken under, see :func:`hashed_form`)."""


class StateDivergenceError(NondeterminismError):
    """A replayed checkpoint's state differs from the one recorded at the same point."""


class CheckpointNotFoundError(CrashsafeError, LookupError):
    """No checkpoint matches the given index, ordinal or label."""


class CheckpointPrunedError(CheckpointNotFoundError):
    """The checkpoint exists, but retention dropped its state (only the last N
    checkpoints of a finished workflow keep theirs)."""


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
    pruned: bool = False
    """Its state was dropped by retention (``app.gc(keep_checkpoints=N)``); the
    metadata stays so replay still checks the hash at this point."""
    auto: bool = False
    """Taken by the workflow's :class:`CheckpointPolicy`, not by ``checkpoint()``."""
    tokens: int | None = None
    """Token usage of the workflow up to here, when known."""
    model: str | None = None
    """The latest model the workflow reported, when known (stored when it changes)."""
    error: str | None = None
    """The latest step failure recorded since the previous checkpoint, if any."""
    dropped: tuple[str, ...] = ()
    """Keys a :class:`Selective` left out of the stored state."""
    truncated: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """Keys a :class:`Selective` shortened: ``key -> (items kept, items before)``."""
    over_budget: bool = False
    """Its essential keys alone exceeded the :class:`Selective` budget."""


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


_NOT_GIVEN: Any = object()


def settings_tag(app: Any) -> Any:
    """The live redaction settings, as a checkpoint record names them (None: the
    defaults, not stored; see :attr:`crashsafe._redaction.Redactor.hash_tag`)."""
    redactor = getattr(app.store, "redactor", None)
    return "off" if redactor is None else redactor.hash_tag


def hashed_form(app: Any, data: bytes, tag: Any = _NOT_GIVEN) -> bytes:
    """The state's bytes as the store keeps them: with credentials redacted
    (crashsafe._redaction), which is what the recorded hash covers. ``tag`` names the
    settings to redact under (a record's ``rd``; None: the defaults); by default the
    live ones. A replay hashes under the settings the checkpoint recorded, so changing
    them (or a release changing the default patterns) is not a divergence."""
    if tag is _NOT_GIVEN:
        redactor = getattr(app.store, "redactor", None)
        if redactor is None:
            return data
    else:
        redactor = for_tag(tag)
    out: bytes = redactor.value(data, encrypted=True, what="checkpoint state")
    return out


# -- recording ----------------------------------------------------------------------------
def checkpoint(state: Any, label: str | None = None, *, select: Selective | None = None,
               tokens: int | None = None, model: str | None = None) -> None:
    """Record the agent's state here (see the module documentation).

    ``select`` keeps part of a dict state (a :class:`Selective`; default: the one in
    the workflow's :class:`CheckpointPolicy`, else all of it). ``tokens`` and ``model``
    are recorded with it (default: what the workflow gave
    :func:`crashsafe.record_usage` so far).
    """
    ctx = workflow_context("crashsafe.checkpoint()")
    if _in_step():
        raise NotInWorkflowError("crashsafe.checkpoint() is called from workflow code, "
                                 "not inside a step")
    if label is not None and (not isinstance(label, str) or not label):
        raise ValueError("checkpoint label must be a non-empty string or None")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool)
                               or tokens < 0):
        raise ConfigurationError(f"checkpoint(tokens=...) must be an int >= 0, not {tokens!r}")
    record(ctx, state, label, select=select, tokens=tokens, model=model)


def record(ctx: WorkflowContext, state: Any, label: str | None, *, auto: bool = False,
           select: Selective | None = None, tokens: int | None = None,
           model: str | None = None) -> None:
    """Record (or, on replay, verify) a checkpoint, explicit or automatic. An automatic
    one rides along with the workflow's next commit."""
    tracker = ctx.auto
    policy = tracker.policy
    if select is None and policy is not None:
        select = policy.select
    started = time.perf_counter()
    data, info = _selected(state, select)
    live = settings_tag(ctx.app)
    name = AUTO if auto else (label or KIND)
    idx, entry = ctx.begin(KIND, name)
    plain = _codec.decode(data)
    meta = None if entry is None else _codec.decode(entry.output or b"{}", "checkpoint")
    tag = live if meta is None else meta.get("rd")
    try:
        # Hashed as stored, redacted (a replay that sees "***" is not a divergence),
        # under the settings the checkpoint was recorded with.
        hashed = hashed_form(ctx.app, data) if meta is None else hashed_form(
            ctx.app, data, tag)
    except ValueError as exc:
        raise CorruptRecordError(
            f"checkpoint {name!r} (journal index {idx}) of workflow {ctx.workflow_id!r} "
            f"names redaction settings this release cannot use: {exc}", ctx.workflow_id,
            idx, "output") from None
    canonical = msgspec.json.encode(msgspec.json.decode(hashed), order="sorted")
    digest, size = hashlib.sha256(canonical).hexdigest(), len(canonical)
    if entry is not None and meta is not None:
        if meta.get("hash") != digest:
            ctx.diverged = StateDivergenceError(
                ctx.workflow_id, idx, f"checkpoint {name!r} with state hash "
                f"{digest[:12]}", f"state hash {str(meta.get('hash'))[:12]}")
            raise ctx.diverged
        # Stored under other redaction settings than the live ones: the next checkpoint
        # is a full snapshot (a delta would be patched onto a base redacted otherwise).
        full_n = meta.get("full_n", 0) if tag == live else None
        ctx.checkpoint_state = (plain, int(meta.get("n", 0)), full_n)
        ctx.checkpoint_base = (idx, canonical)
        tracker.reset(entry.started_at)
        if "model" in meta:
            tracker.recorded_model = str(meta["model"])
        if auto and "next" in meta:
            tracker.interval = int(meta["next"])  # the adaptive decision, as recorded
        return
    extra: dict[str, Any] = {}
    used = tokens if tokens is not None else tracker.tokens
    if used is not None:
        extra["tok"] = used
    used_model = model or tracker.model
    if used_model is not None and used_model != tracker.recorded_model:
        extra["model"] = tracker.recorded_model = used_model  # stored when it changes
    if tracker.error is not None:
        extra["err"] = tracker.error
    if info is not None:
        extra["sel"] = info
    if live is not None:
        extra["rd"] = live  # the hash's redaction settings, when not the defaults
    chosen: list[int] = []
    late = None
    if auto and policy is not None and policy.adaptive:
        def late(doc: dict[str, Any]) -> None:
            # Decided from the steps since the previous checkpoint, and recorded: a
            # replay reads the interval back instead of deciding again.
            cost = time.perf_counter() - started
            doc["us"] = round(cost * 1e6)
            doc["next"] = tracker.next_interval(cost)
            chosen.append(doc["next"])
    made = _entry(ctx, idx, label, plain, digest, size, extra, late, name)
    ctx.checkpoint_base = (idx, canonical)
    tracker.reset(made.started_at)
    if chosen:
        tracker.interval = chosen[0]
    if auto:
        ctx.riders.append(made)
    else:
        ctx.commit([made])


def _selected(state: Any, select: Selective | None) -> tuple[bytes, dict[str, Any] | None]:
    """The state's encoded bytes, after ``select`` (and what it dropped or cut)."""
    data, _ = _codec.encode(state, "checkpoint state")
    if select is None:
        return data, None
    kept, info = select.apply(_codec.decode(data))
    if info is not None:
        data, _ = _codec.encode(kept, "checkpoint state")
    return data, info


def _in_step() -> bool:
    from ._context import _STEP

    return _STEP.get() is not None


def _entry(ctx: WorkflowContext, idx: int, label: str | None, state: Any, digest: str,
           size: int, extra: dict[str, Any] | None = None,
           late: Callable[[dict[str, Any]], None] | None = None,
           name: str | None = None) -> JournalEntry:
    previous = ctx.checkpoint_state
    every = ctx.app.checkpoint_full_every
    n = 0 if previous is None else previous[1] + 1
    doc: dict[str, Any] = {"n": n, "label": label, "hash": digest, "size": size}
    # A replayed checkpoint whose state retention dropped has no base (full_n None).
    if previous is None or previous[2] is None or n - int(previous[2]) >= every:
        doc["full"] = state
        doc["full_n"] = n
        doc["stored"] = size
    else:
        delta = diff(previous[0], state)
        encoded = _codec.encode(delta, "checkpoint delta")[0]
        delta_size = len(encoded)
        base = ctx.checkpoint_base
        # Python's == finds 1, 1.0 and True equal; a delta is only kept if a reader
        # rebuilds exactly this state from it.
        if delta_size < size and _pack.rebuilds(previous[0], delta, patch, state):
            # Compressed against the previous state and the results since, if smaller.
            store = ctx.app.store
            packed = None if base is None else _pack.pack(
                store, encoded, base[1], _pack.recent_outputs(
                    store, ctx.recorded, base[0], idx,
                    loaded=ctx.replayed + len(ctx.journal)))  # read back from the store
            if packed is None:
                doc["delta"] = delta
            else:
                doc.update(packed)
            doc["full_n"] = previous[2]
            doc["stored"] = delta_size
        else:
            doc["full"] = state
            doc["full_n"] = n
            doc["stored"] = size
    if extra:
        doc.update(extra)  # metadata only when known: absent fields cost no bytes
    if late is not None:
        late(doc)
    data, _ = _codec.encode(doc, "checkpoint")
    ctx.checkpoint_state = (state, n, doc["full_n"])
    at = ctx.app.clock()
    return JournalEntry(ctx.workflow_id, idx, KIND, name or label or KIND, data, None, 1, at,
                        at)


# -- reading ----------------------------------------------------------------------------------
def infos(journal: list[JournalEntry]) -> list[CheckpointInfo]:
    out = []
    model = None
    for e in journal:
        if e.kind != KIND:
            continue
        meta = _codec.decode(e.output or b"{}", "checkpoint")
        model = meta.setdefault("model", model)  # recorded when it changed
        out.append(CheckpointInfo(e.index, int(meta["n"]), meta.get("label"),
                                  str(meta["hash"]), int(meta["size"]),
                                  int(meta.get("stored", 0)), "full" in meta, e.started_at,
                                  bool(meta.get("pruned")), **_recorded_extras(e, meta)))
    return out


def _recorded_extras(e: JournalEntry, meta: dict[str, Any]) -> dict[str, Any]:
    sel = meta.get("sel") or {}
    return {"auto": e.name == AUTO and meta.get("label") is None,
            "tokens": meta.get("tok"), "model": meta.get("model"), "error": meta.get("err"),
            "dropped": tuple(sel.get("drop", ())),
            "truncated": {k: (int(v[0]), int(v[1])) for k, v in sel.get("cut", {}).items()},
            "over_budget": bool(sel.get("over"))}


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
    links: list[JournalEntry] = []
    for e in reversed([e for e in journal if e.kind == KIND and e.index <= info.index]):
        meta = _codec.decode(e.output or b"{}", "checkpoint")
        if meta.get("pruned"):
            raise CheckpointPrunedError(
                f"the state of checkpoint #{info.n} was dropped by retention (a finished "
                "workflow keeps the state of its last N checkpoints); its hash is kept")
        chain.append(meta)
        links.append(e)
        if "full" in meta:
            break
    if not chain or "full" not in chain[-1]:
        raise CrashsafeError(f"checkpoint #{info.n} has no full snapshot before it")
    return _pack.rebuild(list(zip(links, chain, strict=True))[::-1], journal, patch)
