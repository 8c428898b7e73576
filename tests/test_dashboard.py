"""The web dashboard: its JSON API over a real server and SQLite file, its guards, and
an end-to-end run in headless Chromium (Debian's package, driven by Playwright).

The end-to-end test never skips: without /usr/bin/chromium it fails and says how to
install it. Screenshots go to tests/artifacts/dashboard/ (git-ignored), and are copied
to $CRASHSAFE_ARTIFACTS when it is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

import crashsafe
from crashsafe.dashboard import TOKEN_ENV, create_app, is_loopback
from crashsafe.dashboard._views import shown_url
from helpers import Database, wait_until

TOKEN = "test-token-0123456789abcdef"
HOSTILE = """<img src=x onerror="alert('id')">&"'</script>"""
HOSTILE_STEP = "<script>alert('step')</script>"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts" / "dashboard"


# -- a worker with workflows to look at --------------------------------------------------
def make_worker(url: str) -> tuple[crashsafe.App, Any]:
    """An App that serves ``approval_flow``: a step, a checkpoint, a wait for the
    signal ``approval``, then a step that records the decision."""
    app = crashsafe.App(url)

    @app.step(name="lookup")
    def lookup(order: str) -> dict[str, Any]:
        return {"order": order, "total": 42}

    @app.step(name=HOSTILE_STEP)
    def hostile(order: str) -> str:
        return order

    @app.step(name="record")
    def record(decision: Any) -> str:
        return f"decided: {json.dumps(decision, sort_keys=True)}"

    @app.workflow(name="approval_flow")
    def approval_flow(order: str, odd: bool = False) -> dict[str, Any]:
        found = lookup(order)
        if odd:
            hostile(order)
        crashsafe.checkpoint({"found": found}, label="looked-up")
        decision = crashsafe.wait_for("approval", timeout=3600)
        return {"found": found, "outcome": record(decision)}

    return app, approval_flow


