"""Redaction of stored payloads (issue 4, scope 6; RELIABILITY S5).

Unit tests of the redactor, the documented trade-off (a redacted step result replays as
"***"; ``redact_allow`` and ``crashsafe.Secret`` are the ways to get a credential back),
and the canary campaign: canaries planted in the arguments, step outputs, signals,
checkpoints and exceptions of 1,000 workflows on a real SQLite file, encryption off and
on, must not appear in plaintext in the database file, its WAL, any stored payload once
decompressed or opened, the captured logs, or any exception text.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import sqlite3
import traceback
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crashsafe
import crashsafe._secrets
from crashsafe import App, RetryPolicy, Secret, SerializationError, StepError, WorkflowFailedError
from crashsafe._codec import decode, encode
from crashsafe._errors import error_payload
from crashsafe._redaction import LogFilter, Redactor, _has_sensitive
from crashsafe._seal import MAGIC
from crashsafe.stores import MemoryStore
from crashsafe.testing import simulate_crash
from helpers import wait_idle, wait_until
from strategies import storable

CANARY = b"CANARY"


def canary(i: int = 0) -> str:
    return f"CANARY{i:04d}x{secrets.token_hex(6)}"


def _keys() -> str:
    return f"k1={base64.b64encode(os.urandom(32)).decode()}"


def _json(data: bytes) -> Any:
    return msgspec.json.decode(data)


# -- the redactor ----------------------------------------------------------------------------
def test_values_under_sensitive_names_are_masked_at_any_depth() -> None:
    c = canary()
    data, _ = encode({"user": "ann", "access_token": c, "usage": {"max_tokens": 10},
                      "calls": [{"headers": {"Authorization": f"Bearer {c}"}}],
                      "apiKey": None, "password": "", "when": (1, 2)}, "v")
    out = Redactor(True).value(data, encrypted=False, what="v")
    assert CANARY not in out
    assert decode(out) == {"user": "ann", "access_token": "***", "usage": {"max_tokens": 10},
                           "calls": [{"headers": {"Authorization": "***"}}],
                           "apiKey": None, "password": "", "when": (1, 2)}


def test_allow_step_allow_custom_patterns_and_off() -> None:
    c = canary()
    data, _ = encode({"access_token": c, "order_ref": c}, "v")
    allowed = Redactor(True, allow=["accessToken"]).value(data, encrypted=False, what="v")
    assert decode(allowed) == {"access_token": c, "order_ref": c}
    per_step = Redactor(True, step_allow=lambda s: ["access_token"] if s == "auth" else [])
    assert decode(per_step.value(data, encrypted=False, what="v", step="auth"))["access_token"] == c
    assert decode(per_step.value(data, encrypted=False, what="v", step="other")) \
        == {"access_token": "***", "order_ref": c}
    custom = Redactor([r"order_ref"]).value(data, encrypted=False, what="v")
    assert decode(custom) == {"access_token": c, "order_ref": "***"}
    assert Redactor(False).value(data, encrypted=False, what="v") == data
    with pytest.raises(crashsafe.ConfigurationError):
        Redactor("token")
    with pytest.raises(ValueError, match="invalid field-name pattern"):
        Redactor(["("])


def test_a_payload_with_nothing_to_mask_is_stored_unchanged() -> None:
    data, _ = encode({"messages": [{"role": "user", "content": "hello"}]}, "v")
    assert Redactor(True).value(data, encrypted=False, what="v") is data


def test_a_checkpoint_delta_stays_patchable() -> None:
    from crashsafe._checkpoint import diff, patch

    old = {"messages": ["a"], "auth": {"user": "u", "pw": "x"}, "api_key": ""}
    new = {"messages": ["a", "b"], "auth": {"user": "u", "pw": canary()}, "api_key": canary()}
    doc, _ = encode({"n": 1, "delta": diff(old, new)}, "checkpoint")
    out = decode(Redactor(True).value(doc, encrypted=False, what="c", checkpoint=True))
    assert CANARY not in encode(out, "c")[0]
    base = decode(Redactor(True).value(encode({"full": old}, "c")[0], encrypted=False,
                                       what="c", checkpoint=True))["full"]
    assert patch(base, out["delta"]) == {"messages": ["a", "b"], "auth": "***", "api_key": "***"}


def test_error_payloads_lose_credentials_in_message_args_and_traceback() -> None:
    c = canary()

    class LoginError(Exception):
        pass

    try:
        raise LoginError(f"password={c}", {"token": c, "user": "ann"}, Secret(c))
    except LoginError as exc:
        payload = error_payload(exc)
    assert c.encode() in payload  # the leak is real before redaction
    clean = Redactor(True).error(payload)
    assert CANARY not in clean
    doc = _json(clean)
    assert doc["message"].startswith("('password=***'")
    assert doc["args"] == ["password=***", {"token": "***", "user": "ann"}, "***"]
    # A Secret is masked in errors even with redaction off.
    assert c.encode() not in Redactor(False).error(encode(
        {"message": "x", "args": [Secret(c)]}, "e")[0])


def test_the_log_filter_masks_messages_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    c = canary()
    log = logging.getLogger("crashsafe.test-redaction")
    log.addFilter(LogFilter())
    with caplog.at_level(logging.DEBUG, logger="crashsafe.test-redaction"):
        try:
            raise RuntimeError(f"upstream: Authorization: Bearer {c}")
        except RuntimeError:
            log.warning("call failed with api_key=%s", c, exc_info=True)
    assert "call failed with api_key=***" in caplog.text
    assert "Bearer ***" in caplog.text and c not in caplog.text


# -- the trade-off, in a workflow ----------------------------------------------------------------
def _token_app(app: App, crash: bool, allow: tuple[str, ...] = ()) -> Any:
    seen: list[Any] = []

    @app.step(name="get_token", redact_allow=allow)
    def get_token(c: str) -> dict[str, Any]:
        return {"access_token": c, "expires_in": 3600}

    @app.step(name="use")
    def use(token: Any) -> str:
        seen.append(token)
        if crash:
            simulate_crash(app, wait=0)
        return "used"

    @app.workflow(name="tokens")
    def tokens(c: str) -> str:
        got = get_token(c)
        crashsafe.checkpoint({"login": {"access_token": got["access_token"]}}, label="auth")
        return use(got["access_token"])

    return tokens, seen


@pytest.mark.parametrize("allow", [(), ("access_token",)], ids=["redacted", "allowed"])
def test_a_redacted_step_result_replays_as_the_mask(tmp_path: Path, allow: tuple[str, ...],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    url = f"sqlite:///{tmp_path}/t.db"
    c = canary()
    first = App(url)
    flow, seen_first = _token_app(first, crash=True, allow=allow)
    first.start(flow, c, workflow_id="t2")
    wait_idle(first)
    assert seen_first == [c]  # the first run sees the real value
    second = App(url)
    _, seen = _token_app(second, crash=False, allow=allow)
    second.recover()
    assert second.handle("t2").result(timeout=10) == "used"
    # No divergence: the checkpoint's hash covers the redacted state (a step's
    # redact_allow covers that step's results only; App(allow=...) covers everything).
    assert second.checkpoint_state("t2", "auth") == {"login": {"access_token": "***"}}
    assert seen == [c if allow else "***"]  # the replay sees what was stored
    first.close()
    second.close()


def test_a_secret_survives_only_inside_encrypted_records(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    c = canary()

    def build(app: App) -> Any:
        @app.step(name="fetch")
        def fetch() -> Secret:
            return Secret(c)

        @app.workflow(name="vault")
        def vault() -> bool:
            return fetch() == Secret(c)

        return vault

    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    plain = App(f"sqlite:///{tmp_path}/plain.db")
    with pytest.raises(SerializationError, match="only inside encrypted records") as info:
        plain.start(build(plain), workflow_id="v1").result(timeout=10)
    assert c not in "".join(traceback.format_exception(info.value))
    plain.close()
    assert CANARY not in _raw_file_bytes(tmp_path / "plain.db")

    streamer = App(f"sqlite:///{tmp_path}/plain.db")

    @streamer.step(name="stream")
    def stream() -> str:
        crashsafe.save_partial({"so_far": "abc", "key": Secret(c)})
        return "done"

    @streamer.workflow(name="streaming")
    def streaming() -> str:
        return stream()

    with pytest.raises(Exception, match="only inside encrypted records"):
        streamer.start(streaming, workflow_id="v3").result(timeout=10)
    streamer.close()
    assert CANARY not in _raw_file_bytes(tmp_path / "plain.db")

    monkeypatch.setenv("CRASHSAFE_KEYS", _keys())
    enc = App(f"sqlite:///{tmp_path}/enc.db")
    assert enc.start(build(enc), workflow_id="v2").result(timeout=10) is True
    value = decode(enc.journal("v2")[0].output or b"")
    assert value == Secret(c) and repr(value) == "Secret('***')"  # replays as a Secret
    enc.close()
    assert CANARY not in _raw_file_bytes(tmp_path / "enc.db")


# -- the canary campaign ----------------------------------------------------------------------
N = 1000


class Upstream(Exception):
    """Not registered with crashsafe: surfaces as StepError, built from its text."""


def _campaign_app(url: str) -> tuple[App, Any]:
    app = App(url)

    @app.step(name="login", retry=RetryPolicy(max_attempts=2, initial_delay=0.001,
                                              jitter=False))
    def login(i: int, password: str, token: str) -> dict[str, Any]:
        if crashsafe.current().attempt == 1:  # an attempt error is recorded
            raise ConnectionError(f"login {i} failed: password={password} "
                                  f"Authorization: Bearer {token}")
        return {"user": f"u{i}", "access_token": token, "expires_in": 3600,
                "profile": {"name": f"n{i}", "api_key": token, "cookies": [token]}}

    @app.step(name="upstream")
    def upstream(i: int, key: str) -> None:
        raise Upstream(f"upstream {i} rejected sk-proj-{key}", {"secret": key})

    @app.workflow(name="canary_agent")
    def canary_agent(i: int, creds: dict[str, str], *, client_secret: str) -> dict[str, Any]:
        session = login(i, creds["password"], creds["token"])
        crashsafe.checkpoint({"turn": 1, "session": session,
                              "messages": [{"role": "user", "content": f"hi {i}"}]},
                             label="turn-1")
        approval = crashsafe.wait_for("approval", timeout=60)
        if i % 3 == 0:
            raise PermissionError(f"workflow {i}: denied with api_key={creds['api_key']}")
        if i % 3 == 1:
            upstream(i, creds["api_key"])
        return {"ok": approval["approved"], "id_token": creds["token"],
                "user": session["user"]}

    return app, canary_agent


def _raw_file_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))


def _plain_views(value: object) -> list[bytes]:
    """A stored value, and the decompressed body of an unencrypted sealed record."""
    data = value.encode() if isinstance(value, str) else value
    if not isinstance(data, bytes):
        return []
    views = [data]
    if data.startswith(MAGIC) and len(data) > 38 and data[4] & 0x01 and not data[4] & 0x02:
        body = data[6 + data[5]:-32]
        views.append(zstandard.ZstdDecompressor().decompress(body))
    return views


def _every_stored_value(db: Path) -> list[bytes]:
    out: list[bytes] = []
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            # Table names come from the database's own catalogue, quoted as identifiers.
            quoted = '"' + table.replace('"', '""') + '"'
            for row in conn.execute(f"SELECT * FROM {quoted}"):
                for value in row:
                    out.extend(_plain_views(value))
    return out


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_canaries_in_1000_workflows_never_reach_disk_logs_or_exception_text(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        encrypted: bool) -> None:
    if encrypted:
        monkeypatch.setenv("CRASHSAFE_KEYS", _keys())
    else:
        monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    db = tmp_path / "canary.db"
    url = f"sqlite:///{db}"
    app, flow = _campaign_app(url)
    texts: list[str] = []
    planted: set[str] = set()
    wal_seen = b""
    with caplog.at_level(logging.DEBUG, logger="crashsafe"):
        for chunk in range(0, N, 100):
            handles = []
            for i in range(chunk, chunk + 100):
                creds = {"api_key": canary(i), "password": canary(i), "token": canary(i)}
                secret = canary(i)
                planted.update([*creds.values(), secret])
                handles.append(app.start(flow, i, creds, client_secret=secret,
                                         workflow_id=f"c{i}"))
                app.signal(f"c{i}", "approval", {"approved": True,
                                                 "authorization": f"Bearer {canary(i)}"})
            for i, h in zip(range(chunk, chunk + 100), handles, strict=True):
                if i % 3 == 2:
                    assert h.result(timeout=60)["ok"] is True
                    continue
                with pytest.raises(Exception) as info:  # noqa: PT011 - both kinds below
                    h.result(timeout=60)
                assert isinstance(info.value, PermissionError if i % 3 == 0
                                  else WorkflowFailedError)  # wrapping the StepError
                texts.append("".join(traceback.format_exception(info.value)))
                texts.append(repr(info.value))
            wal = db.parent / (db.name + "-wal")
            if wal.exists():
                wal_seen += wal.read_bytes()  # before a checkpoint folds it into the file

        # Read back through a second app (another process would): every payload opened.
        reader, _ = _campaign_app(url)
        opened: list[bytes] = []
        for i in range(N):
            wid = f"c{i}"
            rec = reader.get_workflow(wid)
            opened += [rec.inputs, rec.output or b"", rec.error or b""]
            for e in reader.journal(wid):
                opened += [e.output or b"", e.error or b""]
            opened += [a.error or b"" for a in reader.store.load_attempts(wid)]
            opened.append(reader.store.get_signal(wid, "approval", 0) or b"")
            opened.append(repr(reader.checkpoint_state(wid, "turn-1")).encode())
            if i % 3 != 2:
                with pytest.raises(Exception) as again:  # noqa: PT011
                    reader.handle(wid).result(timeout=5)
                assert isinstance(again.value, PermissionError | WorkflowFailedError | StepError)
                texts.append("".join(traceback.format_exception(again.value)))
                texts.append(str(again.value))
        reader.close()
        app.close()

    assert len(planted) == 4 * N
    # The campaign did exercise every path: attempts failed, workflows failed.
    assert sum("denied with api_key=***" in t for t in texts) >= N // 3
    assert sum("sk-proj-***" in t for t in texts) >= N // 3
    leaks = {
        "database file and WAL": _raw_file_bytes(db) + wal_seen,
        "stored values, decompressed": b"\n".join(_every_stored_value(db)),
        "payloads opened by the app": b"\n".join(opened),
        "captured logs": caplog.text.encode(),
        "exception texts": "\n".join(texts).encode(),
    }
    for where, blob in leaks.items():
        assert CANARY not in blob, f"a canary leaked into the {where}"
    assert b"***" in leaks["payloads opened by the app"]


# -- properties ------------------------------------------------------------------------------
SENSITIVE_KEYS = st.sampled_from(["api_key", "token", "X-Api-Key", "password", "auth",
                                  "clientSecret", "(.*_)?bearer", "max_tokens", "note"])


def _with_sensitive(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    return st.recursive(
        storable(max_leaves=4),
        lambda inner: st.dictionaries(SENSITIVE_KEYS | st.text(max_size=8), inner,
                                      max_size=4) | st.lists(inner, max_size=3),
        max_leaves=max_leaves)


@settings(max_examples=300, deadline=None)
@given(value=_with_sensitive())
def test_redaction_of_any_storable_value_is_complete_and_idempotent(value: Any) -> None:
    data, _ = encode(value, "v")
    redactor = Redactor(True)
    once = redactor.value(data, encrypted=False, what="v")
    decode(once)  # still a valid record
    assert not _has_sensitive(_json(once), redactor._sensitive(None))
    assert redactor.value(once, encrypted=False, what="v") == once
    if not _has_sensitive(_json(data), redactor._sensitive(None)):
        assert once is data


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(outputs=st.lists(_with_sensitive(max_leaves=6), min_size=1, max_size=4),
       data=st.data())
def test_with_redaction_a_recovered_run_stores_what_the_first_run_stored(
        outputs: list[Any], data: st.DataObject) -> None:
    crash_at = data.draw(st.integers(min_value=0, max_value=len(outputs) - 1),
                         label="crash_at")
    store = MemoryStore()

    def build(app: App, crash_index: int) -> Any:
        @app.step(name="produce")
        def produce(i: int) -> Any:
            if i == crash_index:
                simulate_crash(app, wait=0)
            return outputs[i]

        @app.workflow(name="pipeline")
        def pipeline(n: int) -> list[Any]:
            return [produce(i) for i in range(n)]

        return pipeline

    apps: list[App] = []
    try:
        reference = App(store=store)
        apps.append(reference)
        reference.start(build(reference, -1), len(outputs), workflow_id="ref").result(timeout=10)
        first = App(store=store)
        apps.append(first)
        first.start(build(first, crash_at), len(outputs), workflow_id="victim")
        wait_idle(first)
        second = App(store=store)
        apps.append(second)
        build(second, -1)
        second.recover()
        second.handle("victim").result(timeout=10)
        ref_rec, victim_rec = second.get_workflow("ref"), second.get_workflow("victim")
        assert victim_rec.output == ref_rec.output  # byte for byte, as stored (opened)
        assert [e.output for e in second.journal("victim")] == \
            [e.output for e in second.journal("ref")]
    finally:
        for app in reversed(apps):
            app.close(timeout=1.0)


def _drift_app(app: App, password: str = "abc123") -> Any:
    @app.workflow(name="agent")
    def agent() -> str:
        state = {"password": password, "pin": "4711", "messages": ["hi"]}
        crashsafe.checkpoint(state, label="before")
        got = crashsafe.wait_for("go")
        crashsafe.checkpoint({**state, "messages": ["hi", str(got)]}, label="after")
        return str(got)

    return agent


def _checkpoint_records(app: App, wid: str) -> list[dict[str, Any]]:
    return [decode(e.output or b"{}") for e in app.store.load_journal(wid)
            if e.kind == "checkpoint"]


@pytest.mark.parametrize("later", [
    {"redact": True},
    {"redact": [*crashsafe._secrets.DEFAULT_PATTERNS, r"(.*_)?pin"]},
    {"redact": True, "allow": ["pin"]},
], ids=["redact-on", "extra-pattern", "allow"])
def test_changing_the_redaction_settings_does_not_dead_letter_running_workflows(
        later: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    store = MemoryStore()
    first = App(store=store, redact=False)
    first.start(_drift_app(first), workflow_id="D-1")
    wait_until(lambda: first.get_workflow("D-1").status.value == "waiting", 10, "waiting")
    first.close(timeout=1.0)
    # Recorded under "off", which it says (the defaults would be said by nothing).
    assert [m.get("rd") for m in _checkpoint_records(first, "D-1")] == ["off"]
    second = App(store=store, **later)
    try:
        _drift_app(second)
        second.recover()
        second.signal("D-1", "go", 1)
        assert second.handle("D-1").result(timeout=10) == "1"
        records = _checkpoint_records(second, "D-1")
        assert records[0]["rd"] == "off"
        assert records[1].get("rd") == second.store.redactor.hash_tag  # type: ignore[attr-defined]
        # The checkpoint after the change is a full snapshot, readable and hash-checked.
        assert "full" in records[1]
        assert second.checkpoint_state("D-1", "before")["password"] == "abc123"
        after = second.checkpoint_state("D-1", "after")
        assert after["password"] == "***" and after["messages"] == ["hi", "1"]
        assert second.gc(keep_checkpoints=1).skipped == []
    finally:
        second.close(timeout=1.0)


def test_a_real_divergence_is_still_caught_under_recorded_redaction_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    store = MemoryStore()
    first = App(store=store, redact=False)
    first.start(_drift_app(first), workflow_id="D-2")
    wait_until(lambda: first.get_workflow("D-2").status.value == "waiting", 10, "waiting")
    first.close(timeout=1.0)
    second = App(store=store, redact=True)
    try:
        # The rebuilt state differs only under a field redaction would now mask: still a
        # divergence, because the hash was taken with redaction off.
        _drift_app(second, password="other")
        second.recover()
        wait_until(lambda: second.get_workflow("D-2").status.value == "dead_letter", 10,
                   "dead letter")
        assert "state hash" in (second.get_workflow("D-2").reason or "")
    finally:
        second.close(timeout=1.0)


def test_default_settings_record_nothing_and_old_records_mean_the_defaults() -> None:
    app = App(store=MemoryStore())
    try:
        @app.workflow(name="plain")
        def plain() -> int:
            crashsafe.checkpoint({"token": "t0k3n-value", "n": 1})
            return 1

        app.start(plain, workflow_id="P-1").result(timeout=10)
        (record,) = _checkpoint_records(app, "P-1")
        assert "rd" not in record
        from crashsafe._checkpoint import hashed_form
        data = encode({"token": "x"}, "state")[0]
        assert hashed_form(app, data, None) == hashed_form(app, data)
        assert hashed_form(app, data, "off") == data
    finally:
        app.close(timeout=1.0)


def test_retention_rewrites_a_checkpoint_under_the_settings_it_was_recorded_with(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    store = MemoryStore()
    first = App(store=store, redact=False, checkpoint_full_every=10)

    @first.workflow(name="w")
    def w() -> int:
        for i in range(3):
            crashsafe.checkpoint({"password": "abc123", "pad": "x" * 500,
                                  "msgs": list(range(i + 1))}, label=f"c{i}")
        return 1

    first.start(w, workflow_id="W").result(timeout=10)
    assert [c.full for c in first.checkpoints("W")] == [True, False, False]
    first.close(timeout=1.0)
    second = App(store=store, redact=True)
    try:
        # The kept delta is rebased as a full snapshot: masked under the live settings,
        # it would no longer match its hash (taken with redaction off).
        report = second.gc(keep_checkpoints=1)
        assert (report.checkpoints_pruned, report.checkpoints_rebased) == (2, 1)
        assert second.checkpoint_state("W") == {"password": "abc123", "pad": "x" * 500,
                                                "msgs": [0, 1, 2]}
    finally:
        second.close(timeout=1.0)


def test_a_packed_delta_after_redaction_changed_twice_reads_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On, off, on again: the dictionary of a delta recorded in the third run is made of
    step results as the store holds them, one of them stored with redaction off."""
    import random

    monkeypatch.delenv("CRASHSAFE_KEYS", raising=False)
    store = MemoryStore()
    rng = random.Random(7)
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(600)) for _ in range(4)]

    def build(app: App, crash_at: int) -> Any:
        @app.step(name="fetch")
        def fetch(i: int) -> dict[str, str]:
            if i == crash_at:
                simulate_crash(app, wait=0)
            return {"text": texts[i], "password": f"hunter{i}" * 20, "tail": texts[i][:200]}

        @app.workflow(name="agent")
        def agent() -> int:
            msgs = [texts[0] * 5]
            crashsafe.checkpoint({"msgs": msgs}, label="start")
            for i in range(4):
                got = fetch(i)
                msgs.append(got["text"] + got["tail"])
            crashsafe.checkpoint({"msgs": msgs}, label="end")
            return len(msgs)

        return agent

    apps: list[App] = []
    try:
        one = App(store=store)  # redaction on: "start", fetch 0 and 1
        apps.append(one)
        one.start(build(one, 2), workflow_id="P")
        wait_idle(one)
        two = App(store=store, redact=False)  # off: fetch 2 stored with its password
        apps.append(two)
        build(two, 3)
        two.recover()
        wait_idle(two)
        three = App(store=store)  # on again: "end" is a packed delta against "start"
        apps.append(three)
        build(three, -1)
        three.recover()
        assert three.handle("P").result(timeout=10) == 5
        end = _checkpoint_records(three, "P")[-1]
        assert "zd" in end
        assert three.checkpoint_state("P", "end")["msgs"][3] == texts[2] + texts[2][:200]
    finally:
        for app in reversed(apps):
            app.close(timeout=1.0)
