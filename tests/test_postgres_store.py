"""What only the PostgreSQL store has: its URL, schemas, migrations, the server's clock,
and dropped connections (``pg_terminate_backend``), COMMIT included.

Everything runs against the real server named by ``CRASHSAFE_TEST_POSTGRES`` (see
``helpers.py``); nothing here is mocked or skipped.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

import crashsafe
from crashsafe import _faults
from crashsafe.exceptions import (
    ConfigurationError,
    StoreConflictError,
    StoreFullError,
    StoreUnavailableError,
)
from crashsafe.stores import JournalEntry, open_store
from crashsafe.stores._postgres_sql import is_lost, translate
from crashsafe.stores.base import CreateWorkflow, FinishWorkflow, Status, WorkflowRecord
from crashsafe.stores.postgres import SCHEMA_VERSION, PostgresStore, parse_postgres_url, redact
from helpers import (
    POSTGRES_URL,
    drop_postgres_schema,
    new_postgres_schema,
    postgres_url,
    require_postgres,
)


@pytest.fixture
def schema() -> Iterator[str]:
    name = new_postgres_schema()
    yield name
    drop_postgres_schema(name)


@pytest.fixture
def admin() -> Iterator[psycopg.Connection[Any]]:
    """A second connection, for looking at and terminating the store's backends."""
    require_postgres()
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        yield conn


@pytest.fixture
def store(schema: str) -> Iterator[PostgresStore]:
    s = PostgresStore(postgres_url(schema, pool_max=1))
    yield s
    s.close()


def wf(wid: str, owner: str = "ex-1") -> WorkflowRecord:
    return WorkflowRecord(id=wid, name="flow", version="1", status=Status.RUNNING,
                          inputs=b"{}", created_at=1.0, updated_at=1.0, owner=owner)


def entry(wid: str, index: int) -> JournalEntry:
    return JournalEntry(wid, index, "step", f"s{index}", b"1", None, 1, 10.0 + index,
                        11.0 + index)


def backends(admin: psycopg.Connection[Any], schema: str) -> list[int]:
    """Backend pids of the store's connections (named after the schema)."""
    return [r[0] for r in admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
        (schema,)).fetchall()]


def terminate(admin: psycopg.Connection[Any], schema: str) -> int:
    pids = backends(admin, schema)
    for pid in pids:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return len(pids)


@pytest.fixture
def fault_hook(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[str], None]], None]:
    """Install ``hook(label)`` at every crash point the store reaches."""

    def install(hook: Callable[[str], None]) -> None:
        monkeypatch.setattr(_faults, "ENABLED", True)
        monkeypatch.setattr(_faults, "point", hook)

    return install


# -- URL ------------------------------------------------------------------------------
def test_url_options_are_parsed_and_crashsafes_own_are_not_passed_to_libpq() -> None:
    opts = parse_postgres_url("postgres://u:pw@db.example:6432/app?schema=agents&pool_min=2"
                              "&pool_max=5&pool_timeout=7.5&connect_timeout=3&sslmode=require")
    assert (opts.schema, opts.pool_min, opts.pool_max) == ("agents", 2, 5)
    assert (opts.pool_timeout, opts.connect_timeout) == (7.5, 3.0)
    assert opts.conninfo == "postgresql://u:pw@db.example:6432/app?sslmode=require"
    default = parse_postgres_url("postgresql://u@h/db")
    assert (default.schema, default.pool_min, default.pool_max) == ("crashsafe", 1, 8)
    assert redact("postgresql://u:secret@h:5/db?x=1") == "postgresql://u:***@h:5/db?x=1"


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("pool=3", ["unknown", "'pool'", "pool_max=N", "schema=NAME", "sslmode"]),
        ("pool_max=0", ["pool_max", ">= 1"]),
        ("pool_max=lots", ["pool_max", "whole number"]),
        ("pool_min=4&pool_max=2", ["pool_max=2", "pool_min=4", "raise pool_max"]),
        ("pool_timeout=-1", ["pool_timeout", "positive"]),
        ("schema=", ["schema=''", "1 to 63"]),
        ("schema=pg_mine", ["reserved"]),
        ("schema=" + "x" * 64, ["1 to 63"]),
    ],
)
def test_bad_url_options_say_what_is_known(query: str, words: list[str]) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_store(f"postgresql://u:hunter2@127.0.0.1/db?{query}")
    for word in words:
        assert word in str(info.value)
    assert "hunter2" not in str(info.value)  # passwords never reach a message


