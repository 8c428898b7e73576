"""What the dashboard's JSON API returns, built from the App's read methods only.

No Starlette here: each function takes an :class:`~crashsafe.App` and returns plain
JSON-ready data, so the shapes are typed and testable without a server. Stored values
are user data: they travel as JSON strings and the page only ever sets them as text.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import _codec
from .._app import App
from .._errors import describe
from ..exceptions import CrashsafeError
from ..observe import Thresholds, compute, evaluate
from ..stores.base import AttemptRecord, JournalEntry, Status, WorkflowRecord
from ._timeline import timeline

MAX_LIST = 500
"""The most workflows one list request returns."""
MAX_JOURNAL = 500
"""The most journal entries (and rolled-back entries, and checkpoints) one workflow
request returns: the last ones, or the last ones before ``?before=INDEX``."""
MAX_RESULT = 500
"""The longest rendered workflow result, in characters."""
MAX_DEPTH = 20
"""Containers nested deeper are rendered as ``…``."""


class _Full(Exception):
    """The rendering reached its width."""


def bounded_repr(value: Any, width: int) -> str:
    """``repr(value)``, cut at ``width`` characters (ending with ``…``), built without
    ever rendering more than that: a result of a megabyte costs no more than a short one,
    and an integer too long to print is named by its size."""
    parts: list[str] = []
    room = [width + 1]

    def put(text: str) -> None:
        parts.append(text[: room[0]])
        room[0] -= len(text)
        if room[0] < 0:
            raise _Full

    def walk(v: Any, depth: int) -> None:
        if isinstance(v, bool) or v is None or isinstance(v, float):
            put(repr(v))
        elif isinstance(v, int):
            put(repr(v) if v.bit_length() < 3 * (width + 1) else
                f"<an integer of {v.bit_length()} bits>")
        elif isinstance(v, str | bytes | bytearray):
            put(repr(v[: width + 1]))
        elif depth >= MAX_DEPTH and isinstance(v, dict | list | tuple | set | frozenset):
            put("…")
        elif isinstance(v, dict):
            put("{")
            for i, (k, x) in enumerate(v.items()):
                put(", " if i else "")
                walk(k, depth + 1)
                put(": ")
                walk(x, depth + 1)
            put("}")
        elif isinstance(v, list | tuple | set | frozenset):
            empty = {list: "[]", tuple: "()", set: "set()", frozenset: "frozenset()"}
            if not v:
                put(empty.get(type(v), "[]"))
                return
            opening, closing = ("[", "]") if isinstance(v, list) else ("(", ")") \
                if isinstance(v, tuple) else ("{", "}")
            put(opening)
            for i, x in enumerate(v):
                put(", " if i else "")
                walk(x, depth + 1)
            put("," + closing if isinstance(v, tuple) and len(v) == 1 else closing)
        else:
            put(repr(v)[: width + 1])

    try:
        walk(value, 0)
    except _Full:
        pass
    text = "".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"


def timestamp(value: float) -> str:
    """A Unix time as ``YYYY-MM-DD HH:MM:SS UTC``, or a plain number for one no calendar
    holds (a deadline a million years away)."""
    try:
        return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):
        return f"{bounded_repr(value, 40)} s after 1970 (beyond the calendar)"


def shown_url(url: str) -> str:
    """The database URL with any password replaced by ``***`` (the page shows it)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def record(rec: WorkflowRecord) -> dict[str, Any]:
    """One workflow row (the same fields as ``crashsafe ls --json``)."""
    return {
        "id": rec.id, "name": rec.name, "version": rec.version, "status": rec.status.value,
        "owner": rec.owner, "parent_id": rec.parent_id, "created_at": rec.created_at,
        "updated_at": rec.updated_at, "recovery_attempts": rec.recovery_attempts,
        "reason": rec.reason, "queue": rec.queue,
    }


def workflows(app: App, *, status: str | None, name: str | None, prefix: str | None,
              limit: int) -> dict[str, Any]:
    """The list page: workflows newest first, filtered as ``crashsafe ls`` filters."""
    limit = max(1, min(limit, MAX_LIST))
    rows = app.list_workflows(status=status or None, name=name or None,
                              id_prefix=prefix or None, limit=limit)
    return {"workflows": [record(r) for r in rows], "limit": limit,
            "statuses": [s.value for s in Status]}


