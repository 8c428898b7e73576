"""Shared fixtures: every engine test runs against the memory store, a real SQLite file
and a real PostgreSQL server (a fresh schema per test).

``make_store()`` returns a *new connection* to this test's database each time it is
called (for memory, the one shared ``MemoryStore``), so a test can give a crashed
app and its successor separate store objects, as two processes would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import crashsafe
from crashsafe.stores import Store
from helpers import STORE_KINDS, AppFactory, Database


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def database(store_kind: str, tmp_path: Path) -> Iterator[Database]:
    db = Database(store_kind, tmp_path)
    yield db
    db.close()


@pytest.fixture
def store_url(database: Database) -> str:
    """A URL naming this test's database (``memory://`` opens a fresh empty store)."""
    return database.url


@pytest.fixture
def make_store(database: Database) -> Callable[[], Store]:
    """A new store object on this test's database (the same one, for memory)."""
    return database.connect


@pytest.fixture
def make_app(database: Database) -> Iterator[AppFactory]:
    """``make_app(**App kwargs)``: an App on this test's database, closed at teardown."""
    factory = AppFactory(database)
    yield factory
    factory.close()


@pytest.fixture
def app(make_app: AppFactory) -> crashsafe.App:
    """One App on this test's database."""
    return make_app()
