"""``crashsafe verify``: every record checked; bad ones listed with a non-zero exit."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

import payload_workload
from crashsafe import App
from crashsafe._keys import Keyring
from crashsafe._seal import RecordContext, Sealer
from crashsafe._verify import verify
from crashsafe.cli.main import cli
from helpers import AppFactory, Database

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
    assert report == {"workflows": 3, "orphans": 0, "records": 12, "bad": [],
                      "rolled_back": []}


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


def _flip(data: bytes) -> bytes:
    broken = bytearray(data)
    broken[len(broken) // 2] ^= 0x10
    return bytes(broken)


def test_every_kind_of_payload_is_opened(database: Database, make_app: AppFactory,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Signals, effect outcomes (also those kept after gc dropped their workflow) and
    rolled-back entries are checked like the rest; a damaged one is listed with where it
    is stored, and the command exits 1. Every store kind."""
    ring = f"k1={base64.b64encode(os.urandom(32)).decode()}"
    monkeypatch.setenv("CRASHSAFE_KEYS", ring)
    app = make_app()
    left = payload_workload.fill(app)
    app.close()
    raw = database.connect()
    sealer = Sealer(Keyring.parse(ring))
    clean = verify(raw, sealer)
    assert (clean.workflows, clean.orphans, clean.records, clean.bad) == (1, 3, 15, [])

    stored = {wid: raw.load_payloads([wid]) for wid in ["live", *left.dropped]}
    targets = {("live", "signals", 0, "signal:approve"), ("live", "effects", 0, "effect-output"),
               ("live", "rewound", 3, "output"), ("gone-1", "effects", 0, "effect-output")}
    for wid, table, index, kind in targets:
        # (index, kind) alone does not say which table: a rolled-back entry and the
        # journal entry that replaced it share them. The stored bytes do.
        (data,) = [d for _, t, i, k, d in stored[wid] if (t, i, k) == (table, index, kind)]
        assert raw.rewrite_payloads(wid, lambda i, k, d, data=data: _flip(d) if d == data
                                    else None) == 1
    report = verify(raw, sealer)
    assert {(b.workflow_id, b.table, b.index, b.kind) for b in report.bad} == targets
    assert report.records == 15 and report.rolled_back == []
    if database.kind != "memory":
        res = runner.invoke(cli, ["--db", database.url, "verify"])
        assert res.exit_code == 1, res.output
        assert "BAD gone-1 #0 effect-output (effects)" in res.output
        assert "BAD live #0 signal:approve (signals)" in res.output
        assert "BAD live #3 output (rewound)" in res.output
        assert "4 bad record(s)" in res.output
        res = runner.invoke(cli, ["--db", database.url, "verify", "--json"])
        listed = json.loads(res.output)
        assert (listed["orphans"], len(listed["bad"])) == (3, 4)

    # A record damaged, then rolled back *for that damage* (the on_corrupt policy names
    # it in the rollback's reason), is known and kept for audit: listed apart, not bad.
    (note,) = [d for _, t, i, k, d in stored["live"] if (t, i, k) == ("journal", 4, "output")]
    raw.rewrite_payloads("live", lambda i, k, d: _flip(d) if d == note else None)
    assert {(b.table, b.index) for b in verify(raw, sealer).bad} >= {("journal", 4)}
    where = RecordContext("live", 4, "output").describe()
    raw.rewind("live", 4, f"corrupt record: {where} was not used: checksum mismatch; "
                          "rolled back to the start", 1.0)
    after = verify(raw, sealer)
    assert [(b.table, b.index, b.kind) for b in after.rolled_back] == [("rewound", 4, "output")]
    assert {(b.workflow_id, b.table, b.index, b.kind) for b in after.bad} == targets
