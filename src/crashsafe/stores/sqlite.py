"""The embedded default: one SQLite file, WAL mode, ``synchronous=FULL``.

``synchronous=FULL`` makes every commit durable against power loss (one fsync of the
WAL per commit). ``?synchronous=normal`` in the URL trades that for speed: a commit
is still safe against a crashed or killed *process* (the WAL write is in the OS page
cache before the call returns), but the last commits may be lost if the *machine*
loses power.

Several processes may share one file: every write transaction starts with
``BEGIN IMMEDIATE`` and waits on the busy timeout instead of failing with
"database is locked".
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .. import _faults
from ..exceptions import (
    ConfigurationError,
    StoreConflictError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from ._payload_sql import (
    drop_rows,
    finished_query,
    orphan_ids,
    read_rows,
    rewind_rows,
    rewrite_finished_rows,
    rewrite_rows,
)
from .base import (
    AttemptRecord,
    ClaimResult,
    CompleteEffect,
    CreateWorkflow,
    EffectRow,
    EffectStart,
    ExecutorRecord,
    FinishWorkflow,
    JournalEntry,
    ListFilter,
    MarkWaiting,
    Op,
    PayloadRewrite,
    Requeue,
    SharedUpdate,
    Status,
    StoredPayload,
    T,
    WorkflowExists,
    WorkflowNotRunning,
    WorkflowRecord,
    decide_claim,
)

SCHEMA_VERSION = 9

# Each entry upgrades the schema from version i to i + 1. Never edit a shipped entry:
# append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE workflows (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        status TEXT NOT NULL,
        inputs BLOB NOT NULL,
        output BLOB,
        error BLOB,
        owner TEXT,
        parent_id TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        recovery_attempts INTEGER NOT NULL DEFAULT 0,
        reason TEXT
    );
    CREATE INDEX workflows_status ON workflows (status, owner);
    CREATE INDEX workflows_created ON workflows (created_at);
    CREATE TABLE journal (
        workflow_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        output BLOB,
        error BLOB,
        attempts INTEGER NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL NOT NULL,
        PRIMARY KEY (workflow_id, idx)
    ) WITHOUT ROWID;
    CREATE TABLE executors (
        id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        pid INTEGER NOT NULL,
        pid_start TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        stopped INTEGER NOT NULL DEFAULT 0
    );
    """,
    """
    ALTER TABLE workflows ADD COLUMN recovery_mark INTEGER NOT NULL DEFAULT 0;
    """,
    """
    CREATE TABLE signals (
        workflow_id TEXT NOT NULL,
        name TEXT NOT NULL,
        seq INTEGER NOT NULL,
        payload BLOB NOT NULL,
        sent_at REAL NOT NULL,
        PRIMARY KEY (workflow_id, name, seq)
    ) WITHOUT ROWID;
    """,
    """
    ALTER TABLE journal ADD COLUMN note TEXT;
    """,
    """
    CREATE TABLE intents (
        workflow_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        key TEXT NOT NULL,
        started_at REAL NOT NULL,
        PRIMARY KEY (workflow_id, idx)
    ) WITHOUT ROWID;
    CREATE TABLE effects (
        key TEXT PRIMARY KEY,
        workflow_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        step TEXT NOT NULL,
        args_hash TEXT NOT NULL,
        state TEXT NOT NULL,
        output BLOB,
        error BLOB,
        created_at REAL NOT NULL,
        expires_at REAL
    );
    CREATE INDEX effects_expiry ON effects (expires_at) WHERE expires_at IS NOT NULL;
    """,
    """
    CREATE TABLE attempts (
        workflow_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        step TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        failure_class TEXT,
        error BLOB,
        delay REAL,
        delay_source TEXT,
        next_at REAL,
        note TEXT,
        PRIMARY KEY (workflow_id, idx, attempt)
    ) WITHOUT ROWID;
    CREATE TABLE shared (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    """
    ALTER TABLE workflows ADD COLUMN token INTEGER NOT NULL DEFAULT 0;
    """,
    """
    ALTER TABLE workflows ADD COLUMN queue TEXT;
    ALTER TABLE workflows ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE workflows ADD COLUMN not_before REAL;
    ALTER TABLE workflows ADD COLUMN dedup_id TEXT;
    CREATE INDEX workflows_queue ON workflows (queue, status, priority, created_at)
        WHERE queue IS NOT NULL;
    CREATE UNIQUE INDEX workflows_dedup ON workflows (queue, dedup_id)
        WHERE dedup_id IS NOT NULL
        AND status IN ('enqueued', 'running', 'waiting', 'cancelling');
    """,
    """
    CREATE TABLE rewound (
        workflow_id TEXT NOT NULL,
        rewound_at REAL NOT NULL,
        reason TEXT NOT NULL,
        idx INTEGER NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        output BLOB,
        error BLOB,
        attempts INTEGER NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL NOT NULL,
        note TEXT
    );
    CREATE INDEX rewound_workflow ON rewound (workflow_id, rewound_at, idx);
    """,
]

_WF_COLS = (
    "id, name, version, status, inputs, output, error, owner, parent_id, created_at, "
    "updated_at, recovery_attempts, reason, recovery_mark, token, queue, priority, not_before, "
    "dedup_id"
)
_INSERT_ENTRY = (
    "INSERT INTO journal (workflow_id, idx, kind, name, output, error, attempts, started_at, "
    "ended_at, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_CREATE = (f"INSERT INTO workflows ({_WF_COLS}) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_REQUEUE = (
    "UPDATE workflows SET status = 'enqueued', owner = NULL, not_before = ?1, reason = ?2 "
    "WHERE id = ?3 AND owner = ?4 AND status IN ('running', 'waiting') "
    "AND (?5 IS NULL OR token = ?5)"
)
# A write that carries a fencing token lands only while the workflow's token is still
# that one: the database itself refuses a stale worker, in the same statement.
_FENCE = " WHERE EXISTS (SELECT 1 FROM workflows WHERE id = ? AND token = ?)"
_INSERT_ENTRY_FENCED = (
    "INSERT INTO journal (workflow_id, idx, kind, name, output, error, attempts, started_at, "
    "ended_at, note) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?" + _FENCE
)
# A workflow asked to cancel can only end cancelled (after its compensations).
_FINISH = (
    "UPDATE workflows SET status = ?, output = ?, error = ?, reason = ?, updated_at = ? "
    "WHERE id = ? AND owner = ? AND (status IN ('running', 'waiting') "
    "OR (status = 'cancelling' AND ?1 = 'cancelled')) AND (?8 IS NULL OR token = ?8)"
)
_COMPLETE_EFFECT = (
    "UPDATE effects SET state = 'done', output = ?, error = ?, expires_at = ? "
    "WHERE key = ? AND workflow_id = ? AND idx = ?"
)
_CLEAR_INTENT = "DELETE FROM intents WHERE workflow_id = ? AND idx = ?"
_EFFECT_COLS = ("key, workflow_id, idx, step, args_hash, state, output, error, created_at, "
                "expires_at")
_ATTEMPT_COLS = ("workflow_id, idx, attempt, step, started_at, ended_at, failure_class, error, "
                 "delay, delay_source, next_at, note")
_UPSERT_ATTEMPT = (
    f"INSERT OR REPLACE INTO attempts ({_ATTEMPT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_ATTEMPT_FENCED = (
    f"INSERT OR REPLACE INTO attempts ({_ATTEMPT_COLS}) "
    "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?" + _FENCE
)
_MARK_WAITING = (
    "UPDATE workflows SET status = ?, reason = ? "
    "WHERE id = ? AND status IN ('running', 'waiting') AND owner = ? "
    "AND (?5 IS NULL OR token = ?5)"
)


_TABLES = ("workflows", "journal", "attempts", "signals", "effects", "intents", "rewound",
           "shared")


def parse_sqlite_url(url: str) -> tuple[str, dict[str, str]]:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db`` -> (path, options)."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a sqlite URL: {url!r}")
    if parts.netloc:
        raise ConfigurationError(
            f"bad SQLite URL {url!r}: use three slashes for a relative path "
            "(sqlite:///agent.db) and four for an absolute one (sqlite:////var/lib/agent.db)"
        )
    path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if not path:
        raise ConfigurationError(f"bad SQLite URL {url!r}: no file path (sqlite:///agent.db)")
    options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(options) - {"synchronous", "busy_timeout"}
    if unknown:
        raise ConfigurationError(
            f"unknown SQLite URL option(s) {sorted(unknown)} in {url!r}; "
            "known: synchronous=full|normal, busy_timeout=SECONDS"
        )
    return path, options


def _translate(exc: sqlite3.Error, doing: str) -> StoreError:
    msg = str(exc)
    low = msg.lower()
    if "full" in low:
        return StoreFullError(
            f"{doing}: the disk is full ({msg}); free space and retry — nothing of this "
            "write was kept and everything committed before it is intact"
        )
    if isinstance(exc, sqlite3.IntegrityError):
        return StoreConflictError(f"{doing}: {msg}")
    if "readonly" in low or "read-only" in low:
        return StoreError(f"{doing}: the database is read-only ({msg})")
    if "not a database" in low or "malformed" in low:
        return StoreUnavailableError(f"{doing}: the file is not a usable SQLite database ({msg})")
    if "unable to open" in low:
        return StoreUnavailableError(f"{doing}: cannot open the database file ({msg})")
    return StoreError(f"{doing}: {msg}")


def _create_row(r: WorkflowRecord) -> tuple[Any, ...]:
    return (r.id, r.name, r.version, r.status.value, r.inputs, r.output, r.error, r.owner,
            r.parent_id, r.created_at, r.updated_at, r.recovery_attempts, r.reason,
            r.recovery_mark, r.token, r.queue, r.priority, r.not_before, r.dedup_id)


def _stale(rows: list[tuple[Any, ...]]) -> WorkflowNotRunning:
    """The fenced write that matched no row: its workflow's token moved on."""
    ids = {r[-2] for r in rows}
    if len(ids) == 1:
        return WorkflowNotRunning(rows[0][-2], rows[0][-1])
    return WorkflowNotRunning("?")


