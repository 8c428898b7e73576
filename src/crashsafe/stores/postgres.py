"""PostgreSQL: many worker processes on many machines share one database.

URL: ``postgresql://user[:password]@host[:port]/dbname[?option=value&...]``
(``postgres://`` works too). Options, all optional:

* ``schema=NAME``: the schema holding crashsafe's tables (default ``crashsafe``),
  created if missing, so several apps or test runs can share one database;
* ``pool_min=N`` / ``pool_max=N``: connections kept open / open at most (1 and 8);
* ``pool_timeout=SECONDS``: how long a call waits for a free connection (30);
* ``connect_timeout=SECONDS``: how long opening a connection may take (10);
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

import hashlib
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .. import _faults
from ..exceptions import (
    ConfigurationError,
    StoreConflictError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
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
    SharedUpdate,
    Status,
    T,
    WorkflowExists,
    WorkflowNotRunning,
    WorkflowRecord,
    decide_claim,
)

Conn = psycopg.Connection[tuple[Any, ...]]
R = TypeVar("R")

SCHEMA_VERSION = 1

# Each entry upgrades the schema from version i to i + 1. Never edit a shipped entry:
# append a new one. Keys and ids use the "C" collation so ordering and prefix
# matching go by code point, as on SQLite and in memory.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE workflows (
        id text COLLATE "C" PRIMARY KEY,
        name text NOT NULL,
        version text NOT NULL,
        status text NOT NULL,
        inputs bytea NOT NULL,
        output bytea,
        error bytea,
        owner text,
        parent_id text,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        recovery_attempts integer NOT NULL DEFAULT 0,
        reason text,
        recovery_mark integer NOT NULL DEFAULT 0
    );
    CREATE INDEX workflows_status ON workflows (status, owner);
    CREATE INDEX workflows_created ON workflows (created_at DESC, id DESC);
    CREATE TABLE journal (
        workflow_id text COLLATE "C" NOT NULL,
        idx integer NOT NULL,
        kind text NOT NULL,
        name text NOT NULL,
        output bytea,
        error bytea,
        attempts integer NOT NULL,
        started_at double precision NOT NULL,
        ended_at double precision NOT NULL,
        note text,
        PRIMARY KEY (workflow_id, idx)
    );
    CREATE TABLE executors (
        id text PRIMARY KEY,
        hostname text NOT NULL,
        pid bigint NOT NULL,
        pid_start text NOT NULL,
        started_at double precision NOT NULL,
        heartbeat_at double precision NOT NULL,
        stopped boolean NOT NULL DEFAULT false
    );
    CREATE TABLE signals (
        workflow_id text NOT NULL,
        name text NOT NULL,
        seq integer NOT NULL,
        payload bytea NOT NULL,
        sent_at double precision NOT NULL,
        PRIMARY KEY (workflow_id, name, seq)
    );
    CREATE TABLE intents (
        workflow_id text NOT NULL,
        idx integer NOT NULL,
        key text NOT NULL,
        started_at double precision NOT NULL,
        PRIMARY KEY (workflow_id, idx)
    );
    CREATE TABLE effects (
        key text PRIMARY KEY,
        workflow_id text NOT NULL,
        idx integer NOT NULL,
        step text NOT NULL,
        args_hash text NOT NULL,
        state text NOT NULL,
        output bytea,
        error bytea,
        created_at double precision NOT NULL,
        expires_at double precision
    );
    CREATE INDEX effects_expiry ON effects (expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE attempts (
        workflow_id text NOT NULL,
        idx integer NOT NULL,
        attempt integer NOT NULL,
        step text NOT NULL,
        started_at double precision NOT NULL,
        ended_at double precision,
        failure_class text,
        error bytea,
        delay double precision,
        delay_source text,
        next_at double precision,
        note text,
        PRIMARY KEY (workflow_id, idx, attempt)
    );
    CREATE TABLE shared (
        key text COLLATE "C" PRIMARY KEY,
        value bytea NOT NULL,
        updated_at double precision NOT NULL
    );
    """,
]

