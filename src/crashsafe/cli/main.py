"""``crashsafe`` commands: thin layers over the App's read and control methods."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import _codec
from .._app import App
from .._errors import describe
from .._progress import Progress, quiet
from ..exceptions import CrashsafeError
from ..stores import Status, Store, default_url, open_store
from ..stores.base import JournalEntry, WorkflowRecord
from ..stores.sqlite import parse_sqlite_url

cli = typer.Typer(
    name="crashsafe",
    help="Crash-only durable execution for AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, `| less`) gets a wide fixed width instead of rich's 80 columns.
_WIDTH = None if sys.stdout.isatty() else 200
out = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="Database URL (default: $CRASHSAFE_DATABASE, else sqlite:///crashsafe.db)"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class _State:
    db: str | None = None


state = _State()


@cli.callback()
def _main(db: DbOption = None) -> None:
    state.db = db


def _url(db: str | None) -> str:
    return db or state.db or default_url()


def _explicit_url(db: str | None) -> str | None:
    """The URL the user named (option or environment), or None to use the app's own."""
    return db or state.db or os.environ.get("CRASHSAFE_DATABASE") or None


def _check_status(status: str | None) -> None:
    if status is not None and status not in {s.value for s in Status}:
        raise _fail(f"unknown status {status!r}; use one of {', '.join(s.value for s in Status)}")


def _fail(message: str, code: int = 2) -> typer.Exit:
    # Text, not markup: messages hold user data and "pip install 'crashsafe[extra]'".
    err.print(Text.assemble(("error:", "bold red"), f" {message}"), highlight=False)
    return typer.Exit(code)


@contextlib.contextmanager
def _progress_bar(label: str) -> Iterator[Progress]:
    """A progress callback: a bar on stderr when stderr is a terminal, else silence (so
    pipes, logs, tests and ``--json`` consumers get clean output)."""
    if not err.is_terminal:
        yield quiet
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as Bar

    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None, note: str | None = None) -> None:
            bar.update(task, completed=done, total=total, description=note or label)

        yield update


def _open_existing(url: str) -> Store:
    """Open a store for reading or control; a SQLite file must exist already."""
    if url.startswith("sqlite:"):
        path, _ = parse_sqlite_url(url)
        if not Path(path).exists():
            raise _fail(f"no database at {path!r} (from {url!r}); run `crashsafe demo` or "
                        "point --db / $CRASHSAFE_DATABASE at your database")
    return open_store(url)


