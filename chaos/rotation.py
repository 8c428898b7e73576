"""Key rotation killed with SIGKILL (RELIABILITY.md S3 / R10; issue 4's gate).

``python chaos/rotation.py --trials 50 --workflows 120 --seed 7``

What it does:

1. Fills two databases with a varied workload (a child process each): one written
   without encryption, one sealed with key ``k1``. Every kind of stored payload is
   there: workflow inputs, results and errors; step results, errors and journaled
   values; checkpoints (full snapshots and deltas compressed against step results);
   failed attempts' errors; effect outcomes, also those of workflows retention
   dropped (kept until their expiry); signals; rolled-back entries; and the partial
   output of a streaming step whose process died mid-stream.
2. Takes a ledger of every stored record straight from the SQLite tables (its own
   list of tables and columns, not crashsafe's): where it lives and the payload it
   opens to.
3. Runs each trial on a fresh copy of one of the two databases: ``encrypt`` (plain
   -> ``k1``, ring ``k1``) or ``rotate`` (``k1`` -> ``k2``, ring ``k2,k1``). Each trial
   starts ``crashsafe keys rotate`` and SIGKILLs it twice, then lets a third run
   finish. Both kills are placed by crash points (before and after every store
   statement and COMMIT), drawn uniformly from all the points one rotation passes:
   the first is sent from outside as soon as the command's trace shows that point
   passed, so it lands wherever the process has got to (inside a statement, a COMMIT
   or its fsync); the second is the process killing itself exactly at its point
   (``CRASHSAFE_CRASH_AT``).
4. After every kill checks, for every record of the ledger: it is still there (0
   lost, 0 added); it opens with exactly one key of the ring (a sealer holding only
   that key), or, before it is rotated in an ``encrypt`` trial, as plaintext; its
   payload is byte-for-byte the ledger's and decodes; the file passes
   ``PRAGMA integrity_check``. After the last run: every record is under the new
   key and opens with the new key alone, checkpoints read back the same states
   through the engine, ``crashsafe verify`` with only the new key passes, and one
   more rotation re-seals 0 records.

It prints a table with the seed and exits 1 on any violation. Replay with the same
arguments and ``--seed``: the kill points and instants repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent

# (table, key columns, workflow column, index expression, [(column, kind expression)]):
# every payload column of the SQLite schema and the place its seal is bound to. Kept
# here, independent of crashsafe.stores._payload_sql, so a column rotation forgets
# shows up as a record that did not move.
PAYLOADS: list[tuple[str, str, str, str, list[tuple[str, str]]]] = [
    ("workflows", "id", "id", "-1",
     [("inputs", "'inputs'"), ("output", "'output'"), ("error", "'error'")]),
    ("journal", "workflow_id, idx", "workflow_id", "idx",
     [("output", "'output'"), ("error", "'error'")]),
    ("attempts", "workflow_id, idx, attempt", "workflow_id", "idx",
     [("error", "'attempt-error:' || attempt")]),
    ("effects", "key", "workflow_id", "idx",
     [("output", "'effect-output'"), ("error", "'effect-error'")]),
    ("signals", "workflow_id, name, seq", "workflow_id", "0",
     [("payload", "'signal:' || name")]),
    ("rewound", "workflow_id, rewound_at, idx", "workflow_id", "idx",
     [("output", "'output'"), ("error", "'error'")]),
]
# Partial outputs of streaming steps live in the shared table: "partial:<wid>:<index>".
PARTIAL = "partial:"

Where = tuple[str, ...]  # (table, column, key values...)


# ------------------------------------------------------------------------ the workload

def fill(db: str, workflows: int, seed: int) -> None:
    """Run the workload into ``db`` (keys from $CRASHSAFE_KEYS), then die mid-stream."""
    import crashsafe
    from crashsafe import RetryPolicy

    rng = random.Random(seed)
    app = crashsafe.App(f"sqlite:///{db}")
    words = [f"w{i:03d}" for i in range(500)]

    def text(n: int, k: int) -> str:
        r = random.Random(n)
        return " ".join(r.choice(words) for _ in range(k))

    @app.step(name="llm")
    def llm(i: int, turn: int) -> dict[str, str]:
        return {"role": "assistant", "content": text(i * 100 + turn, 60)}

    @app.step(name="flaky", retry=RetryPolicy(max_attempts=3, initial_delay=0.01,
                                              jitter="none"))
    def flaky(i: int) -> int:
        if crashsafe.current().attempt == 1:
            raise ConnectionError(f"upstream reset for {i}")
        return i

    @app.step(name="charge", effect=True)
    def charge(i: int) -> dict[str, Any]:
        return {"receipt": f"rcpt-{i}", "key": crashsafe.current().idempotency_key}

    stuck = threading.Event()

    @app.step(name="stream")
    def stream(i: int) -> str:
        crashsafe.save_partial(text(i, 20))
        stuck.wait()  # the process dies here, the partial output stays
        return "never"

    @app.workflow(name="agent")
    def agent(i: int, mode: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": text(7, 40)}]
        for turn in range(4):
            messages.append({"role": "user", "content": text(10_000 + i * 10 + turn, 30)})
            messages.append(llm(i, turn))
            crashsafe.checkpoint({"messages": messages, "turn": turn}, label=f"t{turn}")
        flaky(i)
        receipt = charge(i)
        when = crashsafe.now()
        if mode == "signal":
            receipt["approved"] = crashsafe.wait_for("approve", timeout=60)
        if mode == "fail":
            raise ValueError(f"agent {i} gave up")
        if mode == "stream":
            stream(i)
        return {"i": i, "at": when.isoformat(), **receipt}

    modes = ["plain", "signal", "fail", "rollback"]
    handles = []
    for i in range(workflows):
        mode = modes[i % len(modes)] if i else "stream"
        h = app.start(agent, i, mode, workflow_id=f"wf-{i:04d}")
        handles.append((i, mode, h))
    for _, mode, h in handles:
        if mode == "signal":
            app.signal(h.workflow_id, "approve", {"by": f"ops-{rng.randrange(100)}"})
    for _, mode, h in handles:
        if mode == "stream":
            continue
        try:
            h.result(timeout=120)
        except ValueError:
            if mode != "fail":
                raise
        if mode == "rollback":
            app.rollback(h.workflow_id, to="t1", reason="operator rollback")
            app.handle(h.workflow_id).result(timeout=120)
    # Retention drops some finished workflows: their effect outcomes stay (they
    # deduplicate until their expiry) with no workflow row left to lead to them.
    gone = sorted(h.workflow_id for i, mode, h in handles if mode == "plain" and i % 8 == 4)
    if app.store.drop_workflows(gone, app.store.clock() + 1) != gone:
        raise SystemExit(f"retention did not drop {gone}")
    # Wait until the streaming step has saved its partial output, then die like a
    # killed process: nothing of the workflow past that point is recorded.
    deadline = time.monotonic() + 60
    while not app.store.list_shared(PARTIAL):
        if time.monotonic() > deadline:
            raise SystemExit("the streaming step never saved its partial output")
        time.sleep(0.02)
    os._exit(0)


# -------------------------------------------------------------------------- the ledger

@dataclass
class Record:
    where: Where
    workflow_id: str
    index: int
    kind: str
    stored: bytes


def records(db: str) -> dict[Where, Record]:
    """Every sealed payload in ``db``, read with plain SQL."""
    out: dict[Where, Record] = {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for table, keys, owner, index, columns in PAYLOADS:
            for column, kind in columns:
                # Only the constant names of PAYLOADS are formatted into the SQL.
                sql = (f"SELECT {keys}, {owner}, {index}, {kind}, {column} "  # noqa: S608
                       f"FROM {table} WHERE {column} IS NOT NULL")
                for row in conn.execute(sql):
                    nkeys = len(keys.split(","))
                    where = (table, column, *map(str, row[:nkeys]))
                    wid, idx, knd, data = row[nkeys:]
                    out[where] = Record(where, wid, int(idx), knd, bytes(data))
        for key, value in conn.execute(
                "SELECT key, value FROM shared WHERE substr(key, 1, ?) = ?",
                (len(PARTIAL), PARTIAL)):
            wid, _, idx = key[len(PARTIAL):].rpartition(":")
            where = ("shared", "value", key)
            out[where] = Record(where, wid, int(idx), "partial", bytes(value))
    finally:
        conn.close()
    return out


def sealers(exports: dict[str, str]) -> dict[str, Any]:
    """One sealer per key, holding that key alone, plus ``"*"`` for plaintext."""
    from crashsafe._keys import Keyring
    from crashsafe._seal import Sealer

    out: dict[str, Any] = {k: Sealer(Keyring.parse(v)) for k, v in exports.items()}
    out["*"] = Sealer(None)
    return out


def ledger(db: str, exports: dict[str, str]) -> dict[Where, bytes]:
    """The payload of every record, opened with whichever single key seals it."""
    from crashsafe._seal import RecordContext, record_info

    one = sealers(exports)
    out: dict[Where, bytes] = {}
    for where, rec in records(db).items():
        ctx = RecordContext(rec.workflow_id, rec.index, rec.kind)
        key = record_info(rec.stored, ctx).key_id or "*"
        out[where] = one[key].open(rec.stored, ctx)
    return out


@dataclass
class Check:
    records: int = 0
    old: int = 0
    new: int = 0
    violations: list[str] = field(default_factory=list)


def check(db: str, want: dict[Where, bytes], exports: dict[str, str], old: str,
          new: str) -> Check:
    """The invariants after a kill (see the module documentation)."""
    from crashsafe import CorruptRecordError, CrashsafeError, _codec
    from crashsafe._seal import RecordContext

    one = sealers({k: v for k, v in exports.items() if k in (old, new)})
    got = records(db)
    res = Check(records=len(got))
    for where in want.keys() - got.keys():
        res.violations.append(f"lost: {where}")
    for where in got.keys() - want.keys():
        res.violations.append(f"appeared: {where}")
    for where, rec in got.items():
        if where not in want:
            continue
        ctx = RecordContext(rec.workflow_id, rec.index, rec.kind)
        opened: dict[str, bytes] = {}
        for name, sealer in one.items():
            try:
                opened[name] = sealer.open(rec.stored, ctx)
            except CorruptRecordError:  # each single-key sealer is tried in turn
                pass
        if len(opened) != 1:
            res.violations.append(f"{where}: opens with {sorted(opened) or 'no key'} "
                                  f"(exactly one of {sorted(one)} expected)")
            continue
        ((name, payload),) = opened.items()
        if name not in (old, new):
            res.violations.append(f"{where}: under {name!r}, neither {old!r} nor {new!r}")
        res.old += name == old
        res.new += name == new
        if payload != want[where]:
            res.violations.append(f"{where}: payload differs from the ledger")
            continue
        try:
            _codec.decode(payload, "ledger check")
        except CrashsafeError as exc:
            res.violations.append(f"{where}: does not decode ({exc})")
    conn = sqlite3.connect(db)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    if ok != [("ok",)]:
        res.violations.append(f"integrity_check: {ok[:3]}")
    return res


# ---------------------------------------------------------------------------- a trial

def _env(ring: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CRASHSAFE_KEYS", "CRASHSAFE_CRASH_AT", "CRASHSAFE_CRASH_TRACE")}
    env["CRASHSAFE_KEYS"] = ring
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    return env


def finish(db: str, ring: str) -> None:
    """Run a rotation to its end in this process (what the command does)."""
    from crashsafe._keys import Keyring
    from crashsafe._rotate import rotate
    from crashsafe.stores import open_raw_store

    raw = open_raw_store(f"sqlite:///{db}")
    try:
        rotate(raw, Keyring.parse(ring))
    finally:
        raw.close()


def rotate_cmd(db: str) -> list[str]:
    return [sys.executable, "-m", "crashsafe", "--db", f"sqlite:///{db}", "keys", "rotate"]


@dataclass
class Profile:
    points: int
    first_write: float
    """Seconds from the command to its first crash point (start-up, imports, reads)."""
    last_write: float
    """...to its last crash point (then it only exits)."""
    seconds: float
    """Seconds the whole command takes."""


def profile(db: str, ring: str, tmp: Path, name: str) -> Profile:
    """How many crash points one whole rotation passes, and when."""
    copy = str(tmp / f"profile-{name}.db")
    _copy_db(db, copy)
    trace = tmp / f"trace-{name}.txt"
    env = {**_env(ring), "CRASHSAFE_CRASH_TRACE": str(trace)}
    started = time.perf_counter()
    proc = subprocess.Popen(rotate_cmd(copy), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first = last = None
    size = 0
    while proc.poll() is None:
        now = trace.stat().st_size if trace.exists() else 0
        if now != size:
            last = time.perf_counter() - started
            first = last if first is None else first
            size = now
        time.sleep(0.002)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"profiling rotation failed: {proc.communicate()[1][-2000:]}")
    points = len(trace.read_text().splitlines())
    return Profile(points, seconds if first is None else first,
                   seconds if last is None else last, seconds)


def _kill_after(db: str, env: dict[str, str], points: int, trace: Path) -> int:
    """Run the command, SIGKILL it from outside as soon as its trace shows ``points``
    crash points passed; its exit status."""
    trace.unlink(missing_ok=True)
    popen = subprocess.Popen(rotate_cmd(db), env={**env, "CRASHSAFE_CRASH_TRACE": str(trace)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while popen.poll() is None:
        try:
            seen = trace.read_bytes().count(b"\n")
        except FileNotFoundError:
            seen = 0
        if seen >= points:
            popen.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    code = popen.wait()
    trace.unlink(missing_ok=True)
    return code


def _fastest(runs: Any) -> Profile:
    """Timings of the quicker of a few profiling runs (the first one warms caches)."""
    runs = list(runs)
    return Profile(runs[0].points, min(r.first_write for r in runs),
                   min(r.last_write for r in runs), min(r.seconds for r in runs))


def _copy_db(src: str, dst: str) -> None:
    for ext in ("", "-wal", "-shm"):
        if os.path.exists(dst + ext):
            os.remove(dst + ext)
    conn = sqlite3.connect(src)
    try:
        out = sqlite3.connect(dst)
        conn.backup(out)
        out.close()
    finally:
        conn.close()


@dataclass
class Kill:
    how: str  # "point N" or "at X s"
    landed: str  # "before any write", "mid-rotation", "after the last write", "exited"
    old: int
    new: int


@dataclass
class Trial:
    n: int
    mode: str
    kills: list[Kill] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    records: int = 0


def run_trial(n: int, mode: str, base: str, want: dict[Where, bytes],
              states: dict[str, Any], exports: dict[str, str], prof: Profile,
              rng: random.Random, tmp: Path, kills: int = 2, extra: bool = True) -> Trial:
    """One trial: ``kills`` killed runs, each checked, then a run to the end. With
    ``extra``, also a second rotation (must re-seal 0), ``crashsafe verify`` with the
    new key alone, and every checkpoint read back through the engine."""
    old, new = ("*", "k1") if mode == "encrypt" else ("k1", "k2")
    ring = exports[new] if mode == "encrypt" else f"{exports['k2']},{exports['k1']}"
    db = str(tmp / f"trial-{n}.db")
    _copy_db(base, db)
    trial = Trial(n, mode)
    for k in range(kills):
        env = _env(ring)
        # The first kill lands wherever the process is just after it passed a crash
        # point drawn at random: the campaign watches the trace the command writes and
        # sends SIGKILL from outside, so it may fall inside a statement, a COMMIT or
        # its fsync. Later kills fall exactly at a crash point (CRASHSAFE_CRASH_AT).
        # With one kill per trial, every other pair of trials uses the exact points.
        at = rng.randint(1, prof.points)
        if k > 0 or (kills == 1 and (n // 2) % 2 == 1):
            env["CRASHSAFE_CRASH_AT"] = str(at)
            how = f"point {at}/{prof.points}"
            proc = subprocess.run(rotate_cmd(db), env=env, capture_output=True, text=True)
            code = proc.returncode
        else:
            how = f"after point {at}/{prof.points}"
            code = _kill_after(db, env, at, tmp / f"trace-trial-{n}-{k}.txt")
        res = check(db, want, exports, old, new)
        trial.violations += [f"after kill {k + 1} ({how}): {v}" for v in res.violations]
        if code != -signal.SIGKILL:
            landed = "exited" if code == 0 else f"exit {code}"
        elif res.new == 0:
            landed = "before any write"
        elif res.old == 0:
            landed = "after the last write"
        else:
            landed = "mid-rotation"
        trial.kills.append(Kill(how, landed, res.old, res.new))
    try:  # the last run is not killed: run it here (the killed ones ran the command)
        finish(db, ring)
    except Exception as exc:  # reported as a violation
        trial.violations.append(f"final rotation failed: {exc!r}")
    only_new = {new: exports[new]}
    res = check(db, want, only_new, new, new)
    trial.records = res.records
    trial.violations += [f"after the final run: {v}" for v in res.violations]
    if res.new != len(want):
        trial.violations.append(f"after the final run: {res.new} of {len(want)} records "
                                f"under {new!r}")
    if not extra:
        _remove_db(db)
        return trial
    again = subprocess.run(rotate_cmd(db), env=_env(exports[new]), capture_output=True,
                           text=True)
    if "re-sealed 0 records" not in again.stdout:
        trial.violations.append(f"a rotation after the last one changed records: "
                                f"{again.stdout.strip()[-200:]}")
    verify = subprocess.run([sys.executable, "-m", "crashsafe", "--db", f"sqlite:///{db}",
                             "verify"], env=_env(exports[new]), capture_output=True, text=True)
    if verify.returncode != 0:
        trial.violations.append(f"crashsafe verify with only {new!r}: "
                                f"{(verify.stdout + verify.stderr)[-500:]}")
    trial.violations += engine_reads(db, exports[new], states)
    _remove_db(db)
    return trial


def _remove_db(db: str) -> None:
    for ext in ("", "-wal", "-shm"):
        if os.path.exists(db + ext):
            os.remove(db + ext)


def _engine_states(db: str, ring: str | None) -> dict[str, Any]:
    """Every checkpoint's state of every workflow of ``db``, read through the engine."""
    code = (
        "import json, sys, crashsafe\n"
        "app = crashsafe.App(sys.argv[1])\n"
        "out = {}\n"
        "for r in app.list_workflows(limit=10**6):\n"
        "    cs = app.checkpoints(r.id)\n"
        "    if cs:\n"
        "        out[r.id] = [app.checkpoint_state(r.id, f'#{c.n}') for c in cs]\n"
        "print(json.dumps(out, sort_keys=True, default=str))\n"
    )
    env = _env(ring or "")
    if ring is None:
        env.pop("CRASHSAFE_KEYS")
    done = subprocess.run([sys.executable, "-c", code, f"sqlite:///{db}"], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"reading checkpoints of {db}: {done.stderr[-1000:]}")
    return dict(json.loads(done.stdout))