@contextmanager
def running(app: crashsafe.App, *, token: str = TOKEN, public: bool = False) -> Iterator[str]:
    """A real uvicorn server with the dashboard over ``app`` on a free port."""
    asgi = create_app(app, token=token, public=public)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(asgi, log_level="warning", access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, "the dashboard server to start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dash.db'}"


@pytest.fixture
def worker(db_url: str) -> Iterator[tuple[crashsafe.App, Any]]:
    app, flow = make_worker(db_url)
    yield app, flow
    app.close(timeout=2)


@pytest.fixture
def reader(db_url: str) -> Iterator[crashsafe.App]:
    """The dashboard's own App: it registers no workflow, as `crashsafe dashboard`."""
    app = crashsafe.App(db_url)
    yield app
    app.close()


def start_waiting(worker: tuple[crashsafe.App, Any], workflow_id: str, **kw: Any) -> None:
    app, flow = worker
    handle = app.start(flow, workflow_id.lower(), workflow_id=workflow_id, **kw)
    wait_until(lambda: handle.status() == "waiting", 10, f"{workflow_id} to wait")


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the JSON API ------------------------------------------------------------------------
def test_list_filters_by_status_name_and_literal_id_prefix(
        worker: tuple[crashsafe.App, Any], reader: crashsafe.App) -> None:
    app, _ = worker

    @app.workflow(name="quick")
    def quick() -> str:
        return "done"

    for wid in ("A-1", "A-2", "50%-off"):
        start_waiting(worker, wid)
    for wid in ("B-1", "50x-off"):
        app.start(quick, workflow_id=wid).result(timeout=10)
    with running(reader) as base, httpx.Client(base_url=base) as http:
        def ids(**params: str) -> set[str]:
            resp = http.get("/api/workflows", params=params)
            assert resp.status_code == 200, resp.text
            return {w["id"] for w in resp.json()["workflows"]}

        assert ids() == {"A-1", "A-2", "50%-off", "B-1", "50x-off"}
        assert ids(status="waiting") == {"A-1", "A-2", "50%-off"}
        assert ids(status="succeeded") == {"B-1", "50x-off"}
        assert ids(name="quick") == {"B-1", "50x-off"}
        assert ids(name="approval_flow", prefix="A-") == {"A-1", "A-2"}
        assert ids(prefix="50%") == {"50%-off"}  # % is a character, not a wildcard
        assert ids(prefix="A_") == set()
        assert ids(status="failed") == set()
        newest = http.get("/api/workflows", params={"limit": "2"}).json()
        assert [w["id"] for w in newest["workflows"]] == ["50x-off", "B-1"]
        assert http.get("/api/workflows", params={"limit": "many"}).status_code == 400
        bad = http.get("/api/workflows", params={"status": "on-fire"})
        assert bad.status_code == 400
        assert "on-fire" in bad.json()["error"]


def test_hostile_ids_and_names_come_back_exact_and_inert(
        worker: tuple[crashsafe.App, Any], reader: crashsafe.App) -> None:
    start_waiting(worker, HOSTILE, odd=True)
    with running(reader) as base, httpx.Client(base_url=base) as http:
        listed = http.get("/api/workflows")
        detail = http.get("/api/workflow", params={"id": HOSTILE})
        page = http.get("/", params={"id": HOSTILE})
    for resp in (listed, detail):
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/json"
        # No raw markup characters anywhere in the bytes: user data is escaped even if a
        # response were ever rendered as HTML.
        assert not set(resp.content.decode()) & set("<>&")
    assert [w["id"] for w in listed.json()["workflows"]] == [HOSTILE]
    data = detail.json()
    assert data["workflow"]["id"] == HOSTILE
    assert [e["name"] for e in data["journal"] if e["kind"] == "step"] == ["lookup",
                                                                           HOSTILE_STEP]
    assert any(row["label"] == f"step {HOSTILE_STEP}" for row in data["timeline"]["rows"])
    # The page is a static shell: it never contains user data, and its policy forbids
    # inline script.
    assert HOSTILE not in page.text and "alert(" not in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert page.headers["x-frame-options"] == "DENY"


def test_unknown_workflow_is_404_for_reads_and_actions(reader: crashsafe.App) -> None:
    reader.list_workflows()  # opens (creates) the database
    with running(reader) as base, httpx.Client(base_url=base) as http:
        resp = http.get("/api/workflow", params={"id": "nope"})
        assert resp.status_code == 404
        assert "nope" in resp.json()["error"]
        for action, body in (("signal", {"id": "nope", "name": "approval", "payload": "1"}),
                             ("cancel", {"id": "nope"}), ("resume", {"id": "nope"}),
                             ("rollback", {"id": "nope", "to": None})):
            resp = http.post(f"/api/{action}", json=body, headers=auth())
            assert resp.status_code == 404, (action, resp.text)
            assert "nope" in resp.json()["error"]


def test_bad_json_signal_is_400_and_records_nothing(
        worker: tuple[crashsafe.App, Any], reader: crashsafe.App) -> None:
    start_waiting(worker, "T-7")
    with running(reader) as base, httpx.Client(base_url=base) as http:
        resp = http.post("/api/signal", headers=auth(),
                         json={"id": "T-7", "name": "approval", "payload": "{approved: yes"})
        assert resp.status_code == 400
        assert "not valid JSON" in resp.json()["error"]
        not_json = http.post("/api/signal", content=b"{'id': 'T-7'",
                             headers={**auth(), "Content-Type": "application/json"})
        assert not_json.status_code == 400
        assert "not valid JSON" in not_json.json()["error"]
        no_name = http.post("/api/signal", headers=auth(),
                            json={"id": "T-7", "name": " ", "payload": "true"})
        assert no_name.status_code == 400
        # Nothing was recorded: the first signal the workflow sees is the next good one.
        assert reader.store.get_signal("T-7", "approval", 0) is None
        assert reader.get_workflow("T-7").status == "waiting"
        ok = http.post("/api/signal", headers=auth(),
                       json={"id": "T-7", "name": "approval", "payload": '{"approved": true}'})
        assert ok.status_code == 200, ok.text
    handle = worker[0].handle("T-7")
    assert handle.result(timeout=15)["outcome"] == 'decided: {"approved": true}'


def test_control_needs_the_token_json_and_our_origin(
        worker: tuple[crashsafe.App, Any], reader: crashsafe.App) -> None:
    start_waiting(worker, "T-8")
    body = {"id": "T-8"}
    with running(reader) as base, httpx.Client(base_url=base) as http:
        assert http.get("/api/workflows").status_code == 200  # loopback: reads are open
        metrics = http.get("/metrics")  # mounted here; its figures are test_prometheus's
        assert metrics.status_code == 200, metrics.text
        assert metrics.headers["content-type"].startswith("text/plain")
        assert http.post("/api/cancel", json=body).status_code == 401
        assert http.post("/api/cancel", json=body, headers=auth("x" * 26)).status_code == 401
        assert http.post("/api/cancel", json=body,
                         headers={"Authorization": TOKEN}).status_code == 401
        form = http.post("/api/cancel", content=b"id=T-8",
                         headers={**auth(), "Content-Type": "application/x-www-form-urlencoded"})
        assert form.status_code == 415
        foreign = http.post("/api/cancel", json=body,
                            headers={**auth(), "Origin": "http://evil.example"})
        assert foreign.status_code == 403
        huge = http.post("/api/signal", content=iter([b" " * 65536] * 17),  # chunked
                         headers={**auth(), "Content-Type": "application/json"})
        assert huge.status_code == 413
        rebound = http.get("/api/workflows", headers={"Host": "evil.example"})
        assert rebound.status_code == 403
        assert reader.get_workflow("T-8").status == "waiting"  # none of those acted
        done = http.post("/api/cancel", json=body, headers={**auth(), "Origin": base})
        assert done.status_code == 200, done.text
        again = http.post("/api/cancel", json=body, headers=auth())
        assert again.status_code == 409
    wait_until(lambda: reader.get_workflow("T-8").status == "cancelled", 15,
               "the worker to finish cancelling T-8")


def test_exposed_dashboard_needs_the_token_for_reads(
        worker: tuple[crashsafe.App, Any], reader: crashsafe.App) -> None:
    start_waiting(worker, "T-9")
    with running(reader, public=True) as base, httpx.Client(base_url=base) as http:
        for path in ("/api/workflows", "/api/workflow?id=T-9", "/api/breakers",
                     "/api/checks", "/metrics"):
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers=auth("wrong-token-0123456789")).status_code == 401
        resp = http.get("/api/workflows", headers=auth())
        assert resp.status_code == 200
        assert [w["id"] for w in resp.json()["workflows"]] == ["T-9"]
        session = http.get("/api/session").json()
        assert session == {"reads_need_token": True, "authorized": False, "database": None}
        # Exposed, another Host is fine (a proxy's name); the token is what guards.
        assert http.get("/api/breakers", headers={**auth(), "Host": "dash.example"}
                        ).status_code == 200
    assert shown_url("postgresql://agents:s3cret@db:5432/agents") == \
        "postgresql://agents:***@db:5432/agents"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")


