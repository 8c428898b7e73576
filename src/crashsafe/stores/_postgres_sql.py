"""The PostgreSQL store's fixed parts: schema migrations, SQL text, URL options, and
how psycopg's errors become crashsafe's (see :mod:`crashsafe.stores.postgres`)."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import psycopg

from ..exceptions import (
    ConfigurationError,
    StoreConflictError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from .base import (
    AttemptRecord,
    CompleteEffect,
    CreateWorkflow,
    FinishWorkflow,
    JournalEntry,
    MarkWaiting,
    Op,
    Requeue,
    Status,
    WorkflowNotRunning,
    WorkflowRecord,
)

Conn = psycopg.Connection[tuple[Any, ...]]

SCHEMA_VERSION = 4

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
        recovery_mark integer NOT NULL DEFAULT 0,
        token bigint NOT NULL DEFAULT 0,
        queue text,
        priority integer NOT NULL DEFAULT 0,
        not_before double precision,
        dedup_id text
    );
    CREATE INDEX workflows_status ON workflows (status, owner);
    CREATE INDEX workflows_queue ON workflows (queue, status, priority DESC, created_at)
        WHERE queue IS NOT NULL;
    CREATE UNIQUE INDEX workflows_dedup ON workflows (queue, dedup_id)
        WHERE dedup_id IS NOT NULL
        AND status IN ('enqueued', 'running', 'waiting', 'cancelling');
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
    """
    CREATE TABLE rewound (
        workflow_id text COLLATE "C" NOT NULL,
        rewound_at double precision NOT NULL,
        reason text NOT NULL,
        idx integer NOT NULL,
        kind text NOT NULL,
        name text NOT NULL,
        output bytea,
        error bytea,
        attempts integer NOT NULL,
        started_at double precision NOT NULL,
        ended_at double precision NOT NULL,
        note text
    );
    CREATE INDEX rewound_workflow ON rewound (workflow_id, rewound_at, idx);
    """,
    # v3: a group commit is one call of commit_group, so the server runs the whole
    # transaction without waiting on the client: a worker paused (SIGSTOP, a debugger,
    # a frozen VM) between statements can no longer sit on the locks of a transaction
    # it left open. The fence is checked in SQL; a stale token or a workflow that is no
    # longer running raises, which rolls the whole call back.
    """
    CREATE TYPE commit_entry AS (
        workflow_id text, idx integer, kind text, name text, output bytea, error bytea,
        attempts integer, started_at double precision, ended_at double precision,
        note text, token bigint
    );
    CREATE TYPE commit_attempt AS (
        workflow_id text, idx integer, attempt integer, step text,
        started_at double precision, ended_at double precision, failure_class text,
        error bytea, delay double precision, delay_source text, next_at double precision,
        note text, token bigint
    );
    CREATE TYPE commit_effect AS (
        key text, workflow_id text, idx integer, output bytea, error bytea,
        expires_at double precision
    );
    CREATE TYPE commit_move AS (
        op text, workflow_id text, owner text, token bigint, status text, output bytea,
        error bytea, reason text, at double precision
    );
    CREATE FUNCTION commit_group(c workflows[], j commit_entry[], a commit_attempt[],
                                 ef commit_effect[], mv commit_move[])
    RETURNS void LANGUAGE plpgsql AS $body$
    DECLARE
        n bigint;
        m commit_move;
    BEGIN
        IF c IS NOT NULL THEN
            INSERT INTO workflows SELECT * FROM unnest(c);
        END IF;
        IF j IS NOT NULL THEN
            INSERT INTO journal (workflow_id, idx, kind, name, output, error, attempts,
                                 started_at, ended_at, note)
            SELECT u.workflow_id, u.idx, u.kind, u.name, u.output, u.error, u.attempts,
                   u.started_at, u.ended_at, u.note
            FROM unnest(j) AS u
            WHERE u.token IS NULL OR EXISTS (
                SELECT 1 FROM workflows w WHERE w.id = u.workflow_id AND w.token = u.token
                FOR SHARE);
            GET DIAGNOSTICS n = ROW_COUNT;
            IF n <> cardinality(j) THEN
                RAISE EXCEPTION 'crashsafe: a fencing token is stale' USING ERRCODE = 'CS001';
            END IF;
        END IF;
        IF a IS NOT NULL THEN
            INSERT INTO attempts (workflow_id, idx, attempt, step, started_at, ended_at,
                                  failure_class, error, delay, delay_source, next_at, note)
            SELECT u.workflow_id, u.idx, u.attempt, u.step, u.started_at, u.ended_at,
                   u.failure_class, u.error, u.delay, u.delay_source, u.next_at, u.note
            FROM unnest(a) AS u
            WHERE u.token IS NULL OR EXISTS (
                SELECT 1 FROM workflows w WHERE w.id = u.workflow_id AND w.token = u.token
                FOR SHARE)
            ON CONFLICT (workflow_id, idx, attempt) DO UPDATE SET step = EXCLUDED.step,
                started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at,
                failure_class = EXCLUDED.failure_class, error = EXCLUDED.error,
                delay = EXCLUDED.delay, delay_source = EXCLUDED.delay_source,
                next_at = EXCLUDED.next_at, note = EXCLUDED.note;
            GET DIAGNOSTICS n = ROW_COUNT;
            IF n <> cardinality(a) THEN
                RAISE EXCEPTION 'crashsafe: a fencing token is stale' USING ERRCODE = 'CS001';
            END IF;
        END IF;
        IF ef IS NOT NULL THEN
            UPDATE effects e SET state = 'done', output = u.output, error = u.error,
                                 expires_at = u.expires_at
            FROM unnest(ef) AS u
            WHERE e.key = u.key AND e.workflow_id = u.workflow_id AND e.idx = u.idx;
            DELETE FROM intents i USING unnest(ef) AS u
            WHERE i.workflow_id = u.workflow_id AND i.idx = u.idx;
        END IF;
        -- Status moves one by one, in order: one workflow may move twice in a group.
        FOREACH m IN ARRAY coalesce(mv, '{}') LOOP
            IF m.op = 'requeue' THEN
                UPDATE workflows SET status = 'enqueued', owner = NULL,
                                     not_before = m.at, reason = m.reason
                WHERE id = m.workflow_id AND owner = m.owner
                  AND status IN ('running', 'waiting')
                  AND (m.token IS NULL OR token = m.token);
            ELSIF m.op = 'mark' THEN
                UPDATE workflows SET status = m.status, reason = m.reason
                WHERE id = m.workflow_id AND owner = m.owner
                  AND status IN ('running', 'waiting')
                  AND (m.token IS NULL OR token = m.token);
            ELSE
                UPDATE workflows SET status = m.status, output = m.output,
                                     error = m.error, reason = m.reason, updated_at = m.at
                WHERE id = m.workflow_id AND owner = m.owner
                  AND (status IN ('running', 'waiting')
                       OR (status = 'cancelling' AND m.status = 'cancelled'))
                  AND (m.token IS NULL OR token = m.token);
            END IF;
            GET DIAGNOSTICS n = ROW_COUNT;
            IF n <> 1 THEN
                RAISE EXCEPTION 'crashsafe: workflow % is no longer running here',
                    m.workflow_id USING ERRCODE = 'CS002', DETAIL = m.workflow_id;
            END IF;
        END LOOP;
    END
    $body$;
    """,
    # v4: a dequeue is a single call too, for the same reason as v3: a worker paused
    # between its locking read and its update held rows the others skip.
    """
    CREATE FUNCTION dequeue_group(q text, new_owner text, lim integer, queue_limit integer,
                                  now double precision, lock_key bigint)
    RETURNS SETOF workflows LANGUAGE plpgsql AS $body$
    DECLARE
        take integer := lim;
        busy bigint;
    BEGIN
        IF queue_limit IS NOT NULL THEN
            -- Counting the queue's running workflows and taking more must not interleave
            -- with another worker doing the same, or both would fill the same slots.
            PERFORM pg_advisory_xact_lock(lock_key);
            SELECT count(*) INTO busy FROM workflows
            WHERE queue = q AND status IN ('running', 'waiting', 'cancelling');
            take := least(take, queue_limit - busy);
        END IF;
        IF take <= 0 THEN
            RETURN;
        END IF;
        RETURN QUERY
        UPDATE workflows w SET status = 'running', owner = new_owner, token = w.token + 1,
                               updated_at = now, reason = NULL
        FROM (SELECT id FROM workflows
              WHERE queue = q AND status = 'enqueued'
                AND (not_before IS NULL OR not_before <= now)
              ORDER BY priority DESC, created_at, id LIMIT take
              FOR UPDATE SKIP LOCKED) AS pick
        WHERE w.id = pick.id
        RETURNING w.*;
    END
    $body$;
    """,
]

NOW = "extract(epoch FROM clock_timestamp())::float8"
WF_COLS = (
    "id, name, version, status, inputs, output, error, owner, parent_id, created_at, "
    "updated_at, recovery_attempts, reason, recovery_mark, token, queue, priority, not_before, "
    "dedup_id"
)
INSERT_ENTRY = (
    "INSERT INTO journal (workflow_id, idx, kind, name, output, error, attempts, started_at, "
    "ended_at, note) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
CREATE = (f"INSERT INTO workflows ({WF_COLS}) "
          "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
# A write that carries a fencing token lands only while the workflow's token is still
# that one: the database itself refuses a stale worker, in the same statement. FOR
# SHARE makes a takeover (which updates the token) wait for this write's transaction,
# or this write see the new token, so a stale write never slips in beside a takeover.
FENCE = " WHERE EXISTS (SELECT 1 FROM workflows WHERE id = %s AND token = %s FOR SHARE)"
INSERT_ENTRY_FENCED = (
    "INSERT INTO journal (workflow_id, idx, kind, name, output, error, attempts, started_at, "
    "ended_at, note) SELECT %s, %s, %s, %s, %s::bytea, %s::bytea, %s, %s, %s, %s" + FENCE
)
# A workflow asked to cancel can only end cancelled (after its compensations); the
# status travels twice because the condition needs it again.
FINISH = (
    "UPDATE workflows SET status = %s, output = %s, error = %s, reason = %s, updated_at = %s "
    "WHERE id = %s AND owner = %s AND (status IN ('running', 'waiting') "
    "OR (status = 'cancelling' AND %s = 'cancelled')) AND (%s::bigint IS NULL OR token = %s)"
)
EFFECT_COLS = ("key, workflow_id, idx, step, args_hash, state, output, error, created_at, "
               "expires_at")
ATTEMPT_COLS = ("workflow_id, idx, attempt, step, started_at, ended_at, failure_class, error, "
                "delay, delay_source, next_at, note")
MARK_WAITING = (
    "UPDATE workflows SET status = %s, reason = %s "
    "WHERE id = %s AND status IN ('running', 'waiting') AND owner = %s "
    "AND (%s::bigint IS NULL OR token = %s)"
)

# A recovery sweep's claims in one statement (the same decision as base.decide_claim):
# the first claim of each id counts; rows a paused writer still locks are skipped, not
# waited on (the next sweep tries them again).
CLAIM = (
    "WITH wanted AS ("
    " SELECT DISTINCT ON (u.id) u.id, u.owner"
    " FROM unnest(%(ids)s::text[], %(owners)s::text[]) WITH ORDINALITY AS u(id, owner, n)"
    " ORDER BY u.id, u.n"
    "), locked AS ("
    " SELECT w.id, w.recovery_attempts, w.recovery_mark FROM workflows w"
    " JOIN wanted ON wanted.id = w.id"
    " WHERE w.owner IS NOT DISTINCT FROM wanted.owner"
    " AND w.status IN ('running', 'waiting', 'cancelling')"
    " ORDER BY w.id FOR UPDATE OF w SKIP LOCKED"
    "), decided AS ("
    " SELECT l.id, CASE WHEN c.len > l.recovery_mark THEN 1"
    " ELSE l.recovery_attempts + 1 END AS attempts, greatest(c.len, l.recovery_mark) AS mark"
    " FROM locked l CROSS JOIN LATERAL"
    " (SELECT count(*) AS len FROM journal j WHERE j.workflow_id = l.id) c"
    "), moved AS (UPDATE workflows w SET recovery_attempts = d.attempts, recovery_mark = d.mark,"
    f" updated_at = {NOW},"
    " status = CASE WHEN d.attempts > %(max)s THEN 'dead_letter' ELSE w.status END,"
    " owner = CASE WHEN d.attempts > %(max)s THEN NULL ELSE %(owner)s END,"
    " reason = CASE WHEN d.attempts > %(max)s THEN %(reason)s ELSE w.reason END,"
    " token = CASE WHEN d.attempts > %(max)s THEN w.token ELSE w.token + 1 END"
    " FROM decided d WHERE w.id = d.id"
    " RETURNING " + ", ".join(f"w.{c}" for c in WF_COLS.split(", ")) + ") "
    # Rows this executor owns already: a retry after a lost reply finds its own claims.
    f"SELECT {WF_COLS} FROM moved UNION ALL "
    "SELECT " + ", ".join(f"w.{c}" for c in WF_COLS.split(", ")) + " FROM workflows w"
    " JOIN wanted ON wanted.id = w.id WHERE w.owner = %(owner)s"
    " AND w.status IN ('running', 'waiting', 'cancelling')"
)
DEQUEUE = f"SELECT {WF_COLS} FROM dequeue_group(%s, %s, %s, %s, %s, %s)"

CONFLICT_RETRIES = 5
"""Serialization failures and deadlocks retried inside one call before giving up."""
CONFLICT_STATES = ("40001", "40P01")
OUTCOME_WAIT = 10.0
"""Seconds to wait for a transaction whose COMMIT outcome is unknown to finish on the
server (its backend may still be running) before reporting the store unavailable."""

_DEFAULT_SCHEMA = "crashsafe"
_OWN_OPTIONS = ("schema", "pool_min", "pool_max", "pool_timeout", "connect_timeout",
                "idle_tx_timeout")
_LIBPQ_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "application_name")
_KNOWN = ("schema=NAME, pool_min=N, pool_max=N, pool_timeout=SECONDS, "
          "connect_timeout=SECONDS, idle_tx_timeout=SECONDS, and libpq's sslmode, "
          "sslrootcert, sslcert, sslkey, application_name")


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
    idle_tx_timeout: float = 30.0
    """The server ends a session that sits inside a transaction this long waiting on
    its client (a paused or hung worker), freeing its locks; 0: never."""


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
        idle_tx_timeout=_seconds_option(options, "idle_tx_timeout", 30.0, shown,
                                        zero_ok=True),
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


def _seconds_option(options: dict[str, str], name: str, default: float, shown: str, *,
                    zero_ok: bool = False) -> float:
    try:
        value = float(options.get(name, default))
    except ValueError:
        value = 0.0
    if not (value > 0 or (zero_ok and value == 0)):
        what = "0 or a positive" if zero_ok else "a positive"
        raise ConfigurationError(f"{name} in {shown!r} must be {what} number of seconds")
    return value


# -- errors ---------------------------------------------------------------------------
def message(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def is_lost(exc: psycopg.Error) -> bool:
    """The connection is gone (terminated, server restarted, network cut)."""
    state = exc.sqlstate or ""
    # 25P03: the server ended a session left idle inside a transaction (idle_tx_timeout).
    if state.startswith(("08", "57P")) or state == "25P03":
        return True
    # libpq reports a socket that closed under it without any SQLSTATE.
    return isinstance(exc, psycopg.OperationalError) and not state


def is_conflict(exc: psycopg.Error) -> bool:
    return (exc.sqlstate or "") in CONFLICT_STATES


def translate(exc: psycopg.Error, doing: str) -> StoreError:
    msg = message(exc)
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
    if state in CONFLICT_STATES:
        return StoreConflictError(
            f"{doing}: other writers kept conflicting with this one ({msg}); retry"
        )
    if is_lost(exc):
        return StoreUnavailableError(
            f"{doing}: lost the connection to PostgreSQL ({msg}); check that the server is "
            "up and reachable, then retry"
        )
    if state == "25006":
        return StoreError(f"{doing}: the database is read-only ({msg}); point the URL at "
                          "the primary server")
    if state == "42501":
        return StoreError(f"{doing}: permission denied ({msg}); grant the database user "
                          "the rights on crashsafe's schema")
    return StoreError(f"{doing}: {msg}")


def lock_id(space: str, name: str) -> int:
    """A stable 64-bit advisory lock key for ``name`` within ``space``."""
    digest = hashlib.blake2b(f"crashsafe:{space}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def rollback_quietly(conn: Conn) -> None:
    if conn.closed or conn.broken:
        return
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            pass  # the pool discards a connection it cannot reset


def stale(rows: Sequence[tuple[Any, ...]]) -> WorkflowNotRunning:
    """A fenced write refused: its workflow's token moved on. ``rows`` hold the fenced
    rows, workflow id first and token last."""
    fenced = {(r[0], r[-1]) for r in rows if r[-1] is not None}
    if len(fenced) == 1:
        return WorkflowNotRunning(*fenced.pop())
    return WorkflowNotRunning("?")


def row_to_workflow(row: Sequence[Any]) -> WorkflowRecord:
    return WorkflowRecord(
        id=row[0], name=row[1], version=row[2], status=Status(row[3]), inputs=row[4],
        output=row[5], error=row[6], owner=row[7], parent_id=row[8], created_at=row[9],
        updated_at=row[10], recovery_attempts=row[11], reason=row[12], recovery_mark=row[13],
        token=row[14], queue=row[15], priority=row[16], not_before=row[17], dedup_id=row[18],
    )


def workflow_row(r: WorkflowRecord) -> tuple[Any, ...]:
    return (r.id, r.name, r.version, r.status.value, r.inputs, r.output, r.error, r.owner,
            r.parent_id, r.created_at, r.updated_at, r.recovery_attempts, r.reason,
            r.recovery_mark, r.token, r.queue, r.priority, r.not_before, r.dedup_id)


def entry_row(e: JournalEntry) -> tuple[Any, ...]:
    return (e.workflow_id, e.index, e.kind, e.name, e.output, e.error, e.attempts,
            e.started_at, e.ended_at, e.note)


# One group commit is one call: the server runs the whole transaction without the
# client (see migration v3). Composite rows travel as bound parameters.
COMMIT_GROUP = ("SELECT commit_group(%s::workflows[], %s::commit_entry[], "
                "%s::commit_attempt[], %s::commit_effect[], %s::commit_move[])")
STALE_FENCE = "CS001"
"""SQLSTATE commit_group raises for a write whose fencing token is stale."""
NOT_RUNNING = "CS002"
"""SQLSTATE commit_group raises for a status move of a workflow no longer running here."""


@dataclass(slots=True)
class Rows:
    """One group commit's ops, as the composite rows ``commit_group`` takes."""

    creates: list[tuple[Any, ...]]
    entries: list[tuple[Any, ...]]
    """Journal rows, then the fencing token (None: not fenced)."""
    attempts: list[tuple[Any, ...]]
    """Attempt rows, then the fencing token (None: not fenced)."""
    effects: list[tuple[Any, ...]]
    moves: list[tuple[Any, ...]]
    """Status moves in op order: (op, workflow id, owner, token, status, output, error,
    reason, at) with op one of requeue, mark, finish."""

    @classmethod
    def collect(cls, batches: Sequence[Sequence[Op]]) -> Rows:
        rows = cls([], [], [], [], [])
        for ops in batches:
            for op in ops:
                rows._add(op)
        return rows

    def _add(self, op: Op) -> None:
        if type(op) is JournalEntry:
            self.entries.append((*entry_row(op), op.token))
        elif isinstance(op, FinishWorkflow):
            self.moves.append(("finish", op.workflow_id, op.owner, op.token, op.status.value,
                               op.output, op.error, op.reason, op.at))
        elif isinstance(op, CompleteEffect):
            self.effects.append((op.key, op.workflow_id, op.index, op.output, op.error,
                                 op.expires_at))
        elif isinstance(op, AttemptRecord):
            self.attempts.append((op.workflow_id, op.index, op.attempt, op.step,
                                  op.started_at, op.ended_at, op.failure_class, op.error,
                                  op.delay, op.delay_source, op.next_at, op.note, op.token))
        elif isinstance(op, MarkWaiting):
            self.moves.append(("mark", op.workflow_id, op.owner, op.token,
                               "running" if op.reason is None else "waiting", None, None,
                               op.reason, None))
        elif isinstance(op, CreateWorkflow):
            self.creates.append(workflow_row(op.record))
        elif isinstance(op, Requeue):
            self.moves.append(("requeue", op.workflow_id, op.owner, op.token, "enqueued",
                               None, None, op.reason, op.not_before))
        else:  # an op this store does not know yet must not vanish silently
            raise TypeError(f"the PostgreSQL store cannot apply {type(op).__name__} yet")

    def params(self) -> tuple[list[tuple[Any, ...]] | None, ...]:
        """``COMMIT_GROUP``'s parameters (None for an empty group: less to send)."""
        return (self.creates or None, self.entries or None, self.attempts or None,
                self.effects or None, self.moves or None)

    def single(self) -> bool:
        """One plain statement and nothing else: it can be its own transaction."""
        lone_move = len(self.moves) == 1 and self.moves[0][0] != "requeue"
        return (len(self.creates) + len(self.entries) + lone_move == 1
                and len(self.moves) == lone_move and not self.effects
                and not self.attempts)


class TransactionCursor:
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


def backoff(tries: int) -> None:
    """Sleep a little before retrying a deadlock or serialization failure."""
    time.sleep(random.uniform(0.005, 0.02) * 2 ** tries)
