"""``crashsafe chaos``, end to end: short campaigns on the built-in support agent and on
a user workflow (tests/chaos_target.py), replay by seed, and a violation caught."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crashsafe.cli.main import cli

TARGET = str(Path(__file__).with_name("chaos_target.py"))
runner = CliRunner()


def _chaos(*args: str, code: int = 0) -> dict[str, Any]:
    res = runner.invoke(cli, ["chaos", *args, "--json"])
    assert res.exit_code == code, res.output
    report: dict[str, Any] = json.loads(res.output)
    return report


def _check_consistent(r: dict[str, Any], trials: int, seed: int) -> None:
    """Fields that must agree with each other in every report."""
    assert r["trials"] == trials == len(r["trial_log"])
    assert [t["seed"] for t in r["trial_log"]] == list(range(seed, seed + trials))
    assert r["kills"] == sum(t["kills"] for t in r["trial_log"]) <= r["kills_planned"]
    assert r["failed_trials"] == len(r["failing"]) == sum(not t["ok"] for t in r["trial_log"])
    assert r["ok"] is (r["failed_trials"] == 0)
    rec = r["recovery_s"]
    assert rec["samples"] <= r["kills"]
    if rec["samples"]:
        assert 0 < rec["p50"] <= rec["p95"] <= rec["max"]
    assert r["outcome_unknown"]["count"] == sum(r["outcome_unknown"]["resolved"].values())
    if r["state_consistency_pct"] is not None:
        assert r["consistent_workflows"] <= r["workflows"]
        assert r["state_consistency_pct"] == round(
            100 * r["consistent_workflows"] / r["workflows"], 2)


@pytest.mark.slow
def test_campaign_on_the_support_agent_holds_every_invariant() -> None:
    # 100 trials in every CI run (issue gate); the 1,000-trial figures are in
    # docs/reliability.md.
    r = _chaos("--trials", "100", "--seed", "4242", "--kills-per-trial", "1")
    _check_consistent(r, 100, 4242)
    assert r["ok"] is True and r["failing"] == []
    assert r["workload"] == "support agent (built-in)"
    assert r["kills"] >= 60, "most planned kills land while the agent works"
    assert r["lost_committed_steps"] == 0
    assert r["duplicate_keyed_effects"] == 0
    assert r["stuck_workflows"] == 0
    assert r["workflows"] == 400 and r["state_consistency_pct"] == 100.0
    assert r["reexecutions_per_killed_step"] == round(r["reexecuted_bodies"] / r["kills"], 4)


@pytest.mark.slow
def test_crash_points_kill_the_child_where_asked() -> None:
    r = _chaos("--trials", "2", "--seed", "7", "--crash-at", "25", "--kills-per-trial", "2")
    _check_consistent(r, 2, 7)
    assert r["ok"] is True and r["crash_at"] == 25
    # Each child but the last kills itself at its 25th crash point, long before the end.
    assert r["kills"] == r["kills_planned"] == 4
    assert all(t["plan"] == [25, 25] for t in r["trial_log"])


@pytest.mark.slow
def test_campaign_on_a_user_workflow() -> None:
    r = _chaos(f"{TARGET}:pipeline", "--trials", "3", "--seed", "11", "--args", "[6]",
               "--kills-per-trial", "2", "--workflows", "2")
    _check_consistent(r, 3, 11)
    assert r["ok"] is True
    assert r["kills"] >= 1
    assert r["lost_committed_steps"] == 0 and r["stuck_workflows"] == 0
    assert r["workflows"] == 6 and r["consistent_workflows"] == 6
    # Without a ledger, effects cannot be counted: the report says so instead of 0.
    assert r["duplicate_keyed_effects"] is None
    assert r["reexecutions_per_killed_step"] is None


@pytest.mark.slow
def test_the_seed_replays_the_kill_points() -> None:
    first = _chaos("--trials", "3", "--seed", "900", "--kills-per-trial", "2")
    again = _chaos("--trials", "3", "--seed", "900", "--kills-per-trial", "2")
    plans = [t["plan"] for t in first["trial_log"]]
    assert plans == [t["plan"] for t in again["trial_log"]]
    assert len({json.dumps(p) for p in plans}) == 3, "each trial draws its own kill points"
    # A trial's own seed, printed for each failing trial, replays it alone.
    alone = _chaos("--trials", "1", "--seed", "902", "--kills-per-trial", "2")
    assert alone["trial_log"][0]["plan"] == plans[2]
    # So does a user workflow's, given the kill window.
    user = [_chaos(f"{TARGET}:pipeline", "--trials", "1", "--seed", "5", "--args", "[3]",
                   "--kill-window", "0.2")["trial_log"][0]["plan"] for _ in range(2)]
    assert user[0] == user[1] and 0 <= user[0][0] < 0.2


@pytest.mark.slow
def test_a_result_that_differs_from_the_uninterrupted_run_is_a_violation(
        tmp_path: Path) -> None:
    r = _chaos(f"{TARGET}:unjournaled", "--trials", "2", "--seed", "31", "--args",
               '{"n": 3}', "--dir", str(tmp_path), code=1)
    _check_consistent(r, 2, 31)
    assert r["ok"] is False
    assert r["consistent_workflows"] == 0 and r["state_consistency_pct"] == 0.0
    assert [f["seed"] for f in r["failing"]] == [31, 32]
    assert all("results differ from an uninterrupted run" in f["violations"][0]
               for f in r["failing"])
    # The failing trials' databases are kept for `crashsafe show`.
    assert all(Path(f["directory"], "state.db").exists() for f in r["failing"])
    # The table names each failing trial's seed too.
    res = runner.invoke(cli, ["chaos", f"{TARGET}:unjournaled", "--trials", "1", "--seed",
                              "31", "--args", '{"n": 3}', "--dir", str(tmp_path)])
    assert res.exit_code == 1
    assert "trial 0 failed (seed 31" in res.output and "INVARIANT VIOLATED" in res.output
    # A user who knows the result legitimately varies can turn the comparison off.
    r = _chaos(f"{TARGET}:unjournaled", "--trials", "1", "--args", "[2]", "--no-compare")
    assert r["ok"] is True and r["state_consistency_pct"] is None


def test_bad_targets_and_arguments_are_refused_before_any_trial() -> None:
    cases = [
        ([f"{TARGET}:nope"], "has no workflow 'nope'"),
        ([TARGET], "name the workflow as MODULE:WORKFLOW"),
        ([f"{TARGET}:pipeline", "--args", "[1,"], "--args is not valid JSON"),
        ([f"{TARGET}:pipeline", "--args", "3"], "--args must be a JSON list or object"),
        (["--args", "[1]"], "--args needs MODULE:WORKFLOW"),
        (["--trials", "0"], "need --trials >= 1"),
    ]
    for args, message in cases:
        res = runner.invoke(cli, ["chaos", *args])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)
