"""One workflow's story as rows of bars and marks on a time axis, for the page to draw.

Each row is one journal entry (a wait and the signal that ended it share a row), with
``segments`` (spans: the step's run, each failed or crashed attempt, a wait, a sleep)
and ``marks`` (instants: a checkpoint, a signal received). ``events`` are instants that
concern the whole workflow and are drawn across every row: a recovery after a crash
cut an attempt off, a rollback. Times are Unix seconds on the store's clock; the page
scales them between ``start`` and ``end``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from .. import _codec
from ..exceptions import CrashsafeError
from ..stores.base import AttemptRecord, JournalEntry, WorkflowRecord

MAX_ROWS = 400
"""Rows drawn at most; the rest are counted in ``hidden``."""
CRASHED = "crashed"


def _seg(start: float, end: float, style: str, title: str) -> dict[str, Any]:
    return {"start": start, "end": max(start, end), "style": style, "title": title}


def _mark(at: float, style: str, title: str) -> dict[str, Any]:
    return {"at": at, "style": style, "title": title}


def _secs(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _decoded_float(entry: JournalEntry) -> float | None:
    try:
        value = _codec.decode(entry.output or b"null", "timeline")
    except CrashsafeError:
        return None
    if not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float: no instant to draw
        return None
    return number if math.isfinite(number) else None


def timeline(rec: WorkflowRecord, journal: list[JournalEntry], attempts: list[AttemptRecord],
             rewound: list[tuple[float, str, JournalEntry]], now: float,
             preview: Callable[[JournalEntry | AttemptRecord], str],
             takeovers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The rows, events and time range of one workflow's picture (``takeovers``: its
    recovery log, ``App.recoveries``)."""
    active = not rec.status.terminal  # running, waiting, cancelling or enqueued
    end_of_run = now if active else rec.updated_at
    by_index: dict[int, list[AttemptRecord]] = defaultdict(list)
    for a in attempts:
        by_index[a.index].append(a)
    rows: list[dict[str, Any]] = [{
        "label": f"workflow {rec.name}", "kind": "workflow", "index": None,
        "segments": [_seg(rec.created_at, end_of_run, f"status-{rec.status.value}",
                          f"{rec.status.value}, {_secs(end_of_run - rec.created_at)}")],
        "marks": [],
    }]
    events: list[dict[str, Any]] = []
    open_wait: dict[str, Any] | None = None
    for e in journal:
        if e.kind == "wait":
            open_wait = _wait_row(e, now)
            rows.append(open_wait)
            continue
        if e.kind == "signal" and open_wait is not None and open_wait["name"] == e.name:
            _close_wait(open_wait, e, preview(e))
            open_wait = None
            continue
        rows.append(_entry_row(e, by_index.pop(e.index, []), preview, end_of_run))
    if open_wait is not None and not active:
        open_wait["segments"][0]["end"] = end_of_run
    # Attempt rows past the journal: a step still retrying (or abandoned by a crash).
    for index in sorted(by_index):
        tries = by_index[index]
        row: dict[str, Any] = {"label": f"step {tries[0].step} (no result yet)", "kind": "step",
               "index": index, "segments": [], "marks": []}
        _attempt_segments(row, tries, end_of_run, preview)
        rows.append(row)
    for a in attempts:
        if a.failure_class == CRASHED and a.ended_at is not None:
            events.append(_mark(a.ended_at, "recovered",
                                f"recovered: attempt {a.attempt} of step {a.step!r} "
                                f"(#{a.index}) was cut off by a crash"))
    for ev in takeovers or []:
        at, seen = ev.get("at"), ev.get("seen")
        if not isinstance(at, int | float) or not math.isfinite(at):
            continue
        who, by = str(ev.get("from") or "no owner"), str(ev.get("by") or "?")
        if isinstance(seen, int | float) and math.isfinite(seen) and seen <= at:
            events.append(_mark(seen, "crashed", f"last seen alive: {who} (its last "
                                                 f"heartbeat, {_secs(at - seen)} before the "
                                                 "takeover)"))
        verb = "dead-lettered" if ev.get("outcome") == "dead_letter" else "taken over"
        events.append(_mark(at, "recovered", f"{verb} from {who} by {by}"))
    for at, why, e in rewound:
        rows.append({"label": f"{e.kind} {e.name} (rolled back)", "kind": e.kind,
                     "index": e.index, "marks": [],
                     "segments": [_seg(e.started_at, e.ended_at, "rewound",
                                       f"#{e.index} {e.kind} {e.name!r}, rolled back: {why}")]})
        events.append(_mark(at, "rollback", f"rollback: {why}"))
    hidden = max(0, len(rows) - MAX_ROWS)
    rows = rows[:MAX_ROWS]
    times = [rec.created_at, end_of_run]
    for row in rows:
        times += [t for s in row["segments"] for t in (s["start"], s["end"])]
        times += [m["at"] for m in row["marks"]]
    times += [ev["at"] for ev in events]
    return {"start": min(times), "end": max(times), "rows": rows,
            "events": sorted(events, key=lambda ev: ev["at"]), "hidden": hidden,
            "recoveries": rec.recovery_attempts}