def engine_reads(db: str, ring: str, want: dict[str, Any]) -> list[str]:
    try:
        got = _engine_states(db, ring)
    except RuntimeError as exc:
        return [f"checkpoints through the engine: {exc}"]
    if got != want:
        bad = sorted(k for k in want.keys() | got.keys() if got.get(k) != want.get(k))
        return [f"checkpoints through the engine differ for {bad[:5]}"]
    return []


# ---------------------------------------------------------------------------- the run

def build_bases(tmp: Path, workflows: int, seed: int, exports: dict[str, str]
                ) -> dict[str, str]:
    bases = {"encrypt": str(tmp / "base-plain.db"), "rotate": str(tmp / "base-k1.db")}
    for mode, db in bases.items():
        env = _env(exports["k1"]) if mode == "rotate" else _env("")
        if mode == "encrypt":
            env.pop("CRASHSAFE_KEYS")
        done = subprocess.run([sys.executable, str(HERE), "--fill", db, "--workflows",
                               str(workflows), "--seed", str(seed)], env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"filling {db} failed: {done.stderr[-3000:]}")
    return bases


@dataclass
class Summary:
    seed: int
    trials: list[Trial]
    records: dict[str, int]
    kinds: dict[str, dict[str, int]]
    profiles: dict[str, Profile]
    seconds: float

    @property
    def violations(self) -> list[str]:
        return [f"trial {t.n} ({t.mode}): {v}" for t in self.trials for v in t.violations]


