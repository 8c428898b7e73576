"""``crashsafe verify``: every record checked; bad ones listed with a non-zero exit."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crashsafe import App
from crashsafe.cli.main import cli

runner = CliRunner()


def _make(db: Path) -> None:
    app = App(f"sqlite:///{db}")

    @app.step(name="double")
    def double(x: int) -> int:
        return 2 * x

    @app.workflow(name="flow")
    def flow(x: int) -> int:
        return double(x) + double(x + 1)

    for i in range(3):
        app.start(flow, i, workflow_id=f"v{i}").result(timeout=10)
    app.close()


def test_an_intact_database_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    db = tmp_path / "ok.db"
    _make(db)
    res = runner.invoke(cli, ["--db", f"sqlite:///{db}", "verify", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    # 3 workflows x (inputs + output) + 3 x 2 journal outputs
    assert report == {"workflows": 3, "records": 12, "bad": []}


def test_damaged_and_moved_records_are_listed(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRASHSAFE_KEYS", f"k1={base64.b64encode(os.urandom(32)).decode()}")
    db = tmp_path / "bad.db"
    _make(db)
    with sqlite3.connect(db) as conn:
        (out,) = conn.execute("SELECT output FROM journal WHERE workflow_id = 'v0' AND idx = 1"
                              ).fetchone()
        broken = bytearray(out)
        broken[-40] ^= 0x80
        conn.execute("UPDATE journal SET output = ? WHERE workflow_id = 'v0' AND idx = 1",
                     (bytes(broken),))
        (moved,) = conn.execute("SELECT output FROM workflows WHERE id = 'v1'").fetchone()
        conn.execute("UPDATE workflows SET output = ? WHERE id = 'v2'", (moved,))
    res = runner.invoke(cli, ["--db", f"sqlite:///{db}", "verify"])
    assert res.exit_code == 1, res.output
    assert "BAD v0 #1 output" in res.output
    assert "BAD v2 #-1 output" in res.output
    assert "2 bad record(s)" in res.output
    # Without the keyring it refuses to judge (every record would look bad).
    monkeypatch.delenv("CRASHSAFE_KEYS")
    res = runner.invoke(cli, ["--db", f"sqlite:///{db}", "verify"])
    assert res.exit_code == 2 and "set $CRASHSAFE_KEYS" in res.output
