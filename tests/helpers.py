"""Test helpers shared by the suite: test databases, app factories, polling."""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import pytest

import crashsafe
from crashsafe.stores import MemoryStore, Store
from crashsafe.stores.postgres import PostgresStore
from crashsafe.stores.sqlite import SQLiteStore

STORE_KINDS = ["memory", "sqlite", "postgres"]

POSTGRES_URL = os.environ.get("CRASHSAFE_TEST_POSTGRES",
                              "postgresql://postgres@127.0.0.1:5432/test")
"""The one place the tests learn where PostgreSQL is; every test gets its own schema."""


@functools.cache
def _postgres_problem() -> str | None:
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=5).close()
    except psycopg.Error as exc:
        return " ".join(str(exc).split())
    return None


def require_postgres() -> None:
    """Fail the test, saying why and what to do, when the test server is unreachable."""
    problem = _postgres_problem()
    if problem is not None:
        pytest.fail(
            f"PostgreSQL at {POSTGRES_URL} is unreachable ({problem}). The postgres tests "
            "need a running server: start it (.ci/run does), or point "
            "CRASHSAFE_TEST_POSTGRES at one. They are never skipped.",
            pytrace=False,
        )


def postgres_url(schema: str, **options: object) -> str:
    """:data:`POSTGRES_URL` on ``schema``; its connections are named after the schema
    (``application_name``) so :func:`drop_postgres_schema` can find and end them."""
    require_postgres()
    query = "&".join([f"schema={schema}", f"application_name={schema}",
                      *(f"{k}={v}" for k, v in options.items())])
    return f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}{query}"


def new_postgres_schema() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def drop_postgres_schema(schema: str) -> None:
    """End every connection still using ``schema`` (a crashed app's, say), then drop it."""
    require_postgres()
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = %s AND pid != pg_backend_pid()", (schema,))
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            psycopg.sql.Identifier(schema)))


class Database:
    """One test database; each :meth:`connect` opens another store object on it."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.path = directory / f"crashsafe-{uuid.uuid4().hex[:8]}.db"
        self.schema = new_postgres_schema() if kind == "postgres" else None
        if kind == "memory":
            self.url = "memory://"
        elif self.schema is not None:
            self.url = postgres_url(self.schema)
        else:
            self.url = f"sqlite:///{self.path}"
        self._memory = MemoryStore() if kind == "memory" else None
        self._opened: list[Store] = []

    def connect(self) -> Store:
        if self._memory is not None:
            return self._memory
        store: Store = PostgresStore(self.url) if self.kind == "postgres" \
            else SQLiteStore(self.url)
        self._opened.append(store)
        return store

    def close(self) -> None:
        for store in self._opened:
            try:
                store.close()
            except Exception:  # a daemon thread of a crashed app may still hold it
                pass
        self._opened.clear()
        if self.schema is not None:
            drop_postgres_schema(self.schema)


class AppFactory:
    """Makes apps bound to one :class:`Database` and closes them all at teardown."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.apps: list[crashsafe.App] = []

    def __call__(self, **kwargs: Any) -> crashsafe.App:
        app = crashsafe.App(store=self.db.connect(), **kwargs)
        self.apps.append(app)
        return app

    def close(self) -> None:
        for app in reversed(self.apps):
            app.close(timeout=1.0)
        self.apps.clear()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate!r}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def wait_idle(app: crashsafe.App, timeout: float = 10.0) -> None:
    """Wait until ``app`` runs no workflow any more (for example after a simulated crash)."""
    wait_until(lambda: not app._executions, timeout, f"app {app.executor_id} to go idle")