_NOW = "extract(epoch FROM clock_timestamp())::float8"
_WF_COLS = (
    "id, name, version, status, inputs, output, error, owner, parent_id, created_at, "
    "updated_at, recovery_attempts, reason, recovery_mark"
)
_INSERT_ENTRY = (
    "INSERT INTO journal (workflow_id, idx, kind, name, output, error, attempts, started_at, "
    "ended_at, note) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_CREATE = (f"INSERT INTO workflows ({_WF_COLS}) "
           "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
# A workflow asked to cancel can only end cancelled (after its compensations); the
# status travels twice because the condition needs it again.
_FINISH = (
    "UPDATE workflows SET status = %s, output = %s, error = %s, reason = %s, updated_at = %s "
    "WHERE id = %s AND owner = %s AND (status IN ('running', 'waiting') "
    "OR (status = 'cancelling' AND %s = 'cancelled'))"
)
_COMPLETE_EFFECT = (
    "UPDATE effects SET state = 'done', output = %s, error = %s, expires_at = %s "
    "WHERE key = %s AND workflow_id = %s AND idx = %s"
)
_CLEAR_INTENT = "DELETE FROM intents WHERE workflow_id = %s AND idx = %s"
_EFFECT_COLS = ("key, workflow_id, idx, step, args_hash, state, output, error, created_at, "
                "expires_at")
_ATTEMPT_COLS = ("workflow_id, idx, attempt, step, started_at, ended_at, failure_class, error, "
                 "delay, delay_source, next_at, note")
_UPSERT_ATTEMPT = (
    f"INSERT INTO attempts ({_ATTEMPT_COLS}) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (workflow_id, idx, attempt) DO UPDATE SET step = EXCLUDED.step, "
    "started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at, "
    "failure_class = EXCLUDED.failure_class, error = EXCLUDED.error, delay = EXCLUDED.delay, "
    "delay_source = EXCLUDED.delay_source, next_at = EXCLUDED.next_at, note = EXCLUDED.note"
)
_MARK_WAITING = (
    "UPDATE workflows SET status = %s, reason = %s "
    "WHERE id = %s AND status IN ('running', 'waiting') AND owner = %s"
)

_CONFLICT_RETRIES = 5
"""Serialization failures and deadlocks retried inside one call before giving up."""
_CONFLICT_STATES = ("40001", "40P01")
_OUTCOME_WAIT = 10.0
"""Seconds to wait for a transaction whose COMMIT outcome is unknown to finish on the
server (its backend may still be running) before reporting the store unavailable."""

_DEFAULT_SCHEMA = "crashsafe"
_OWN_OPTIONS = ("schema", "pool_min", "pool_max", "pool_timeout", "connect_timeout")
_LIBPQ_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "application_name")
_KNOWN = ("schema=NAME, pool_min=N, pool_max=N, pool_timeout=SECONDS, "
          "connect_timeout=SECONDS, and libpq's sslmode, sslrootcert, sslcert, sslkey, "
          "application_name")


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """What a ``postgresql://`` URL asks for."""

    conninfo: str
    """The URL handed to libpq: crashsafe's own options removed."""
    schema: str = _DEFAULT_SCHEMA
    pool_min: int = 1
    pool_max: int = 8
    pool_timeout: float = 30.0
    connect_timeout: float = 10.0


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def parse_postgres_url(url: str) -> PostgresOptions:
    """``postgresql://user@host:port/db?schema=...&pool_max=...`` -> options."""
    parts = urlsplit(url)
    shown = redact(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a PostgreSQL URL: {shown!r}")
    options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(options) - set(_OWN_OPTIONS) - set(_LIBPQ_OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"unknown PostgreSQL URL option(s) {sorted(unknown)} in {shown!r}; known: {_KNOWN}"
        )
    schema = options.get("schema", _DEFAULT_SCHEMA)
    _check_schema(schema, shown)
    pool_min = _int_option(options, "pool_min", 1, 0, shown)
    pool_max = _int_option(options, "pool_max", 8, 1, shown)
    if pool_max < pool_min:
        raise ConfigurationError(
            f"pool_max={pool_max} is below pool_min={pool_min} in {shown!r}; raise pool_max"
        )
    libpq = [(k, options[k]) for k in _LIBPQ_OPTIONS if k in options]
    return PostgresOptions(
        conninfo=urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(libpq), "")),
        schema=schema,
        pool_min=pool_min,
        pool_max=pool_max,
        pool_timeout=_seconds_option(options, "pool_timeout", 30.0, shown),
        connect_timeout=_seconds_option(options, "connect_timeout", 10.0, shown),
    )