def test_a_closed_port_is_store_unavailable_with_what_to_do() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        PostgresStore("postgresql://postgres:s3cret@127.0.0.1:1/test?connect_timeout=2")
    msg = str(info.value)
    assert "127.0.0.1:1" in msg
    assert "refused" in msg.lower()
    assert "check that the server is running" in msg
    assert "s3cret" not in msg
    assert time.monotonic() - started < 10


def test_import_works_without_psycopg_and_open_store_names_the_extra() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["psycopg"] = None
        sys.modules["psycopg_pool"] = None
        import crashsafe
        app = crashsafe.App("postgresql://u@127.0.0.1/db")
        try:
            app.store
        except crashsafe.ConfigurationError as exc:
            print(exc)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "pip install 'crashsafe[postgres]'" in res.stdout


def test_errors_are_translated_into_crashsafes_own() -> None:
    full = translate(psycopg.errors.DiskFull("could not extend file"), "committing")
    assert isinstance(full, StoreFullError)
    assert "free space" in str(full)
    dup = translate(psycopg.errors.UniqueViolation("duplicate key"), "committing")
    assert isinstance(dup, StoreConflictError)
    gone = translate(psycopg.errors.AdminShutdown("terminating connection"), "reading")
    assert isinstance(gone, StoreUnavailableError)
    assert "check that the server is up" in str(gone)
    crowded = translate(psycopg.errors.TooManyConnections("sorry"), "reading")
    assert isinstance(crowded, StoreUnavailableError)
    assert "pool_max" in str(crowded)


# -- schema and migrations --------------------------------------------------------------
def test_schemas_isolate_stores_sharing_one_database(schema: str) -> None:
    other = new_postgres_schema()
    a = PostgresStore(postgres_url(schema))
    b = PostgresStore(postgres_url(other))
    try:
        a.create_workflow(wf("same-id"))
        assert b.get_workflow("same-id") is None
        b.create_workflow(wf("same-id", owner="b"))
        a_rec, b_rec = a.get_workflow("same-id"), b.get_workflow("same-id")
        assert a_rec is not None and b_rec is not None
        assert (a_rec.owner, b_rec.owner) == ("ex-1", "b")
    finally:
        a.close()
        b.close()
        drop_postgres_schema(other)


def test_odd_schema_names_are_quoted_not_formatted(admin: psycopg.Connection[Any]) -> None:
    name = f'Odd "name"; DROP TABLE x; {uuid.uuid4().hex[:6]}'
    store = PostgresStore(postgres_url(name.replace(" ", "%20").replace(";", "%3B")
                                       .replace('"', "%22")))
    try:
        store.create_workflow(wf("w"))
        assert store.get_workflow("w") is not None
        tables = admin.execute("SELECT count(*) FROM information_schema.tables "
                               "WHERE table_schema = %s", (name,)).fetchone()
        assert tables is not None and tables[0] >= 8
    finally:
        store.close()
        drop_postgres_schema(name)


