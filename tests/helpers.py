"""Test helpers shared by the suite: test databases, app factories, polling."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import crashsafe
from crashsafe.stores import MemoryStore, Store
from crashsafe.stores.sqlite import SQLiteStore

STORE_KINDS = ["memory", "sqlite"]


class Database:
    """One test database; each :meth:`connect` opens another store object on it."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.path = directory / f"crashsafe-{uuid.uuid4().hex[:8]}.db"
        self.url = "memory://" if kind == "memory" else f"sqlite:///{self.path}"
        self._memory = MemoryStore() if kind == "memory" else None
        self._opened: list[Store] = []

    def connect(self) -> Store:
        if self._memory is not None:
            return self._memory
        store = SQLiteStore(self.url)
        self._opened.append(store)
        return store

    def close(self) -> None:
        for store in self._opened:
            try:
                store.close()
            except Exception:  # a daemon thread of a crashed app may still hold it
                pass
        self._opened.clear()


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