def _check_schema(schema: str, shown: str) -> None:
    if not schema or "\x00" in schema or len(schema.encode()) > 63:
        raise ConfigurationError(
            f"schema={schema!r} in {shown!r}: use a name of 1 to 63 bytes (e.g. schema=crashsafe)"
        )
    if schema.lower().startswith("pg_"):
        raise ConfigurationError(
            f"schema={schema!r} in {shown!r}: names starting with pg_ are reserved by "
            "PostgreSQL; pick another"
        )


def _int_option(options: dict[str, str], name: str, default: int, minimum: int,
                shown: str) -> int:
    try:
        value = int(options.get(name, default))
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigurationError(f"{name} in {shown!r} must be a whole number >= {minimum}")
    return value


def _seconds_option(options: dict[str, str], name: str, default: float, shown: str) -> float:
    try:
        value = float(options.get(name, default))
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ConfigurationError(f"{name} in {shown!r} must be a positive number of seconds")
    return value


# -- errors ---------------------------------------------------------------------------
def _message(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _is_lost(exc: psycopg.Error) -> bool:
    """The connection is gone (terminated, server restarted, network cut)."""
    state = exc.sqlstate or ""
    if state.startswith(("08", "57P")):
        return True
    # libpq reports a socket that closed under it without any SQLSTATE.
    return isinstance(exc, psycopg.OperationalError) and not state


def _is_conflict(exc: psycopg.Error) -> bool:
    return (exc.sqlstate or "") in _CONFLICT_STATES


def _translate(exc: psycopg.Error, doing: str) -> StoreError:
    msg = _message(exc)
    state = exc.sqlstate or ""
    if state == "53100":
        return StoreFullError(
            f"{doing}: the database server's disk is full ({msg}); free space on the server "
            "and retry — nothing of this write was kept and everything committed before it "
            "is intact"
        )
    if state == "53300":
        return StoreUnavailableError(
            f"{doing}: PostgreSQL refused another connection ({msg}); lower pool_max in the "
            "URL or raise the server's max_connections"
        )
    if isinstance(exc, psycopg.IntegrityError):
        return StoreConflictError(f"{doing}: {msg}")
    if state in _CONFLICT_STATES:
        return StoreConflictError(
            f"{doing}: other writers kept conflicting with this one ({msg}); retry"
        )
    if _is_lost(exc):
        return StoreUnavailableError(
            f"{doing}: lost the connection to PostgreSQL twice ({msg}); check that the server "
            "is up and reachable, then retry — nothing of this write was kept"
        )
    if state == "25006":
        return StoreError(f"{doing}: the database is read-only ({msg}); point the URL at "
                          "the primary server")
    if state == "42501":
        return StoreError(f"{doing}: permission denied ({msg}); grant the database user "
                          "the rights on crashsafe's schema")
    return StoreError(f"{doing}: {msg}")


def _lock_id(space: str, name: str) -> int:
    """A stable 64-bit advisory lock key for ``name`` within ``space``."""
    digest = hashlib.blake2b(f"crashsafe:{space}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _rollback_quietly(conn: Conn) -> None:
    if conn.closed or conn.broken:
        return
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            pass  # the pool discards a connection it cannot reset


def _row_to_workflow(row: Sequence[Any]) -> WorkflowRecord:
    return WorkflowRecord(
        id=row[0], name=row[1], version=row[2], status=Status(row[3]), inputs=row[4],
        output=row[5], error=row[6], owner=row[7], parent_id=row[8], created_at=row[9],
        updated_at=row[10], recovery_attempts=row[11], reason=row[12], recovery_mark=row[13],
    )


def _workflow_row(r: WorkflowRecord) -> tuple[Any, ...]:
    return (r.id, r.name, r.version, r.status.value, r.inputs, r.output, r.error, r.owner,
            r.parent_id, r.created_at, r.updated_at, r.recovery_attempts, r.reason,
            r.recovery_mark)


def _entry_row(e: JournalEntry) -> tuple[Any, ...]:
    return (e.workflow_id, e.index, e.kind, e.name, e.output, e.error, e.attempts,
            e.started_at, e.ended_at, e.note)


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


@dataclass(slots=True)
class _Rows:
    """One group commit's ops, sorted into the parameter rows of each statement."""

    creates: list[tuple[Any, ...]]
    entries: list[tuple[Any, ...]]
    finishes: list[tuple[Any, ...]]
    marks: list[tuple[Any, ...]]
    effects: list[CompleteEffect]
    attempts: list[tuple[Any, ...]]

    @classmethod
    def collect(cls, batches: Sequence[Sequence[Op]]) -> _Rows:
        rows = cls([], [], [], [], [], [])
        for ops in batches:
            for op in ops:
                rows._add(op)
        return rows

    def _add(self, op: Op) -> None:
        if type(op) is JournalEntry:
            self.entries.append(_entry_row(op))
        elif isinstance(op, FinishWorkflow):
            self.finishes.append((op.status.value, op.output, op.error, op.reason, op.at,
                                  op.workflow_id, op.owner, op.status.value))
        elif isinstance(op, CompleteEffect):
            self.effects.append(op)
        elif isinstance(op, AttemptRecord):
            self.attempts.append((op.workflow_id, op.index, op.attempt, op.step,
                                  op.started_at, op.ended_at, op.failure_class, op.error,
                                  op.delay, op.delay_source, op.next_at, op.note))
        elif isinstance(op, MarkWaiting):
            self.marks.append(("running" if op.reason is None else "waiting", op.reason,
                               op.workflow_id, op.owner))
        elif isinstance(op, CreateWorkflow):
            self.creates.append(_workflow_row(op.record))

    def single(self) -> bool:
        """One statement and nothing else: it can be its own transaction."""
        return (len(self.creates) + len(self.entries) + len(self.finishes) + len(self.marks)
                == 1 and not self.effects and not self.attempts)


class _TransactionCursor:
    """What a transactional step's :class:`~crashsafe.TransactionConnection` wraps on
    PostgreSQL: ``execute``/``executemany`` inside the journal's open transaction, with
    psycopg's ``%s`` placeholders."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    def execute(self, query: str, parameters: Any = ()) -> psycopg.Cursor[tuple[Any, ...]]:
        return self._conn.execute(query, parameters or None)

    def executemany(self, query: str, seq_of_parameters: Any) -> psycopg.Cursor[tuple[Any, ...]]:
        cur = self._conn.cursor()
        cur.executemany(query, seq_of_parameters)
        return cur


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
        conn.execute("SELECT set_config('search_path', %s, false)", (self._schema_path,))

    def _connect(self) -> Conn:
        try:
            return psycopg.connect(self.options.conninfo, **self._connect_kwargs())
        except psycopg.Error as exc:
            raise StoreUnavailableError(
                f"cannot connect to PostgreSQL at {self._shown!r}: {_message(exc)}; check that "
                "the server is running and that the URL's host, port, user and database "
                "are right"
            ) from exc

    def _migrate(self) -> None:
        schema = self.options.schema
        with self._connect() as conn:
            try:
                self._user_path = conn.execute("SHOW search_path").fetchone()[0]  # type: ignore[index]
                self._schema_path = sql.Identifier(schema).as_string(conn)
                self._configure(conn)
                if self._schema_version(conn) == SCHEMA_VERSION:
                    return  # current already: no need to queue behind other starters
                conn.execute("BEGIN")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_id("migrate", schema),))
                if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                                (schema,)).fetchone() is None:
                    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
                conn.execute("CREATE TABLE IF NOT EXISTS crashsafe_meta "
                             "(name text PRIMARY KEY, value integer NOT NULL)")
                self._upgrade(conn, self._schema_version(conn))
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                raise _translate(exc, f"preparing schema {schema!r} in {self._shown!r}") \
                    from exc

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
                f"{self.options.pool_timeout:g} s ({_message(exc)}); check that the server is "
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
                if _is_conflict(exc) and tries < _CONFLICT_RETRIES:
                    _backoff(tries)
                    continue
                if not _is_lost(exc) or lost_once:
                    raise _translate(exc, doing) from exc
                lost_once = True
                if att.committing and transaction and (
                        att.xid is None or self._committed(att.xid, doing)):
                    return cast(R, att.value)
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
            _rollback_quietly(conn)
            raise
        if _faults.ENABLED:
            _faults.point(f"store: after COMMIT of {doing}")
        return att.value

    def _committed(self, xid: str, doing: str) -> bool:
        """Whether transaction ``xid``, whose COMMIT reply was lost, committed."""
        checking = f"{doing} (checking whether its COMMIT landed)"
        deadline = time.monotonic() + _OUTCOME_WAIT
        while True:
            row = self._run(checking, lambda c: c.execute(
                "SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone(), transaction=False)
            status = None if row is None else row[0]
            if status in ("committed", "aborted"):
                return bool(status == "committed")
            if status is None or time.monotonic() > deadline:
                raise StoreUnavailableError(
                    f"{doing}: the connection dropped during COMMIT and PostgreSQL cannot "
                    f"say yet whether transaction {xid} committed ({status or 'unknown'}); "
                    "check the server, then read the data back before retrying"
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

    @staticmethod
    def _conflict(ops: Sequence[Op], exc: psycopg.Error) -> StoreConflictError:
        create = next((op for op in ops if isinstance(op, CreateWorkflow)), None)
        if create is not None and exc.diag.constraint_name == "workflows_pkey":
            return WorkflowExists(create.record.id)
        wf = next((op.workflow_id for op in ops if not isinstance(op, CreateWorkflow)), "?")
        return StoreConflictError(
            f"workflow {wf!r}: journal entry already recorded ({_message(exc)}); another "
            "executor is running this workflow"
        )

    def _commit(self, batches: Sequence[Sequence[Op]]) -> None:
        """Apply ``batches`` in one transaction, through conflicts and one dropped
        connection. Raises ``psycopg.IntegrityError`` or :class:`WorkflowNotRunning` for
        a batch the database refused, :class:`StoreError` for anything else."""
        doing = "committing the journal"
        rows = _Rows.collect(batches)
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
                if unknown and self._landed(batches, doing):
                    return
                raise
            except psycopg.Error as exc:
                if _is_conflict(exc) and conflicts < _CONFLICT_RETRIES:
                    conflicts += 1
                    _backoff(conflicts)
                    continue
                if not _is_lost(exc) or lost_once:
                    raise self._lost_twice(exc, doing, unknown) from exc
                lost_once = True
                if att.committing:
                    if self._landed(batches, doing):
                        return
                    unknown = True
                self._refresh()

    @staticmethod
    def _lost_twice(exc: psycopg.Error, doing: str, unknown: bool) -> StoreError:
        if unknown and _is_lost(exc):
            return StoreUnavailableError(
                f"{doing}: lost the connection to PostgreSQL during COMMIT and again while "
                f"re-applying ({_message(exc)}); nothing of it is recorded, check that the "
                "server is up and reachable"
            )
        return _translate(exc, doing)

    def _apply_txn(self, conn: Conn, rows: _Rows, att: _Attempt) -> None:
        if _faults.ENABLED:
            _faults.point("store: begin journal commit")
        if rows.single():
            # One statement in autocommit mode is its own transaction: one round trip.
            att.committing = True
            self._apply_single(conn, rows)
        else:
            conn.execute("BEGIN")
            try:
                self._apply_statements(conn, rows)
                if _faults.ENABLED:
                    _faults.point("store: before COMMIT (fsync)")
                att.committing = True
                conn.execute("COMMIT")
            except BaseException:
                _rollback_quietly(conn)
                raise
        if _faults.ENABLED:
            _faults.point("store: after journal commit")

    @staticmethod
    def _apply_statements(conn: Conn, rows: _Rows) -> None:
        cur = conn.cursor()
        if rows.creates:
            cur.executemany(_CREATE, rows.creates)
        if rows.entries:
            cur.executemany(_INSERT_ENTRY, rows.entries)
        if rows.attempts:
            cur.executemany(_UPSERT_ATTEMPT, rows.attempts)
        if rows.effects:
            cur.executemany(_COMPLETE_EFFECT, [
                (e.output, e.error, e.expires_at, e.key, e.workflow_id, e.index)
                for e in rows.effects])
            cur.executemany(_CLEAR_INTENT, [(e.workflow_id, e.index) for e in rows.effects])
        if rows.marks:
            cur.executemany(_MARK_WAITING, rows.marks)
            if cur.rowcount != len(rows.marks):
                raise WorkflowNotRunning(rows.marks[0][2] if len(rows.marks) == 1 else "?")
        if rows.finishes:
            cur.executemany(_FINISH, rows.finishes)
            if cur.rowcount != len(rows.finishes):
                # Some workflow was cancelled or taken over; only a one-batch
                # transaction can say which, so this one is rolled back.
                raise WorkflowNotRunning(rows.finishes[0][5] if len(rows.finishes) == 1
                                         else "?")

    @staticmethod
    def _apply_single(conn: Conn, rows: _Rows) -> None:
        if rows.entries:
            conn.execute(_INSERT_ENTRY, rows.entries[0])
        elif rows.finishes:
            if conn.execute(_FINISH, rows.finishes[0]).rowcount != 1:
                raise WorkflowNotRunning(rows.finishes[0][5])
        elif rows.marks:
            if conn.execute(_MARK_WAITING, rows.marks[0]).rowcount != 1:
                raise WorkflowNotRunning(rows.marks[0][2])
        else:
            conn.execute(_CREATE, rows.creates[0])

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
        return False  # the rest are upserts and conditional updates: applying them again is safe

    # -- other writes -----------------------------------------------------------------
    def create_workflow(self, record: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        def body(conn: Conn) -> tuple[WorkflowRecord, bool]:
            cur = conn.execute(_CREATE + " ON CONFLICT (id) DO NOTHING", _workflow_row(record))
            if cur.rowcount == 1:
                return record, True
            row = conn.execute(f"SELECT {_WF_COLS} FROM workflows WHERE id = %s",
                               (record.id,)).fetchone()
            assert row is not None  # the conflicting row is there (rows are never deleted)
            return _row_to_workflow(row), False

        return self._run(f"starting workflow {record.id!r}", body)

    def claim_workflows(
        self, claims: Sequence[tuple[str, str | None]], new_owner: str, max_recoveries: int
    ) -> list[ClaimResult]:
        def body(conn: Conn) -> list[ClaimResult]:
            return [self._claim(conn, wid, owner, new_owner, max_recoveries)
                    for wid, owner in claims]

        return self._run("recovering workflows", body)

    @staticmethod
    def _claim(conn: Conn, workflow_id: str, expected_owner: str | None, new_owner: str,
               max_recoveries: int) -> ClaimResult:
        row = conn.execute(
            f"SELECT {_WF_COLS}, {_NOW} FROM workflows WHERE id = %s "
            "AND status IN ('running', 'waiting', 'cancelling') "
            "AND owner IS NOT DISTINCT FROM %s FOR UPDATE",
            (workflow_id, expected_owner),
        ).fetchone()
        if row is None:
            return ClaimResult(claimed=False)
        rec = _row_to_workflow(row)
        length = conn.execute("SELECT count(*) FROM journal WHERE workflow_id = %s",
                              (workflow_id,)).fetchone()[0]  # type: ignore[index]
        res = decide_claim(rec, new_owner, max_recoveries, length, row[-1])
        conn.execute(
            "UPDATE workflows SET status = %s, owner = %s, reason = %s, recovery_attempts = %s, "
            "recovery_mark = %s, updated_at = %s WHERE id = %s",
            (rec.status.value, rec.owner, rec.reason, rec.recovery_attempts, rec.recovery_mark,
             rec.updated_at, workflow_id),
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
        def body(conn: Conn) -> WorkflowRecord | None:
            row = conn.execute(f"SELECT {_WF_COLS}, {_NOW} FROM workflows WHERE id = %s "
                               "FOR UPDATE", (workflow_id,)).fetchone()
            if row is None:
                return None
            rec = _row_to_workflow(row)
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
        rows = self._read(f"SELECT {_WF_COLS} FROM workflows WHERE id = %s", (workflow_id,))
        return _row_to_workflow(rows[0]) if rows else None

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
            f"SELECT {_WF_COLS} FROM workflows {clause} ORDER BY created_at DESC, id DESC "
            "LIMIT %s",
            params,
        )
        return [_row_to_workflow(r) for r in rows]

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
            if row is None or row[0] not in ("running", "waiting", "cancelling"):
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
                if _is_conflict(exc) and tries < _CONFLICT_RETRIES:
                    _backoff(tries)
                    continue
                if _is_lost(exc) and not lost_once:
                    lost_once = True
                    if att.committing and self._entry_landed(att.value[1], doing):
                        return att.value[0]
                    self._refresh()
                    continue
                if att.in_work and not _is_lost(exc):
                    raise  # the step's own SQL failed: the step sees the database's error
                if isinstance(exc, psycopg.IntegrityError):
                    raise StoreConflictError(f"transactional step: {_message(exc)}") from exc
                raise _translate(exc, doing) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _transact_once(self, conn: Conn, work: Callable[[Any], Any],
                       record: Callable[[Any], JournalEntry], att: _Attempt) -> Any:
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT set_config('search_path', %s, true)", (self._user_path,))
            att.in_work = True
            value = work(_TransactionCursor(conn))
            att.in_work = False
            entry = record(value)
            conn.execute("SELECT set_config('search_path', %s, true)", (self._schema_path,))
            conn.execute(_INSERT_ENTRY, _entry_row(entry))
            if _faults.ENABLED:
                _faults.point("store: before COMMIT of a transactional step")
            att.value = (value, entry)
            att.committing = True
            conn.execute("COMMIT")
        except BaseException:
            _rollback_quietly(conn)
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
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_id("effect", key),))
            row = conn.execute(f"SELECT {_EFFECT_COLS} FROM effects WHERE key = %s",
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
                    f"INSERT INTO effects ({_EFFECT_COLS}) VALUES (%s, %s, %s, %s, %s, "
                    "'started', NULL, NULL, %s, NULL)",
                    (key, workflow_id, index, step, args_hash, at))
            return EffectStart(unknown=unknown)

        return self._run(f"recording the intent of step {index} of {workflow_id!r}", body)

    def get_effect(self, key: str) -> EffectRow | None:
        rows = self._read(f"SELECT {_EFFECT_COLS} FROM effects WHERE key = %s", (key,))
        return EffectRow(*rows[0]) if rows else None

    def purge_effects(self, now: float) -> int:
        return self._statement("purging expired effect keys",
                               "DELETE FROM effects WHERE state = 'done' AND expires_at < %s",
                               (now,))

    def load_attempts(self, workflow_id: str) -> list[AttemptRecord]:
        rows = self._read(f"SELECT {_ATTEMPT_COLS} FROM attempts WHERE workflow_id = %s "
                          "ORDER BY idx, attempt", (workflow_id,))
        return [AttemptRecord(*r) for r in rows]

    # -- shared values ----------------------------------------------------------------
    def update_shared(self, key: str, fn: SharedUpdate[T]) -> T:
        def body(conn: Conn) -> T:
            # The lock (not a row lock) also covers a key that does not exist yet; it is
            # taken in its own statement so the read below sees the last holder's write.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_id("shared", key),))
            row = conn.execute(f"SELECT (SELECT value FROM shared WHERE key = %s), {_NOW}",
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
        rows = self._read(f"SELECT (SELECT value FROM shared WHERE key = %s), {_NOW}", (key,))
        value, now = rows[0]
        return (None if value is None else bytes(value)), now

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


def _backoff(tries: int) -> None:
    """Sleep a little before retrying a deadlock or serialization failure."""
    time.sleep(random.uniform(0.005, 0.02) * 2 ** tries)