def test_migrations_run_once_when_four_processes_open_a_fresh_schema_at_once(
        schema: str, admin: psycopg.Connection[Any], tmp_path: Path) -> None:
    url = postgres_url(schema)
    go = tmp_path / "go"
    code = textwrap.dedent("""
        import pathlib, sys, time
        from crashsafe.stores.postgres import PostgresStore
        go = pathlib.Path(sys.argv[2])
        while not go.exists():
            time.sleep(0.002)
        store = PostgresStore(sys.argv[1])
        store.close()
        print("opened")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    time.sleep(1.0)  # let every process import and wait at the gate
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == "opened"
    version = admin.execute(f'SELECT value FROM "{schema}".crashsafe_meta').fetchall()
    assert version == [(SCHEMA_VERSION,)]
    # And once more, on the fast path: nothing changes.
    PostgresStore(url).close()
    assert admin.execute(f'SELECT value FROM "{schema}".crashsafe_meta').fetchall() == version


def test_a_version_2_schema_with_data_is_upgraded_and_keeps_working(
        schema: str, admin: psycopg.Connection[Any]) -> None:
    from crashsafe.stores._postgres_sql import MIGRATIONS
    from crashsafe.stores.base import WorkflowNotRunning

    # The schema as the first PostgreSQL release left it (version 2), holding a
    # running workflow with one journal entry and a queued one.
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute("CREATE TABLE crashsafe_meta (name text PRIMARY KEY, "
                     "value integer NOT NULL)")
        for migration in MIGRATIONS[:2]:
            conn.execute(migration)
        conn.execute("INSERT INTO crashsafe_meta VALUES ('schema_version', 2)")
        conn.execute("INSERT INTO workflows (id, name, version, status, inputs, owner, "
                     "created_at, updated_at, token) VALUES ('w1', 'flow', '1', 'running', "
                     "'{}', 'ex-1', 1.0, 1.0, 3)")
        conn.execute("INSERT INTO workflows (id, name, version, status, inputs, created_at, "
                     "updated_at, queue) VALUES ('q1', 'flow', '1', 'enqueued', '{}', 1.0, "
                     "1.0, 'jobs')")
        conn.execute("INSERT INTO journal VALUES ('w1', 0, 'step', 's0', '1', NULL, 1, "
                     "10.0, 11.0, NULL)")
    store = PostgresStore(postgres_url(schema))
    try:
        version = admin.execute(f'SELECT value FROM "{schema}".crashsafe_meta').fetchall()
        assert version == [(SCHEMA_VERSION,)]
        assert [e.index for e in store.load_journal("w1")] == [0]
        # A group commit (one commit_group call) with a fenced entry and a finish.
        fenced = JournalEntry("w1", 1, "step", "s1", b"2", None, 1, 12.0, 13.0, token=3)
        stale = JournalEntry("w1", 2, "step", "s2", b"3", None, 1, 14.0, 15.0, token=2)
        finish = FinishWorkflow("w1", "ex-1", Status.SUCCEEDED, b"2", at=16.0, token=3)
        ok, refused = store.apply([[fenced, entry("w1", 5)], [stale]])
        assert ok is None and isinstance(refused, WorkflowNotRunning)
        assert store.apply([[finish]]) == [None]
        rec = store.get_workflow("w1")
        assert rec is not None and rec.status is Status.SUCCEEDED
        assert [e.index for e in store.load_journal("w1")] == [0, 1, 5]
        # A dequeue (one dequeue_group call) takes the queued one and raises its token.
        (taken,) = store.dequeue("jobs", "ex-2", 5, 1, 100.0)
        assert (taken.id, taken.owner, taken.token) == ("q1", "ex-2", 1)
    finally:
        store.close()


def test_a_newer_schema_is_refused_with_upgrade_advice(
        store: PostgresStore, schema: str, admin: psycopg.Connection[Any]) -> None:
    admin.execute(f'UPDATE "{schema}".crashsafe_meta SET value = 99')
    with pytest.raises(ConfigurationError, match="upgrade crashsafe"):
        PostgresStore(postgres_url(schema))


# -- the server's clock -----------------------------------------------------------------
def test_update_shared_uses_the_servers_clock_not_the_workers(
        store: PostgresStore, admin: psycopg.Connection[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def server_now() -> float:
        row = admin.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        assert row is not None
        return float(row[0])

    skewed = time.time() + 3600.0
    monkeypatch.setattr(time, "time", lambda: skewed)  # this worker's clock is an hour fast
    seen: list[float] = []
    before = server_now()
    store.update_shared("k", lambda cur, now: (seen.append(now), (b"v", None))[1])
    _, read_now = store.read_shared("k")
    clock = store.clock()
    after = server_now()
    assert before <= seen[0] <= read_now <= clock <= after
    assert abs(skewed - seen[0]) > 3000
    (_, _, stamped), = store.list_shared("k")
    assert stamped == seen[0]


def test_recovery_and_status_changes_are_stamped_by_the_server(
        store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create_workflow(wf("w1", owner="dead"))
    store.create_workflow(wf("w2"))
    monkeypatch.setattr(time, "time", lambda: 1.0)  # a worker clock stuck in 1970
    (res,) = store.claim_workflows([("w1", "dead")], "me", 5)
    assert res.claimed and res.record is not None
    assert res.record.updated_at > 1_600_000_000
    changed = store.set_status("w2", Status.CANCELLED, only_from=[Status.RUNNING])
    assert changed is not None and changed.updated_at > 1_600_000_000


# -- concurrency --------------------------------------------------------------------------
def test_update_shared_counter_across_four_processes_is_exact(schema: str,
                                                              tmp_path: Path) -> None:
    url = postgres_url(schema)
    PostgresStore(url).close()  # migrate first; this test is about the counter
    go = tmp_path / "go"
    code = textwrap.dedent("""
        import pathlib, sys, time
        from crashsafe.stores.postgres import PostgresStore
        store = PostgresStore(sys.argv[1])
        go = pathlib.Path(sys.argv[2])
        while not go.exists():
            time.sleep(0.002)
        for _ in range(50):
            store.update_shared("counter",
                                lambda cur, now: (str(int(cur or b"0") + 1).encode(), None))
        store.close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(go)],
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(1.0)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    store = PostgresStore(url)
    try:
        assert store.read_shared("counter")[0] == b"200"
    finally:
        store.close()


