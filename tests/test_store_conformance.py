"""Run the Store conformance checks against every backend in this version."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from crashsafe.stores import MemoryStore, Store
from crashsafe.stores.sqlite import SQLiteStore
from store_conformance import CHECKS, Check


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_memory_store(check: Check) -> None:
    check(MemoryStore)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_sqlite_store(check: Check, tmp_path: Path) -> None:
    counter = itertools.count()

    def factory() -> Store:
        return SQLiteStore(f"sqlite:///{tmp_path}/conformance-{next(counter)}.db")

    check(factory)


def test_every_check_is_collected() -> None:
    assert len(CHECKS) >= 20
    assert len({c.__name__ for c in CHECKS}) == len(CHECKS)