def test_cli_generates_and_requires_a_token_off_loopback(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    crashsafe.App(url).list_workflows()  # create the database
    env = {k: v for k, v in os.environ.items() if k != "CRASHSAFE_DASHBOARD_TOKEN"}
    with dashboard_process(url, host="0.0.0.0", env=env) as (port, token, _):
        assert len(token) >= 32
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            assert http.get("/api/workflows").status_code == 401
            assert http.get("/api/workflows", headers=auth(token)).status_code == 200


def test_timeline_shows_retries_checkpoints_waits_and_rollbacks(
        worker: tuple[crashsafe.App, Any], reader: crashsafe.App) -> None:
    app, _ = worker
    calls = {"n": 0}

    @app.step(retry=crashsafe.RetryPolicy(max_attempts=3, initial_delay=0.01, jitter=False))
    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TimeoutError("the model took too long")
        return "ok"

    @app.workflow(name="story")
    def story() -> str:
        crashsafe.checkpoint({"turn": 1}, label="first")
        flaky()
        return str(crashsafe.wait_for("go"))

    handle = app.start(story, workflow_id="S-1")
    wait_until(lambda: handle.status() == "waiting", 10, "S-1 to wait")
    with running(reader) as base, httpx.Client(base_url=base) as http:
        tl = http.get("/api/workflow", params={"id": "S-1"}).json()["timeline"]
        styles = {s["style"] for row in tl["rows"] for s in row["segments"]}
        marks = {m["style"] for row in tl["rows"] for m in row["marks"]}
        assert {"status-waiting", "ok", "retry", "waiting"} <= styles
        assert "checkpoint" in marks
        retry = next(s for row in tl["rows"] for s in row["segments"] if s["style"] == "retry")
        assert "timeout" in retry["title"] and "the model took too long" in retry["title"]
        waiting = next(row for row in tl["rows"] if row["kind"] == "wait")
        assert waiting["open"] is True and waiting["label"] == "wait go"
        assert tl["start"] <= retry["start"] <= retry["end"] <= tl["end"]

        # The dashboard's App registers no step: it cannot run `flaky`'s compensation.
        resp = http.post("/api/rollback", headers=auth(), json={"id": "S-1", "to": "first"})
        assert resp.status_code == 409, resp.text
        resp = http.post("/api/rollback", headers=auth(),
                         json={"id": "S-1", "to": "first", "force": True})
        assert resp.status_code == 200, resp.text
        data = http.get("/api/workflow", params={"id": "S-1"}).json()
        assert {r["kind"] for r in data["rewound"]} >= {"step", "wait"}
        assert [e["style"] for e in data["timeline"]["events"]].count("rollback") >= 1
        missing = http.post("/api/rollback", headers=auth(), json={"id": "S-1", "to": "nope"})
        assert missing.status_code == 404


def test_the_same_api_over_postgres(tmp_path: Path) -> None:
    db = Database("postgres", tmp_path)
    worker, flow = make_worker(db.url)
    reader = crashsafe.App(db.url)
    try:
        start_waiting((worker, flow), "P-1")
        start_waiting((worker, flow), "P%2")
        with running(reader) as base, httpx.Client(base_url=base) as http:
            listed = http.get("/api/workflows", params={"prefix": "P%", "status": "waiting"})
            assert [w["id"] for w in listed.json()["workflows"]] == ["P%2"]
            data = http.get("/api/workflow", params={"id": "P-1"}).json()
            assert data["waiting_for"] == "approval"
            assert [c["label"] for c in data["checkpoints"]] == ["looked-up"]
            sent = http.post("/api/signal", headers=auth(),
                             json={"id": "P-1", "name": "approval", "payload": "[1, 2]"})
            assert sent.status_code == 200, sent.text
        assert worker.handle("P-1").result(timeout=15)["outcome"] == "decided: [1, 2]"
    finally:
        worker.close(timeout=2)
        reader.close()
        db.close()


def test_timeline_shows_a_kill_and_the_recovery(db_url: str, reader: crashsafe.App) -> None:
    script = str(Path(__file__).parent / "dashboard_worker.py")
    crashed = subprocess.run([sys.executable, script, db_url, "crash"], capture_output=True,
                             text=True, timeout=60)
    assert crashed.returncode == -9, crashed.stderr  # SIGKILL, in its second attempt
    resumed = subprocess.run([sys.executable, script, db_url, "recover"],
                             capture_output=True, text=True, timeout=60)
    assert resumed.stdout.strip() == "answered at attempt 3", resumed.stderr
    with running(reader) as base, httpx.Client(base_url=base) as http:
        data = http.get("/api/workflow", params={"id": "K-1"}).json()
    tl = data["timeline"]
    step = next(row for row in tl["rows"] if row["kind"] == "step")
    styles = [s["style"] for s in step["segments"]]
    assert styles.count("retry") == 1 and styles.count("crashed") == 1
    assert styles[0] == "ok" and "backoff" in styles
    crashed_seg = next(s for s in step["segments"] if s["style"] == "crashed")
    recovered = [e for e in tl["events"] if e["style"] == "recovered"]
    assert len(recovered) == 2  # the cut-off attempt, and the takeover from the log
    cut = next(e for e in recovered if "attempt 2 of step 'call_llm'" in e["title"])
    assert cut["at"] == crashed_seg["end"]
    (takeover,) = [e for e in recovered if e["title"].startswith("taken over from ")]
    (seen,) = [e for e in tl["events"] if e["style"] == "crashed"]
    assert seen["at"] <= takeover["at"] and "last seen alive" in seen["title"]
    assert data["workflow"]["status"] == "succeeded"


def test_breakers_and_alert_panel(worker: tuple[crashsafe.App, Any],
                                  reader: crashsafe.App) -> None:
    app, _ = worker
    app.breaker("llm<b>", consecutive_failures=2, open_for=300)

    @app.step(name="call_llm", retry=1, breaker="llm<b>")
    def call_llm(turn: int) -> str:
        raise ConnectionError("upstream is down")

    @app.workflow(name="chatty")
    def chatty(turn: int) -> str:
        return call_llm(turn)

    for turn in range(2):
        with pytest.raises(ConnectionError):
            app.start(chatty, turn, workflow_id=f"C-{turn}").result(timeout=10)
    with running(reader) as base, httpx.Client(base_url=base) as http:
        breakers = http.get("/api/breakers").json()["breakers"]
        assert [(b["name"], b["state"], b["trips"]) for b in breakers] == [("llm<b>", "open", 1)]
        checks = http.get("/api/checks", params={"since": "3600"}).json()
        by_name = {c["name"]: c for c in checks["checks"]}
        assert by_name["retry rate"]["status"] == "OK"
        assert by_name["success after retry"]["status"] == "NO DATA"
        assert by_name["breaker open longest"]["status"] == "OK"  # open for seconds only
        assert checks["workflows"] == 2 and checks["by_status"]["failed"] == 2
        tight = http.get("/api/checks", params={"since": "nope"})
        assert tight.status_code == 400
        assert http.get("/api/checks", params={"since": "-5"}).status_code == 400


def test_missing_extra_names_the_install_command(tmp_path: Path) -> None:
    crashsafe.App(f"sqlite:///{tmp_path / 'x.db'}").list_workflows()  # create the database
    code = ("import sys; sys.modules['uvicorn'] = None; "
            "from crashsafe.cli.main import run; run()")
    proc = subprocess.run(
        [sys.executable, "-c", code, "dashboard", "--db", f"sqlite:///{tmp_path / 'x.db'}"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'crashsafe[dashboard]'" in proc.stderr


# -- end to end in Chromium ----------------------------------------------------------------
@contextmanager
def dashboard_process(url: str, *, host: str = "127.0.0.1", token: str | None = None,
                      env: dict[str, str] | None = None) -> Iterator[tuple[int, str, Any]]:
    """`crashsafe dashboard --port 0` in a child process; yields (port, token, process)."""
    cmd = [sys.executable, "-m", "crashsafe", "dashboard", "--db", url, "--host", host,
           "--port", "0"] + (["--token", token] if token else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**(env or os.environ), "COLUMNS": "300"})
    try:
        seen: list[str] = []
        found = None
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while found is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            found = re.search(r"open http://\S+:(\d+)/(?:#token=(\S+))?", line)
        if found is None:
            proc.kill()
            pytest.fail(f"`crashsafe dashboard` did not start: {''.join(seen)}"
                        f"{proc.stderr.read() if proc.stderr else ''}")
        # A token the user gave is never printed; one made for the run always is.
        given = token or (env or os.environ).get(TOKEN_ENV)
        assert (found.group(2) is None) == bool(given), seen
        assert not given or given not in "".join(seen)
        yield int(found.group(1)), found.group(2) or given or "", proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("CRASHSAFE_ARTIFACTS")
    if extra:
        target = Path(extra) / "dashboard"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)


def test_end_to_end_in_chromium_signal_resumes_the_workflow(
        worker: tuple[crashsafe.App, Any], db_url: str) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the dashboard's end-to-end test drives Debian's "
                    "Chromium. Install it with `apt-get install chromium` (.ci/run does)")
    from playwright.sync_api import expect, sync_playwright

    start_waiting(worker, "T-42")
    start_waiting(worker, HOSTILE, odd=True)
    problems: list[str] = []
    with dashboard_process(db_url, token=TOKEN) as (port, token, _), sync_playwright() as pw:
        assert token == TOKEN
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            # A JavaScript dialog (alert, confirm) would mean injected script ran: the
            # page's own confirmation is an HTML <dialog>, never window.confirm.
            page.on("dialog", lambda d: (problems.append(f"JS dialog: {d.message}"),
                                         d.dismiss()))
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(f"console: {msg.text}")
                    if msg.type == "error" else None)
            page.goto(f"http://127.0.0.1:{port}/#token={token}")
            expect(page.locator("#token-state")).to_have_text("token accepted")
            assert "#token" not in page.url  # the token leaves the address bar at once
            rows = page.locator("#workflow-table tbody tr")
            expect(rows).to_have_count(2)
            expect(page.locator("#workflow-table a", has_text=HOSTILE)).to_have_count(1)
            expect(page.locator("#checks tr.check").first).to_be_visible()
            _shot(page, "1-list")

            page.select_option("#f-status", "waiting")
            page.fill("#f-prefix", "T-")
            page.click("#filters button[type=submit]")
            expect(rows).to_have_count(1)
            assert "prefix=T-" in page.url

            page.click("#workflow-table a:text-is('T-42')")
            expect(page.locator("#wf-id")).to_have_text("T-42")
            expect(page.locator("#wf-status")).to_have_text("waiting")
            timeline = page.locator("svg#timeline")
            expect(timeline.locator("rect[data-style=ok]")).to_have_count(1)
            expect(timeline.locator("rect[data-style=waiting]")).to_have_count(1)
            expect(timeline.locator("polygon[data-style=checkpoint]")).to_have_count(1)
            expect(page.locator("#sig-name")).to_have_value("approval")
            _shot(page, "2-workflow-waiting")

            page.fill("#sig-payload", '{"approved": true, "by": "playwright"}')
            page.click("#btn-signal")
            dialog = page.locator("dialog#confirm")
            expect(dialog).to_be_visible()
            expect(dialog).to_contain_text('Send the signal "approval" to workflow T-42')
            _shot(page, "3-confirm-signal")
            page.click("#confirm-yes")
            expect(page.locator("#flash")).to_contain_text("sent signal 'approval' to T-42")
            expect(page.locator("#wf-status")).to_have_text("succeeded", timeout=20_000)
            expect(timeline.locator("circle[data-style=signal]")).to_have_count(1)
            expect(page.locator("#wf-result")).to_contain_text("playwright")
            _shot(page, "4-workflow-succeeded")

            page.goto(f"http://127.0.0.1:{port}/workflow?id=" + _quote(HOSTILE))
            expect(page.locator("#wf-id")).to_have_text(HOSTILE)
            expect(page.locator("svg#timeline text", has_text=HOSTILE_STEP[:20])).to_have_count(1)
            _shot(page, "5-hostile-id")
            # Dismissing the confirmation does nothing; confirming cancels.
            page.click("#btn-cancel")
            expect(dialog).to_contain_text("Cancel workflow")
            page.click("#confirm-no")
            expect(dialog).to_be_hidden()
            page.wait_for_timeout(500)
            assert worker[0].get_workflow(HOSTILE).status == "waiting"
            page.click("#btn-cancel")
            page.click("#confirm-yes")
            expect(page.locator("#wf-status")).to_have_text("cancelled", timeout=20_000)
            expect(page.locator("#btn-resume")).to_be_enabled()
        finally:
            browser.close()
    assert problems == []
    result = worker[0].handle("T-42").result(timeout=10)
    assert result["outcome"] == 'decided: {"approved": true, "by": "playwright"}'


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