# -- dropped connections ------------------------------------------------------------------
def test_a_read_on_a_terminated_connection_is_retried_transparently(
        store: PostgresStore, schema: str, admin: psycopg.Connection[Any]) -> None:
    store.create_workflow(wf("w1"))
    old = backends(admin, schema)
    assert terminate(admin, schema) >= 1
    rec = store.get_workflow("w1")  # its pooled connection is dead: one retry, no error
    assert rec is not None and rec.id == "w1"
    new = backends(admin, schema)
    assert new and not set(new) & set(old)
    assert store.load_journal("w1") == []


def test_an_idempotent_write_on_a_terminated_connection_is_retried(
        store: PostgresStore, schema: str, admin: psycopg.Connection[Any]) -> None:
    store.register_executor(crashsafe.stores.ExecutorRecord("e", "h", 1, "", 1.0, 1.0))
    terminate(admin, schema)
    store.heartbeat("e", 42.0)
    assert store.get_executors(["e"])["e"].heartbeat_at == 42.0


def _killer(admin: psycopg.Connection[Any], schema: str, label: str,
            times: int = 1) -> tuple[Callable[[str], None], list[int]]:
    """A crash-point hook that terminates the store's backend at ``label``."""
    killed: list[int] = []

    def hook(at: str) -> None:
        if at == label and len(killed) < times:
            killed.append(terminate(admin, schema))

    return hook, killed


def test_terminated_before_commit_nothing_lands_then_the_retry_lands_once(
        store: PostgresStore, schema: str, admin: psycopg.Connection[Any],
        fault_hook: Callable[[Callable[[str], None]], None]) -> None:
    store.create_workflow(wf("w1"))
    hook, killed = _killer(admin, schema, "store: before COMMIT (fsync)")
    fault_hook(hook)
    assert store.apply([[entry("w1", 0), entry("w1", 1)]]) == [None]
    assert killed == [1]
    assert [e.index for e in store.load_journal("w1")] == [0, 1]


def test_terminated_before_commit_twice_reports_unavailable_and_keeps_nothing(
        store: PostgresStore, schema: str, admin: psycopg.Connection[Any],
        fault_hook: Callable[[Callable[[str], None]], None]) -> None:
    store.create_workflow(wf("w1"))
    hook, killed = _killer(admin, schema, "store: before COMMIT (fsync)", times=2)
    fault_hook(hook)
    (err,) = store.apply([[entry("w1", 0), FinishWorkflow("w1", "ex-1", Status.SUCCEEDED,
                                                          b"1", at=5.0)]])
    assert killed == [1, 1]
    assert isinstance(err, StoreUnavailableError)
    assert "check that the server is up" in str(err)
    rec = store.get_workflow("w1")
    assert rec is not None and rec.status is Status.RUNNING  # nothing half-applied
    assert store.load_journal("w1") == []


def test_terminated_before_a_lone_statement_is_resolved_and_applied_once(
        store: PostgresStore, schema: str, admin: psycopg.Connection[Any],
        fault_hook: Callable[[Callable[[str], None]], None]) -> None:
    store.create_workflow(wf("w1"))
    hook, killed = _killer(admin, schema, "store: begin journal commit")
    fault_hook(hook)
    assert store.apply([[entry("w1", 0)]]) == [None]  # one statement, its own transaction
    assert killed == [1]
    assert [e.index for e in store.load_journal("w1")] == [0]


class CutProxy:
    """A TCP proxy in front of PostgreSQL that cuts one connection at a chosen answer.

    Once armed (or at the ``cut_at``-th chunk the server sends, counting from 1), it
    drops that answer instead of passing it on: the server has already executed the
    client's statement (a COMMIT, say). It then terminates the backend with
    ``pg_terminate_backend`` from a second connection and closes the client's socket.
    The client is left exactly where a real drop after sending its statement leaves it.
    """

    def __init__(self, schema: str, admin: psycopg.Connection[Any]) -> None:
        target = urlsplit(POSTGRES_URL)
        self.target = (target.hostname or "127.0.0.1", target.port or 5432)
        self.schema = schema
        self.admin = admin
        self.armed = threading.Event()
        self.cut = threading.Event()
        self.cut_at: int | None = None
        self.chunks = 0
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self) -> str:
        parts = urlsplit(POSTGRES_URL)
        user = f"{parts.username}@" if parts.username else ""
        return (f"postgresql://{user}127.0.0.1:{self.port}{parts.path}"
                f"?schema={self.schema}&application_name={self.schema}&pool_max=1")

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for sock in (client, server):  # no Nagle delays on pipelined statements
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True),
                             daemon=True).start()

    def _cut_now(self) -> bool:
        with self._lock:
            self.chunks += 1
            if self.cut.is_set():
                return False
            if self.armed.is_set() or self.chunks == self.cut_at:
                self.armed.clear()
                terminate(self.admin, self.schema)
                self.cut.set()
                return True
            return False

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_server and self._cut_now():
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def cut_proxy(schema: str, admin: psycopg.Connection[Any]) -> Iterator[CutProxy]:
    proxy = CutProxy(schema, admin)
    yield proxy
    proxy.close()


