"""Every payload is sealed at the store boundary: checksummed always, encrypted with a
keyring, verified on every read. Real SQLite files; the conformance suite also runs
through the sealed wrapper (tests/test_store_conformance.py)."""

from __future__ import annotations

import base64
import os
import sqlite3
from pathlib import Path

import pytest

import crashsafe
from crashsafe import App, ConfigurationError, CorruptRecordError
from crashsafe.stores.sealed import SealedStore

CANARY = "canary-7f3a9c-do-not-store"


def _keys(key_id: str = "k1") -> str:
    return f"{key_id}={base64.b64encode(os.urandom(32)).decode()}"


def _run(url: str) -> App:
    app = App(url)

    @app.step(name="echo")
    def echo(text: str) -> str:
        return f"seen {text}"

    @app.workflow(name="flow")
    def flow(text: str) -> str:
        return echo(text)

    assert app.start(flow, CANARY, workflow_id="w1").result(timeout=10) == f"seen {CANARY}"
    return app


def _raw_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_without_keys_payloads_are_checksummed_and_read_back(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    db = tmp_path / "plain.db"
    app = _run(f"sqlite:///{db}")
    assert isinstance(app.store, SealedStore)
    app.close()
    with sqlite3.connect(db) as conn:
        (output,) = conn.execute("SELECT output FROM journal WHERE workflow_id = 'w1'").fetchone()
    assert output.startswith(b"\xc5CS")  # a sealed record, not bare JSON


def test_with_a_keyring_no_payload_is_stored_in_plaintext(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRASHSAFE_KEYS", _keys())
    db = tmp_path / "secret.db"
    app = _run(f"sqlite:///{db}")
    assert app.journal("w1")[0].output == f'"seen {CANARY}"'.encode()
    app.close()
    assert CANARY.encode() not in _raw_bytes(db)  # the file and its WAL
    # Without the keyring the store refuses to open: no silent plaintext writes.
    monkeypatch.delenv("CRASHSAFE_KEYS")
    with pytest.raises(ConfigurationError, match="is encrypted"):
        App(f"sqlite:///{db}").store  # noqa: B018 - opening is the point
    # With a different keyring the record cannot be read and says which one it is.
    monkeypatch.setenv("CRASHSAFE_KEYS", _keys("other"))
    other = App(f"sqlite:///{db}")
    with pytest.raises(CorruptRecordError, match="workflow 'w1'"):
        other.journal("w1")
    other.close()


def test_a_damaged_record_is_refused_with_its_name_and_others_stay_readable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    db = tmp_path / "damaged.db"
    app = _run(f"sqlite:///{db}")
    app.close()
    with sqlite3.connect(db) as conn:
        (output,) = conn.execute("SELECT output FROM journal WHERE workflow_id = 'w1'").fetchone()
        flipped = bytearray(output)
        flipped[8] ^= 0x01
        conn.execute("UPDATE journal SET output = ? WHERE workflow_id = 'w1' AND idx = 0",
                     (bytes(flipped),))
    reader = App(f"sqlite:///{db}")
    with pytest.raises(CorruptRecordError, match="'output' at index 0 of workflow 'w1'"):
        reader.journal("w1")
    rec = reader.get_workflow("w1")  # the workflow's own records are intact
    assert rec.output == f'"seen {CANARY}"'.encode()
    reader.close()


def test_a_record_moved_to_another_workflow_is_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRASHSAFE_KEYS", _keys())
    db = tmp_path / "moved.db"
    app = _run(f"sqlite:///{db}")
    handle = app.start("flow", "second", workflow_id="w2")
    handle.result(timeout=10)
    app.close()
    with sqlite3.connect(db) as conn:
        (stolen,) = conn.execute("SELECT output FROM journal WHERE workflow_id = 'w1'").fetchone()
        conn.execute("UPDATE journal SET output = ? WHERE workflow_id = 'w2'", (stolen,))
    reader = App(f"sqlite:///{db}")
    with pytest.raises(CorruptRecordError, match="workflow 'w2'"):
        reader.journal("w2")
    assert reader.journal("w1")[0].output == f'"seen {CANARY}"'.encode()
    reader.close()


def test_bare_json_written_before_sealing_is_still_read(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    from crashsafe.stores.sqlite import SQLiteStore
    from store_conformance import entry, wf

    db = tmp_path / "legacy.db"
    raw = SQLiteStore(f"sqlite:///{db}")
    raw.create_workflow(wf("old", inputs=b'{"args":[],"kwargs":{}}'))
    raw.apply([[entry("old", 0, output=b'"from 0.1"')]])
    raw.close()
    app = App(f"sqlite:///{db}")
    assert app.journal("old")[0].output == b'"from 0.1"'
    assert crashsafe._codec.decode(app.get_workflow("old").inputs) == {"args": [], "kwargs": {}}
    app.close()