def _wait_row(e: JournalEntry, now: float) -> dict[str, Any]:
    deadline = _decoded_float(e)
    title = f"waiting for signal {e.name!r}" + (
        f" (deadline in {_secs(max(0.0, deadline - now))})" if deadline else "")
    return {"label": f"wait {e.name}", "kind": "wait", "index": e.index, "name": e.name,
            "segments": [_seg(e.started_at, now, "waiting", title)], "marks": [],
            "open": True}


def _close_wait(row: dict[str, Any], signal: JournalEntry, detail: str) -> None:
    seg = row["segments"][0]
    seg["end"] = max(seg["start"], signal.ended_at)
    row["open"] = False
    if signal.error is not None:
        seg["title"] = f"waited for signal {signal.name!r}, timed out: {detail}"
        row["marks"].append(_mark(signal.ended_at, "timeout", seg["title"]))
    else:
        seg["title"] = (f"waited {_secs(seg['end'] - seg['start'])} for signal "
                        f"{signal.name!r}")
        row["marks"].append(_mark(signal.ended_at, "signal",
                                  f"signal {signal.name!r} received: {detail}"))


def _entry_row(e: JournalEntry, tries: list[AttemptRecord],
               preview: Callable[[JournalEntry | AttemptRecord], str],
               end_of_run: float) -> dict[str, Any]:
    row: dict[str, Any] = {"label": f"{e.kind} {e.name}", "kind": e.kind, "index": e.index,
                           "segments": [], "marks": []}
    detail = preview(e)
    note = f" ({e.note})" if e.note else ""
    if e.kind == "checkpoint":
        row["label"] = f"checkpoint {e.name}" if e.name else "checkpoint"
        row["marks"].append(_mark(e.started_at, "checkpoint", f"checkpoint #{e.index}{note}"))
    elif e.kind == "sleep":
        wake = _decoded_float(e) or e.ended_at
        row["segments"].append(_seg(e.started_at, wake, "sleep",
                                    f"durable sleep, {_secs(max(0.0, wake - e.started_at))}"))
    elif e.kind in ("step", "child", "compensate"):
        style = "failed" if e.error is not None else ("compensate" if e.kind == "compensate"
                                                      else "ok")
        took = _secs(max(0.0, e.ended_at - e.started_at))
        row["segments"].append(_seg(e.started_at, e.ended_at, style,
                                    f"#{e.index} {e.kind} {e.name!r}: {e.attempts} "
                                    f"attempt(s), {took}{note}: {detail}"))
        _attempt_segments(row, tries, end_of_run, preview)
    else:  # now, uuid, random, patch: an instant
        row["marks"].append(_mark(e.started_at, "instant", f"#{e.index} {e.kind}: {detail}"))
    if e.note and e.kind == "step" and "unknown" in e.note:
        row["marks"].append(_mark(e.ended_at, "unknown", e.note))
    return row


def _attempt_segments(row: dict[str, Any], tries: list[AttemptRecord], end_of_run: float,
                      preview: Callable[[JournalEntry | AttemptRecord], str]) -> None:
    for a in tries:
        if a.failure_class is None:
            continue  # a successful or still running attempt: the step's own bar
        end = a.ended_at if a.ended_at is not None else end_of_run
        style = "crashed" if a.failure_class == CRASHED else "retry"
        title = f"attempt {a.attempt}: {a.failure_class}"
        if a.failure_class != CRASHED and a.error is not None:
            title += f": {preview(a)}"
        if a.delay is not None:
            title += f"; next attempt after {_secs(a.delay)}"
            if a.delay_source:
                title += f" ({a.delay_source})"
        row["segments"].append(_seg(a.started_at, end, style, title))
        if a.next_at is not None and a.next_at > end:
            row["segments"].append(_seg(end, a.next_at, "backoff",
                                        f"waiting {_secs(a.next_at - end)} before attempt "
                                        f"{a.attempt + 1}"))
