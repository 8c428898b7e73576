"""Progress on long commands: library functions report through a callback (monotone),
and the command line draws a bar on stderr only when stderr is a terminal; piped
output, and every ``--json`` output, stays clean."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import crashsafe
from crashsafe._seal import Sealer
from crashsafe._verify import verify
from crashsafe.stores import open_raw_store

TARGET = str(Path(__file__).with_name("chaos_target.py"))


def _fill(url: str, count: int = 6) -> None:
    app = crashsafe.App(url)

    @app.workflow(name="turns")
    def turns(n: int) -> int:
        for i in range(n):
            crashsafe.checkpoint({"i": i, "pad": "p" * 100})
        return n

    for i in range(count):
        app.start(turns, 4, workflow_id=f"w{i}").result(timeout=20)
    app.close()


def _monotone(calls: list[tuple[Any, ...]]) -> None:
    assert calls, "the callback was never called"
    done = [c[0] for c in calls]
    assert done == sorted(done), done
    total = calls[-1][1]
    assert done[-1] == total, calls
    assert all(c[1] in (None, total) for c in calls), calls


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CRASHSAFE_KEYS", "FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    env.update(TERM="xterm-256color", COLUMNS="120", **extra)
    return env


def _run(args: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crashsafe", *args], capture_output=True,
                          text=True, timeout=120, env=_env(**extra))


def _run_with_tty_stderr(args: list[str]) -> tuple[int, str, str]:
    """Run with stdout piped and stderr on a pseudo-terminal; (code, stdout, stderr)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "crashsafe", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal closed with the process
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    out, _ = proc.communicate(timeout=120)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


# -- the callbacks -------------------------------------------------------------------------
def test_verify_and_rotate_report_monotone_progress(tmp_path: Path) -> None:
    from crashsafe._keys import Keyring
    from crashsafe._rotate import rotate

    url = f"sqlite:///{tmp_path / 'p.db'}"
    _fill(url)
    raw = open_raw_store(url)
    calls: list[tuple[Any, ...]] = []
    report = verify(raw, Sealer(None), lambda *a: calls.append(a))
    assert report.ok and report.workflows == 6
    _monotone(calls)
    assert calls[-1][:2] == (6, 6)
    calls.clear()
    rotate(raw, Keyring.generate("k1"), lambda *a: calls.append(a))
    _monotone(calls)
    raw.close()


def test_gc_reports_monotone_progress_across_both_rules(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    _fill(url, 5)
    app = crashsafe.App(url)
    calls: list[tuple[Any, ...]] = []
    app.gc(keep_checkpoints=1, finished_older_than=0, batch=2,
           progress=lambda *a: calls.append(a))
    _monotone(calls)
    assert calls[0] == (0, 5)  # all five are both old and finished: drop rule only
    app.close()


def test_chaos_campaign_reports_each_trial(tmp_path: Path) -> None:
    from rich.console import Console

    from crashsafe import chaos

    calls: list[tuple[Any, ...]] = []
    workload = chaos.UserWorkflow(f"{TARGET}:pipeline", "[3]", 1, True)
    settings = chaos.Settings(trials=2, seed=7, kills_per_trial=0, crash_at=None,
                              kill_window=None, stuck_after=30.0, directory=tmp_path)
    with open(os.devnull, "w") as sink:
        code = chaos.run_campaign(workload, settings, as_json=True, console=Console(file=sink),
                                  progress=lambda *a: calls.append(a))
    assert code == 0
    _monotone(calls)
    assert [c[0] for c in calls] == [0, 1, 2]


# -- the command line ----------------------------------------------------------------------
def test_piped_output_has_no_progress_bar_and_json_stays_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    _fill(url)
    res = _run(["--db", url, "gc", "--keep-checkpoints", "2", "--dry-run", "--json"])
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    report = json.loads(res.stdout)
    assert report["dry_run"] is True and report["checkpoints_pruned"] == 6 * 2
    assert report["before"] == report["after"] and report["before"]["workflows"] == 6
    res = _run(["--db", url, "verify", "--json"])
    assert res.returncode == 0 and res.stderr == ""
    assert json.loads(res.stdout)["workflows"] == 6
    assert "would drop 0 finished workflow(s) and the state of 12 checkpoint(s)" in \
        _run(["--db", url, "gc", "--keep-checkpoints", "2", "--dry-run"]).stdout
    for args in (["gc", "--keep-checkpoints", "2"], ["verify"]):
        res = _run(["--db", url, *args])
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
        assert "\x1b[" not in res.stdout and "━" not in res.stdout, res.stdout
    res = _run(["--db", url, "keys", "rotate"], CRASHSAFE_KEYS="k1=" + "A" * 43 + "=")
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_a_terminal_gets_a_bar_on_stderr_and_stdout_stays_clean(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    _fill(url)
    code, out, err = _run_with_tty_stderr(
        ["--db", url, "gc", "--keep-checkpoints", "1", "--json"])
    assert code == 0, err
    assert json.loads(out)["checkpoints_pruned"] == 6 * 3  # stdout: JSON only
    assert "collecting" in err and "\x1b[" in err, err  # the bar, drawn on the terminal
    code, out, err = _run_with_tty_stderr(["--db", url, "verify"])
    assert code == 0 and "verifying workflows" in err, err
    assert "\x1b[" not in out and "all records intact" in out


def test_gc_command_refuses_nothing_to_do_and_bad_values(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    _fill(url, 1)
    res = _run(["--db", url, "gc"])
    assert res.returncode == 2 and "--keep-checkpoints N and/or --older-than" in res.stderr
    res = _run(["--db", url, "gc", "--keep-checkpoints", "0"])
    assert res.returncode == 2 and "at least 1" in res.stderr
    res = _run(["--db", url, "gc", "--older-than", "soon"])
    assert res.returncode == 2 and "cannot read the duration" in res.stderr


def test_demo_reports_tickets_monotonically(tmp_path: Path) -> None:
    from rich.console import Console

    from crashsafe.demo.runner import run_demo

    calls: list[tuple[Any, ...]] = []
    with open(os.devnull, "w") as sink:
        code = run_demo(f"sqlite:///{tmp_path / 'demo.db'}", tickets=4, kills=1, seed=3,
                        concurrency=2, fault_rate=0.0, as_json=True, console=Console(file=sink),
                        progress=lambda *a: calls.append(a))
    assert code == 0
    _monotone(calls)
    assert calls[0] == (0, 4, "tickets (kills 0/1)") and calls[-1][:2] == (4, 4)
    assert calls[-1][2] == "tickets (kills 1/1)"
