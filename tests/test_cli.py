"""The command line, end to end: demo, ls, show, cancel, resume, replay of golden journals."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

import crashsafe
from crashsafe.cli.main import cli
from crashsafe.stores.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore

GOLDEN = Path(__file__).parent / "golden"
runner = CliRunner()


GOLDEN_VERSIONS = sorted(int(p.stem.removeprefix("journal_v"))
                         for p in GOLDEN.glob("journal_v*.sql"))


def _golden_db(tmp_path: Path, version: int) -> str:
    """A database as schema ``version`` wrote it (its golden rows were recorded then);
    opening it with the current code must migrate it and keep every row."""
    db = tmp_path / "golden.db"
    conn = sqlite3.connect(db)
    for migration in MIGRATIONS[:version]:
        for statement in migration.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.executescript((GOLDEN / f"journal_v{version}.sql").read_text())
    rows_before = conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
    conn.close()
    store = SQLiteStore(f"sqlite:///{db}")
    store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == rows_before
    conn.close()
    return f"sqlite:///{db}"


def test_every_schema_has_a_golden_journal() -> None:
    assert list(range(1, SCHEMA_VERSION + 1)) == GOLDEN_VERSIONS


@pytest.mark.parametrize("version", GOLDEN_VERSIONS)
def test_golden_journals_replay_clean_against_current_code(tmp_path: Path, version: int) -> None:
    url = _golden_db(tmp_path, version)
    res = runner.invoke(cli, ["--db", url, "replay", str(GOLDEN / "golden_app.py"), "--json"])
    assert res.exit_code == 0, res.output
    reports = json.loads(res.output)
    verdicts = {r["workflow_id"]: r["verdict"] for r in reports}
    expected = {"golden-refund", "golden-question", "golden-async", "golden-refund/6",
                "golden-question/5"}
    if version >= 3:
        expected.add("golden-approval")  # durable waits exist from schema 3 on
    assert verdicts == dict.fromkeys(expected, "ok")


@pytest.mark.parametrize("version", GOLDEN_VERSIONS)
def test_replay_reports_a_renamed_step_as_nondeterminism(tmp_path: Path, version: int) -> None:
    url = _golden_db(tmp_path, version)
    res = runner.invoke(cli, ["--db", url, "replay", str(GOLDEN / "golden_app_changed.py"),
                              "--json"])
    assert res.exit_code == 1
    reports = {r["workflow_id"]: r for r in json.loads(res.output)}
    bad = reports["golden-refund"]
    assert bad["verdict"] == "nondeterminism"
    assert "step index 3" in bad["detail"]
    assert "'classify_v2'" in bad["detail"] and "'classify'" in bad["detail"]
    assert reports["golden-async"]["verdict"] == "ok"  # untouched workflows still pass


def _sleeper_app(url: str) -> tuple[crashsafe.App, crashsafe.Workflow[[str], str]]:
    app = crashsafe.App(url)

    @app.step(name="greet")
    def greet(who: str) -> str:
        return f"hello {who}"

    @app.workflow(name="sleeper")
    def sleeper(who: str) -> str:
        greet(who)
        crashsafe.sleep(60)
        return "woke"

    return app, sleeper


def test_ls_show_cancel_resume(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    app, sleeper = _sleeper_app(url)
    handle = app.start(sleeper, "ada", workflow_id="S-1")
    deadline = threading.Event()
    while len(app.journal("S-1")) < 2 and not deadline.wait(0.01):
        pass

    res = runner.invoke(cli, ["--db", url, "ls", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [(r["id"], r["status"]) for r in rows] == [("S-1", "running")]

    res = runner.invoke(cli, ["--db", url, "show", "S-1"])
    assert res.exit_code == 0, res.output
    assert "greet" in res.output and "'hello ada'" in res.output and "sleep" in res.output

    res = runner.invoke(cli, ["--db", url, "cancel", "S-1"])
    assert res.exit_code == 0, res.output
    with pytest.raises(crashsafe.WorkflowCancelledError):
        handle.result(timeout=10)
    res = runner.invoke(cli, ["--db", url, "ls", "--status", "cancelled", "--json"])
    assert [r["id"] for r in json.loads(res.output)] == ["S-1"]

    res = runner.invoke(cli, ["--db", url, "cancel", "S-1"])
    assert res.exit_code == 1 and "already cancelled" in res.output

    res = runner.invoke(cli, ["--db", url, "resume", "S-1"])
    assert res.exit_code == 0, res.output
    assert app.get_workflow("S-1").status is crashsafe.Status.RUNNING
    app.close()


def test_clear_errors_for_unknown_ids_and_bad_urls(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    SQLiteStore(url).close()
    res = runner.invoke(cli, ["--db", url, "show", "nope"])
    assert res.exit_code == 2 and "no workflow with id 'nope'" in res.output
    res = runner.invoke(cli, ["--db", "foo://x", "ls"])
    assert res.exit_code == 2 and "unsupported database URL 'foo://x'" in res.output
    res = runner.invoke(cli, ["--db", f"sqlite:///{tmp_path / 'absent.db'}", "ls"])
    assert res.exit_code == 2 and "no database at" in res.output
    res = runner.invoke(cli, ["--db", url, "ls", "--status", "sleepy"])
    assert res.exit_code == 2 and "unknown status 'sleepy'" in res.output
    res = runner.invoke(cli, ["--db", url, "resume", "nope"])
    assert res.exit_code == 2 and "no workflow with id 'nope'" in res.output


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "crashsafe", "--db", f"sqlite:///{tmp_path / 'demo.db'}",
         "demo", "--tickets", "26", "--kills", "2", "--concurrency", "6", "--json"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert report["completed"] == 26 and report["kills"] == 2
    assert report["duplicate_refunds"] == 0 and report["lost_committed_steps"] == 0
    assert report["reexecuted_committed_steps"] == 0 and report["inconsistent_results"] == []
    assert all(k["recovery_s"] is not None for k in report["kill_log"])
    # Every large refund waited for the operator, who answered each one by signal.
    from crashsafe.demo import agent

    escalations = sum(
        agent.needs_person(agent.refund_rule(agent.order_facts(t["order_id"]),
                                             agent.true_label(t["text"])))
        for t in map(agent.make_ticket, range(26)))
    assert escalations > 0
    assert report["escalated"] == escalations
    # The database is left behind for `crashsafe ls`.
    res = runner.invoke(cli, ["--db", f"sqlite:///{tmp_path / 'demo.db'}", "ls", "--json",
                              "--limit", "100"])
    assert len(json.loads(res.output)) == 26  # one workflow per ticket


def test_ls_and_show_print_hostile_names_and_every_status_verbatim(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    app = crashsafe.App(url)

    @app.step(name="[red]step[/]")
    def odd() -> str:
        return "[bold]not markup[/bold]"

    @app.workflow(name="[bold]wf")
    def wf() -> None:
        odd()
        crashsafe.wait_for("never")

    handle = app.start(wf, workflow_id="[x]-1")
    deadline = threading.Event()
    while handle.status() is not crashsafe.Status.WAITING and not deadline.wait(0.01):
        pass
    app.store.set_status("[x]-1", crashsafe.Status.CANCELLING,
                         only_from=(crashsafe.Status.WAITING,))
    res = runner.invoke(cli, ["--db", url, "ls"])
    assert res.exit_code == 0, res.output
    assert "[x]-1" in res.output and "[bold]wf" in res.output and "cancelling" in res.output
    res = runner.invoke(cli, ["--db", url, "show", "[x]-1"])
    assert res.exit_code == 0, res.output
    assert "[red]step[/]" in res.output and "'[bold]not markup[/bold]'" in res.output
    app.close()