# -- review findings -----------------------------------------------------------------------
def _client(app: crashsafe.App, *, public: bool = False) -> Any:
    from starlette.testclient import TestClient

    return TestClient(create_app(app, token=TOKEN, public=public),
                      raise_server_exceptions=False, base_url="http://127.0.0.1")


def test_rollback_refuses_compensations_it_cannot_run_and_running_workflows(
        db_url: str, reader: crashsafe.App) -> None:
    worker = crashsafe.App(db_url)
    undone: list[str] = []
    gate = threading.Event()

    @worker.step(name="pay", compensate=undone.append)
    def pay(order: str) -> str:
        return "paid " + order

    @worker.step(name="slow")
    def slow() -> str:
        gate.wait(20)
        return "slow"

    @worker.workflow(name="flow")
    def flow(order: str) -> str:
        crashsafe.checkpoint({"order": order}, label="start")
        return pay(order)

    @worker.workflow(name="busy")
    def busy() -> str:
        crashsafe.checkpoint({}, label="start")
        return slow()

    try:
        for wid in ("F-1", "F-2", "F-3"):
            worker.start(flow, wid.lower(), workflow_id=wid).result(timeout=10)
        running_handle = worker.start(busy, workflow_id="R-1")
        wait_until(lambda: running_handle.status() == "running"
                   and worker.journal("R-1"), 10, "R-1 to run its step")
        dash = _client(reader)
        # The dashboard's App registers no step: refused, nothing rolled back or released.
        resp = dash.post("/api/rollback", json={"id": "F-1", "to": "start"}, headers=auth())
        assert resp.status_code == 409, resp.text
        message = resp.json()["error"]
        assert "'pay' (#1)" in message and "registers the workflow's code" in message
        assert '"force": true' in message
        assert reader.rewound("F-1") == [] and reader.get_workflow("F-1").status == "succeeded"
        assert undone == []
        # Forced: rolled back without the compensation, and the record says so.
        resp = dash.post("/api/rollback", json={"id": "F-2", "to": "start", "force": True},
                         headers=auth())
        assert resp.status_code == 200, resp.text
        assert "compensations not run: 'pay' (#1)" in resp.json()["message"]
        assert all("forced" in why for _, why, _ in reader.rewound("F-2"))
        assert undone == []
        bad = dash.post("/api/rollback", json={"id": "F-3", "force": "yes"}, headers=auth())
        assert bad.status_code == 400
        # Served from the process that registers the code, the compensation runs.
        resp = _client(worker).post("/api/rollback", json={"id": "F-3", "to": "start"},
                                    headers=auth())
        assert resp.status_code == 200, resp.text
        assert undone == ["paid f-3"]
        # A workflow running a step is not rolled back from the dashboard.
        resp = dash.post("/api/rollback", json={"id": "R-1", "to": "start", "force": True},
                         headers=auth())
        assert resp.status_code == 409, resp.text
        assert "running" in resp.json()["error"]
        assert reader.rewound("R-1") == []
    finally:
        gate.set()
        worker.close(timeout=5)


