"""Transactional steps: a step's own writes and its journal entry in one transaction.

``@app.transaction()`` marks a sync function whose first parameter receives a
database connection to the *journal's* database (the SQLite file, or the PostgreSQL
database with ``%s`` placeholders). Its writes commit in the same
transaction as the step's result, so they happen exactly once: a crash before the
commit rolls both back and the step runs again; after it, replay returns the result
and the function does not run.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from .exceptions import ConfigurationError, NotInWorkflowError


class TransactionConnection:
    """The connection a transactional step receives: the journal's open transaction.

    ``execute`` and ``executemany`` work as on :class:`sqlite3.Connection` (on
    PostgreSQL they take ``%s`` placeholders and return a psycopg cursor); committing,
    rolling back, closing and ``executescript`` (which commits) are refused, because
    crashsafe commits the step's writes together with its result.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any]) -> sqlite3.Cursor:
        return self._conn.executemany(sql, seq_of_parameters)

    def _refuse(self, *_: Any) -> None:
        raise NotInWorkflowError(
            "a transactional step must not commit, roll back or close the connection: "
            "crashsafe commits its writes together with the step's result"
        )

    commit = rollback = close = executescript = _refuse


def check(fn: Any, is_async: bool, name: str) -> None:
    if is_async:
        raise ConfigurationError(
            f"transactional step {name!r} must be a plain def: it runs inside the "
            "journal's transaction, which an await could hold open"
        )


def unsupported(store: Any, name: str) -> ConfigurationError:
    return ConfigurationError(
        f"transactional step {name!r} needs a store that can share its transaction "
        f"(the SQLite or PostgreSQL store); {store.url!r} cannot"
    )
