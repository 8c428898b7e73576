"""The lease race, CI-sized (RELIABILITY.md R6; the full gate is chaos/lease_race.py).

4 worker processes race for 300 queued workflows of 5 steps on a 1 s lease, while
the campaign SIGKILLs three running ones (each replaced at once) and SIGSTOPs one for
2.5 leases, so it wakes up holding leases another worker took over. The checks are the
campaign's own (see chaos/lease_race.py): every workflow succeeded once with the
expected result; no journal row changed or written twice; no stale-token write
accepted (the database's audit trigger saw every accepted write come from the
token's holder); nothing held by a killed or paused worker longer than
lease + sweep + slack; one keyed effect per step at the independent ledger. It also
checks that the pause did what it is for: leases were taken over from the paused
worker and its stale writes were refused.

On PostgreSQL every check is strict: a group commit is one call the server finishes
without the client, so a pause never leaves a transaction holding locks. On SQLite one
limit remains (docs/reliability.md, "Lease race (R6)", finding 1): a process paused
while it holds the file's single write lock stops every writer until it resumes, so
its workflows cannot be taken over meanwhile. A SQLite run whose only violation is
exactly that is reported as xfail, with its seed; anything else fails.

Runs on PostgreSQL (never skipped: it fails when the server is unreachable) and on
one SQLite file. Each run prints its seed; replay with CRASHSAFE_TEST_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
from rich.console import Console

from helpers import drop_postgres_schema, new_postgres_schema, postgres_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "chaos"))
from lease_race import Config, report, run

PLAN = [(0.4, "stop"), (0.8, "kill"), (1.6, "kill"), (2.6, "kill")]


def _seed() -> int:
    env = os.environ.get("CRASHSAFE_TEST_SEED")
    return int(env) if env else random.SystemRandom().randrange(10**9)


def _race(db: str, tmp_path: Path, *, sqlite: bool = False) -> None:
    seed = _seed()
    print(f"lease race: seed={seed}")
    cfg = Config(db=db, workers=4, workflows=300, steps=5, lease=1.0, sweep=0.25,
                 seed=seed, plan=PLAN, stop_for=(2.5, 2.5), kill_paused=False, concurrency=4,
                 step_ms=15.0, slack=1.0, deadline=60.0, directory=tmp_path / "logs")
    res = run(cfg, Console(width=120, stderr=True), quiet=True)
    console = Console(width=120)
    report(res, console)
    f = res.figures
    failed = [name for name, _value, ok in res.rows if ok is False]
    if sqlite and failed \
            and all(name.startswith("held by a killed/paused worker") for name in failed) \
            and f["held_too_long"] == f["held_too_long_behind_a_paused_lock_holder"]:
        # SQLite's limit (docs/reliability.md, "Lease race (R6)"): the pause caught the
        # worker holding the file's write lock, and no writer can move until it
        # resumes. Every safety invariant held (they are all in `failed` otherwise).
        pytest.xfail(f"seed={seed}: paused lock holder blocked the takeover: "
                     f"{f['pauses_holding_locks']}; {res.violations[0][:400]}")
    assert res.ok, f"seed={seed}: " + "; ".join(v[:600] for v in res.violations)
    assert f["kills"] == 3 and f["stops"] == 1, f"seed={seed}: {f}"
    # The pause outlived the lease: another worker took the paused worker's leases,
    # and when it woke up its writes were refused by the fence.
    assert f["leases_taken_over_while_paused"] >= 1, f"seed={seed}: {f}"
    assert f["stale_writes_refused"] >= 1, f"seed={seed}: {f}"


@pytest.mark.slow
def test_lease_race_on_postgres(tmp_path: Path) -> None:
    schema = new_postgres_schema()
    try:
        _race(postgres_url(schema), tmp_path)
    finally:
        drop_postgres_schema(schema)
        drop_postgres_schema(f"{schema}_ledger")


@pytest.mark.slow
def test_lease_race_on_sqlite(tmp_path: Path) -> None:
    _race(f"sqlite:///{tmp_path / 'state.db'}", tmp_path, sqlite=True)