def preview(entry: JournalEntry | AttemptRecord, width: int = 160) -> str:
    """One line for a tooltip: the error, or the recorded value's repr, cut at ``width``."""
    if entry.error is not None:
        return describe(entry.error)[:width]
    output = getattr(entry, "output", None)
    if output is None:
        return ""
    try:
        value = _codec.decode(output, "output")
    except CrashsafeError as exc:
        return f"<unreadable: {exc}>"[:width]
    kind = getattr(entry, "kind", "step")
    if kind == "checkpoint" and isinstance(value, dict):
        return (f"checkpoint #{value.get('n')}: {value.get('size')} bytes of state"
                + (" (delta)" if "full" not in value else ""))
    if kind in ("sleep", "wait"):
        if not isinstance(value, int | float):
            return "no deadline"
        return f"{'wake at' if kind == 'sleep' else 'deadline'} {timestamp(value)}"
    return bounded_repr(value, width)


def workflow(app: App, workflow_id: str, *, before: int | None = None,
             limit: int = MAX_JOURNAL) -> dict[str, Any]:
    """One workflow: its row, journal, attempts, checkpoints, rolled-back entries and
    the timeline picture's rows (raises UnknownWorkflowError for an unknown id).

    At most ``limit`` (≤ :data:`MAX_JOURNAL`) journal entries: the last ones, or with
    ``before`` the last ones below that index; ``truncated`` counts the earlier entries
    left out (ask again with ``before`` = the first index shown). The timeline draws
    the entries returned; rolled-back entries and checkpoints are the last
    :data:`MAX_JOURNAL`, with ``rewound_truncated`` and ``checkpoints_truncated``.
    """
    limit = max(1, min(limit, MAX_JOURNAL))
    rec = app.get_workflow(workflow_id)
    journal = app.journal(workflow_id)
    attempts = app.store.load_attempts(workflow_id)
    rewound = app.rewound(workflow_id)
    checkpoints = app.checkpoints(workflow_id)
    now = app.clock()
    data = record(rec)
    data["error"] = describe(rec.error) or None
    data["result"] = None
    if rec.status is Status.SUCCEEDED:
        try:
            data["result"] = bounded_repr(_codec.decode(rec.output or b"null", "result"),
                                          MAX_RESULT)
        except CrashsafeError as exc:
            data["result"] = f"<unreadable: {exc}>"
    earlier = [e for e in journal if before is None or e.index < before]
    shown = earlier[-limit:]
    low = shown[0].index if shown else (before if before is not None else 0)
    high = before if before is not None else None
    # Attempt rows of the entries shown (and, on the last page, of the steps that have
    # no journal entry yet).
    attempts = [a for a in attempts if a.index >= low and (high is None or a.index < high)]
    return {
        "workflow": data,
        "now": now,
        "journal": [
            {"index": e.index, "kind": e.kind, "name": e.name, "attempts": e.attempts,
             "started_at": e.started_at, "ended_at": e.ended_at, "note": e.note,
             "error": describe(e.error) or None, "preview": preview(e)}
            for e in shown
        ],
        "truncated": len(earlier) - len(shown),
        "before": before,
        "checkpoints": [{"index": c.index, "n": c.n, "label": c.label, "size": c.size,
                         "stored": c.stored, "full": c.full}
                        for c in checkpoints[-MAX_JOURNAL:]],
        "checkpoints_truncated": max(0, len(checkpoints) - MAX_JOURNAL),
        "rewound": [{"at": at, "why": why, "index": e.index, "kind": e.kind, "name": e.name}
                    for at, why, e in rewound[-MAX_JOURNAL:]],
        "rewound_truncated": max(0, len(rewound) - MAX_JOURNAL),
        "waiting_for": _waiting_for(rec, journal),
        "timeline": timeline(rec, shown, attempts, rewound[-MAX_JOURNAL:], now, preview,
                             app.recoveries(rec.id)[-MAX_JOURNAL:]),
    }


def _waiting_for(rec: WorkflowRecord, journal: list[JournalEntry]) -> str | None:
    """The signal a waiting workflow waits for (the page fills it in), else None."""
    if rec.status is not Status.WAITING or not journal or journal[-1].kind != "wait":
        return None
    return journal[-1].name


def breakers(app: App) -> dict[str, Any]:
    """Every circuit breaker, as ``crashsafe breakers --json`` lists them."""
    return {"breakers": [dataclasses.asdict(b) for b in app.breakers()]}


def checks(app: App, *, since: float | None, name: str | None) -> dict[str, Any]:
    """The alert panel: every ``crashsafe stats`` check over the last ``since`` seconds
    (None: all time), with a few headline figures."""
    store = app.store
    start = store.clock() - since if since is not None else None
    metrics = compute(store, start, None, name or None)
    found = evaluate(metrics, Thresholds())
    return {
        "since": metrics.since, "until": metrics.until, "name": metrics.name,
        "alerts": sum(c.alert for c in found),
        "checks": [{**dataclasses.asdict(c), "status": c.status.value} for c in found],
        "by_status": metrics.by_status,
        "workflows": metrics.workflows,
    }


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