def _arm_at(proxy: CutProxy, label: str) -> Callable[[str], None]:
    """A crash-point hook that arms ``proxy`` at ``label``, once."""
    def hook(at: str) -> None:
        if at == label and not proxy.cut.is_set():
            proxy.armed.set()

    return hook


def test_drop_after_commit_landed_is_resolved_by_rereading_no_duplicate(
        schema: str, admin: psycopg.Connection[Any], cut_proxy: CutProxy,
        fault_hook: Callable[[Callable[[str], None]], None]) -> None:
    store = PostgresStore(cut_proxy.url())
    try:
        store.create_workflow(wf("w1"))
        fault_hook(_arm_at(cut_proxy, "store: before COMMIT (fsync)"))
        results = store.apply([[entry("w1", 0), entry("w1", 1)], [CreateWorkflow(wf("w2"))]])
        assert cut_proxy.cut.is_set()  # the COMMIT's answer was lost, its backend killed
        # Re-applying would have met the committed rows (a conflict); re-reading them
        # says the batch landed.
        assert results == [None, None]
        assert [e.index for e in store.load_journal("w1")] == [0, 1]
        assert store.get_workflow("w2") is not None
    finally:
        store.close()


def test_drop_after_commit_of_a_lone_statement_is_resolved_too(
        schema: str, admin: psycopg.Connection[Any], cut_proxy: CutProxy,
        fault_hook: Callable[[Callable[[str], None]], None]) -> None:
    store = PostgresStore(cut_proxy.url())
    try:
        store.create_workflow(wf("w1"))
        fault_hook(_arm_at(cut_proxy, "store: begin journal commit"))
        assert store.apply([[FinishWorkflow("w1", "ex-1", Status.SUCCEEDED, b"ok",
                                            at=7.0)]]) == [None]
        assert cut_proxy.cut.is_set()
        rec = store.get_workflow("w1")
        assert rec is not None and (rec.status, rec.output) == (Status.SUCCEEDED, b"ok")
    finally:
        store.close()


def test_drop_after_commit_of_update_shared_asks_the_server_and_counts_once(
        schema: str, admin: psycopg.Connection[Any], cut_proxy: CutProxy,
        fault_hook: Callable[[Callable[[str], None]], None]) -> None:
    store = PostgresStore(cut_proxy.url())
    try:
        calls: list[bytes | None] = []

        def bump(cur: bytes | None, now: float) -> tuple[bytes | None, int]:
            calls.append(cur)
            n = int(cur or b"0") + 1
            return str(n).encode(), n

        assert store.update_shared("c", bump) == 1
        fault_hook(_arm_at(cut_proxy, "store: before COMMIT of updating shared state 'c'"))
        assert store.update_shared("c", bump) == 2
        assert cut_proxy.cut.is_set()
        assert calls == [None, b"1"]  # not called again: the server said it committed
        assert store.read_shared("c")[0] == b"2"
    finally:
        store.close()


def test_drop_after_commit_of_create_workflow_still_says_created(
        schema: str, admin: psycopg.Connection[Any], cut_proxy: CutProxy,
        fault_hook: Callable[[Callable[[str], None]], None]) -> None:
    store = PostgresStore(cut_proxy.url())
    try:
        fault_hook(_arm_at(cut_proxy, "store: before COMMIT of starting workflow 'w1'"))
        stored, created = store.create_workflow(wf("w1"))
        assert cut_proxy.cut.is_set()
        assert created is True  # a retry would have found the row and said False
        assert stored.id == "w1"
    finally:
        store.close()


def test_a_closed_store_refuses_calls_clearly(schema: str) -> None:
    store = PostgresStore(postgres_url(schema))
    store.close()
    store.close()  # twice is fine
    with pytest.raises(StoreUnavailableError, match="closed"):
        store.get_workflow("w")
    (err,) = store.apply([[entry("w", 0)]])
    assert isinstance(err, StoreUnavailableError)


