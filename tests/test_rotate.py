"""``crashsafe keys rotate`` (S3): every record readable with exactly one key of the ring
at every moment, also when the rotation is killed with SIGKILL and run again."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crashsafe import App
from crashsafe._seal import record_info
from crashsafe.cli.main import cli
from crashsafe.stores import ListFilter
from crashsafe.stores.sqlite import SQLiteStore

runner = CliRunner()
CANARY = "rotation-canary-51c9"


def _key(key_id: str) -> str:
    return f"{key_id}={base64.b64encode(os.urandom(32)).decode()}"


def _fill(db: Path, count: int) -> None:
    app = App(f"sqlite:///{db}")

    @app.step(name="note")
    def note(i: int) -> str:
        return f"{CANARY}-{i}"

    @app.workflow(name="flow")
    def flow(i: int) -> str:
        return note(i) + note(i + 1)

    handles = [app.start(flow, i, workflow_id=f"r{i:04d}") for i in range(count)]
    for h in handles:
        h.result(timeout=60)
    app.close()


def _key_ids(db: Path) -> set[str | None]:
    store = SQLiteStore(f"sqlite:///{db}")
    try:
        ids: set[str | None] = set()
        for rec in store.list_workflows(ListFilter(limit=10**6)):
            ids.add(record_info(rec.inputs).key_id)
            for e in store.load_journal(rec.id):
                ids.add(record_info(e.output or b"").key_id)
        return ids
    finally:
        store.close()


def _verify(db: Path) -> None:
    res = runner.invoke(cli, ["--db", f"sqlite:///{db}", "verify"])
    assert res.exit_code == 0, res.output


def test_rotation_encrypts_then_moves_to_the_new_key(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    db = tmp_path / "r.db"
    _fill(db, 5)
    assert CANARY.encode() in b"".join(p.read_bytes() for p in tmp_path.glob("r.db*"))
    k1 = _key("k1")
    monkeypatch.setenv("CRASHSAFE_KEYS", k1)
    res = runner.invoke(cli, ["--db", f"sqlite:///{db}", "keys", "rotate"])
    assert res.exit_code == 0, res.output
    assert "re-sealed 20 records of 5 workflows with key 'k1'" in res.output
    assert _key_ids(db) == {"k1"}
    _verify(db)
    # k2 becomes active; k1 stays in the ring until the rotation is done.
    k2 = _key("k2")
    monkeypatch.setenv("CRASHSAFE_KEYS", f"{k2},{k1}")
    res = runner.invoke(cli, ["--db", f"sqlite:///{db}", "keys", "rotate"])
    assert "re-sealed 20 records" in res.output
    assert _key_ids(db) == {"k2"}
    monkeypatch.setenv("CRASHSAFE_KEYS", k2)  # the old key can go now
    _verify(db)
    res = runner.invoke(cli, ["--db", f"sqlite:///{db}", "keys", "rotate"])
    assert "re-sealed 0 records" in res.output  # nothing left to do


def test_keys_generate_prints_a_usable_key() -> None:
    res = runner.invoke(cli, ["keys", "generate", "2026-11"])
    assert res.exit_code == 0
    key_id, _, value = res.output.strip().partition("=")
    assert key_id == "2026-11" and len(base64.b64decode(value)) == 32


def test_rotate_without_keys_says_what_to_do(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    res = runner.invoke(cli, ["--db", f"sqlite:///{tmp_path}/x.db", "keys", "rotate"])
    assert res.exit_code == 2 and "set $CRASHSAFE_KEYS first" in res.output


@pytest.mark.slow
def test_a_rotation_killed_midway_loses_nothing_and_resumes(tmp_path: Path) -> None:
    db = tmp_path / "kill.db"
    env = {k: v for k, v in os.environ.items() if k != "CRASHSAFE_KEYS"}
    k1, k2 = _key("k1"), _key("k2")
    old = dict(os.environ)
    os.environ["CRASHSAFE_KEYS"] = k1
    try:
        _fill(db, 300)
    finally:
        os.environ.clear()
        os.environ.update(old)
    both = {**env, "CRASHSAFE_KEYS": f"{k2},{k1}"}
    kills = 0
    for delay in (0.4, 0.6, 0.8):
        proc = subprocess.Popen([sys.executable, "-m", "crashsafe", "--db", f"sqlite:///{db}",
                                 "keys", "rotate"], env=both, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        ids = _key_ids(db)
        assert ids <= {"k1", "k2"}, ids  # every record under exactly one key of the ring
        res = subprocess.run([sys.executable, "-m", "crashsafe", "--db", f"sqlite:///{db}",
                              "verify"], env=both, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    assert kills >= 1, "no kill landed during the rotation"
    done = subprocess.run([sys.executable, "-m", "crashsafe", "--db", f"sqlite:///{db}",
                           "keys", "rotate"], env=both, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _key_ids(db) == {"k2"}
    only_new = subprocess.run([sys.executable, "-m", "crashsafe", "--db", f"sqlite:///{db}",
                               "verify"], env={**env, "CRASHSAFE_KEYS": k2},
                              capture_output=True, text=True)
    assert only_new.returncode == 0, only_new.stdout
