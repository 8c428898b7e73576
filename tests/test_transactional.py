"""Transactional steps: the step's writes and its journal entry commit together."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import crashsafe


def _app(db: Path) -> tuple[crashsafe.App, crashsafe.Workflow[[str], int]]:
    app = crashsafe.App(f"sqlite:///{db}")
    attempts: list[int] = []

    @app.transaction(name="reserve", retry=crashsafe.RetryPolicy(max_attempts=3,
                                                                 initial_delay=0))
    def reserve(db: crashsafe.TransactionConnection, sku: str) -> int:
        db.execute("CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, reserved INT)")
        db.execute("INSERT INTO stock VALUES (?, 1) ON CONFLICT (sku) DO UPDATE "
                   "SET reserved = reserved + 1", (sku,))
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("lost the warehouse link after writing")  # rolled back
        return int(db.execute("SELECT reserved FROM stock WHERE sku = ?", (sku,)).fetchone()[0])

    @app.workflow(name="order")
    def order(sku: str) -> int:
        return reserve(sku)

    return app, order


def test_writes_commit_with_the_result_and_roll_back_with_a_failure(tmp_path: Path) -> None:
    app, order = _app(tmp_path / "shop.db")
    assert app.start(order, "kettle", workflow_id="o-1").result(timeout=10) == 1
    conn = sqlite3.connect(tmp_path / "shop.db")
    assert conn.execute("SELECT sku, reserved FROM stock").fetchall() == [("kettle", 1)]
    conn.close()
    entry = app.journal("o-1")[0]
    assert (entry.kind, entry.name, entry.attempts) == ("step", "reserve", 2)
    app.close()


def test_a_transactional_step_may_not_commit_by_itself(tmp_path: Path) -> None:
    app = crashsafe.App(f"sqlite:///{tmp_path / 'x.db'}")

    @app.transaction(name="sneaky")
    def sneaky(db: crashsafe.TransactionConnection) -> None:
        db.commit()

    @app.workflow(name="w")
    def w() -> None:
        sneaky()

    with pytest.raises(crashsafe.NotInWorkflowError, match="must not commit"):
        app.start(w, workflow_id="w-1").result(timeout=10)
    app.close()


def test_needs_the_sqlite_store_and_a_plain_def() -> None:
    app = crashsafe.App("memory://")

    @app.transaction(name="t")
    def t(db: crashsafe.TransactionConnection) -> None:
        return None

    @app.workflow(name="w")
    def w() -> None:
        t()

    with pytest.raises(crashsafe.ConfigurationError, match="needs a store that can share"):
        app.start(w, workflow_id="w").result(timeout=10)
    with pytest.raises(crashsafe.ConfigurationError, match="must be a plain def"):
        @app.transaction(name="a")
        async def a(db: crashsafe.TransactionConnection) -> None:
            return None
    app.close()


@pytest.mark.slow
def test_kill_9_inside_the_transaction_leaves_nothing_then_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        import crashsafe
        app = crashsafe.App("sqlite:///{db}")
        marker = Path("{tmp_path / 'died'}")

        @app.transaction(name="pay")
        def pay(db, amount: int) -> int:
            db.execute("CREATE TABLE IF NOT EXISTS payments (amount INT)")
            db.execute("INSERT INTO payments VALUES (?)", (amount,))
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)  # written, not committed
            return amount

        @app.workflow(name="w")
        def w() -> int:
            return pay(7)

        app.recover()
        print(app.start(w, workflow_id="pay-1").result(timeout=30))
        app.close()
    """))
    first = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == -signal.SIGKILL, first.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 0
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'payments'").fetchall() == []
    conn.close()
    second = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "7"
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT amount FROM payments").fetchall() == [(7,)]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert os.path.exists(tmp_path / "died")