# -- transactional steps --------------------------------------------------------------------
@pytest.fixture
def user_table(admin: psycopg.Connection[Any]) -> Iterator[str]:
    """A table of the user's own, in the database user's default schema (public)."""
    name = f"stock_{uuid.uuid4().hex[:8]}"
    yield name
    admin.execute(psycopg.sql.SQL("DROP TABLE IF EXISTS public.{}").format(
        psycopg.sql.Identifier(name)))


def test_transactional_step_commits_with_its_result_and_rolls_back_a_failure(
        schema: str, user_table: str, admin: psycopg.Connection[Any]) -> None:
    admin.execute(f"CREATE TABLE public.{user_table} (sku text PRIMARY KEY, reserved int)")
    app = crashsafe.App(postgres_url(schema))
    attempts: list[int] = []

    @app.transaction(name="reserve", retry=crashsafe.RetryPolicy(max_attempts=3,
                                                                 initial_delay=0))
    def reserve(db: crashsafe.TransactionConnection, sku: str) -> int:
        # Unqualified: the step sees the user's search path, not crashsafe's schema.
        db.execute(f"INSERT INTO {user_table} VALUES (%s, 1) ON CONFLICT (sku) DO UPDATE "
                   f"SET reserved = {user_table}.reserved + 1", (sku,))
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("lost the warehouse link after writing")  # rolled back
        row = db.execute(f"SELECT reserved FROM {user_table} WHERE sku = %s", (sku,)).fetchone()
        return int(row[0])

    @app.workflow(name="order")
    def order(sku: str) -> int:
        return reserve(sku)

    try:
        assert app.start(order, "kettle", workflow_id="o-1").result(timeout=20) == 1
        assert admin.execute(f"SELECT sku, reserved FROM public.{user_table}").fetchall() == [
            ("kettle", 1)]
        entry0 = app.journal("o-1")[0]
        assert (entry0.kind, entry0.name, entry0.attempts) == ("step", "reserve", 2)
    finally:
        app.close()


def test_transactional_step_refuses_commit_and_sql_errors_reach_the_step(
        schema: str) -> None:
    app = crashsafe.App(postgres_url(schema))

    @app.transaction(name="sneaky")
    def sneaky(db: crashsafe.TransactionConnection) -> None:
        db.commit()

    @app.transaction(name="typo")
    def typo(db: crashsafe.TransactionConnection) -> None:
        db.execute("SELEC 1")

    @app.workflow(name="w")
    def w() -> None:
        sneaky()

    @app.workflow(name="t")
    def t() -> None:
        typo()

    try:
        with pytest.raises(crashsafe.NotInWorkflowError, match="must not commit"):
            app.start(w, workflow_id="w-1").result(timeout=20)
        with pytest.raises(Exception, match="syntax error") as info:
            app.start(t, workflow_id="t-1").result(timeout=20)
        assert not isinstance(info.value, crashsafe.StoreError)
    finally:
        app.close()


def test_transactional_step_dropped_after_commit_neither_reruns_nor_duplicates(
        schema: str, user_table: str, admin: psycopg.Connection[Any],
        cut_proxy: CutProxy,
        fault_hook: Callable[[Callable[[str], None]], None]) -> None:
    admin.execute(f"CREATE TABLE public.{user_table} (amount int)")
    store = PostgresStore(cut_proxy.url())
    store.create_workflow(wf("w1"))
    runs: list[int] = []

    def work(db: Any) -> int:
        runs.append(1)
        db.execute(f"INSERT INTO {user_table} VALUES (%s)", (7,))
        return 7

    def record(value: Any) -> JournalEntry:
        return JournalEntry("w1", 0, "step", "pay", str(value).encode(), None, 1, 1.0, 2.0)

    try:
        fault_hook(_arm_at(cut_proxy, "store: before COMMIT of a transactional step"))
        assert store.transact(work, record) == 7
        assert cut_proxy.cut.is_set()
        assert runs == [1]
        assert admin.execute(f"SELECT amount FROM public.{user_table}").fetchall() == [(7,)]
        assert [e.name for e in store.load_journal("w1")] == ["pay"]
    finally:
        store.close()