def _open_app(db: str | None) -> App:
    return App(store=_open_existing(_url(db)))


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _secs(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


_STATUS_STYLE = {
    Status.RUNNING: "yellow",
    Status.WAITING: "cyan",
    Status.CANCELLING: "magenta",
    Status.SUCCEEDED: "green",
    Status.FAILED: "red",
    Status.CANCELLED: "magenta",
    Status.DEAD_LETTER: "bold red",
}


def _status_text(status: Status) -> Text:
    return Text(status.value, style=_STATUS_STYLE.get(status, ""))


def _record_json(rec: WorkflowRecord) -> dict[str, Any]:
    return {
        "id": rec.id, "name": rec.name, "version": rec.version, "status": rec.status.value,
        "owner": rec.owner, "parent_id": rec.parent_id, "created_at": rec.created_at,
        "updated_at": rec.updated_at, "recovery_attempts": rec.recovery_attempts,
        "reason": rec.reason,
    }


@cli.command("ls")
def ls_cmd(
    status: Annotated[
        str | None,
        typer.Option(help="running, waiting, cancelling, succeeded, failed, cancelled or "
                          "dead_letter"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Only workflows with this name.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """List workflows, newest first."""
    _check_status(status)
    try:
        app = _open_app(db)
        rows = app.list_workflows(status=status, name=name, limit=limit)
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        out.print_json(json.dumps([_record_json(r) for r in rows]))
        return
    if not rows:
        out.print("no workflows match")
        return
    table = Table(box=None, header_style="bold")
    for col in ("ID", "NAME", "VERSION", "STATUS", "CREATED", "UPDATED", "RECOVERIES"):
        table.add_column(col)
    for r in rows:
        # Text, not markup: ids and names are user data and may hold "[" characters.
        table.add_row(Text(r.id), Text(r.name), Text(r.version), _status_text(r.status),
                      _when(r.created_at), _when(r.updated_at), str(r.recovery_attempts))
    out.print(table)


keys_cli = typer.Typer(help="Encryption keys: generate one, rotate a store to the active key.",
                       no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")


@keys_cli.command("generate")
def keys_generate_cmd(
    key_id: Annotated[str, typer.Argument(help="The new key's id.")] = "k1",
) -> None:
    """Print a new random AES-256 key as ID=BASE64, ready for $CRASHSAFE_KEYS (put the
    new key first to make it the active one; keep the old ones after it until
    `crashsafe keys rotate` has run)."""
    import base64
    import secrets as _secrets

    from .._keys import Keyring

    line = f"{key_id}={base64.b64encode(_secrets.token_bytes(32)).decode()}"
    try:
        Keyring.parse(line)  # the id must be one the keyring accepts
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    print(line)


@keys_cli.command("rotate")
def keys_rotate_cmd(db: DbOption = None) -> None:
    """Re-seal every record with the active key of $CRASHSAFE_KEYS (also encrypts a
    store written without encryption). Safe to kill at any moment and run again."""
    from .._keys import Keyring
    from .._rotate import rotate
    from ..stores import open_raw_store

    url = _url(db)
    try:
        keyring = Keyring.from_env()
        if keyring is None:
            raise _fail("set $CRASHSAFE_KEYS first (the new key first, old keys after it); "
                        "`crashsafe keys generate NEW_ID` makes a key")
        _open_raw_existing(url)
        raw = open_raw_store(url)
        with _progress_bar("re-sealing workflows") as progress:
            report = rotate(raw, keyring, progress)
        raw.close()
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    out.print(f"re-sealed {report.resealed} records of {report.workflows} workflows with key "
              f"{keyring.active_id!r}", highlight=False)
    if report.orphans:
        out.print(f"(the count includes the rows kept for {report.orphans} dropped "
                  "workflow(s): effect outcomes, kept until their expiry)", highlight=False)
    if report.damaged:
        out.print(f"{len(report.damaged)} damaged record(s) left as they are (unreadable with "
                  f"any key; `crashsafe verify` lists them): {'; '.join(report.damaged[:5])}",
                  style="yellow", highlight=False, markup=False)


def _open_raw_existing(url: str) -> None:
    if url.startswith("sqlite:"):
        path, _ = parse_sqlite_url(url)
        if not Path(path).exists():
            raise _fail(f"no database at {path!r} (from {url!r})")


@cli.command("verify")
def verify_cmd(
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Check every stored record's checksum (and, with $CRASHSAFE_KEYS, that it
    decrypts): exit 1 and list the bad records if any."""
    from .._keys import Keyring
    from .._seal import Sealer
    from .._verify import verify
    from ..stores import open_raw_store
    from ..stores.sealed import ENCRYPTION_MARK

    url = _url(db)
    try:
        _open_existing(url).close()  # the friendly "no database at ..." check
        raw = open_raw_store(url)
        keyring = Keyring.from_env()
        if keyring is None and raw.read_shared(ENCRYPTION_MARK)[0] is not None:
            raw.close()
            raise _fail(f"{url!r} is encrypted: set $CRASHSAFE_KEYS to its keyring to verify "
                        "it")
        with _progress_bar("verifying workflows") as progress:
            report = verify(raw, Sealer(keyring), progress)
        raw.close()
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        out.print_json(json.dumps({
            "workflows": report.workflows, "orphans": report.orphans,
            "records": report.records,
            "bad": [dataclasses.asdict(b) for b in report.bad],
            "rolled_back": [dataclasses.asdict(b) for b in report.rolled_back]}))
    else:
        dropped = (f" and the kept rows of {report.orphans} dropped workflow(s)"
                   if report.orphans else "")
        out.print(f"checked {report.records} records of {report.workflows} workflows{dropped}",
                  highlight=False)
        for b in report.bad:
            out.print(Text(f"BAD {b.workflow_id} #{b.index} {b.kind} ({b.table}): {b.reason}",
                           style="red"))
        for b in report.rolled_back:
            out.print(Text(f"rolled back (damaged, kept for audit) {b.workflow_id} #{b.index} "
                           f"{b.kind}: {b.reason}", style="yellow"))
        out.print("all records intact" if report.ok else f"{len(report.bad)} bad record(s)",
                  highlight=False)
    if not report.ok:
        raise typer.Exit(1)


def _usage(store: Store) -> dict[str, int]:
    usage = getattr(store, "usage", None)
    return dict(usage()) if usage is not None else {}


def _size(n: int) -> str:
    for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@cli.command("gc")
def gc_cmd(
    keep_checkpoints: Annotated[int | None, typer.Option(
        "--keep-checkpoints", help="Keep the state of each finished workflow's last N "
                                   "checkpoints (older ones keep only their hash).")] = None,
    older_than: Annotated[str | None, typer.Option(
        "--older-than", help="Drop workflows finished longer ago than this (90s, 12h, 7d, "
                             "1h30m), with all their rows.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Count what would go; change nothing.")] = False,
    batch: Annotated[int, typer.Option(help="Workflows per transaction.")] = 100,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Retention: drop old finished workflows, keep the last N checkpoints of finished
    ones (deltas compacted first). Running workflows are never touched; safe to kill at
    any moment and run again."""
    if keep_checkpoints is None and older_than is None:
        raise _fail("say what to collect: --keep-checkpoints N and/or --older-than 7d")
    if keep_checkpoints is not None and keep_checkpoints < 1:
        raise _fail("--keep-checkpoints must be at least 1 (the latest is always kept)")
    if batch < 1:
        raise _fail("--batch must be at least 1")
    age = _duration(older_than) if older_than is not None else None
    try:
        app = _open_app(db)
        before = _usage(app.store)
        with _progress_bar("collecting") as progress:
            report = app.gc(keep_checkpoints=keep_checkpoints, finished_older_than=age,
                            dry_run=dry_run, batch=batch, progress=progress)
        after = _usage(app.store)
        app.close()
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        out.print_json(json.dumps({**report.to_dict(), "before": before, "after": after}))
        return
    verb = "would drop" if dry_run else "dropped"
    out.print(f"{verb} {report.workflows_dropped} finished workflow(s) and the state of "
              f"{report.checkpoints_pruned} checkpoint(s); {report.checkpoints_rebased} kept "
              "delta(s) rewritten as full snapshots", highlight=False)
    out.print(f"{report.effects_purged} expired effect key(s) and {report.partials_dropped} "
              f"stale partial output(s) removed; {report.workflows_examined} workflow(s) "
              "examined", highlight=False)
    for line in report.skipped:
        out.print(Text(f"skipped {line}", style="yellow"))
    if before:
        table = Table(box=None, header_style="bold")
        for col in ("", "BEFORE", "AFTER"):
            table.add_column(col, justify="right" if col else "left")
        for key in before:
            fmt = _size if key.endswith("bytes") else str
            table.add_row(key.replace("_", " "), fmt(before[key]), fmt(after.get(key, 0)))
        out.print(table)


_BREAKER_STYLE = {"closed": "green", "open": "bold red", "half_open": "yellow"}


@cli.command("breakers")
def breakers_cmd(
    reset: Annotated[str | None, typer.Option(
        "--reset", help="Close this breaker by hand (forgets its window).")] = None,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """List every circuit breaker: state, calls in its window, trips, last change."""
    try:
        app = _open_app(db)
        if reset is not None:
            if not app.reset_breaker(reset):
                raise _fail(f"no breaker named {reset!r}; `crashsafe breakers` lists them")
            out.print(f"breaker {reset!r} closed", highlight=False)
            return
        rows = app.breakers()
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        out.print_json(json.dumps([dataclasses.asdict(r) for r in rows]))
        return
    if not rows:
        out.print("no breakers recorded yet")
        return
    table = Table(box=None, header_style="bold")
    for col in ("BREAKER", "STATE", "OK", "FAILED", "TRIPS", "CHANGED", "WHY"):
        table.add_column(col)
    for r in rows:
        why = r.why
        if r.open_until is not None:
            why = f"{why} (probe after {_when(r.open_until)})"
        table.add_row(Text(r.name), Text(r.state, style=_BREAKER_STYLE.get(r.state, "")),
                      str(r.successes), str(r.failures), str(r.trips), _when(r.changed_at),
                      Text(why))
    out.print(table)


_STATS_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_VERDICT_STYLE = {"OK": "green", "ALERT": "bold red", "NO DATA": "dim"}


def _stats_duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``7d``, ``1h30m`` or plain seconds, in seconds."""
    seconds = _duration(text)
    if seconds <= 0:
        raise _fail("--since must be a positive duration")
    return seconds


def _duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``7d``, ``1h30m`` or plain seconds, in seconds."""
    import re

    spec = text.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw]?)", spec)
    if not parts or "".join(n + u for n, u in parts) != spec \
            or (len(parts) > 1 and not all(u for _, u in parts)):
        raise _fail(f"cannot read the duration {text!r}; use for example 90s, 30m, 1h, 7d "
                    "or 1h30m")
    return sum(float(n) * _STATS_UNITS[u or "s"] for n, u in parts)


def _stats_thresholds(pairs: list[str]) -> Any:
    from ..observe import Thresholds

    known = {f.name: f.type for f in dataclasses.fields(Thresholds)}
    given: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise _fail(f"--threshold takes NAME=VALUE with NAME one of {', '.join(known)}; "
                        f"got {pair!r}")
        try:
            given[key] = int(raw) if known[key] in ("int", int) else float(raw)
        except ValueError:
            raise _fail(f"--threshold {key}: {raw!r} is not a number") from None
    try:
        return Thresholds(**given)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _stats_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ratio":
        return f"{value * 100:.2f} %"
    if unit == "s":
        return _stats_secs(value)
    if unit == "bytes":
        return f"{value / 1024:.1f} KB"
    return f"{value:g}"


def _stats_secs(value: float) -> str:
    for size, unit in ((86400.0, "d"), (3600.0, "h"), (60.0, "min")):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return _secs(value)


def _stats_rate(per_second: float | None, what: str) -> str:
    if per_second is None:
        return f"- {what}"
    for size, unit in ((1.0, "s"), (60.0, "min"), (3600.0, "h")):
        if per_second * size >= 1:
            return f"{per_second * size:.3g} {what}/{unit}"
    return f"{per_second * 86400:.3g} {what}/day"


def _stats_latency(p: Any) -> str:
    if not p.count:
        return "-"
    return (f"p50 {_stats_secs(p.p50)} · p95 {_stats_secs(p.p95)} · "
            f"p99 {_stats_secs(p.p99)} · max {_stats_secs(p.max)} (n={p.count})")


@cli.command("stats")
def stats_cmd(
    since: Annotated[str | None, typer.Option(
        help="Only the last DURATION: 90s, 30m, 1h, 7d, 1h30m (default: everything).",
    )] = None,
    name: Annotated[str | None, typer.Option(help="Only workflows with this name.")] = None,
    threshold: Annotated[list[str] | None, typer.Option(
        "--threshold", help="Override a threshold, NAME=VALUE (repeatable), e.g. "
                            "retry_rate=0.2; ratios are fractions, durations seconds.",
    )] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Exit 1 when any figure crosses its threshold (for cron or CI).",
    )] = False,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """The production figures, computed from the journal, each against its alert
    threshold: recovery, duplicate effects, retries, failure types, breakers."""
    from ..observe import compute, evaluate

    window = _stats_duration(since) if since is not None else None
    thresholds = _stats_thresholds(threshold or [])
    try:
        store = _open_app(db).store
        start = store.clock() - window if window is not None else None
        with _progress_bar("reading workflows") as progress:
            metrics = compute(store, start, None, name, progress=progress)
        checks = evaluate(metrics, thresholds)
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    alerts = sum(c.alert for c in checks)
    if as_json:
        out.print_json(json.dumps({
            "since": metrics.since, "until": metrics.until, "name": metrics.name,
            "alerts": alerts, "checks": [dataclasses.asdict(c) for c in checks],
            "metrics": metrics.to_dict()}))
    else:
        scope = f"last {since}" if since else "all time"
        out.print(Text.assemble(
            (f"{metrics.workflows} workflows", "bold"), f", {scope} until ",
            _when(metrics.until), *((", name ", (name, "bold")) if name else ())))
        table = Table(box=None, header_style="bold")
        for col in ("FIGURE", "VALUE", "ALERT WHEN", "STATUS", "DETAIL"):
            table.add_column(col)
        signs = {"above": ">", "below": "<", "at least": ">="}
        for c in checks:
            table.add_row(c.name, _stats_value(c.value, c.unit),
                          f"{signs[c.alert_when]} {_stats_value(c.threshold, c.unit)}",
                          Text(c.status.value, style=_VERDICT_STYLE[c.status.value]),
                          Text(c.detail))
        out.print(table)
        m = metrics
        facts = Table(box=None, header_style="bold")
        facts.add_column("FIGURE")
        facts.add_column("VALUE")
        rows = [
            ("by status", ", ".join(f"{k} {v}" for k, v in m.by_status.items() if v) or "-"),
            ("throughput", f"{_stats_rate(m.workflow_throughput, 'workflows')}, "
                           f"{_stats_rate(m.step_throughput, 'steps')} "
                           f"({m.workflows_finished} finished, {m.steps_finished} steps)"),
            ("step latency", _stats_latency(m.step_latency)),
            ("workflow latency", _stats_latency(m.workflow_latency)),
            ("failure types", ", ".join(f"{k} {v}" for k, v in m.failure_counts.items())
             or "-"),
            ("unknown outcomes", ", ".join(f"{k}: {v}" for k, v in m.unknown_outcomes.items())
             or "-"),
            ("recoveries (approx.)", f"{m.recoveries} takeovers of "
                                     f"{m.recovered_workflows} workflows; "
                                     f"{m.dead_lettered} dead letter(s); "
                                     f"{m.rollbacks} rollback(s)"),
            ("breaker changes", f"{m.breaker_changes} across {len(m.breakers)} breakers"),
        ]
        for label, value in rows:
            facts.add_row(label, Text(value))
        out.print(facts)
        missing = ", ".join(k.replace("_", " ") for k in m.unavailable)
        out.print(Text(f"not recorded yet: {missing}", style="dim"))
        out.print(Text(f"{alerts} alert(s)", style="bold red" if alerts else "green"))
    if check and alerts:
        raise typer.Exit(1)


def _preview(entry: JournalEntry, width: int = 60) -> Text:
    """One cell of the timeline, as Text: stored values are user data, never markup."""
    if entry.error is not None:
        return Text(describe(entry.error)[:width], style="red")
    if entry.output is None:
        return Text("")
    try:
        value = _codec.decode(entry.output, "output")
    except CrashsafeError as exc:
        return Text(f"<unreadable: {exc}>", style="red")
    if entry.kind == "sleep" and isinstance(value, float):
        return Text(f"wake at {_when(value)}")
    if entry.kind == "wait":
        return Text(f"deadline {_when(value)}" if isinstance(value, float) else "no deadline")
    text = repr(value)
    return Text(text if len(text) <= width else text[: width - 1] + "…")


@cli.command("show")
def show_cmd(
    workflow_id: Annotated[str, typer.Argument(help="The workflow id.")],
    at: Annotated[str | None, typer.Option(
        "--at", help="Print the agent state at a checkpoint instead: a label, #N (the "
                     "N-th checkpoint), a journal index, or 'latest'.")] = None,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Show one workflow and its timeline: steps, attempts, durations, errors."""
    try:
        app = _open_app(db)
        rec = app.get_workflow(workflow_id)
        if at is not None:
            state = app.checkpoint_state(workflow_id, _checkpoint_ref(at))
            out.print_json(json.dumps(state, default=str))
            return
        journal = app.journal(workflow_id)
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        data = _record_json(rec)
        data["journal"] = [
            {"index": e.index, "kind": e.kind, "name": e.name, "attempts": e.attempts,
             "started_at": e.started_at, "ended_at": e.ended_at,
             "error": describe(e.error) or None, "note": e.note}
            for e in journal
        ]
        out.print_json(json.dumps(data))
        return
    out.print(Text.assemble((rec.id, "bold"), f"  {rec.name} v{rec.version}  ",
                            _status_text(rec.status)))
    out.print(f"created {_when(rec.created_at)}   updated {_when(rec.updated_at)}   "
              f"recoveries {rec.recovery_attempts}   owner {rec.owner or '-'}", highlight=False)
    if rec.parent_id:
        out.print(f"child of {rec.parent_id}")
    if rec.reason:
        out.print(f"reason: {rec.reason}", highlight=False)
    if rec.status is Status.FAILED:
        out.print(f"[red]error: {describe(rec.error)}[/]", highlight=False)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("#", "KIND", "NAME", "AT", "TOOK", "ATTEMPTS"):
        table.add_column(col, no_wrap=True)
    table.add_column("RESULT", no_wrap=True, overflow="ellipsis", max_width=70)
    for e in journal:
        at = f"+{_secs(max(0.0, e.started_at - rec.created_at))}"
        took = _secs(max(0.0, e.ended_at - e.started_at)) if e.kind == "step" else ""
        attempts = str(e.attempts) if e.kind == "step" else ""
        table.add_row(str(e.index), e.kind, Text(e.name), at, took, attempts, _preview(e))
        if e.note:
            table.add_row("", "", "", "", "", "", Text(f"↳ {e.note}", style="magenta"))
    if journal:
        out.print(table)
    else:
        out.print("(no journal entries yet)")
    try:
        rewound = app.rewound(workflow_id)
    except CrashsafeError as exc:
        rewound = []
        out.print(f"[red]rolled-back entries unreadable: {exc}[/]", highlight=False)
    for when, why, e in rewound:
        out.print(Text(f"rolled back {_when(when)} ({why}): #{e.index} {e.kind} {e.name}",
                       style="dim"))
    if rec.status is Status.SUCCEEDED:
        try:
            result = repr(_codec.decode(rec.output or b"null", "result"))
        except CrashsafeError as exc:
            result = f"<unreadable: {exc}>"
        out.print(f"[green]result:[/] {result[:200]}", highlight=False)


def _checkpoint_ref(at: str) -> int | str | None:
    if at == "latest":
        return None
    return int(at) if at.lstrip("-").isdigit() else at


@cli.command("fork")
def fork_cmd(
    workflow_id: Annotated[str, typer.Argument(help="The workflow to fork.")],
    at: Annotated[str, typer.Option(
        "--at", help="A checkpoint (label, #N or 'latest', included) or a journal index "
                     "(entries before it are kept).")] = "latest",
    new_id: Annotated[str | None, typer.Option("--id", help="The new workflow's id.")] = None,
    db: DbOption = None,
) -> None:
    """Start a new workflow from a past point of another: same inputs, the journal up
    to that point; a serving worker with the workflow registered runs it."""
    try:
        app = _open_app(db)
        handle = app.fork(workflow_id, at=_checkpoint_ref(at), new_id=new_id)
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    out.print(f"forked {workflow_id} into {handle.workflow_id}", highlight=False)


@cli.command("rollback")
def rollback_cmd(
    workflow_id: Annotated[str, typer.Argument(help="The workflow to roll back.")],
    to: Annotated[str, typer.Option(
        "--to", help="A checkpoint (label, #N or 'latest', kept) or a journal index "
                     "(entries from it on are rolled back).")] = "latest",
    reason: Annotated[str | None, typer.Option(help="Why, for the record.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Roll back even past completed steps whose compensations this "
                        "command cannot run.")] = False,
    db: DbOption = None,
) -> None:
    """Roll a workflow back (entries kept for audit) and let a serving worker resume it.
    Compensations run only where the step's code is registered: this command registers
    none, so it refuses to roll back completed steps (their effects would stay done and
    be applied again) unless --force — use app.rollback() in your program for those."""
    from .. import _rollback_check

    try:
        app = _open_app(db)
        point = _checkpoint_ref(to)
        skipped = _rollback_check.unrunnable(app, workflow_id, point)
        if skipped and not force:
            raise _fail(_rollback_check.refusal(workflow_id, skipped, "--force"), 1)
        why = reason
        if skipped:
            why = (f"{reason or 'rolled back from the command line'}; forced: the "
                   f"compensations of {_rollback_check.describe(skipped)} did not run (not "
                   "registered in the command's process)")
        app.rollback(workflow_id, to=point, reason=why)
        moved = [e for _, _, e in app.rewound(workflow_id)]
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    out.print(f"rolled back {workflow_id}: {len(moved)} entr{'y' if len(moved) == 1 else 'ies'} "
              "kept for audit; a serving worker resumes it", highlight=False)


@cli.command("cancel")
def cancel_cmd(
    workflow_id: Annotated[str, typer.Argument(help="The workflow id.")],
    db: DbOption = None,
) -> None:
    """Cancel a running workflow (it stops at its next durable call)."""
    try:
        app = _open_app(db)
        done = app.cancel(workflow_id, reason="cancelled from the command line")
        status = app.get_workflow(workflow_id).status
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    if not done:
        raise _fail(f"workflow {workflow_id!r} is already {status}; nothing to cancel", 1)
    out.print(f"cancelled {workflow_id}")


@cli.command("signal")
def signal_cmd(
    workflow_id: Annotated[str, typer.Argument(help="The workflow id.")],
    name: Annotated[str, typer.Argument(help="The signal name the workflow waits for.")],
    payload: Annotated[str | None, typer.Argument(help="JSON payload (default: null).")] = None,
    db: DbOption = None,
) -> None:
    """Send a signal (with a JSON payload) to a running or waiting workflow."""
    try:
        value = json.loads(payload) if payload is not None else None
    except ValueError as exc:
        raise _fail(f"the payload is not valid JSON ({exc}); quote it for your shell, "
                    """for example '{"approved": true}'""") from None
    try:
        _open_app(db).signal(workflow_id, name, value)
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    out.print(f"sent signal {name!r} to {workflow_id}")


@cli.command("resume")
def resume_cmd(
    workflow_id: Annotated[str, typer.Argument(help="The workflow id.")],
    db: DbOption = None,
) -> None:
    """Resume a cancelled or dead-lettered workflow from where its journal ends."""
    try:
        _open_app(db).resume(workflow_id)
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    out.print(f"{workflow_id} is running again; any process serving its workflow picks it up "
              "(for example `crashsafe worker MODULE:APP`)")


def load_app(target: str) -> App:
    """Import ``module:attr``, ``module`` or ``path/to/file.py`` and find its App."""
    module_name, _, attr = target.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.exists():
                raise _fail(f"no such file: {module_name}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or spec.loader is None:
                raise _fail(f"cannot import {module_name}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _fail(f"cannot import {module_name!r}: {exc}") from None
    if attr:
        found = getattr(module, attr, None)
        if not isinstance(found, App):
            raise _fail(f"{target!r} is not a crashsafe.App")
        return found
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if len(apps) != 1:
        raise _fail(f"{module_name!r} defines {len(apps)} crashsafe.App objects; "
                    "name one as MODULE:ATTRIBUTE")
    return apps[0]


@cli.command("replay")
def replay_cmd(
    module: Annotated[str, typer.Argument(help="MODULE[:APP] or file.py holding your workflows")],
    status: Annotated[str | None, typer.Option(help="Only workflows with this status.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many workflows, newest first.")] = 1000,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Replay recorded journals against the current code; report every nondeterminism.

    Writes nothing. Run it before deploying changed workflow code.
    """
    from .._replay import replay_workflow

    _check_status(status)
    app = load_app(module)
    try:
        url = _explicit_url(db)
        if url is not None:  # otherwise replay the database the app itself names
            app._store = _open_existing(url)
            app._owns_store = True
        elif app._store is None:
            app._store = _open_existing(app._url or default_url())
        rows = app.list_workflows(status=status, limit=limit)
        reports = [replay_workflow(app, r) for r in rows]
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    problems = [r for r in reports if r.problem]
    if as_json:
        out.print_json(json.dumps([dataclasses.asdict(r) for r in reports]))
    else:
        table = Table(box=None, header_style="bold")
        for col in ("ID", "NAME", "VERDICT", "DETAIL"):
            table.add_column(col)
        for r in reports:
            color = "red" if r.problem else ("dim" if r.verdict == "skipped" else "green")
            table.add_row(r.workflow_id, r.name, f"[{color}]{r.verdict}[/]", r.detail)
        out.print(table)
        out.print(f"{len(reports)} replayed, {len(problems)} with problems")
    if problems:
        raise typer.Exit(1)


@cli.command("worker")
def worker_cmd(
    target: Annotated[str, typer.Argument(help="MODULE:APP (or MODULE, or file.py) to serve")],
    queues: Annotated[str | None, typer.Option(
        "--queues", help="Comma-separated queues to take work from (default: every queue "
                         "the app declares; none if it declares none).")] = None,
    concurrency: Annotated[int | None, typer.Option(
        help="Most queued workflows this worker runs at once.")] = None,
    grace: Annotated[float, typer.Option(
        help="On SIGTERM, seconds to let in-flight work reach its next durable call.")] = 10.0,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (needs "
             "crashsafe[prometheus]).")] = None,
    metrics_host: Annotated[str, typer.Option(
        help="Address the metrics endpoint binds to.")] = "127.0.0.1",
    log_format: Annotated[str | None, typer.Option(
        help="Write crashsafe's log lines to stderr as 'json' (one object per line, with "
             "workflow_id, step, attempt) or 'text'.")] = None,
    log_level: Annotated[str, typer.Option(help="Lowest level logged with --log-format.")
                         ] = "INFO",
    db: DbOption = None,
) -> None:
    """Serve an app: take queued work, recover orphaned workflows, keep going until
    stopped. SIGTERM stops taking work, gives in-flight workflows --grace seconds, then
    hands queued ones back to their queue for other workers."""
    if log_format is not None:
        from ..observe.logs import configure

        try:
            configure(log_format, log_level.upper())
        except ValueError as exc:
            raise _fail(f"--log-format/--log-level: {exc}") from None
    app = load_app(target)
    url = _explicit_url(db)
    if url is not None:
        app._store = open_store(url)
    server = None
    if metrics_port is not None:
        from ..observe import prometheus

        try:
            prometheus.instrument()  # before any workflow runs: count them all
            server = prometheus.serve(app.store, metrics_port, metrics_host)
        except (CrashsafeError, OSError) as exc:
            raise _fail(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc}") \
                from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    names = [n.strip() for n in queues.split(",") if n.strip()] if queues else None
    try:
        app.launch()
        if names is not None or app._queues:
            app.serve(names, concurrency=concurrency)
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    served = ", ".join(sorted(app._served)) or "no queues"
    out.print(f"crashsafe worker {app.executor_id} serving {app.store.url} ({served}); "
              "Ctrl-C or SIGTERM to stop", highlight=False)
    if server is not None:
        host, port = server.server_address[:2]
        out.print(f"metrics at http://{host!s}:{port}/metrics", highlight=False)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    if server is not None:
        server.shutdown()
    app.close(timeout=grace)


@cli.command("demo")
def demo_cmd(
    tickets: Annotated[int, typer.Option(help="Support tickets to process.")] = 50,
    kills: Annotated[int, typer.Option(help="How many times to SIGKILL the agent process.")] = 3,
    seed: Annotated[int | None, typer.Option(help="Seed for faults and kill points.")] = None,
    concurrency: Annotated[int, typer.Option(help="Tickets in flight at once.")] = 10,
    fault_rate: Annotated[float, typer.Option(help="Share of LLM calls that fail (0-1).")] = 0.03,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Run the support-agent demo: faults, kill -9s, recovery, and a report."""
    from ..demo.runner import run_demo

    with _progress_bar("tickets") as progress:
        code = run_demo(_url(db), tickets=tickets, kills=kills, seed=seed,
                        concurrency=concurrency, fault_rate=fault_rate, as_json=as_json,
                        console=out, progress=progress)
    raise typer.Exit(code)


@cli.command("chaos")
def chaos_cmd(
    target: Annotated[str | None, typer.Argument(
        help="MODULE:WORKFLOW to test (default: the built-in support agent)")] = None,
    trials: Annotated[int, typer.Option(help="Trials, each on a fresh database.")] = 100,
    seed: Annotated[int | None, typer.Option(
        help="Campaign seed (trial i uses SEED+i); the same seed replays the kill points.",
    )] = None,
    kills_per_trial: Annotated[int, typer.Option(help="kill -9s per trial.")] = 1,
    crash_at: Annotated[int | None, typer.Option(
        help="Kill at the child's N-th crash point instead of at a random instant.")] = None,
    kill_window: Annotated[float | None, typer.Option(
        help="Kill instants fall within this many seconds after the child starts "
             "(default: --latency-scale; for MODULE:WORKFLOW, its uninterrupted run "
             "time).")] = None,
    workflows: Annotated[int | None, typer.Option(
        help="Workflows per trial (default: 4 tickets; 1 for MODULE:WORKFLOW).")] = None,
    args: Annotated[str, typer.Option(
        "--args", help="Arguments for MODULE:WORKFLOW: a JSON list, or an object for "
                       "keyword arguments.")] = "[]",
    compare: Annotated[bool, typer.Option(
        "--compare/--no-compare",
        help="Check results against an uninterrupted run (turn off when the result "
             "contains crashsafe.now(), uuid4() or random()).")] = True,
    latency_scale: Annotated[float, typer.Option(
        help="Built-in workload: multiply the agent's simulated delays by this.")] = 0.1,
    stuck_after: Annotated[float, typer.Option(
        help="Seconds after the last restart before unfinished workflows count as stuck.",
    )] = 30.0,
    directory: Annotated[Path | None, typer.Option(
        "--dir", help="Put the trials' databases here (default: a temporary directory); "
                      "failing trials are kept.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Run a kill -9 campaign: kill, restart, and check that nothing was lost, duplicated
    or left stuck."""
    import random

    from .. import chaos

    if trials < 1 or kills_per_trial < 0 or (crash_at is not None and crash_at < 1) \
            or (workflows is not None and workflows < 1) or latency_scale <= 0 \
            or stuck_after <= 0 or (kill_window is not None and kill_window < 0):
        raise _fail("need --trials >= 1, --kills-per-trial >= 0, --crash-at >= 1, "
                    "--workflows >= 1, --latency-scale > 0, --stuck-after > 0 and "
                    "--kill-window >= 0")
    workload: chaos.Workload
    try:
        if target is None:
            if args != "[]":
                raise _fail("--args needs MODULE:WORKFLOW; the built-in workload takes none")
            workload = chaos.SupportAgent(workflows or 4, latency_scale)
        else:
            chaos.load_workflow(target)  # fail here, not in every trial's child
            chaos.call_args(args)
            workload = chaos.UserWorkflow(target, args, workflows or 1, compare)
        if seed is None:
            seed = random.SystemRandom().randrange(1, 10**6)
        settings = chaos.Settings(trials=trials, seed=seed, kills_per_trial=kills_per_trial,
                                  crash_at=crash_at, kill_window=kill_window,
                                  stuck_after=stuck_after, directory=directory)
        with _progress_bar("trials") as progress:
            code = chaos.run_campaign(workload, settings, as_json=as_json, console=out,
                                      progress=progress)
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


def run() -> None:
    cli()


# Registered last: its module imports the helpers above.
from ._dashboard import dashboard_cmd  # noqa: E402

cli.command("dashboard")(dashboard_cmd)