def campaign(trials: int, workflows: int, seed: int, tmpdir: str | None = None,
             progress: Any = None, kills: int = 2, extra_every: int = 1) -> Summary:
    """Run the trials (``kills`` each; the extra end checks on every ``extra_every``-th
    trial of each mode and always on the last two)."""
    from crashsafe._keys import Keyring

    started = time.perf_counter()
    rng = random.Random(seed)
    exports = {k: Keyring.generate(k).export() for k in ("k1", "k2")}
    with tempfile.TemporaryDirectory(prefix="crashsafe-rotation-", dir=tmpdir) as t:
        tmp = Path(t)
        bases = build_bases(tmp, workflows, seed, exports)
        wants = {mode: ledger(db, exports) for mode, db in bases.items()}
        kinds = {mode: dict(Counter(f"{w[0]}.{w[1]}" for w in want))
                 for mode, want in wants.items()}
        rings = {"encrypt": exports["k1"], "rotate": f"{exports['k2']},{exports['k1']}"}
        profiles = {mode: _fastest(profile(db, rings[mode], tmp, f"{mode}-{i}")
                                   for i in range(2)) for mode, db in bases.items()}
        states = {mode: _engine_states(db, exports["k1"] if mode == "rotate" else None)
                  for mode, db in bases.items()}
        done: list[Trial] = []
        for n in range(trials):
            mode = "encrypt" if n % 2 else "rotate"
            extra = (n // 2) % extra_every == 0 or n >= trials - 2
            trial = run_trial(n, mode, bases[mode], wants[mode], states[mode], exports,
                              profiles[mode], rng, tmp, kills, extra)
            done.append(trial)
            if progress is not None:
                progress(trial)
    return Summary(seed, done, {m: len(w) for m, w in wants.items()}, kinds, profiles,
                   time.perf_counter() - started)


def report(s: Summary) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    t = Table(title=f"key rotation killed with SIGKILL: {len(s.trials)} trials, seed {s.seed}"
                    f" ({s.seconds:.0f} s)", title_justify="left")
    for col in ("mode", "trials", "records each", "kills", "before any write",
                "mid-rotation", "after the last write", "exited first", "violations"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for mode in ("rotate", "encrypt"):
        ts = [x for x in s.trials if x.mode == mode]
        landed = Counter(k.landed for x in ts for k in x.kills)
        t.add_row(mode, str(len(ts)), str(s.records[mode]), str(sum(len(x.kills) for x in ts)),
                  str(landed["before any write"]), str(landed["mid-rotation"]),
                  str(landed["after the last write"]),
                  str(sum(v for k, v in landed.items() if k.startswith(("exited", "exit")))),
                  str(sum(len(x.violations) for x in ts)))
    console.print(t)
    for mode, kinds in s.kinds.items():
        console.print(f"{mode}: records by table.column: "
                      + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    for mode, p in s.profiles.items():
        console.print(f"{mode}: one uninterrupted rotation passes {p.points} crash points; "
                      f"the command takes {p.seconds:.2f} s; it writes from {p.first_write:.2f}"
                      f" s to {p.last_write:.2f} s")
    mid = [k for x in s.trials for k in x.kills if k.landed == "mid-rotation"]
    if mid:
        share = sorted(k.new / (k.old + k.new) for k in mid)
        console.print(f"kills mid-rotation: {len(mid)}; share of records already moved at "
                      f"those kills: min {share[0]:.0%}, median {share[len(share) // 2]:.0%}, "
                      f"max {share[-1]:.0%}")
    hit = sum(any(k.landed == "mid-rotation" for k in x.kills) for x in s.trials)
    console.print(f"trials with at least one kill mid-rotation: {hit} of {len(s.trials)}")
    bad = s.violations
    console.print(f"violations: {len(bad)}; lost records: "
                  f"{sum('lost' in v for v in bad)}; seed {s.seed}")
    for v in bad[:30]:
        console.print(f"  {v}", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--workflows", type=int, default=120,
                   help="workflows in each base database (one of them is left mid-stream)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tmpdir", default=None, help="where the databases go")
    p.add_argument("--fill", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fill:
        fill(args.fill, args.workflows, args.seed or 0)
        return
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    print(f"chaos/rotation.py --trials {args.trials} --workflows {args.workflows} "
          f"--seed {seed}", flush=True)

    def progress(t: Trial) -> None:
        kills = "; ".join(f"{k.how} -> {k.landed}" for k in t.kills)
        print(f"  trial {t.n + 1}/{args.trials} {t.mode}: {kills}; "
              f"{len(t.violations)} violation(s)", flush=True)

    summary = campaign(args.trials, args.workflows, seed, args.tmpdir, progress)
    report(summary)
    sys.exit(1 if summary.violations else 0)


if __name__ == "__main__":
    main()
