"""What only the SQLite store does: pragmas, schema versions, group commit, several
processes on one file, a full disk. All through the real sqlite3 module on real files."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import crashsafe
from crashsafe import (
    App,
    ConfigurationError,
    Status,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from crashsafe.stores import ListFilter, WorkflowRecord
from crashsafe.stores.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore
from sqlite_mp_worker import STEPS, expected

WORKER = Path(__file__).with_name("sqlite_mp_worker.py")


def url_for(path: Path, query: str = "") -> str:
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


def pragma(conn: sqlite3.Connection, name: str) -> Any:
    return conn.execute(f"PRAGMA {name}").fetchone()[0]


def record(wid: str) -> WorkflowRecord:
    return WorkflowRecord(wid, "flow", "1", Status.RUNNING, b"{}", 1.0, 1.0, owner="ex")


# -- opening ------------------------------------------------------------------------------
@pytest.mark.parametrize(("query", "level", "name"), [("", 2, "full"),
                                                     ("synchronous=normal", 1, "normal"),
                                                     ("synchronous=FULL", 2, "full")])
def test_wal_and_synchronous_pragmas_are_set(tmp_path: Path, query: str, level: int,
                                             name: str) -> None:
    store = SQLiteStore(url_for(tmp_path / "p.db", query))
    try:
        assert store.synchronous == name
        for conn in (store._w, store._r):
            assert pragma(conn, "journal_mode") == "wal"
            assert pragma(conn, "synchronous") == level
    finally:
        store.close()
    raw = sqlite3.connect(tmp_path / "p.db")
    try:
        assert pragma(raw, "journal_mode") == "wal"  # persistent in the file
    finally:
        raw.close()


def test_schema_is_created_once_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "schema.db"
    store = SQLiteStore(url_for(path))
    store.create_workflow(record("kept"))
    store.close()
    raw = sqlite3.connect(path)
    try:
        assert pragma(raw, "user_version") == SCHEMA_VERSION
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"workflows", "journal", "executors"} <= tables
    finally:
        raw.close()
    again = SQLiteStore(url_for(path))  # reopening migrates nothing and keeps the data
    try:
        assert again.get_workflow("kept") == record("kept")
    finally:
        again.close()


def test_an_older_schema_is_migrated_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    raw = sqlite3.connect(path)
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    raw.execute(
        "INSERT INTO workflows (id, name, version, status, inputs, created_at, updated_at, "
        "owner, recovery_attempts) VALUES ('old', 'flow', '1', 'running', x'7b7d', 1.0, 1.0, "
        "'ex', 2)"
    )
    raw.execute(
        "INSERT INTO journal VALUES ('old', 0, 'step', 's', x'31', NULL, 1, 1.0, 2.0)"
    )
    raw.commit()
    raw.close()
    store = SQLiteStore(url_for(path))
    try:
        rec = store.get_workflow("old")
        assert rec is not None
        assert (rec.status, rec.owner, rec.recovery_attempts, rec.inputs) == (
            Status.RUNNING, "ex", 2, b"{}")
        assert [e.output for e in store.load_journal("old")] == [b"1"]
    finally:
        store.close()
    raw = sqlite3.connect(path)
    try:
        assert pragma(raw, "user_version") == SCHEMA_VERSION
        assert pragma(raw, "integrity_check") == "ok"
    finally:
        raw.close()


def test_newer_schema_version_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE future_thing (x)")
    raw.execute("PRAGMA user_version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(ConfigurationError) as info:
        SQLiteStore(url_for(path))
    message = str(info.value)
    assert "99" in message
    assert str(SCHEMA_VERSION) in message
    assert "upgrade crashsafe" in message
    raw = sqlite3.connect(path)
    try:
        assert pragma(raw, "user_version") == 99
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"future_thing"}  # nothing was created or changed
    finally:
        raw.close()


def test_a_file_that_is_not_a_database_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    with pytest.raises(StoreUnavailableError, match="not a usable SQLite database"):
        SQLiteStore(url_for(path))
    assert path.read_bytes() == b"these are my notes, not a database\n" * 200
    with pytest.raises(StoreUnavailableError):
        _ = App(url_for(path)).store


def test_an_empty_file_becomes_a_database(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    store = SQLiteStore(url_for(path))
    try:
        store.create_workflow(record("w"))
        assert store.get_workflow("w") is not None
    finally:
        store.close()


def test_errors_after_close_are_translated(tmp_path: Path) -> None:
    store = SQLiteStore(url_for(tmp_path / "closed.db"))
    store.close()
    with pytest.raises(StoreError):
        store.get_workflow("w")
    with pytest.raises(StoreError):
        store.create_workflow(record("w"))


def test_writers_wait_on_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    SQLiteStore(url_for(path)).close()
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    impatient = SQLiteStore(url_for(path, "busy_timeout=0.2"))
    patient = SQLiteStore(url_for(path))
    try:
        blocker.execute("BEGIN IMMEDIATE")
        start = time.monotonic()
        with pytest.raises(StoreError, match="locked") as info:
            impatient.create_workflow(record("a"))
        assert not isinstance(info.value, sqlite3.Error)
        assert time.monotonic() - start >= 0.15

        threading.Timer(0.3, lambda: blocker.execute("COMMIT")).start()
        start = time.monotonic()
        patient.create_workflow(record("b"))  # waits for the lock instead of failing
        assert time.monotonic() - start >= 0.2
        assert patient.get_workflow("b") is not None
        assert impatient.get_workflow("a") is None  # the failed write left nothing
    finally:
        impatient.close()
        patient.close()
        blocker.close()


# -- group commit -------------------------------------------------------------------------
def test_group_commit_batches_concurrent_async_workflows(tmp_path: Path) -> None:
    app = App(url_for(tmp_path / "group.db"))
    go = threading.Event()
    try:
        @app.step(name="gate")
        async def gate() -> None:
            while not go.is_set():
                await asyncio.sleep(0.002)

        @app.step(name="work")
        async def work(i: int, j: int) -> int:
            return i * 100 + j

        @app.workflow(name="many")
        async def many(i: int) -> int:
            await gate()
            total = 0
            for j in range(5):
                total += await work(i, j)
            return total

        handles = [app.start(many, i, workflow_id=f"g{i:02d}") for i in range(50)]
        committer = app._committer
        tx0, writes0 = committer.transactions, committer.batched_writes
        go.set()
        assert [h.result(timeout=30) for h in handles] == [i * 500 + 10 for i in range(50)]
        transactions = committer.transactions - tx0
        writes = committer.batched_writes - writes0
        assert writes == 50 * 7  # gate + 5 steps + the finish, per workflow
        assert transactions * 4 <= writes, f"{transactions} transactions for {writes} writes"
        for i in (0, 49):
            assert len(app.journal(f"g{i:02d}")) == 6
        assert len(app.list_workflows(status=Status.SUCCEEDED, limit=100)) == 50
    finally:
        go.set()
        app.close()


# -- several processes on one file --------------------------------------------------------
def test_four_processes_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    go = tmp_path / "go"
    count = 12
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), url_for(path), str(p), str(count), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for p in range(4)
    ]
    go.touch()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        outputs.append((proc.returncode, out, err))
    for returncode, _, err in outputs:
        assert "locked" not in err
        assert returncode == 0, err
    for p, (_, out, _) in enumerate(outputs):
        assert json.loads(out) == {f"p{p}-w{i}": expected(p, i) for i in range(count)}

    store = SQLiteStore(url_for(path))
    try:
        rows = store.list_workflows(ListFilter(limit=1000))
        assert len(rows) == 4 * count
        assert {r.status for r in rows} == {Status.SUCCEEDED}
        assert all(r.recovery_attempts == 0 for r in rows)  # nobody stole a live workflow
        for r in rows:
            assert [e.index for e in store.load_journal(r.id)] == list(range(STEPS))
    finally:
        store.close()
    raw = sqlite3.connect(path)
    try:
        assert pragma(raw, "integrity_check") == "ok"
    finally:
        raw.close()


# -- full disk ----------------------------------------------------------------------------
def test_full_disk_fails_the_commit_and_the_workflow_recovers(tmp_path: Path) -> None:
    path = tmp_path / "full.db"
    store = SQLiteStore(url_for(path))
    big = os.urandom(100_000).hex()  # incompressible: sealing cannot shrink it into the page
    filled = threading.Event()
    seen: list[BaseException] = []

    def register(app: App, fill: bool) -> Any:
        @app.step(name="small")
        def small() -> int:
            return 1

        @app.step(name="big")
        def big_step() -> str:
            if fill and not filled.is_set():
                filled.set()
                with store._wlock:  # the writer connection is the store's to lock
                    pages = pragma(store._w, "page_count")
                    store._w.execute(f"PRAGMA max_page_count = {pages}")
            return big

        @app.workflow(name="w")
        def w() -> int:
            a = small()
            try:
                b = big_step()
            except StoreFullError as exc:
                seen.append(exc)
                raise
            return a + len(b)

        return w

    first = App(store=store)
    try:
        first.start(register(first, fill=True), workflow_id="full-1")
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(seen) == 1
        assert "full" in str(seen[0])
        deadline = time.monotonic() + 10
        while first._executions and time.monotonic() < deadline:
            time.sleep(0.01)

        rec = store.get_workflow("full-1")
        assert rec is not None
        assert rec.status is Status.RUNNING
        journal = first.store.load_journal("full-1")  # the sealed view: payloads opened
        assert [(e.index, e.name) for e in journal] == [(0, "small")]
        assert crashsafe._codec.decode(journal[0].output or b"") == 1
        raw = sqlite3.connect(path)
        try:
            assert pragma(raw, "integrity_check") == "ok"
        finally:
            raw.close()

        with store._wlock:
            store._w.execute("PRAGMA max_page_count = 1073741823")
    finally:
        first.close()
        store.close()

    second = App(url_for(path))
    try:
        register(second, fill=False)
        (handle,) = second.recover()
        assert handle.result(timeout=10) == 1 + len(big)
        assert [e.name for e in second.journal("full-1")] == ["small", "big"]
    finally:
        second.close()
