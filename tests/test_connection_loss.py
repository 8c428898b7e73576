"""R5 in CI: the connection-loss campaign of ``chaos/connection_loss.py``, 50 trials.

Each trial cuts the PostgreSQL connection that carries one statement of a reference
workflow (before the server sees it, after it ran but before its answer reaches the
client, or by ``pg_terminate_backend`` as it arrives), and checks the outcome against
an uninterrupted run and an independent ledger. Two thirds of the cuts fall on a
statement that commits (COMMIT, or a write that is its own transaction), so lost
COMMIT answers are resolved in every run; the full gate is the 1,000-trial campaign
(docs/reliability.md). The seed is printed; rerun one with ``CRASHSAFE_TEST_SEED``.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from helpers import POSTGRES_URL, require_postgres

CHAOS = Path(__file__).resolve().parent.parent / "chaos"
TRIALS = 50


@pytest.mark.slow
def test_connection_cut_at_statements_of_a_workflow_loses_and_duplicates_nothing(
        capsys: pytest.CaptureFixture[str]) -> None:
    require_postgres()  # fails, never skips, without a server
    sys.path.insert(0, str(CHAOS))
    try:
        import connection_loss as r5
    finally:
        sys.path.remove(str(CHAOS))
    seed = int(os.environ.get("CRASHSAFE_TEST_SEED", random.randrange(1_000_000)))
    print(f"connection-loss campaign seed {seed}")
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="crashsafe-r5-") as tmp:
        campaign = r5.Campaign(POSTGRES_URL, Path(tmp))
        try:
            campaign.calibrate()
            kinds = campaign.reference["kinds"]
            # Group commits, claims and dequeues are single statements (their own
            # transactions); a few calls still end in an explicit COMMIT.
            assert kinds["commit"] >= 1 and kinds["autocommit write"] >= 5, kinds
            commits = [(s.number, m) for s in campaign.calibration
                       for m in r5.MODES if s.commits]
            others = [(s.number, m) for s in campaign.calibration
                      for m in r5.MODES if not s.commits]
            rng.shuffle(commits)
            rng.shuffle(others)
            picked = commits[: TRIALS * 2 // 3] + others[: TRIALS - TRIALS * 2 // 3]
            plan = [(n, mode, i % 8 == 7) for i, (n, mode) in enumerate(picked)]
            results = r5.run_plan(campaign, plan, quiet=True)
        finally:
            campaign.close()
        ok = r5.report(results, campaign, seed, 0.0, as_json=False)
    out = capsys.readouterr().out
    failing = [(r.cut_at, r.mode, r.restart, r.statement, r.violations)
               for r in results if r.violations]
    assert ok and not failing, f"seed {seed}: {failing}\n{out}"
    cut = [r for r in results if r.cut]
    assert len(cut) >= TRIALS * 9 // 10  # statement numbers drift a little between runs
    assert {r.mode for r in cut} == set(r5.MODES)
    assert any(r.restart for r in cut)
    truth = Counter(r.landed for r in cut if r.kind in ("commit", "autocommit write"))
    assert truth[True] and truth[False], truth  # both outcomes of a lost commit answer
    assert sum(r.kind in ("commit", "autocommit write") for r in cut) >= TRIALS // 2


def test_an_app_whose_start_failed_can_be_tried_again() -> None:
    """A failed launch (the database unreachable) leaves the App able to try again,
    instead of hanging on its own lock or running unregistered."""
    import crashsafe

    app = crashsafe.App("postgresql://postgres@127.0.0.1:1/test?connect_timeout=1")

    @app.workflow()
    def flow() -> int:
        return 1

    for _ in range(2):
        try:
            app.start(flow)
        except crashsafe.StoreUnavailableError as exc:
            assert "127.0.0.1" in str(exc) or "connect" in str(exc).lower()
        else:
            raise AssertionError("start() should fail while the database is unreachable")
    assert app._launched is False
