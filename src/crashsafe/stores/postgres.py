"""PostgreSQL: many worker processes on many machines share one database.

URL: ``postgresql://user[:password]@host[:port]/dbname[?option=value&...]``
(``postgres://`` works too). Options, all optional:

* ``schema=NAME``: the schema holding crashsafe's tables (default ``crashsafe``),
  created if missing, so several apps or test runs can share one database;
* ``pool_min=N`` / ``pool_max=N``: connections kept open / open at most (1 and 8);
* ``pool_timeout=SECONDS``: how long a call waits for a free connection (30);
* ``connect_timeout=SECONDS``: how long opening a connection may take (10);
* ``idle_tx_timeout=SECONDS``: the server ends a session left inside a transaction
  this long by a paused or hung client, freeing its locks (30; 0: never);
* ``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``, ``application_name``:
  passed to libpq as they are.

A commit returns once PostgreSQL has made it durable (``synchronous_commit``, on by
default). Schema migrations run under an advisory lock, so many processes may start
against a fresh database at the same moment.

**Clock.** Every time this store stamps by itself (recoveries, status changes,
shared values) and the ``now`` it hands to :meth:`PostgresStore.update_shared` come
from the database server's ``clock_timestamp()``. Workers on many machines then
compare breaker cool-downs, budgets and leases against one clock, whatever their
own wall clocks say; a worker whose clock is an hour off cannot end a cool-down early.

**Fencing.** A write that carries a fencing token is checked against the workflow's
token in the same statement, under a share lock on the workflow row: a takeover and a
stale worker's write never interleave, whichever comes first.

**Dropped connections.** A read, or a write whose connection drops before its COMMIT
was sent, is retried once on a fresh connection: the server rolled it back, so
nothing of it was kept. A connection that drops *during* COMMIT leaves the outcome
unknown. The store then finds out on a fresh connection and never guesses: journal
batches by re-reading the keyed rows they wrote (a journal entry by workflow and
index, a workflow row by id), other writes by asking the server whether their
transaction committed (``pg_xact_status``). What landed is reported as done; what
did not is applied once more.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .. import _faults
from ..exceptions import (
    ConfigurationError,
    StoreConflictError,
    StoreError,
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
from ._postgres_sql import (
    ATTEMPT_COLS,
    CLAIM,
    COMMIT_GROUP,
    CONFLICT_RETRIES,
    CREATE,
    DEQUEUE,
    EFFECT_COLS,
    FINISH,
    INSERT_ENTRY,
    INSERT_ENTRY_FENCED,
    MARK_WAITING,
    MIGRATIONS,
    NOT_RUNNING,
    NOW,
    OUTCOME_WAIT,
    SCHEMA_VERSION,
    STALE_FENCE,
    WF_COLS,
    Conn,
    PostgresOptions,
    Rows,
    TransactionCursor,
    backoff,
    entry_row,
    is_conflict,
    is_lost,
    lock_id,
    message,
    parse_postgres_url,
    redact,
    rollback_quietly,
    row_to_workflow,
    stale,
    translate,
    workflow_row,
)
from .base import (
    AttemptRecord,
    ClaimResult,
    CreateWorkflow,
    EffectRow,
    EffectStart,
    ExecutorRecord,
    FinishWorkflow,
    JournalEntry,
    ListFilter,
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
    dead_letter_reason,
)

R = TypeVar("R")

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresOptions", "PostgresStore",
           "parse_postgres_url", "redact"]


@dataclass(slots=True)
class _Attempt:
    """What one try of a transaction got to, for deciding what a dropped connection means."""

    committing: bool = False
    """COMMIT (or a statement that is its own transaction) was sent: outcome unknown."""
    xid: str | None = None
    """The transaction's id, if it wrote anything."""
    value: Any = None
    in_work: bool = False
    """A transactional step's own code was running."""