# -- a cut at every answer of a reference workload (RELIABILITY.md R5) ---------------------
def _reference_workload(store: PostgresStore) -> list[Any]:
    """Store calls a workflow's life makes, in order; returns what each returned."""
    from crashsafe.stores.base import AttemptRecord, CompleteEffect

    out: list[Any] = [store.create_workflow(wf("w1"))[1]]
    out.append(store.apply([[entry("w1", 0)]]))
    out.append(store.begin_effect("w1", 1, "pay", "pay-key", "h", 3.0))
    out.append(store.apply([[AttemptRecord("w1", 1, 1, "pay", 3.0, 3.5, "timeout"),
                             entry("w1", 1),
                             CompleteEffect("pay-key", "w1", 1, b"paid", None, 4.0)]]))
    out.append(store.update_shared("budget", lambda cur, now: (
        str(int(cur or b"0") + 1).encode(), int(cur or b"0") + 1)))
    out.append(store.send_signal("w1", "approval", b"yes", 5.0))
    out.append(store.apply([[entry("w1", 2), entry("w1", 3)],
                            [CreateWorkflow(wf("w2", owner="dead"))]]))
    claimed = store.claim_workflows([("w2", "dead")], "me", 5)
    out.append([c.claimed for c in claimed])
    out.append(store.apply([[FinishWorkflow("w1", "ex-1", Status.SUCCEEDED, b"ok", at=9.0)]]))
    return out


def _final_state(store: PostgresStore) -> Any:
    w1, w2 = store.get_workflow("w1"), store.get_workflow("w2")
    assert w1 is not None and w2 is not None
    effect = store.get_effect("pay-key")
    return (
        [(e.index, e.name) for e in store.load_journal("w1")],
        (w1.status, w1.output), (w2.owner, w2.recovery_attempts),
        store.read_shared("budget")[0],
        [store.get_signal("w1", "approval", n) for n in (0, 1)],
        None if effect is None else (effect.state, effect.output),
        [(a.index, a.attempt) for a in store.load_attempts("w1")],
    )


@pytest.mark.slow
def test_a_connection_cut_at_every_answer_loses_nothing_and_duplicates_nothing(
        admin: psycopg.Connection[Any]) -> None:
    def run(cut_at: int | None) -> tuple[list[Any], Any, int, bool]:
        schema = new_postgres_schema()
        proxy = CutProxy(schema, admin)
        try:
            store = PostgresStore(proxy.url())
            try:
                proxy.chunks = 0  # count from the workload's first statement
                proxy.cut_at = cut_at
                results = _reference_workload(store)
                return results, _final_state(store), proxy.chunks, proxy.cut.is_set()
            finally:
                store.close()
        finally:
            proxy.close()
            drop_postgres_schema(schema)

    expected, state, answers, _ = run(None)
    assert answers > 20
    cuts = 0
    for n in range(1, answers + 1):
        results, got, _, cut = run(n)
        assert results == expected, f"cut at answer {n}: calls returned {results}"
        assert got == state, f"cut at answer {n}: final state {got}"
        cuts += cut
    assert cuts == answers  # every answer was cut once, in its own run


# -- fencing tokens ------------------------------------------------------------------------
def test_writes_under_a_stale_fencing_token_are_refused(store: PostgresStore) -> None:
    from crashsafe.stores.base import AttemptRecord, MarkWaiting, WorkflowNotRunning

    store.create_workflow(wf("w1", owner="dead"))
    (res,) = store.claim_workflows([("w1", "dead")], "me", 5)
    assert res.record is not None and res.record.token == 1
    stale_entry = JournalEntry("w1", 0, "step", "s", b"1", None, 1, 1.0, 2.0, token=0)
    for batch in ([stale_entry],
                  [AttemptRecord("w1", 0, 2, "s", 1.0, token=0)],
                  [JournalEntry("w1", 0, "step", "s", b"1", None, 1, 1.0, 2.0, token=1),
                   AttemptRecord("w1", 0, 2, "s", 1.0, token=0)],
                  [FinishWorkflow("w1", "me", Status.SUCCEEDED, b"1", at=3.0, token=0)],
                  [MarkWaiting("w1", "me", "approval", token=0)]):
        (err,) = store.apply([batch])
        assert isinstance(err, WorkflowNotRunning), batch
    assert store.load_journal("w1") == []
    assert store.load_attempts("w1") == []
    fresh = JournalEntry("w1", 0, "step", "s", b"1", None, 1, 1.0, 2.0, token=1)
    assert store.apply([[fresh, FinishWorkflow("w1", "me", Status.SUCCEEDED, b"1", at=3.0,
                                               token=1)]]) == [None]
    rec = store.get_workflow("w1")
    assert rec is not None and (rec.status, rec.token) == (Status.SUCCEEDED, 1)


