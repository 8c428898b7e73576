"""The lease race's two witnesses, shared by the runner and its workers.

* :class:`Ledger`: what the step bodies themselves saw and did, written by the
  workers into a store crashsafe never touches (a separate SQLite file in WAL mode, or
  a separate PostgreSQL schema): every body execution with the fencing token its run
  believed it held, every keyed effect applied (``INSERT ... ON CONFLICT DO NOTHING``
  on the idempotency key: the receiver honours keys) or refused as a repeat, every
  (re)start of a workflow function, every run that ended without success.
* :func:`install_audit`: triggers on crashsafe's own ``journal`` and ``workflows``
  tables that copy, **inside the writing transaction**, the workflow's token and owner
  at the instant a journal row was inserted, and every change of a workflow's status,
  owner or token (the takeover history). The database is the only place where "the
  writer held the current token at the time" can be observed exactly: the store's
  fenced insert share-locks the workflow row, so the trigger reads the same token the
  fence checked. The audit tables live in the ledger schema on PostgreSQL; on SQLite a
  trigger can only write to its own file, so they are ``race_audit_*`` tables beside
  crashsafe's.

SQL is written with ``?`` placeholders and translated for psycopg.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

LEDGER_TABLES = [
    # One row per step body execution (at-least-once: duplicates allowed).
    "CREATE TABLE IF NOT EXISTS bodies (workflow_id TEXT NOT NULL, idx INTEGER NOT NULL, "
    "attempt INTEGER, executor TEXT NOT NULL, pid INTEGER NOT NULL, token INTEGER, "
    "run TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
    # The receiver of the keyed effect: one row per key, ever.
    "CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, workflow_id TEXT NOT NULL, "
    "idx INTEGER NOT NULL, value BIGINT NOT NULL, executor TEXT NOT NULL, "
    "pid INTEGER NOT NULL, token INTEGER, run TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
    # A repeated key the receiver refused (a duplicate body reaching the effect).
    "CREATE TABLE IF NOT EXISTS effect_repeats (key TEXT NOT NULL, value BIGINT NOT NULL, "
    "executor TEXT NOT NULL, pid INTEGER NOT NULL, token INTEGER, run TEXT NOT NULL, "
    "at DOUBLE PRECISION NOT NULL)",
    # Every start of a workflow function in some process (a dequeue, a takeover, a resume).
    "CREATE TABLE IF NOT EXISTS runs (workflow_id TEXT NOT NULL, executor TEXT NOT NULL, "
    "pid INTEGER NOT NULL, token INTEGER, at DOUBLE PRECISION NOT NULL)",
    # Every run that ended otherwise than "ok" (a refused stale write ends as "aborted").
    "CREATE TABLE IF NOT EXISTS outcomes (workflow_id TEXT NOT NULL, executor TEXT NOT NULL, "
    "pid INTEGER NOT NULL, token INTEGER, kind TEXT NOT NULL, error_type TEXT, "
    "stale_token INTEGER, message TEXT, at DOUBLE PRECISION NOT NULL)",
    # A worker's background thread was late: a heartbeat gap, or a slow sweep or poll.
    "CREATE TABLE IF NOT EXISTS stalls (executor TEXT NOT NULL, pid INTEGER NOT NULL, "
    "what TEXT NOT NULL, seconds DOUBLE PRECISION NOT NULL, at DOUBLE PRECISION NOT NULL)",
    # What the runner did to the workers: spawn, ready, kill, stop, cont, term, exit.
    "CREATE TABLE IF NOT EXISTS events (kind TEXT NOT NULL, worker INTEGER NOT NULL, "
    "pid INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL, detail TEXT)",
]


@dataclass(frozen=True)
class Location:
    """Where a database lives: a SQLite file or a PostgreSQL schema."""

    kind: str  # "sqlite" | "postgres"
    url: str
    """As crashsafe takes it (``sqlite:///...`` or ``postgresql://...?schema=...``)."""
    path: Path | None = None
    conninfo: str | None = None
    """For psycopg: the URL without crashsafe's own options."""
    schema: str | None = None

    @staticmethod
    def parse(url: str) -> Location:
        if url.startswith("sqlite:///"):
            return Location("sqlite", url, path=Path(url[len("sqlite:///"):]))
        if url.startswith(("postgresql://", "postgres://")):
            parts = urlsplit(url)
            query = dict(parse_qsl(parts.query))
            schema = query.pop("schema", "crashsafe")
            for opt in ("pool_min", "pool_max", "pool_timeout"):
                query.pop(opt, None)
            conninfo = urlunsplit(parts._replace(query=urlencode(query)))
            return Location("postgres", url, conninfo=conninfo, schema=schema)
        raise ValueError(f"not a sqlite:/// or postgresql:// URL: {url!r}")

    def connect(self) -> Any:
        """A plain autocommit connection (``sqlite3`` or ``psycopg``)."""
        if self.kind == "sqlite":
            assert self.path is not None
            conn = sqlite3.connect(str(self.path), timeout=120, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=120000")
            return conn
        import psycopg

        return psycopg.connect(self.conninfo or "", autocommit=True, connect_timeout=20)


def _q(sql: str, kind: str) -> str:
    return sql.replace("?", "%s") if kind == "postgres" else sql


def quote_ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"unexpected identifier {name!r}")
    return f'"{name}"'


class Ledger:
    """The independent witness (see the module documentation). Thread-safe."""

    def __init__(self, url: str, *, create: bool = False) -> None:
        self.loc = Location.parse(url)
        self.kind = self.loc.kind
        self.conn = self.loc.connect()
        self.lock = threading.Lock()
        if self.kind == "sqlite":
            self.conn.execute("PRAGMA journal_mode=WAL")
            # Survives a SIGKILL of the writer (the OS keeps what was written); the
            # ledger does not have to survive power loss.
            self.conn.execute("PRAGMA synchronous=NORMAL")
        else:
            schema = quote_ident(self.loc.schema or "")
            if create:
                self.conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            self.conn.execute(f"SET search_path TO {schema}")
            # Committed rows survive the client's death either way; only a server crash
            # could lose the last ones, which this campaign does not cause.
            self.conn.execute("SET synchronous_commit TO off")
        if create:
            for ddl in LEDGER_TABLES:
                self.conn.execute(ddl)

    def _exec(self, sql: str, params: tuple[Any, ...]) -> int:
        with self.lock:
            cur = self.conn.execute(_q(sql, self.kind), params)
            return int(cur.rowcount)

    # -- written by the workers ------------------------------------------------------
    def body(self, wid: str, idx: int, attempt: int | None, executor: str, pid: int,
             token: int | None, run: str) -> None:
        self._exec("INSERT INTO bodies VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (wid, idx, attempt, executor, pid, token, run, time.time()))

    def effect(self, key: str, wid: str, idx: int, value: int, executor: str, pid: int,
               token: int | None, run: str) -> bool:
        """Apply the keyed effect once per key; False when the key was seen before."""
        at = time.time()
        applied = self._exec(
            "INSERT INTO effects VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (key) DO NOTHING",
            (key, wid, idx, value, executor, pid, token, run, at)) == 1
        if not applied:
            self._exec("INSERT INTO effect_repeats VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (key, value, executor, pid, token, run, at))
        return applied

    def run(self, wid: str, executor: str, pid: int, token: int | None) -> None:
        self._exec("INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                   (wid, executor, pid, token, time.time()))

    def outcome(self, wid: str, executor: str, pid: int, token: int | None, kind: str,
                error_type: str | None, stale_token: int | None, message: str) -> None:
        self._exec("INSERT INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (wid, executor, pid, token, kind, error_type, stale_token, message,
                    time.time()))

    def stall(self, executor: str, pid: int, what: str, seconds: float, at: float) -> None:
        self._exec("INSERT INTO stalls VALUES (?, ?, ?, ?, ?)", (executor, pid, what, seconds, at))

    # -- written and read by the runner ------------------------------------------------
    def event(self, kind: str, worker: int, pid: int, at: float, detail: str = "") -> None:
        self._exec("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (kind, worker, pid, at, detail))

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return [tuple(r) for r in self.conn.execute(_q(sql, self.kind), params).fetchall()]

    def close(self) -> None:
        with self.lock:
            self.conn.close()


# -- the database audit ---------------------------------------------------------------
_PG_AUDIT = """
CREATE TABLE {a}.audit_journal (
    seq bigserial PRIMARY KEY, workflow_id text, idx integer, op text,
    db_token bigint, db_owner text, at double precision);
CREATE TABLE {a}.audit_workflows (
    seq bigserial PRIMARY KEY, workflow_id text, op text, old_status text, new_status text,
    old_owner text, new_owner text, old_token bigint, new_token bigint,
    output_set boolean, at double precision);
CREATE FUNCTION {a}.audit_journal_fn() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {a}.audit_journal (workflow_id, idx, op, db_token, db_owner, at)
        VALUES (NEW.workflow_id, NEW.idx, 'insert',
                (SELECT w.token FROM {cs}.workflows w WHERE w.id = NEW.workflow_id),
                (SELECT w.owner FROM {cs}.workflows w WHERE w.id = NEW.workflow_id),
                extract(epoch FROM clock_timestamp()));
    ELSE
        INSERT INTO {a}.audit_journal (workflow_id, idx, op, at)
        VALUES (OLD.workflow_id, OLD.idx, lower(TG_OP), extract(epoch FROM clock_timestamp()));
    END IF;
    RETURN NULL;
END $fn$;
CREATE FUNCTION {a}.audit_workflows_fn() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {a}.audit_workflows (workflow_id, op, new_status, new_owner, new_token,
                                         output_set, at)
        VALUES (NEW.id, 'insert', NEW.status, NEW.owner, NEW.token, NEW.output IS NOT NULL,
                extract(epoch FROM clock_timestamp()));
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {a}.audit_workflows (workflow_id, op, old_status, old_owner, old_token, at)
        VALUES (OLD.id, 'delete', OLD.status, OLD.owner, OLD.token,
                extract(epoch FROM clock_timestamp()));
    ELSIF OLD.status IS DISTINCT FROM NEW.status OR OLD.owner IS DISTINCT FROM NEW.owner
          OR OLD.token IS DISTINCT FROM NEW.token OR OLD.output IS DISTINCT FROM NEW.output THEN
        INSERT INTO {a}.audit_workflows (workflow_id, op, old_status, new_status, old_owner,
                                         new_owner, old_token, new_token, output_set, at)
        VALUES (NEW.id, 'update', OLD.status, NEW.status, OLD.owner, NEW.owner, OLD.token,
                NEW.token, OLD.output IS DISTINCT FROM NEW.output,
                extract(epoch FROM clock_timestamp()));
    END IF;
    RETURN NULL;
END $fn$;
CREATE TRIGGER race_audit AFTER INSERT OR UPDATE OR DELETE ON {cs}.journal
    FOR EACH ROW EXECUTE FUNCTION {a}.audit_journal_fn();
CREATE TRIGGER race_audit AFTER INSERT OR UPDATE OR DELETE ON {cs}.workflows
    FOR EACH ROW EXECUTE FUNCTION {a}.audit_workflows_fn();
"""

_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_SQLITE_AUDIT = """
CREATE TABLE race_audit_journal (
    seq INTEGER PRIMARY KEY, workflow_id TEXT, idx INTEGER, op TEXT,
    db_token INTEGER, db_owner TEXT, at REAL);
CREATE TABLE race_audit_workflows (
    seq INTEGER PRIMARY KEY, workflow_id TEXT, op TEXT, old_status TEXT, new_status TEXT,
    old_owner TEXT, new_owner TEXT, old_token INTEGER, new_token INTEGER,
    output_set INTEGER, at REAL);
CREATE TRIGGER race_audit_journal_insert AFTER INSERT ON journal BEGIN
    INSERT INTO race_audit_journal (workflow_id, idx, op, db_token, db_owner, at)
    VALUES (NEW.workflow_id, NEW.idx, 'insert',
            (SELECT token FROM workflows WHERE id = NEW.workflow_id),
            (SELECT owner FROM workflows WHERE id = NEW.workflow_id), {now});
END;
CREATE TRIGGER race_audit_journal_update AFTER UPDATE ON journal BEGIN
    INSERT INTO race_audit_journal (workflow_id, idx, op, at)
    VALUES (OLD.workflow_id, OLD.idx, 'update', {now});
END;
CREATE TRIGGER race_audit_journal_delete AFTER DELETE ON journal BEGIN
    INSERT INTO race_audit_journal (workflow_id, idx, op, at)
    VALUES (OLD.workflow_id, OLD.idx, 'delete', {now});
END;
CREATE TRIGGER race_audit_workflows_insert AFTER INSERT ON workflows BEGIN
    INSERT INTO race_audit_workflows (workflow_id, op, new_status, new_owner, new_token,
                                      output_set, at)
    VALUES (NEW.id, 'insert', NEW.status, NEW.owner, NEW.token, NEW.output IS NOT NULL,
            {now});
END;
CREATE TRIGGER race_audit_workflows_delete AFTER DELETE ON workflows BEGIN
    INSERT INTO race_audit_workflows (workflow_id, op, old_status, old_owner, old_token, at)
    VALUES (OLD.id, 'delete', OLD.status, OLD.owner, OLD.token, {now});
END;
CREATE TRIGGER race_audit_workflows_update AFTER UPDATE ON workflows
WHEN OLD.status IS NOT NEW.status OR OLD.owner IS NOT NEW.owner
     OR OLD.token IS NOT NEW.token OR OLD.output IS NOT NEW.output BEGIN
    INSERT INTO race_audit_workflows (workflow_id, op, old_status, new_status, old_owner,
                                      new_owner, old_token, new_token, output_set, at)
    VALUES (NEW.id, 'update', OLD.status, NEW.status, OLD.owner, NEW.owner, OLD.token,
            NEW.token, OLD.output IS NOT NEW.output, {now});
END;
""".replace("{now}", _SQLITE_NOW)


class Audit:
    """Reads (and installs) the trigger-kept audit of crashsafe's tables."""

    def __init__(self, db: Location, ledger: Location) -> None:
        self.db = db
        self.ledger = ledger
        if db.kind == "sqlite":
            self.journal_table, self.workflows_table = "race_audit_journal", \
                "race_audit_workflows"
            self.where = db
        else:
            a = quote_ident(ledger.schema or "")
            self.journal_table, self.workflows_table = f"{a}.audit_journal", \
                f"{a}.audit_workflows"
            self.where = ledger

    def install(self) -> None:
        conn = self.where.connect() if self.db.kind == "postgres" else self.db.connect()
        try:
            if self.db.kind == "sqlite":
                conn.executescript(_SQLITE_AUDIT)
            else:
                conn.execute(_PG_AUDIT.format(a=quote_ident(self.ledger.schema or ""),
                                              cs=quote_ident(self.db.schema or "")))
        finally:
            conn.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = self.where.connect()
        try:
            sql = sql.format(journal=self.journal_table, workflows=self.workflows_table)
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        finally:
            conn.close()