def _row_to_workflow(row: tuple[Any, ...]) -> WorkflowRecord:
    return WorkflowRecord(
        id=row[0], name=row[1], version=row[2], status=Status(row[3]), inputs=row[4],
        output=row[5], error=row[6], owner=row[7], parent_id=row[8], created_at=row[9],
        updated_at=row[10], recovery_attempts=row[11], reason=row[12], recovery_mark=row[13],
        token=row[14], queue=row[15], priority=row[16], not_before=row[17], dedup_id=row[18],
    )


class SQLiteStore:
    """The :class:`~crashsafe.stores.base.Store` contract on one SQLite file."""

    def __init__(self, url: str) -> None:
        self.url = url
        path, options = parse_sqlite_url(url)
        sync = options.get("synchronous", "full").lower()
        if sync not in ("full", "normal"):
            raise ConfigurationError(
                f"synchronous={sync!r} in {url!r}: use 'full' (durable against power loss, "
                "the default) or 'normal' (durable against process crashes only)"
            )
        try:
            busy = float(options.get("busy_timeout", "60"))
        except ValueError:
            raise ConfigurationError(f"busy_timeout in {url!r} must be a number of seconds") \
                from None
        self.path = path
        self.synchronous = sync
        parent = Path(path).parent
        if not parent.exists():
            raise StoreUnavailableError(
                f"cannot open {url!r}: directory {str(parent)!r} does not exist"
            )
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._closed = False
        try:
            self._w = self._connect(path, busy, sync)
            self._migrate()
            self._r = self._connect(path, busy, sync)
        except sqlite3.Error as exc:
            raise _translate(exc, f"opening {url!r}") from exc

    @staticmethod
    def _connect(path: str, busy: float, sync: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=busy, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=OFF")
        return conn

    def _migrate(self) -> None:
        conn = self._w
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return  # current already: readers need not queue behind a writer
        with self._wlock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = conn.execute("PRAGMA user_version").fetchone()[0]
                if current > SCHEMA_VERSION:
                    raise ConfigurationError(
                        f"{self.url!r} has schema version {current}, newer than this crashsafe "
                        f"understands ({SCHEMA_VERSION}); upgrade crashsafe"
                    )
                for version in range(current, SCHEMA_VERSION):
                    for statement in MIGRATIONS[version].split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {version + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _check_open(self, doing: str) -> None:
        if self._closed:
            raise StoreUnavailableError(f"{doing}: this store was closed")

    @contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._wlock:
            self._check_open(doing)
            conn = self._w
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                if _faults.ENABLED:
                    _faults.point(f"store: before COMMIT of {doing}")
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise _translate(exc, doing) from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if _faults.ENABLED:
                _faults.point(f"store: after COMMIT of {doing}")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._rlock:
            self._check_open("reading")
            try:
                return self._r.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, "reading") from exc

    # -- group commit -----------------------------------------------------------------
    def apply(self, batches: Sequence[Sequence[Op]]) -> list[BaseException | None]:
        with self._wlock:
            if self._closed:
                return [StoreUnavailableError("committing the journal: this store was closed")
                        ] * len(batches)
            try:
                self._apply_txn(batches)
                return [None] * len(batches)
            except sqlite3.IntegrityError as exc:
                if len(batches) == 1:
                    return [self._conflict(batches[0], exc)]
            except sqlite3.Error as exc:
                err = _translate(exc, "committing the journal")
                return [err] * len(batches)
            except WorkflowNotRunning as exc:
                if len(batches) == 1:
                    return [exc]
            # One batch broke the shared transaction: apply them one by one.
            results: list[BaseException | None] = []
            for ops in batches:
                try:
                    self._apply_txn([ops])
                    results.append(None)
                except sqlite3.IntegrityError as exc:
                    results.append(self._conflict(ops, exc))
                except WorkflowNotRunning as exc:
                    results.append(exc)
                except sqlite3.Error as exc:
                    results.append(_translate(exc, "committing the journal"))
            return results

    def _conflict(self, ops: Sequence[Op], exc: sqlite3.Error) -> StoreConflictError:
        create = next((op for op in ops if isinstance(op, CreateWorkflow)), None)
        if create is not None and "workflows.id" in str(exc):
            return WorkflowExists(create.record.id)
        if create is not None and "workflows.dedup_id" in str(exc):
            r = create.record
            row = self._w.execute(
                "SELECT id FROM workflows WHERE queue = ? AND dedup_id = ? "
                "AND status IN ('enqueued', 'running', 'waiting', 'cancelling')",
                (r.queue, r.dedup_id)).fetchone()
            return WorkflowExists(row[0] if row else r.id, r.dedup_id)
        wf = next((op.workflow_id for op in ops if not isinstance(op, CreateWorkflow)), "?")
        return StoreConflictError(
            f"workflow {wf!r}: journal entry already recorded ({exc}); another executor "
            "is running this workflow"
        )

    def _apply_txn(self, batches: Sequence[Sequence[Op]]) -> None:
        conn = self._w
        creates: list[tuple[Any, ...]] = []
        entries: list[tuple[Any, ...]] = []
        fenced: list[tuple[Any, ...]] = []
        fenced_attempts: list[tuple[Any, ...]] = []
        finishes: list[tuple[Any, ...]] = []
        marks: list[tuple[Any, ...]] = []
        effects: list[CompleteEffect] = []
        attempts: list[tuple[Any, ...]] = []
        requeues: list[tuple[Any, ...]] = []
        for ops in batches:
            for op in ops:
                if type(op) is JournalEntry:
                    row = (op.workflow_id, op.index, op.kind, op.name, op.output, op.error,
                           op.attempts, op.started_at, op.ended_at, op.note)
                    if op.token is None:
                        entries.append(row)
                    else:
                        fenced.append((*row, op.workflow_id, op.token))
                elif isinstance(op, FinishWorkflow):
                    finishes.append((op.status.value, op.output, op.error, op.reason, op.at,
                                     op.workflow_id, op.owner, op.token))
                elif isinstance(op, CompleteEffect):
                    effects.append(op)
                elif isinstance(op, AttemptRecord):
                    arow = (op.workflow_id, op.index, op.attempt, op.step, op.started_at,
                            op.ended_at, op.failure_class, op.error, op.delay, op.delay_source,
                            op.next_at, op.note)
                    if op.token is None:
                        attempts.append(arow)
                    else:
                        fenced_attempts.append((*arow, op.workflow_id, op.token))
                elif isinstance(op, MarkWaiting):
                    marks.append(("running" if op.reason is None else "waiting", op.reason,
                                  op.workflow_id, op.owner, op.token))
                elif isinstance(op, CreateWorkflow):
                    r = op.record
                    creates.append(_create_row(r))
                elif isinstance(op, Requeue):
                    requeues.append((op.not_before, op.reason, op.workflow_id, op.owner,
                                     op.token))
        if _faults.ENABLED:
            _faults.point("store: begin journal commit")
        if (len(creates) + len(entries) + len(fenced) + len(finishes) + len(marks) == 1
                and not effects and not attempts and not fenced_attempts and not requeues):
            # One statement in autocommit mode is its own transaction: one fsync, one call.
            self._apply_single(conn, creates, entries, fenced, finishes, marks)
            if _faults.ENABLED:
                _faults.point("store: after journal commit")
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            if creates:
                conn.executemany(_CREATE, creates)
            if entries:
                conn.executemany(_INSERT_ENTRY, entries)
            if fenced and conn.executemany(_INSERT_ENTRY_FENCED, fenced).rowcount != len(fenced):
                raise _stale(fenced)
            if attempts:
                conn.executemany(_UPSERT_ATTEMPT, attempts)
            if fenced_attempts and conn.executemany(
                    _UPSERT_ATTEMPT_FENCED, fenced_attempts).rowcount != len(fenced_attempts):
                raise _stale(fenced_attempts)
            if effects:
                conn.executemany(_COMPLETE_EFFECT, [
                    (e.output, e.error, e.expires_at, e.key, e.workflow_id, e.index)
                    for e in effects])
                conn.executemany(_CLEAR_INTENT, [(e.workflow_id, e.index) for e in effects])
            if requeues and conn.executemany(_REQUEUE, requeues).rowcount != len(requeues):
                raise WorkflowNotRunning(requeues[0][2] if len(requeues) == 1 else "?")
            if marks and conn.executemany(_MARK_WAITING, marks).rowcount != len(marks):
                raise WorkflowNotRunning(marks[0][2] if len(marks) == 1 else "?")
            if finishes and conn.executemany(_FINISH, finishes).rowcount != len(finishes):
                # Some workflow was cancelled or taken over; only a one-batch
                # transaction can say which, so this one is rolled back.
                raise WorkflowNotRunning(finishes[0][5] if len(finishes) == 1 else "?")
            if _faults.ENABLED:
                _faults.point("store: before COMMIT (fsync)")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if _faults.ENABLED:
            _faults.point("store: after journal commit")

    @staticmethod
    def _apply_single(conn: sqlite3.Connection, creates: list[tuple[Any, ...]],
                      entries: list[tuple[Any, ...]], fenced: list[tuple[Any, ...]],
                      finishes: list[tuple[Any, ...]], marks: list[tuple[Any, ...]]) -> None:
        if entries:
            conn.execute(_INSERT_ENTRY, entries[0])
        elif fenced:
            if conn.execute(_INSERT_ENTRY_FENCED, fenced[0]).rowcount != 1:
                raise _stale(fenced)
        elif finishes:
            if conn.execute(_FINISH, finishes[0]).rowcount != 1:
                raise WorkflowNotRunning(finishes[0][5])
        elif marks:
            if conn.execute(_MARK_WAITING, marks[0]).rowcount != 1:
                raise WorkflowNotRunning(marks[0][2])
        else:
            conn.execute(_CREATE, creates[0])

    # -- other writes -----------------------------------------------------------------
    def create_workflow(self, record: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        with self._write(f"starting workflow {record.id!r}") as conn:
            cur = conn.execute(_CREATE + " ON CONFLICT (id) DO NOTHING", _create_row(record))
            if cur.rowcount == 1:
                return record, True
            row = conn.execute(f"SELECT {_WF_COLS} FROM workflows WHERE id = ?",
                               (record.id,)).fetchone()
            return _row_to_workflow(row), False

    def claim_workflows(
        self, claims: Sequence[tuple[str, str | None]], new_owner: str, max_recoveries: int
    ) -> list[ClaimResult]:
        with self._write("recovering workflows") as conn:
            return [self._claim(conn, wid, owner, new_owner, max_recoveries)
                    for wid, owner in claims]

    @staticmethod
    def _claim(conn: sqlite3.Connection, workflow_id: str, expected_owner: str | None,
               new_owner: str, max_recoveries: int) -> ClaimResult:
        row = conn.execute(
            f"SELECT {_WF_COLS} FROM workflows WHERE id = ? "
            "AND status IN ('running', 'waiting', 'cancelling') "
            "AND owner IS ?",
            (workflow_id, expected_owner),
        ).fetchone()
        if row is None:
            return ClaimResult(claimed=False)
        rec = _row_to_workflow(row)
        length = conn.execute("SELECT COUNT(*) FROM journal WHERE workflow_id = ?",
                              (workflow_id,)).fetchone()[0]
        res = decide_claim(rec, new_owner, max_recoveries, length, time.time())
        conn.execute(
            "UPDATE workflows SET status = ?, owner = ?, reason = ?, recovery_attempts = ?, "
            "recovery_mark = ?, updated_at = ?, token = ? WHERE id = ?",
            (rec.status.value, rec.owner, rec.reason, rec.recovery_attempts, rec.recovery_mark,
             rec.updated_at, rec.token, workflow_id),
        )
        return res

    def set_status(
        self,
        workflow_id: str,
        status: Status,
        *,
        only_from: Sequence[Status],
        reason: str | None = None,
        clear_owner: bool = False,
        reset_recoveries: bool = False,
    ) -> WorkflowRecord | None:
        with self._write(f"changing the status of workflow {workflow_id!r}") as conn:
            row = conn.execute(f"SELECT {_WF_COLS} FROM workflows WHERE id = ?",
                               (workflow_id,)).fetchone()
            if row is None:
                return None
            rec = _row_to_workflow(row)
            if rec.status not in only_from:
                return None
            rec.status = status
            rec.reason = reason
            rec.updated_at = time.time()
            if clear_owner:
                rec.owner = None
            if reset_recoveries:
                rec.recovery_attempts = 0
            conn.execute(
                "UPDATE workflows SET status = ?, reason = ?, owner = ?, recovery_attempts = ?, "
                "updated_at = ? WHERE id = ?",
                (rec.status.value, rec.reason, rec.owner, rec.recovery_attempts, rec.updated_at,
                 workflow_id),
            )
            return rec

    def register_executor(self, record: ExecutorRecord) -> None:
        with self._write("registering this process") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO executors (id, hostname, pid, pid_start, started_at, "
                "heartbeat_at, stopped) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.hostname, record.pid, record.pid_start, record.started_at,
                 record.heartbeat_at, int(record.stopped)),
            )

    def heartbeat(self, executor_id: str, at: float) -> None:
        with self._write("heartbeat") as conn:
            conn.execute("UPDATE executors SET heartbeat_at = ? WHERE id = ?", (at, executor_id))

    def stop_executor(self, executor_id: str) -> None:
        with self._write("stopping this process") as conn:
            conn.execute("UPDATE executors SET stopped = 1 WHERE id = ?", (executor_id,))

    # -- reads ------------------------------------------------------------------------
    def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        rows = self._read(f"SELECT {_WF_COLS} FROM workflows WHERE id = ?", (workflow_id,))
        return _row_to_workflow(rows[0]) if rows else None

    def list_workflows(self, flt: ListFilter) -> list[WorkflowRecord]:
        where: list[str] = []
        params: list[Any] = []
        if flt.status is not None:
            where.append("status = ?")
            params.append(flt.status.value)
        if flt.name is not None:
            where.append("name = ?")
            params.append(flt.name)
        if flt.id_prefix is not None:
            where.append("substr(id, 1, ?) = ?")
            params += [len(flt.id_prefix), flt.id_prefix]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params.append(max(0, int(flt.limit)))
        rows = self._read(
            f"SELECT {_WF_COLS} FROM workflows {clause} ORDER BY created_at DESC, id DESC "
            "LIMIT ?",
            params,
        )
        return [_row_to_workflow(r) for r in rows]

    def load_journal(self, workflow_id: str) -> list[JournalEntry]:
        rows = self._read(
            "SELECT workflow_id, idx, kind, name, output, error, attempts, started_at, ended_at, "
            "note FROM journal WHERE workflow_id = ? ORDER BY idx",
            (workflow_id,),
        )
        return [JournalEntry(*r) for r in rows]

    def running_workflows(self, exclude_owner: str) -> list[tuple[str, str | None, str]]:
        rows = self._read(
            "SELECT id, owner, name FROM workflows "
            "WHERE status IN ('running', 'waiting', 'cancelling') "
            "AND (owner IS NULL OR owner != ?)",
            (exclude_owner,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def cancelled_among(self, workflow_ids: Sequence[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(workflow_ids), 500):
            chunk = list(workflow_ids[start:start + 500])
            marks = ", ".join("?" * len(chunk))
            out += [r[0] for r in self._read(
                f"SELECT id FROM workflows WHERE id IN ({marks}) "
                "AND status NOT IN ('running', 'waiting')", chunk
            )]
        return out

    def send_signal(self, workflow_id: str, name: str, payload: bytes, at: float) -> int | None:
        with self._write(f"signalling workflow {workflow_id!r}") as conn:
            row = conn.execute("SELECT status FROM workflows WHERE id = ?",
                               (workflow_id,)).fetchone()
            if row is None or row[0] not in ("running", "waiting", "cancelling", "enqueued"):
                return None
            seq = conn.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM signals WHERE workflow_id = ? AND name = ?",
                (workflow_id, name),
            ).fetchone()[0]
            conn.execute("INSERT INTO signals (workflow_id, name, seq, payload, sent_at) "
                         "VALUES (?, ?, ?, ?, ?)", (workflow_id, name, seq, payload, at))
            return int(seq)

    def get_signal(self, workflow_id: str, name: str, nth: int) -> bytes | None:
        rows = self._read("SELECT payload FROM signals WHERE workflow_id = ? AND name = ? "
                          "AND seq = ?", (workflow_id, name, nth))
        return rows[0][0] if rows else None

    def transact(self, work: Callable[[sqlite3.Connection], Any],
                 record: Callable[[Any], JournalEntry]) -> Any:
        """Run ``work`` inside a write transaction and commit its writes together with the
        journal entry ``record(result)``: both land, or neither does."""
        with self._wlock:
            self._check_open("running a transactional step")
            conn = self._w
            try:
                conn.execute("BEGIN IMMEDIATE")
                value = work(conn)
                e = record(value)
                row = (e.workflow_id, e.index, e.kind, e.name, e.output, e.error, e.attempts,
                       e.started_at, e.ended_at, e.note)
                if e.token is None:
                    conn.execute(_INSERT_ENTRY, row)
                elif conn.execute(_INSERT_ENTRY_FENCED,
                                  (*row, e.workflow_id, e.token)).rowcount != 1:
                    raise WorkflowNotRunning(e.workflow_id, e.token)
                if _faults.ENABLED:
                    _faults.point("store: before COMMIT of a transactional step")
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.IntegrityError) and "journal" in str(exc):
                    raise StoreConflictError(f"transactional step: {exc}") from exc
                raise
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return value

    def begin_effect(self, workflow_id: str, index: int, step: str, key: str, args_hash: str,
                     at: float) -> EffectStart:
        with self._write(f"recording the intent of step {index} of {workflow_id!r}") as conn:
            row = conn.execute(f"SELECT {_EFFECT_COLS} FROM effects WHERE key = ?",
                               (key,)).fetchone()
            if row is not None:
                held = EffectRow(*row)
                if (held.workflow_id, held.index) != (workflow_id, index) or held.state == "done":
                    return EffectStart(holder=held)
            unknown = conn.execute("SELECT 1 FROM intents WHERE workflow_id = ? AND idx = ?",
                                   (workflow_id, index)).fetchone() is not None
            if not unknown:
                conn.execute("INSERT INTO intents (workflow_id, idx, key, started_at) "
                             "VALUES (?, ?, ?, ?)", (workflow_id, index, key, at))
            if row is None:
                conn.execute(
                    f"INSERT INTO effects ({_EFFECT_COLS}) VALUES (?, ?, ?, ?, ?, 'started', "
                    "NULL, NULL, ?, NULL)", (key, workflow_id, index, step, args_hash, at))
            return EffectStart(unknown=unknown)

    def get_effect(self, key: str) -> EffectRow | None:
        rows = self._read(f"SELECT {_EFFECT_COLS} FROM effects WHERE key = ?", (key,))
        return EffectRow(*rows[0]) if rows else None

    def purge_effects(self, now: float) -> int:
        with self._write("purging expired effect keys") as conn:
            cur = conn.execute("DELETE FROM effects WHERE state = 'done' AND expires_at < ?",
                               (now,))
            return int(cur.rowcount)

    def dequeue(self, queue: str, owner: str, limit: int, queue_limit: int | None,
                now: float) -> list[WorkflowRecord]:
        ready = "queue = ? AND status = 'enqueued' AND (not_before IS NULL OR not_before <= ?)"
        # A plain read first, so idle workers polling an empty queue take no write lock.
        if limit <= 0 or not self._read(f"SELECT 1 FROM workflows WHERE {ready} LIMIT 1",
                                         (queue, now)):
            return []
        with self._write(f"taking work from queue {queue!r}") as conn:
            if queue_limit is not None:
                running = conn.execute(
                    "SELECT COUNT(*) FROM workflows WHERE queue = ? "
                    "AND status IN ('running', 'waiting', 'cancelling')", (queue,)).fetchone()[0]
                limit = min(limit, queue_limit - running)
                if limit <= 0:
                    return []
            rows = conn.execute(
                f"SELECT {_WF_COLS} FROM workflows WHERE {ready} "
                "ORDER BY priority DESC, created_at, id LIMIT ?", (queue, now, limit)).fetchall()
            taken = [_row_to_workflow(r) for r in rows]
            for rec in taken:
                rec.status, rec.owner, rec.token = Status.RUNNING, owner, rec.token + 1
                rec.updated_at, rec.reason = now, None
            conn.executemany(
                "UPDATE workflows SET status = 'running', owner = ?, token = ?, updated_at = ?, "
                "reason = NULL WHERE id = ? AND status = 'enqueued'",
                [(owner, r.token, now, r.id) for r in taken])
            return taken

    def rewind(self, workflow_id: str, from_index: int, reason: str, at: float) -> int:
        with self._write(f"rolling back workflow {workflow_id!r}") as conn:
            return rewind_rows(conn, workflow_id, from_index, reason, at, "?")

    def load_rewound(self, workflow_id: str) -> list[tuple[float, str, JournalEntry]]:
        rows = self._read(
            "SELECT rewound_at, reason, workflow_id, idx, kind, name, output, error, attempts, "
            "started_at, ended_at, note FROM rewound WHERE workflow_id = ? "
            "ORDER BY rewound_at, idx", (workflow_id,))
        return [(r[0], r[1], JournalEntry(*r[2:])) for r in rows]

    def rewrite_payloads(self, workflow_id: str, fn: PayloadRewrite) -> int:
        with self._write(f"rewriting the records of workflow {workflow_id!r}") as conn:
            return rewrite_rows(conn, workflow_id, fn, "?")

    def _read_with(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Several statements on the read connection."""
        with self._rlock:
            self._check_open("reading")
            try:
                return fn(self._r)
            except sqlite3.Error as exc:
                raise _translate(exc, "reading") from exc

    def load_payloads(self, workflow_ids: Sequence[str]) -> list[StoredPayload]:
        return self._read_with(lambda conn: read_rows(conn, workflow_ids, "?"))

    def orphaned_workflow_ids(self) -> list[str]:
        return self._read_with(orphan_ids)

    def clock(self) -> float:
        # SQLite reads the operating system's clock itself, below anything a process
        # may have done to its own notion of time.
        rows = self._read("SELECT (julianday('now') - 2440587.5) * 86400.0")
        return float(rows[0][0])

    def load_attempts(self, workflow_id: str) -> list[AttemptRecord]:
        rows = self._read(f"SELECT {_ATTEMPT_COLS} FROM attempts WHERE workflow_id = ? "
                          "ORDER BY idx, attempt", (workflow_id,))
        return [AttemptRecord(*r) for r in rows]

    def update_shared(self, key: str, fn: SharedUpdate[T]) -> T:
        with self._write(f"updating shared state {key!r}") as conn:
            row = conn.execute("SELECT value FROM shared WHERE key = ?", (key,)).fetchone()
            current = None if row is None else bytes(row[0])
            now = time.time()
            new, result = fn(current, now)
            if new != current:
                if new is None:
                    conn.execute("DELETE FROM shared WHERE key = ?", (key,))
                else:
                    conn.execute("INSERT OR REPLACE INTO shared (key, value, updated_at) "
                                 "VALUES (?, ?, ?)", (key, new, now))
            return result

    def read_shared(self, key: str) -> tuple[bytes | None, float]:
        rows = self._read("SELECT value FROM shared WHERE key = ?", (key,))
        return (bytes(rows[0][0]) if rows else None), time.time()

    def list_shared(self, prefix: str) -> list[tuple[str, bytes, float]]:
        rows = self._read("SELECT key, value, updated_at FROM shared "
                          "WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix))
        return [(r[0], bytes(r[1]), r[2]) for r in rows]

    def get_executors(self, ids: Sequence[str]) -> dict[str, ExecutorRecord]:
        out: dict[str, ExecutorRecord] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            marks = ", ".join("?" * len(chunk))
            for r in self._read(
                "SELECT id, hostname, pid, pid_start, started_at, heartbeat_at, stopped "
                f"FROM executors WHERE id IN ({marks})",
                chunk,
            ):
                out[r[0]] = ExecutorRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]))
        return out

    # -- retention ----------------------------------------------------------------------
    def finished_workflows(self, before: float, after: tuple[float, str] | None, limit: int,
                           *, roots: bool = False) -> list[tuple[str, float]]:
        query, params = finished_query(before, after, limit, roots, "?")
        return [(r[0], r[1]) for r in self._read(query, params)]

    def drop_workflows(self, workflow_ids: Sequence[str], before: float) -> list[str]:
        with self._write("dropping finished workflows (retention)") as conn:
            dropped = drop_rows(conn, workflow_ids, before, "?")
            # Freed pages are reused by later writes; a file created with
            # auto_vacuum=INCREMENTAL also gives them back to the file system.
            if dropped and conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
                # Each step of the pragma frees one page, and the driver steps it once.
                free = conn.execute("PRAGMA freelist_count").fetchone()[0]
                while free:
                    conn.execute("PRAGMA incremental_vacuum")
                    now = conn.execute("PRAGMA freelist_count").fetchone()[0]
                    if now >= free:
                        break
                    free = now
            return dropped

    def rewrite_finished_entries(self, entries: Sequence[JournalEntry],
                                 expect: Mapping[str, tuple[int, float]]) -> list[str]:
        if not entries:
            return []
        with self._write("compacting checkpoints (retention)") as conn:
            return rewrite_finished_rows(conn, entries, expect, "?")

    def usage(self) -> dict[str, int]:
        """Rows per table, and bytes: ``bytes`` the pages in use, ``free_bytes`` the
        free pages the file keeps for reuse, ``file_bytes`` the file and its WAL."""
        out = {t: int(self._read(f"SELECT count(*) FROM {t}")[0][0]) for t in _TABLES}
        size = int(self._read("PRAGMA page_size")[0][0])
        pages = int(self._read("PRAGMA page_count")[0][0])
        free = int(self._read("PRAGMA freelist_count")[0][0])
        out["bytes"] = (pages - free) * size
        out["free_bytes"] = free * size
        out["file_bytes"] = sum(Path(self.path + ext).stat().st_size
                                for ext in ("", "-wal") if Path(self.path + ext).exists())
        return out

    def close(self) -> None:
        with self._wlock, self._rlock:
            if self._closed:
                return
            self._closed = True
            self._w.close()
            self._r.close()