def test_a_stale_write_racing_a_takeover_waits_for_it_and_is_refused(
        store: PostgresStore, schema: str) -> None:
    from crashsafe.stores.base import WorkflowNotRunning

    store.create_workflow(wf("w1"))
    results: list[Any] = []
    with psycopg.connect(POSTGRES_URL) as takeover:  # a transaction, not autocommit
        takeover.execute(f'UPDATE "{schema}".workflows SET token = token + 1, owner = %s '
                         "WHERE id = 'w1'", ("new-worker",))
        writer = threading.Thread(target=lambda: results.extend(store.apply(
            [[JournalEntry("w1", 0, "step", "s", b"1", None, 1, 1.0, 2.0, token=0)]])))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive()  # it waits for the takeover instead of reading past it
        takeover.commit()
    writer.join(10)
    assert len(results) == 1 and isinstance(results[0], WorkflowNotRunning)
    assert results[0].stale_token == 0
    assert store.load_journal("w1") == []


# -- queues ----------------------------------------------------------------------------------
def _enqueue(store: PostgresStore, n: int, queue: str = "q") -> None:
    for i in range(n):
        rec = wf(f"job-{i:03d}", owner="")
        rec.owner, rec.status, rec.queue, rec.created_at = None, Status.ENQUEUED, queue, float(i)
        store.create_workflow(rec)


def test_concurrent_dequeues_never_hand_one_item_to_two_workers(schema: str) -> None:
    stores = [PostgresStore(postgres_url(schema)) for _ in range(4)]
    try:
        _enqueue(stores[0], 100)
        taken: list[list[str]] = [[] for _ in stores]

        def worker(n: int) -> None:
            while got := stores[n].dequeue("q", f"w{n}", 3, None, time.time() + 60):
                taken[n].extend(r.id for r in got)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        everything = [wid for ids in taken for wid in ids]
        assert sorted(everything) == [f"job-{i:03d}" for i in range(100)]  # once each
        rec = stores[0].get_workflow("job-000")
        assert rec is not None and rec.status is Status.RUNNING and rec.token == 1
    finally:
        for s in stores:
            s.close()


def test_a_queue_limit_holds_across_concurrent_workers(schema: str) -> None:
    stores = [PostgresStore(postgres_url(schema)) for _ in range(4)]
    try:
        _enqueue(stores[0], 20)
        counts: list[int] = []
        lock = threading.Lock()

        def worker(n: int) -> None:
            got = stores[n].dequeue("q", f"w{n}", 5, 3, time.time() + 60)
            with lock:
                counts.append(len(got))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sum(counts) == 3  # never more running than the limit, whoever asked
    finally:
        for s in stores:
            s.close()


# -- a client paused inside a transaction ------------------------------------------------
def test_idle_tx_timeout_is_parsed_and_zero_turns_it_off() -> None:
    assert parse_postgres_url("postgresql://u@h/db").idle_tx_timeout == 30.0
    assert parse_postgres_url("postgresql://u@h/db?idle_tx_timeout=0").idle_tx_timeout == 0.0
    with pytest.raises(ConfigurationError, match=r"idle_tx_timeout .* must be 0 or a positive"):
        parse_postgres_url("postgresql://u@h/db?idle_tx_timeout=-1")


def test_a_client_paused_inside_a_transaction_loses_its_locks_not_the_store(
        schema: str, admin: psycopg.Connection[Any]) -> None:
    store = PostgresStore(postgres_url(schema, pool_max=1) + "&idle_tx_timeout=0.3")
    try:
        store.create_workflow(wf("w1"))
        # A worker that stops (SIGSTOP, a debugger) between two statements of a
        # transaction, holding a row lock.
        with store._conn("test") as conn:
            conn.execute("BEGIN")
            conn.execute("SELECT 1 FROM workflows WHERE id = 'w1' FOR UPDATE")
            admin.execute("SET lock_timeout = '5s'")
            started = time.monotonic()
            # Another worker can take the row once the server has ended the session.
            admin.execute(f'UPDATE "{schema}".workflows SET reason = %s WHERE id = %s',
                          ("taken", "w1"))
            waited = time.monotonic() - started
            with pytest.raises(psycopg.Error) as woke:
                conn.execute("SELECT 1")  # the paused worker wakes up to a closed session
            assert is_lost(woke.value)  # handled as a dropped connection: retried
        assert 0.2 < waited < 3.0
        # The store replaces the dead connection and goes on.
        assert store.apply([[entry("w1", 0)]]) == [None]
        rec = store.get_workflow("w1")
        assert rec is not None and rec.reason == "taken"
    finally:
        store.close()