def test_far_off_deadline_renders_and_unexpected_errors_are_generic_500(
        worker: tuple[crashsafe.App, Any], reader: crashsafe.App,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from crashsafe.dashboard import _views

    app, _ = worker

    @app.workflow(name="patient")
    def patient() -> Any:
        return crashsafe.wait_for("go", timeout=1e12)

    handle = app.start(patient, workflow_id="X-1")
    wait_until(lambda: handle.status() == "waiting", 10, "X-1 to wait")
    dash = _client(reader)
    resp = dash.get("/api/workflow", params={"id": "X-1"})
    assert resp.status_code == 200, resp.text
    wait = next(e for e in resp.json()["journal"] if e["kind"] == "wait")
    assert "beyond the calendar" in wait["preview"]
    assert _views.timestamp(0) == "1970-01-01 00:00:00 UTC"
    assert "beyond the calendar" in _views.timestamp(1e300)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom: password=hunter2-canary at /srv/secret/path")

    monkeypatch.setattr(_views, "workflow", broken)
    with caplog.at_level("ERROR", logger="crashsafe"):
        resp = dash.get("/api/workflow", params={"id": "X-1"})
    assert resp.status_code == 500
    assert resp.headers["content-type"] == "application/json"
    assert "internal error" in resp.json()["error"]
    assert "hunter2" not in resp.text and "Traceback" not in resp.text and "boom" not in resp.text
    logged = [r for r in caplog.records if "dashboard" in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert logged[0].exc_text and "RuntimeError" in logged[0].exc_text
    assert "hunter2" not in logged[0].exc_text  # masked in the log too


def test_deeply_nested_json_in_a_control_request_is_400(reader: crashsafe.App) -> None:
    reader.list_workflows()
    dash = _client(reader)
    headers = {**auth(), "Content-Type": "application/json"}
    deep = b"[" * 100_000 + b"]" * 100_000
    resp = dash.post("/api/signal", content=deep, headers=headers)
    assert resp.status_code == 400, resp.text
    assert "nested too deeply" in resp.json()["error"]
    body = json.dumps({"id": "x", "name": "n", "payload": "[" * 100_000 + "]" * 100_000})
    resp = dash.post("/api/signal", content=body.encode(), headers=headers)
    assert resp.status_code == 400, resp.text
    assert "nested too deeply" in resp.json()["error"]


def test_workflow_response_is_bounded_and_pages(
        worker: tuple[crashsafe.App, Any], reader: crashsafe.App) -> None:
    from crashsafe.dashboard import _views

    app, _ = worker

    @app.step(name="tick")
    def tick(i: int) -> str:
        return "y" * 100_000

    @app.workflow(name="long")
    def long(n: int) -> str:
        for _ in range(n):
            crashsafe.now()
        tick(0)
        return "x" * 1_000_000

    @app.workflow(name="huge_int")
    def huge_int() -> int:
        return 10 ** 4000

    app.start(long, 1200, workflow_id="L-1").result(timeout=60)
    app.start(huge_int, workflow_id="L-2").result(timeout=10)
    dash = _client(reader)
    data = dash.get("/api/workflow", params={"id": "L-1"}).json()
    journal = data["journal"]
    assert len(journal) == _views.MAX_JOURNAL == 500
    assert data["truncated"] == 1201 - 500
    assert [e["index"] for e in journal] == list(range(701, 1201))
    assert len(journal[-1]["preview"]) <= 160
    assert len(data["workflow"]["result"]) <= _views.MAX_RESULT
    assert data["workflow"]["result"].endswith("…")
    assert len(data["timeline"]["rows"]) <= 501
    earlier = dash.get("/api/workflow", params={"id": "L-1", "before": "701"}).json()
    assert [e["index"] for e in earlier["journal"]] == list(range(201, 701))
    assert earlier["truncated"] == 201 and earlier["before"] == 701
    first = dash.get("/api/workflow", params={"id": "L-1", "before": "201"}).json()
    assert [e["index"] for e in first["journal"]] == list(range(201))
    assert first["truncated"] == 0
    assert dash.get("/api/workflow", params={"id": "L-1", "before": "x"}).status_code == 400
    # An integer far too long to show is named, not rendered.
    big = dash.get("/api/workflow", params={"id": "L-2"})
    assert big.status_code == 200, big.text
    assert big.json()["workflow"]["result"] == "<an integer of 13288 bits>"
    assert _views.bounded_repr(list(range(10 ** 6)), 20) == "[0, 1, 2, 3, 4, 5, …"
    assert _views.bounded_repr({"a": (1,), "b": set()}, 80) == repr({"a": (1,), "b": set()})


def test_a_given_token_is_never_printed_and_short_public_tokens_are_refused(
        tmp_path: Path, reader: crashsafe.App) -> None:
    url = f"sqlite:///{tmp_path / 'tok.db'}"
    crashsafe.App(url).list_workflows()
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    with dashboard_process(url, token=TOKEN, env=env) as (_, token, _proc):
        assert token == TOKEN  # the helper checked it was not printed
    with dashboard_process(url, env={**env, TOKEN_ENV: "env-token-0123456789"}) as (_, token, _p):
        assert token == "env-token-0123456789"
    with pytest.raises(crashsafe.ConfigurationError, match="at least 16"):
        create_app(reader, token="short", public=True)
    create_app(reader, token="x" * 16, public=True)


def _hostile(tag: str) -> str:
    return (f"""<img src=x onerror="alert('{tag}')">"><script>alert('{tag}')</script>"""
            f"javascript:alert('{tag}')")


def test_chromium_shows_hostile_text_literally_and_guards_rollback(
        worker: tuple[crashsafe.App, Any], db_url: str) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install chromium`")
    from playwright.sync_api import expect, sync_playwright

    app, _ = worker
    error, signal, label, breaker, reason = (_hostile(t) for t in
                                             ("error", "signal", "label", "breaker", "reason"))
    gate = threading.Event()
    app.breaker(breaker, consecutive_failures=1, open_for=300)

    @app.step(name="boom", retry=1, breaker=breaker)
    def boom() -> str:
        raise ValueError(error)

    @app.step(name="slow")
    def slow() -> str:
        gate.wait(60)
        return "slow"

    @app.workflow(name="hostile_fail")
    def hostile_fail() -> str:
        crashsafe.checkpoint({}, label=label)
        return boom()

    @app.workflow(name="hostile_wait")
    def hostile_wait() -> Any:
        crashsafe.checkpoint({}, label=label)
        return crashsafe.wait_for(signal)

    @app.workflow(name="busy")
    def busy() -> str:
        crashsafe.checkpoint({}, label="start")
        return slow()

    @app.workflow(name="long")
    def long(n: int) -> int:
        for _ in range(n):
            crashsafe.now()
        return n

    with pytest.raises(ValueError, match="onerror"):
        app.start(hostile_fail, workflow_id="HF-1").result(timeout=10)
    waiting = app.start(hostile_wait, workflow_id="HW-1")
    wait_until(lambda: waiting.status() == "waiting", 10, "HW-1 to wait")
    other = crashsafe.App(db_url)  # serves nothing: HR-1 stays in its queue until cancelled

    @other.workflow(name="queued")
    def queued() -> str:
        return "never runs"

    other.queue("nobody").enqueue(queued, workflow_id="HR-1")
    assert other.cancel("HR-1", reason=reason)
    other.close()
    busy_handle = app.start(busy, workflow_id="R-1")
    wait_until(lambda: busy_handle.status() == "running" and len(app.journal("R-1")) == 1,
               10, "R-1 to run its step")
    app.start(long, 520, workflow_id="L-1").result(timeout=60)
    hidden = len(app.journal("L-1")) - 500
    problems: list[str] = []
    try:
        with dashboard_process(db_url, token=TOKEN) as (port, token, _), \
                sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1360, "height": 900})
                page.on("dialog", lambda d: (problems.append(f"JS dialog: {d.message}"),
                                             d.dismiss()))
                page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
                base = f"http://127.0.0.1:{port}"

                def inert() -> None:
                    assert page.locator("img").count() == 0
                    assert page.locator("script").count() == 1  # dashboard.js alone
                    assert page.locator("a[href^='javascript']").count() == 0

                # A malformed %-escape in the link must not break the page.
                page.goto(f"{base}/?from=a-bad-link#token=%E0%A4%A")
                expect(page.locator("#token-state")).to_have_text("token refused")
                page.goto(f"{base}/#token={token}")
                expect(page.locator("#token-state")).to_have_text("token accepted")
                expect(page.locator("#breaker-table tbody td.mono")).to_have_text(breaker)
                inert()

                page.goto(f"{base}/workflow?id=HF-1")
                expect(page.locator("#wf-error")).to_have_text("error: ValueError: " + error)
                expect(page.locator("#journal td.error").first).to_contain_text(error)
                expect(page.locator("#rb-to option").nth(1)).to_contain_text(label)
                expect(page.locator("#btn-rollback")).to_be_enabled()
                inert()

                page.goto(f"{base}/workflow?id=HW-1")
                expect(page.locator("#sig-name")).to_have_value(signal)
                expect(page.locator("#sig-hint")).to_have_text(f'waiting for "{signal}"')
                expect(page.locator("#rb-to option").nth(1)).to_contain_text(label)
                texts = page.locator("svg#timeline title").all_text_contents()
                assert any(signal in t for t in texts) and any(label in t for t in texts)
                inert()
                # The confirmation says what happens to compensations, forced or not.
                page.click("#btn-rollback")
                dialog = page.locator("dialog#confirm")
                expect(dialog).to_contain_text("the rollback is refused")
                page.click("#confirm-no")
                page.check("#rb-force")
                page.click("#btn-rollback")
                expect(dialog).to_contain_text("Forced: the compensations")
                page.click("#confirm-no")
                expect(dialog).to_be_hidden()

                page.goto(f"{base}/workflow?id=HR-1")
                expect(page.locator("#wf-reason")).to_have_text("reason: " + reason)
                inert()

                page.goto(f"{base}/workflow?id=R-1")
                expect(page.locator("#wf-status")).to_have_text("running")
                expect(page.locator("#btn-rollback")).to_be_disabled()

                page.goto(f"{base}/workflow?id=L-1")
                expect(page.locator("#journal-truncated")).to_contain_text(
                    f"{hidden} earlier entries not shown")
                expect(page.locator("#journal tbody tr")).to_have_count(500)
                page.click("#journal-earlier")
                expect(page.locator("#journal tbody tr")).to_have_count(hidden)
                expect(page.locator("#journal tbody tr td").first).to_have_text("0")
                _shot(page, "6-hostile-and-paging")
            finally:
                browser.close()
    finally:
        gate.set()
    assert problems == []
    assert app.get_workflow("HW-1").status == "waiting"  # nothing was confirmed