class PostgresStore:
    """The :class:`~crashsafe.stores.base.Store` contract on a PostgreSQL database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.options = parse_postgres_url(url)
        self._shown = redact(url)
        self._closing = threading.Lock()
        self._closed = False
        self._schema_path = ""
        self._user_path = ""
        self._migrate()
        self._pool: ConnectionPool[Conn] = ConnectionPool(
            self.options.conninfo,
            min_size=self.options.pool_min,
            max_size=self.options.pool_max,
            timeout=self.options.pool_timeout,
            kwargs=self._connect_kwargs(),
            configure=self._configure,
            open=False,
            name=f"crashsafe:{self.options.schema}",
        )
        self._pool.open(wait=False)

    # -- connections ------------------------------------------------------------------
    def _connect_kwargs(self) -> dict[str, Any]:
        return {"autocommit": True,
                "connect_timeout": max(2, round(self.options.connect_timeout))}

    def _configure(self, conn: Conn) -> None:
        # Our own statements name tables unqualified; the search path points them at
        # crashsafe's schema (set as a parameter: no identifier is ever formatted in).
        conn.execute("SELECT set_config('search_path', %s, false), "
                     "set_config('idle_in_transaction_session_timeout', %s, false)",
                     (self._schema_path, str(round(self.options.idle_tx_timeout * 1000))))

    def _connect(self) -> Conn:
        try:
            return psycopg.connect(self.options.conninfo, **self._connect_kwargs())
        except psycopg.Error as exc:
            raise StoreUnavailableError(
                f"cannot connect to PostgreSQL at {self._shown!r}: {message(exc)}; check that "
                "the server is running and that the URL's host, port, user and database "
                "are right"
            ) from exc

    def _migrate(self) -> None:
        schema = self.options.schema
        for last in (False, True):
            with self._connect() as conn:
                try:
                    self._user_path = conn.execute("SHOW search_path").fetchone()[0]  # type: ignore[index]
                    self._schema_path = sql.Identifier(schema).as_string(conn)
                    self._configure(conn)
                    if self._schema_version(conn) == SCHEMA_VERSION:
                        return  # current already: no need to queue behind other starters
                    conn.execute("BEGIN")
                    conn.execute("SELECT pg_advisory_xact_lock(%s)",
                                 (lock_id("migrate", schema),))
                    if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                                    (schema,)).fetchone() is None:
                        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
                    conn.execute("CREATE TABLE IF NOT EXISTS crashsafe_meta "
                                 "(name text PRIMARY KEY, value integer NOT NULL)")
                    self._upgrade(conn, self._schema_version(conn))
                    conn.execute("COMMIT")
                    return
                except psycopg.Error as exc:
                    # Dropped once connected: retried once on a fresh connection, as
                    # reads are. The migration is one transaction that checks the
                    # version first, so a retry after a lost COMMIT answer finds the
                    # schema current.
                    if last or not is_lost(exc):
                        raise translate(exc, f"preparing schema {schema!r} in "
                                             f"{self._shown!r}") from exc

    @staticmethod
    def _schema_version(conn: Conn) -> int:
        if conn.execute("SELECT to_regclass('crashsafe_meta')").fetchone() == (None,):
            return 0
        row = conn.execute("SELECT value FROM crashsafe_meta "
                           "WHERE name = 'schema_version'").fetchone()
        return 0 if row is None else int(row[0])

    def _upgrade(self, conn: Conn, current: int) -> None:
        if current > SCHEMA_VERSION:
            raise ConfigurationError(
                f"schema {self.options.schema!r} in {self._shown!r} has version {current}, "
                f"newer than this crashsafe understands ({SCHEMA_VERSION}); upgrade crashsafe"
            )
        for version in range(current, SCHEMA_VERSION):
            conn.execute(MIGRATIONS[version])  # no parameters: several statements may run
            conn.execute(
                "INSERT INTO crashsafe_meta (name, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", (version + 1,))

    @contextmanager
    def _conn(self, doing: str) -> Iterator[Conn]:
        if self._closed:
            raise StoreUnavailableError(f"{doing}: this store was closed")
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise StoreUnavailableError(
                f"{doing}: no connection to PostgreSQL at {self._shown!r} within "
                f"{self.options.pool_timeout:g} s ({message(exc)}); check that the server is "
                "reachable, or raise pool_max if all connections were busy"
            ) from exc
        except PoolClosed as exc:
            raise StoreUnavailableError(f"{doing}: this store was closed") from exc

    def _refresh(self) -> None:
        """After a dropped connection: replace idle connections that died with it."""
        try:
            self._pool.check()
        except psycopg.Error:
            pass  # the retry reports the server's state

    # -- the transaction runner -------------------------------------------------------
    def _run(self, doing: str, body: Callable[[Conn], R], *, transaction: bool = True) -> R:
        """Run ``body`` on a pooled connection: in one transaction, or (``transaction``
        False) as autocommit statements that are safe to repeat. Deadlocks and
        serialization failures are retried; a dropped connection once (see the module
        docstring for what a drop during COMMIT means)."""
        lost_once = False
        for tries in itertools.count():
            att = _Attempt()
            try:
                with self._conn(doing) as conn:
                    if not transaction:
                        return body(conn)
                    return cast(R, self._transaction(conn, body, att, doing))
            except psycopg.Error as exc:
                if is_conflict(exc) and tries < CONFLICT_RETRIES:
                    backoff(tries)
                    continue
                if not is_lost(exc):
                    raise translate(exc, doing) from exc
                if att.committing and transaction and (att.xid is None or self._outcome(
                        doing, functools.partial(self._committed, att.xid, doing))):
                    return cast(R, att.value)
                if lost_once:  # and this try did not land either
                    raise translate(exc, doing) from exc
                lost_once = True
                self._refresh()
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _transaction(conn: Conn, body: Callable[[Conn], Any], att: _Attempt,
                     doing: str) -> Any:
        conn.execute("BEGIN")
        try:
            att.value = body(conn)
            row = conn.execute("SELECT pg_current_xact_id_if_assigned()::text").fetchone()
            att.xid = None if row is None else row[0]
            if _faults.ENABLED:
                _faults.point(f"store: before COMMIT of {doing}")
            att.committing = True
            conn.execute("COMMIT")
        except BaseException:
            rollback_quietly(conn)
            raise
        if _faults.ENABLED:
            _faults.point(f"store: after COMMIT of {doing}")
        return att.value

    @staticmethod
    def _outcome(doing: str, check: Callable[[], bool]) -> bool:
        """Run ``check``, which tells whether a COMMIT whose reply was lost landed; if
        even that fails, the caller learns that the outcome is unknown."""
        try:
            return check()
        except StoreError as exc:
            raise StoreUnavailableError(
                f"{doing}: the connection dropped during COMMIT and whether it landed could "
                f"not be checked ({exc}); it may or may not be recorded — check that the "
                "server is up, then read the data back before doing it again"
            ) from exc

    def _committed(self, xid: str, doing: str) -> bool:
        """Whether transaction ``xid``, whose COMMIT reply was lost, committed."""
        checking = f"{doing} (checking whether its COMMIT landed)"
        deadline = time.monotonic() + OUTCOME_WAIT
        while True:
            row = self._run(checking, lambda c: c.execute(
                "SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone(), transaction=False)
            status = None if row is None else row[0]
            if status in ("committed", "aborted"):
                return bool(status == "committed")
            if status is None or time.monotonic() > deadline:
                raise StoreUnavailableError(
                    f"{checking}: PostgreSQL cannot say whether transaction {xid} "
                    f"committed ({status or 'unknown'})"
                )
            time.sleep(0.05)  # its old backend is still finishing it

    def _read(self, query: str, params: Sequence[Any] = (),
              doing: str = "reading") -> list[tuple[Any, ...]]:
        return self._run(doing, lambda c: c.execute(query, params).fetchall(),
                         transaction=False)

    def _statement(self, doing: str, query: str, params: Sequence[Any]) -> int:
        """One write that is its own transaction and harmless to repeat; its row count."""
        if _faults.ENABLED:
            _faults.point(f"store: before COMMIT of {doing}")
        count = self._run(doing, lambda c: c.execute(query, params).rowcount,
                          transaction=False)
        if _faults.ENABLED:
            _faults.point(f"store: after COMMIT of {doing}")
        return count

    # -- group commit -----------------------------------------------------------------
    def apply(self, batches: Sequence[Sequence[Op]]) -> list[BaseException | None]:
        if not batches:
            return []
        if self._closed:
            return [StoreUnavailableError("committing the journal: this store was closed")
                    ] * len(batches)
        try:
            self._commit(batches)
            return [None] * len(batches)
        except psycopg.IntegrityError as exc:
            if len(batches) == 1:
                return [self._conflict(batches[0], exc)]
        except WorkflowNotRunning as exc:
            if len(batches) == 1:
                return [exc]
        except StoreError as exc:
            return [exc] * len(batches)
        # One batch broke the shared transaction: apply them one by one.
        results: list[BaseException | None] = []
        for ops in batches:
            try:
                self._commit([ops])
                results.append(None)
            except psycopg.IntegrityError as exc:
                results.append(self._conflict(ops, exc))
            except StoreError as exc:
                results.append(exc)
        return results

    def _conflict(self, ops: Sequence[Op], exc: psycopg.Error) -> StoreConflictError:
        create = next((op for op in ops if isinstance(op, CreateWorkflow)), None)
        if create is not None and exc.diag.constraint_name == "workflows_pkey":
            return WorkflowExists(create.record.id)
        if create is not None and exc.diag.constraint_name == "workflows_dedup":
            return self._dedup_conflict(create.record)
        wf = next((op.workflow_id for op in ops if not isinstance(op, CreateWorkflow)), "?")
        return StoreConflictError(
            f"workflow {wf!r}: journal entry already recorded ({message(exc)}); another "
            "executor is running this workflow"
        )

    def _dedup_conflict(self, r: WorkflowRecord) -> StoreConflictError:
        """The workflow already waiting or running on ``r``'s queue with its dedup id."""
        try:
            rows = self._read(
                "SELECT id FROM workflows WHERE queue = %s AND dedup_id = %s "
                "AND status IN ('enqueued', 'running', 'waiting', 'cancelling')",
                (r.queue, r.dedup_id))
        except StoreError as exc:
            return StoreConflictError(f"workflow {r.id!r}: dedup id {r.dedup_id!r} is taken "
                                      f"on queue {r.queue!r} ({exc})")
        return WorkflowExists(rows[0][0] if rows else r.id, r.dedup_id)

    def _commit(self, batches: Sequence[Sequence[Op]]) -> None:
        """Apply ``batches`` in one transaction, through conflicts and one dropped
        connection. Raises ``psycopg.IntegrityError`` or :class:`WorkflowNotRunning` for
        a batch the database refused, :class:`StoreError` for anything else."""
        doing = "committing the journal"
        rows = Rows.collect(batches)
        conflicts = 0
        lost_once = False
        unknown = False  # a COMMIT reply was lost and the batches are being re-applied
        while True:
            att = _Attempt()
            try:
                with self._conn(doing) as conn:
                    self._apply_txn(conn, rows, att)
                return
            except (psycopg.IntegrityError, WorkflowNotRunning):
                # After a lost reply, the first try may have landed after all (its
                # backend finished the COMMIT while the re-read looked): ask again.
                if unknown and self._outcome(doing, lambda: self._landed(batches, doing)):
                    return
                raise
            except psycopg.Error as exc:
                if is_conflict(exc) and conflicts < CONFLICT_RETRIES:
                    conflicts += 1
                    backoff(conflicts)
                    continue
                if not is_lost(exc):
                    raise translate(exc, doing) from exc
                if att.committing:
                    if self._outcome(doing, lambda: self._landed(batches, doing)):
                        return
                    unknown = True
                if lost_once:  # and this try did not land either
                    raise translate(exc, doing) from exc
                lost_once = True
                self._refresh()

    def _apply_txn(self, conn: Conn, rows: Rows, att: _Attempt) -> None:
        if _faults.ENABLED:
            _faults.point("store: begin journal commit")
        if rows.single():
            # One statement in autocommit mode is its own transaction: one round trip.
            att.committing = True
            self._apply_single(conn, rows)
        else:
            # One call the server runs to the end without the client: no transaction
            # is ever left open waiting on a paused worker.
            if _faults.ENABLED:
                _faults.point("store: before COMMIT (fsync)")
            att.committing = True
            try:
                conn.execute(COMMIT_GROUP, rows.params())
            except psycopg.Error as exc:
                if exc.sqlstate == STALE_FENCE:
                    raise stale([*rows.entries, *rows.attempts]) from None
                if exc.sqlstate == NOT_RUNNING:
                    moved = {m[1] for m in rows.moves}
                    raise WorkflowNotRunning(moved.pop() if len(moved) == 1 else "?") from None
                raise
        if _faults.ENABLED:
            _faults.point("store: after journal commit")

    @staticmethod
    def _apply_single(conn: Conn, rows: Rows) -> None:
        if rows.entries:
            row = rows.entries[0]
            if row[-1] is None:
                conn.execute(INSERT_ENTRY, row[:-1])
            elif conn.execute(INSERT_ENTRY_FENCED, (*row[:-1], row[0], row[-1])).rowcount != 1:
                raise stale(rows.entries)
        elif rows.moves:
            op, wid, owner, token, status, output, error, reason, at = rows.moves[0]
            if op == "finish":
                params = (status, output, error, reason, at, wid, owner, status, token, token)
                if conn.execute(FINISH, params).rowcount != 1:
                    raise WorkflowNotRunning(wid)
            elif conn.execute(MARK_WAITING, (status, reason, wid, owner, token,
                                             token)).rowcount != 1:
                raise WorkflowNotRunning(wid)
        else:
            conn.execute(CREATE, rows.creates[0])

    def _landed(self, batches: Sequence[Sequence[Op]], doing: str) -> bool:
        """After a COMMIT whose reply was lost: did it land? All these batches shared
        that one transaction, so one keyed row they wrote answers for all of them."""
        ops = [op for ops in batches for op in ops]
        checking = f"{doing} (checking whether its COMMIT landed)"
        entry = next((op for op in ops if type(op) is JournalEntry), None)
        if entry is not None:
            got = self._read("SELECT kind, name, started_at, ended_at FROM journal "
                             "WHERE workflow_id = %s AND idx = %s",
                             (entry.workflow_id, entry.index), checking)
            return got == [(entry.kind, entry.name, entry.started_at, entry.ended_at)]
        create = next((op for op in ops if isinstance(op, CreateWorkflow)), None)
        if create is not None:
            r = create.record
            got = self._read("SELECT name, version, created_at FROM workflows WHERE id = %s",
                             (r.id,), checking)
            return got == [(r.name, r.version, r.created_at)]
        finish = next((op for op in ops if isinstance(op, FinishWorkflow)), None)
        if finish is not None:
            got = self._read("SELECT status, updated_at, owner FROM workflows WHERE id = %s",
                             (finish.workflow_id,), checking)
            return got == [(finish.status.value, finish.at, finish.owner)]
        requeue = next((op for op in ops if isinstance(op, Requeue)), None)
        if requeue is not None:
            got = self._read("SELECT status, owner, not_before, reason FROM workflows "
                             "WHERE id = %s", (requeue.workflow_id,), checking)
            return got == [("enqueued", None, requeue.not_before, requeue.reason)]
        return False  # the rest are upserts and conditional updates: applying them again is safe

    # -- other writes -----------------------------------------------------------------
    def create_workflow(self, record: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        def body(conn: Conn) -> tuple[WorkflowRecord, bool]:
            cur = conn.execute(CREATE + " ON CONFLICT (id) DO NOTHING", workflow_row(record))
            if cur.rowcount == 1:
                return record, True
            row = conn.execute(f"SELECT {WF_COLS} FROM workflows WHERE id = %s",
                               (record.id,)).fetchone()
            assert row is not None  # the conflicting row is there (rows are never deleted)
            return row_to_workflow(row), False

        return self._run(f"starting workflow {record.id!r}", body)

    def claim_workflows(
        self, claims: Sequence[tuple[str, str | None]], new_owner: str, max_recoveries: int
    ) -> list[ClaimResult]:
        """One statement for the whole list (recovering 10,000 workflows is one round
        trip per 500 of them), which the server finishes without the client: a worker
        paused mid-claim holds no row the others must skip."""
        if not claims:
            return []
        params = {"ids": [wid for wid, _ in claims], "owners": [o for _, o in claims],
                  "owner": new_owner, "max": max_recoveries,
                  "reason": dead_letter_reason(max_recoveries)}
        # Its own transaction: if the reply is lost, the retry finds nothing left to
        # claim, and the next sweep resumes what this process already owns.
        rows = self._run("recovering workflows",
                         lambda conn: conn.execute(CLAIM, params).fetchall(),
                         transaction=False)
        moved = {r[0]: row_to_workflow(r) for r in rows}
        results: list[ClaimResult] = []
        for wid, _owner in claims:
            rec = moved.pop(wid, None)  # a duplicate claim in the list finds it taken
            if rec is None:
                results.append(ClaimResult(claimed=False))
            elif rec.status is Status.DEAD_LETTER:
                results.append(ClaimResult(claimed=False, dead_lettered=True, record=rec))
            else:
                results.append(ClaimResult(claimed=True, record=rec))
        return results

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
        def body(conn: Conn) -> WorkflowRecord | None:
            row = conn.execute(f"SELECT {WF_COLS}, {NOW} FROM workflows WHERE id = %s "
                               "FOR UPDATE", (workflow_id,)).fetchone()
            if row is None:
                return None
            rec = row_to_workflow(row)
            if rec.status not in only_from:
                return None
            rec.status = status
            rec.reason = reason
            rec.updated_at = row[-1]
            if clear_owner:
                rec.owner = None
            if reset_recoveries:
                rec.recovery_attempts = 0
            conn.execute(
                "UPDATE workflows SET status = %s, reason = %s, owner = %s, "
                "recovery_attempts = %s, updated_at = %s WHERE id = %s",
                (rec.status.value, rec.reason, rec.owner, rec.recovery_attempts,
                 rec.updated_at, workflow_id),
            )
            return rec

        return self._run(f"changing the status of workflow {workflow_id!r}", body)

    def register_executor(self, record: ExecutorRecord) -> None:
        self._statement(
            "registering this process",
            "INSERT INTO executors (id, hostname, pid, pid_start, started_at, heartbeat_at, "
            "stopped) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
            "hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, pid_start = EXCLUDED.pid_start, "
            "started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at, "
            "stopped = EXCLUDED.stopped",
            (record.id, record.hostname, record.pid, record.pid_start, record.started_at,
             record.heartbeat_at, record.stopped),
        )

    def heartbeat(self, executor_id: str, at: float) -> None:
        self._statement("heartbeat", "UPDATE executors SET heartbeat_at = %s WHERE id = %s",
                        (at, executor_id))

    def stop_executor(self, executor_id: str) -> None:
        self._statement("stopping this process",
                        "UPDATE executors SET stopped = true WHERE id = %s", (executor_id,))

    # -- reads ------------------------------------------------------------------------
    def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        rows = self._read(f"SELECT {WF_COLS} FROM workflows WHERE id = %s", (workflow_id,))
        return row_to_workflow(rows[0]) if rows else None

    def list_workflows(self, flt: ListFilter) -> list[WorkflowRecord]:
        where: list[str] = []
        params: list[Any] = []
        if flt.status is not None:
            where.append("status = %s")
            params.append(flt.status.value)
        if flt.name is not None:
            where.append("name = %s")
            params.append(flt.name)
        if flt.id_prefix is not None:
            where.append("starts_with(id, %s)")  # literal: % and _ are no wildcards here
            params.append(flt.id_prefix)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params.append(max(0, int(flt.limit)))
        rows = self._read(
            f"SELECT {WF_COLS} FROM workflows {clause} ORDER BY created_at DESC, id DESC "
            "LIMIT %s",
            params,
        )
        return [row_to_workflow(r) for r in rows]

    def load_journal(self, workflow_id: str) -> list[JournalEntry]:
        rows = self._read(
            "SELECT workflow_id, idx, kind, name, output, error, attempts, started_at, ended_at, "
            "note FROM journal WHERE workflow_id = %s ORDER BY idx",
            (workflow_id,),
        )
        return [JournalEntry(*r) for r in rows]

    def running_workflows(self, exclude_owner: str) -> list[tuple[str, str | None, str]]:
        rows = self._read(
            "SELECT id, owner, name FROM workflows "
            "WHERE status IN ('running', 'waiting', 'cancelling') "
            "AND (owner IS NULL OR owner != %s)",
            (exclude_owner,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def cancelled_among(self, workflow_ids: Sequence[str]) -> list[str]:
        if not workflow_ids:
            return []
        rows = self._read("SELECT id FROM workflows WHERE id = ANY(%s) "
                          "AND status NOT IN ('running', 'waiting')", (list(workflow_ids),))
        return [r[0] for r in rows]

    def send_signal(self, workflow_id: str, name: str, payload: bytes, at: float) -> int | None:
        def body(conn: Conn) -> int | None:
            # Locking the workflow row serializes senders, so sequence numbers never clash.
            row = conn.execute("SELECT status FROM workflows WHERE id = %s FOR UPDATE",
                               (workflow_id,)).fetchone()
            if row is None or row[0] not in ("running", "waiting", "cancelling", "enqueued"):
                return None
            seq = conn.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM signals "
                "WHERE workflow_id = %s AND name = %s", (workflow_id, name),
            ).fetchone()[0]  # type: ignore[index]
            conn.execute("INSERT INTO signals (workflow_id, name, seq, payload, sent_at) "
                         "VALUES (%s, %s, %s, %s, %s)", (workflow_id, name, seq, payload, at))
            return int(seq)

        return self._run(f"signalling workflow {workflow_id!r}", body)

    def get_signal(self, workflow_id: str, name: str, nth: int) -> bytes | None:
        rows = self._read("SELECT payload FROM signals WHERE workflow_id = %s AND name = %s "
                          "AND seq = %s", (workflow_id, name, nth))
        return bytes(rows[0][0]) if rows else None

    # -- transactional steps ----------------------------------------------------------
    def transact(self, work: Callable[[Any], Any],
                 record: Callable[[Any], JournalEntry]) -> Any:
        """Run ``work`` inside a transaction and commit its writes together with the
        journal entry ``record(result)``: both land, or neither does.

        ``work`` sees the database user's own search path (not crashsafe's schema), so
        its unqualified table names mean what they mean anywhere else in the database.
        Errors of its own SQL reach the step unchanged, as psycopg raised them.
        """
        doing = "running a transactional step"
        lost_once = False
        for tries in itertools.count():
            att = _Attempt()
            try:
                with self._conn(doing) as conn:
                    return self._transact_once(conn, work, record, att)
            except psycopg.Error as exc:
                if is_conflict(exc) and tries < CONFLICT_RETRIES:
                    backoff(tries)
                    continue
                if is_lost(exc):
                    if att.committing and self._outcome(
                            doing, functools.partial(self._entry_landed, att.value[1], doing)):
                        return att.value[0]
                    if not lost_once:
                        lost_once = True
                        self._refresh()
                        continue
                elif att.in_work:
                    raise  # the step's own SQL failed: the step sees the database's error
                if isinstance(exc, psycopg.IntegrityError):
                    raise StoreConflictError(f"transactional step: {message(exc)}") from exc
                raise translate(exc, doing) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _transact_once(self, conn: Conn, work: Callable[[Any], Any],
                       record: Callable[[Any], JournalEntry], att: _Attempt) -> Any:
        conn.execute("BEGIN")
        try:
            # The step's own work may take its time inside the transaction: the idle
            # timeout that frees a paused worker's locks does not apply to it.
            conn.execute("SELECT set_config('search_path', %s, true), "
                         "set_config('idle_in_transaction_session_timeout', '0', true)",
                         (self._user_path,))
            att.in_work = True
            value = work(TransactionCursor(conn))
            att.in_work = False
            entry = record(value)
            conn.execute("SELECT set_config('search_path', %s, true)", (self._schema_path,))
            if entry.token is None:
                conn.execute(INSERT_ENTRY, entry_row(entry))
            elif conn.execute(INSERT_ENTRY_FENCED, (*entry_row(entry), entry.workflow_id,
                                                    entry.token)).rowcount != 1:
                raise WorkflowNotRunning(entry.workflow_id, entry.token)
            if _faults.ENABLED:
                _faults.point("store: before COMMIT of a transactional step")
            att.value = (value, entry)
            att.committing = True
            conn.execute("COMMIT")
        except BaseException:
            rollback_quietly(conn)
            raise
        return value

    def _entry_landed(self, entry: JournalEntry, doing: str) -> bool:
        got = self._read("SELECT name, started_at, ended_at FROM journal "
                         "WHERE workflow_id = %s AND idx = %s", (entry.workflow_id, entry.index),
                         f"{doing} (checking whether its COMMIT landed)")
        return got == [(entry.name, entry.started_at, entry.ended_at)]

    # -- effects ----------------------------------------------------------------------
    def begin_effect(self, workflow_id: str, index: int, step: str, key: str, args_hash: str,
                     at: float) -> EffectStart:
        def body(conn: Conn) -> EffectStart:
            # One starter per key at a time, as SQLite's single writer gives for free.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id("effect", key),))
            row = conn.execute(f"SELECT {EFFECT_COLS} FROM effects WHERE key = %s",
                               (key,)).fetchone()
            if row is not None:
                held = EffectRow(*row)
                if (held.workflow_id, held.index) != (workflow_id, index) or held.state == "done":
                    return EffectStart(holder=held)
            unknown = conn.execute("SELECT 1 FROM intents WHERE workflow_id = %s AND idx = %s",
                                   (workflow_id, index)).fetchone() is not None
            if not unknown:
                conn.execute("INSERT INTO intents (workflow_id, idx, key, started_at) "
                             "VALUES (%s, %s, %s, %s)", (workflow_id, index, key, at))
            if row is None:
                conn.execute(
                    f"INSERT INTO effects ({EFFECT_COLS}) VALUES (%s, %s, %s, %s, %s, "
                    "'started', NULL, NULL, %s, NULL)",
                    (key, workflow_id, index, step, args_hash, at))
            return EffectStart(unknown=unknown)

        return self._run(f"recording the intent of step {index} of {workflow_id!r}", body)

    def get_effect(self, key: str) -> EffectRow | None:
        rows = self._read(f"SELECT {EFFECT_COLS} FROM effects WHERE key = %s", (key,))
        return EffectRow(*rows[0]) if rows else None

    def purge_effects(self, now: float) -> int:
        return self._statement("purging expired effect keys",
                               "DELETE FROM effects WHERE state = 'done' AND expires_at < %s",
                               (now,))

    def load_attempts(self, workflow_id: str) -> list[AttemptRecord]:
        rows = self._read(f"SELECT {ATTEMPT_COLS} FROM attempts WHERE workflow_id = %s "
                          "ORDER BY idx, attempt", (workflow_id,))
        return [AttemptRecord(*r) for r in rows]

    # -- shared values ----------------------------------------------------------------
    def update_shared(self, key: str, fn: SharedUpdate[T]) -> T:
        def body(conn: Conn) -> T:
            # The lock (not a row lock) also covers a key that does not exist yet; it is
            # taken in its own statement so the read below sees the last holder's write.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id("shared", key),))
            row = conn.execute(f"SELECT (SELECT value FROM shared WHERE key = %s), {NOW}",
                               (key,)).fetchone()
            assert row is not None
            current = None if row[0] is None else bytes(row[0])
            now: float = row[1]
            new, result = fn(current, now)
            if new != current:
                if new is None:
                    conn.execute("DELETE FROM shared WHERE key = %s", (key,))
                else:
                    conn.execute("INSERT INTO shared (key, value, updated_at) VALUES (%s, %s, %s) "
                                 "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, "
                                 "updated_at = EXCLUDED.updated_at", (key, new, now))
            return result

        return self._run(f"updating shared state {key!r}", body)

    def read_shared(self, key: str) -> tuple[bytes | None, float]:
        rows = self._read(f"SELECT (SELECT value FROM shared WHERE key = %s), {NOW}", (key,))
        value, now = rows[0]
        return (None if value is None else bytes(value)), now

    # -- queues -----------------------------------------------------------------------
    def dequeue(self, queue: str, owner: str, limit: int, queue_limit: int | None,
                now: float) -> list[WorkflowRecord]:
        ready = ("queue = %s AND status = 'enqueued' "
                 "AND (not_before IS NULL OR not_before <= %s)")
        # A plain read first, so idle workers polling an empty queue open no transaction.
        if limit <= 0 or not self._read(f"SELECT 1 FROM workflows WHERE {ready} LIMIT 1",
                                        (queue, now)):
            return []

        # One call: the count under the queue's advisory lock, the SKIP LOCKED pick and
        # the update all run on the server, so a paused worker holds nothing.
        params = (queue, owner, limit, queue_limit, now, lock_id("queue", queue))

        def body(conn: Conn) -> list[WorkflowRecord]:
            return [row_to_workflow(r) for r in conn.execute(DEQUEUE, params).fetchall()]

        return self._run(f"taking work from queue {queue!r}", body, transaction=False)

    def rewind(self, workflow_id: str, from_index: int, reason: str, at: float) -> int:
        def body(conn: Conn) -> int:
            return rewind_rows(conn, workflow_id, from_index, reason, at, "%s")

        return self._run(f"rolling back workflow {workflow_id!r}", body)

    def load_rewound(self, workflow_id: str) -> list[tuple[float, str, JournalEntry]]:
        rows = self._read(
            "SELECT rewound_at, reason, workflow_id, idx, kind, name, output, error, attempts, "
            "started_at, ended_at, note FROM rewound WHERE workflow_id = %s "
            "ORDER BY rewound_at, idx", (workflow_id,))
        return [(r[0], r[1], JournalEntry(r[2], r[3], r[4], r[5],
                                          None if r[6] is None else bytes(r[6]),
                                          None if r[7] is None else bytes(r[7]),
                                          r[8], r[9], r[10], r[11])) for r in rows]

    def rewrite_payloads(self, workflow_id: str, fn: PayloadRewrite) -> int:
        def body(conn: Conn) -> int:
            return rewrite_rows(conn, workflow_id, fn, "%s")

        return self._run(f"rewriting the records of workflow {workflow_id!r}", body)

    def load_payloads(self, workflow_ids: Sequence[str]) -> list[StoredPayload]:
        return self._run("reading stored records", lambda conn: read_rows(
            conn, workflow_ids, "%s"), transaction=False)

    def orphaned_workflow_ids(self) -> list[str]:
        return self._run("listing rows left without their workflow", orphan_ids,
                         transaction=False)

    def clock(self) -> float:
        return float(self._read(f"SELECT {NOW}")[0][0])

    def list_shared(self, prefix: str) -> list[tuple[str, bytes, float]]:
        rows = self._read("SELECT key, value, updated_at FROM shared "
                          "WHERE starts_with(key, %s) ORDER BY key", (prefix,))
        return [(r[0], bytes(r[1]), r[2]) for r in rows]

    # -- executors --------------------------------------------------------------------
    def get_executors(self, ids: Sequence[str]) -> dict[str, ExecutorRecord]:
        if not ids:
            return {}
        rows = self._read("SELECT id, hostname, pid, pid_start, started_at, heartbeat_at, "
                          "stopped FROM executors WHERE id = ANY(%s)", (list(ids),))
        return {r[0]: ExecutorRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]))
                for r in rows}

    def close(self) -> None:
        with self._closing:
            if self._closed:
                return
            self._closed = True
        self._pool.close(timeout=1.0)


    # -- retention ----------------------------------------------------------------------
    def finished_workflows(self, before: float, after: tuple[float, str] | None, limit: int,
                           *, roots: bool = False) -> list[tuple[str, float]]:
        query, params = finished_query(before, after, limit, roots, "%s")
        return [(r[0], r[1]) for r in self._read(query, params)]

    def drop_workflows(self, workflow_ids: Sequence[str], before: float) -> list[str]:
        def body(conn: Conn) -> list[str]:
            # Row locks first, so a resume or a signal racing this drop waits for it (or
            # this drop sees the workflow running again and keeps it).
            conn.execute("SELECT id FROM workflows WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                         (list(workflow_ids),))
            return drop_rows(conn, workflow_ids, before, "%s")

        return self._run("dropping finished workflows (retention)", body)

    def rewrite_finished_entries(self, entries: Sequence[JournalEntry],
                                 expect: Mapping[str, tuple[int, float]]) -> list[str]:
        if not entries:
            return []

        def body(conn: Conn) -> list[str]:
            ids = sorted({e.workflow_id for e in entries})
            # Held until the commit: a rewind or a claim (which raise the token) waits,
            # so the token compared below is still the one when the entries are written.
            conn.execute("SELECT id FROM workflows WHERE id = ANY(%s) ORDER BY id FOR SHARE",
                         (ids,))
            return rewrite_finished_rows(conn, entries, expect, "%s")

        return self._run("compacting checkpoints (retention)", body)

    def usage(self) -> dict[str, int]:
        """Rows per table, and ``bytes``: the tables' total relation size (heap,
        indexes, TOAST) in this store's schema."""
        tables = ("workflows", "journal", "attempts", "signals", "effects", "intents",
                  "rewound", "shared")
        out = {t: int(self._read(f"SELECT count(*) FROM {t}")[0][0]) for t in tables}
        out["bytes"] = int(self._read(
            "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r'")[0][0])
        return out
