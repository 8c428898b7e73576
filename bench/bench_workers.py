"""Many workers on PostgreSQL: queue throughput and takeover after SIGKILL, vs DBOS 3.4.

Two measurements, every case in a fresh child process with a fresh PostgreSQL schema
(crashsafe) or a fresh database (DBOS), dropped afterwards; repetitions interleaved.

* Throughput: W workflows x S trivial steps enqueued on a queue, taken and run by N
  worker processes (crashsafe: the real ``crashsafe worker`` command; DBOS: N
  processes that ``DBOS.launch()`` on the same system database and listen to the
  queue); steps/s from the first enqueue to the last completion. For context, the
  same workload run sequentially in one process.
* Takeover: N workers run slow workflows (each step appends to an independent ledger
  file, then sleeps); one worker is SIGKILLed; time from the kill to the first step
  of one of its workflows on another worker, and until all of them finished.

    python bench/bench_workers.py                    # W=200, S=20, 4 workers x 25, 3 reps
    python bench/bench_workers.py --reps 1 --cases cs_sync_4w,dbos_4w

See bench/README.md for what each case measures.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import _harness as h

SCRIPT = Path(__file__).resolve()
APP_FILE = SCRIPT.with_name("_workers_app.py")
DEFAULT_PG = os.environ.get("CRASHSAFE_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
POLL_S = 0.02  # how often the parent of a case looks for completions
READY_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 300.0

THROUGHPUT_CASES = [
    "cs_sync_4w",
    "cs_async_4w",
    "cs_sync_4w_backlog",
    "cs_async_4w_backlog",
    "dbos_4w",
    "cs_seq",
    "dbos_seq",
]
TAKEOVER_CASES = ["takeover_cs_lease", "takeover_cs_host"]
SLOW_CASES = ["takeover_dbos"]  # run --dbos-takeover-reps times, after the others

# (numerator, denominator, target or None). Ratios are of steps/s.
RATIOS: list[tuple[str, str, float | None]] = [
    ("cs_sync_4w", "dbos_4w", 3.0),
    ("cs_async_4w", "dbos_4w", 3.0),
    ("cs_seq", "dbos_seq", None),
    ("cs_sync_4w", "cs_seq", None),
    ("cs_async_4w", "cs_seq", None),
    ("dbos_4w", "dbos_seq", None),
]


# ---------------------------------------------------------------- PostgreSQL bits


def _pg_connect(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True)


def _with_schema(base: str, schema: str) -> str:
    return f"{base}{'&' if '?' in base else '?'}schema={schema}"


def _with_database(base: str, dbname: str) -> str:
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


class Fresh:
    """A fresh schema (crashsafe) or database (DBOS) for one measurement."""

    def __init__(self, base: str, kind: str) -> None:
        self.base, self.kind = base, kind
        self.name = f"bench_{kind}_{uuid.uuid4().hex[:10]}"
        if kind == "dbos":
            with _pg_connect(base) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            self.url = _with_database(base, self.name)
            self.prefix = "dbos."  # DBOS's default system schema
        else:
            self.url = _with_schema(base, self.name)
            self.prefix = f'"{self.name}".'

    def drop(self) -> None:
        with _pg_connect(self.base) as conn:
            if self.kind == "dbos":
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            else:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')


def _count(conn: Any, sql: str, params: Sequence[Any] = ()) -> int:
    return int(conn.execute(sql, params).fetchone()[0])


# ------------------------------------------------------------------ worker processes


def _die_with_parent() -> None:
    """In a worker, before exec: get SIGTERM when the case's process dies (e.g. killed
    by the harness's timeout), so no worker outlives its measurement."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Workers:
    """Worker processes of one measurement, with their output in log files."""

    def __init__(self, tmpdir: str) -> None:
        self.tmpdir = tmpdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[str] = []

    def spawn(self, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log_path = os.path.join(self.tmpdir, f"worker-{len(self.procs)}.log")
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.tmpdir,
                preexec_fn=_die_with_parent,
            )
        self.procs.append(proc)
        self.logs.append(log_path)
        return proc

    def tail(self, i: int, lines: int = 12) -> str:
        text = Path(self.logs[i]).read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def wait_ready(self, marker: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = set(range(len(self.procs)))
        while pending:
            for i in list(pending):
                if marker in Path(self.logs[i]).read_text(errors="replace"):
                    pending.discard(i)
                elif self.procs[i].poll() is not None:
                    raise RuntimeError(
                        f"worker {i} exited {self.procs[i].returncode}:\n" + self.tail(i)
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"workers {sorted(pending)} not ready after "
                    f"{READY_TIMEOUT_S:.0f} s:\n" + self.tail(min(pending))
                )
            time.sleep(0.05)

    def check_alive(self, skip: int | None = None) -> None:
        for i, p in enumerate(self.procs):
            if i != skip and p.poll() is not None:
                raise RuntimeError(f"worker {i} exited {p.returncode}:\n" + self.tail(i))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _worker_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _spawn_cs_workers(
    args: argparse.Namespace, workers: Workers, url: str, extra_env: Callable[[int], dict[str, str]]
) -> None:
    for i in range(args.workers):
        env = _worker_env(
            {"CRASHSAFE_DATABASE": url, "BENCH_LEDGER_DIR": workers.tmpdir, **extra_env(i)}
        )
        workers.spawn(
            [
                sys.executable,
                "-m",
                "crashsafe",
                "worker",
                f"{APP_FILE}:app",
                "--queues",
                "bench",
                "--concurrency",
                str(args.worker_concurrency),
                "--grace",
                "2",
            ],
            env,
        )
    workers.wait_ready("serving")


def _spawn_dbos_workers(args: argparse.Namespace, workers: Workers, url: str) -> None:
    for i in range(args.workers):
        env = _worker_env(
            {"BENCH_LEDGER_DIR": workers.tmpdir, "BENCH_STEP_SLEEP": str(args.step_sleep)}
        )
        workers.spawn(
            [
                sys.executable,
                str(SCRIPT),
                "--dbos-worker",
                "--url",
                url,
                "--executor-id",
                f"worker-{i}",
                "--dbos-pool",
                str(args.dbos_pool),
            ],
            env,
        )
    workers.wait_ready("DBOS_WORKER_READY")


# -------------------------------------------------------------------- DBOS process


def _dbos_config(args: argparse.Namespace, url: str, executor_id: str) -> dict[str, Any]:
    return {
        "name": "bench",
        "system_database_url": url,
        "application_version": "bench",  # same in every process, so all dequeue alike
        "executor_id": executor_id,
        "sys_db_pool_size": args.dbos_pool,
        "log_level": "WARNING",
    }


def dbos_worker_main(args: argparse.Namespace) -> None:
    """A DBOS worker process: launch on the shared system database, listen to 'bench'."""
    from dbos import DBOS

    import _workers_app as wa

    DBOS(config=_dbos_config(args, args.url, args.executor_id))  # type: ignore[arg-type]
    wa.dbos_define()
    DBOS.listen_queues(["bench"])
    DBOS.launch()
    print("DBOS_WORKER_READY", flush=True)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        time.sleep(0.1)
    DBOS.destroy(workflow_completion_timeout_sec=0)


def _dbos_launch_enqueuer(args: argparse.Namespace, url: str) -> tuple[Any, dict[str, Any]]:
    """DBOS in the case's own process: creates the schema, registers the queue, enqueues;
    listens to no queue of ours, so it never runs the work itself."""
    from dbos import DBOS

    import _workers_app as wa

    DBOS(config=_dbos_config(args, url, "enqueuer"))  # type: ignore[arg-type]
    fns = wa.dbos_define()
    DBOS.listen_queues(["not-bench"])
    DBOS.launch()
    queue = DBOS.register_queue(
        "bench", worker_concurrency=args.worker_concurrency, polling_interval_sec=args.dbos_poll
    )
    return queue, fns


# ----------------------------------------------------------------------- throughput


def _done(args: argparse.Namespace, elapsed: float, workflows: int, **extra: Any) -> h.JsonDict:
    steps = workflows * args.steps
    return {
        "elapsed_s": elapsed,
        "workflows": workflows,
        "steps": steps,
        "steps_per_s": steps / elapsed,
        "us_per_step": elapsed / steps * 1e6,
        **extra,
    }


def _wait_count(
    conn: Any, sql: str, target: int, workers: Workers | None, skip: int | None = None
) -> float:
    """Poll until ``sql`` counts ``target``; the wall-clock time it first did."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        if _count(conn, sql) >= target:
            return time.time()
        if workers is not None:
            workers.check_alive(skip)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {_count(conn, sql)} of {target} done after {RUN_TIMEOUT_S:.0f} s"
            )
        time.sleep(POLL_S)


def _cs_env(args: argparse.Namespace, url: str, tmpdir: str, **extra: str) -> None:
    """Environment of this process before it imports the app module."""
    os.environ.update(
        {
            "CRASHSAFE_DATABASE": url,
            "BENCH_LEDGER_DIR": tmpdir,
            "BENCH_STEP_SLEEP": str(args.step_sleep),
            **extra,
        }
    )


def _cs_workers_throughput(
    args: argparse.Namespace, workflow: str, backlog: bool = False
) -> h.JsonDict:
    """N ``crashsafe worker`` processes on one queue. Normal: the clock starts at the
    first enqueue. Backlog: every workflow is enqueued first with a far ``delay``, then
    released at once (one UPDATE of ``not_before``); the clock starts at the release,
    so this measures what the workers can drain, without the enqueuer."""
    tmpdir = os.path.dirname(args.db)
    fresh = Fresh(args.pg, "cs")
    workers = Workers(tmpdir)
    total = args.backlog_workflows if backlog else args.workflows
    try:
        _cs_env(args, fresh.url, tmpdir)
        import _workers_app as wa

        wa.app.launch()  # creates the schema: outside the clock
        _spawn_cs_workers(args, workers, fresh.url, lambda i: {})
        time.sleep(1.5)  # every worker in its steady polling state
        fn = wa.trivial_sync if workflow == "sync" else wa.trivial_async
        conn = _pg_connect(args.pg)
        done_sql = f"SELECT count(*) FROM {fresh.prefix}workflows WHERE status = 'succeeded'"
        started = time.time()
        for w in range(total):
            wa.bench_queue.enqueue(
                fn, args.steps, workflow_id=f"w-{w}", delay=3600 if backlog else None
            )
        enqueued = time.time() - started
        wa.app.close()
        if backlog:
            started = time.time()
            conn.execute(
                f"UPDATE {fresh.prefix}workflows SET not_before = NULL WHERE status = 'enqueued'"
            )
        ended = _wait_count(conn, done_sql, total, workers)
        steps = _count(conn, f"SELECT count(*) FROM {fresh.prefix}journal WHERE kind = 'step'")
        per_worker = sorted(
            (
                int(r[0])
                for r in conn.execute(
                    f"SELECT count(*) FROM {fresh.prefix}workflows GROUP BY owner"
                )
            ),
            reverse=True,
        )
        conn.close()
        assert steps == total * args.steps, steps
        assert len(per_worker) <= args.workers, per_worker
        return _done(
            args, ended - started, total, enqueue_s=enqueued, workflows_per_worker=per_worker
        )
    finally:
        workers.stop()
        fresh.drop()


def case_cs_sync_4w(args: argparse.Namespace) -> h.JsonDict:
    return _cs_workers_throughput(args, "sync")


def case_cs_async_4w(args: argparse.Namespace) -> h.JsonDict:
    return _cs_workers_throughput(args, "async")


def case_cs_sync_4w_backlog(args: argparse.Namespace) -> h.JsonDict:
    return _cs_workers_throughput(args, "sync", backlog=True)


def case_cs_async_4w_backlog(args: argparse.Namespace) -> h.JsonDict:
    return _cs_workers_throughput(args, "async", backlog=True)


def case_dbos_4w(args: argparse.Namespace) -> h.JsonDict:
    tmpdir = os.path.dirname(args.db)
    fresh = Fresh(args.pg, "dbos")
    workers = Workers(tmpdir)
    try:
        from dbos import DBOS, SetWorkflowID

        queue, fns = _dbos_launch_enqueuer(args, fresh.url)
        _spawn_dbos_workers(args, workers, fresh.url)
        time.sleep(1.5)  # every worker's queue thread started and polling
        conn = _pg_connect(fresh.url)
        done_sql = f"SELECT count(*) FROM {fresh.prefix}workflow_status WHERE status = 'SUCCESS'"
        started = time.time()
        for w in range(args.workflows):
            with SetWorkflowID(f"w-{w}"):
                queue.enqueue(fns["trivial_sync"], args.steps)
        enqueued = time.time() - started
        ended = _wait_count(conn, done_sql, args.workflows, workers)
        steps = _count(conn, f"SELECT count(*) FROM {fresh.prefix}operation_outputs")
        per_worker = sorted(
            (
                int(r[0])
                for r in conn.execute(
                    f"SELECT count(*) FROM {fresh.prefix}workflow_status GROUP BY executor_id"
                )
            ),
            reverse=True,
        )
        conn.close()
        assert steps == args.workflows * args.steps, steps
        DBOS.destroy(workflow_completion_timeout_sec=0)
        return _done(
            args,
            ended - started,
            args.workflows,
            enqueue_s=enqueued,
            workflows_per_worker=per_worker,
        )
    finally:
        workers.stop()
        fresh.drop()


def case_cs_seq(args: argparse.Namespace) -> h.JsonDict:
    tmpdir = os.path.dirname(args.db)
    fresh = Fresh(args.pg, "cs")
    try:
        _cs_env(args, fresh.url, tmpdir)
        import _workers_app as wa

        wa.app.launch()
        started = time.perf_counter()
        for w in range(args.seq_workflows):
            out = wa.app.start(wa.trivial_sync, args.steps, workflow_id=f"w-{w}").result(
                timeout=RUN_TIMEOUT_S
            )
            assert out == args.steps, out
        elapsed = time.perf_counter() - started
        wa.app.close()
        return _done(args, elapsed, args.seq_workflows)
    finally:
        fresh.drop()


def case_dbos_seq(args: argparse.Namespace) -> h.JsonDict:
    fresh = Fresh(args.pg, "dbos")
    try:
        from dbos import DBOS, SetWorkflowID

        import _workers_app as wa

        DBOS(config=_dbos_config(args, fresh.url, "seq"))  # type: ignore[arg-type]
        fns = wa.dbos_define()
        DBOS.launch()
        started = time.perf_counter()
        for w in range(args.seq_workflows):
            with SetWorkflowID(f"w-{w}"):
                out = fns["trivial_sync"](args.steps)
            assert out == args.steps, out
        elapsed = time.perf_counter() - started
        DBOS.destroy(workflow_completion_timeout_sec=0)
        return _done(args, elapsed, args.seq_workflows)
    finally:
        fresh.drop()


# ------------------------------------------------------------------------- takeover


def _wait_ledger(tmpdir: str, target: int, workers: Workers) -> None:
    import _workers_app as wa

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(wa.read_ledger(tmpdir)) < target:
        workers.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError("the workers made no progress")
        time.sleep(0.01)


def _kill(workers: Workers, victim: int) -> float:
    proc = workers.procs[victim]
    killed_at = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # reap it at once: no zombie left for anyone's liveness check
    return killed_at


def _track(
    conn: Any, sql: str, total: int, deadline_s: float, workers: Workers, victim: int
) -> dict[str, float]:
    """Poll the finished workflows; when each was first seen finished (wall clock)."""
    seen: dict[str, float] = {}
    end = time.monotonic() + deadline_s
    while len(seen) < total and time.monotonic() < end:
        now = time.time()
        for (wid,) in conn.execute(sql):
            seen.setdefault(wid, now)
        workers.check_alive(skip=victim)
        time.sleep(POLL_S)
    return seen


def _ledger_figures(
    tmpdir: str, victim_pid: int, victims: set[str], killed_at: float
) -> h.JsonDict:
    import _workers_app as wa

    rows = wa.read_ledger(tmpdir)
    resumed = [
        t for wid, _, pid, t in rows if wid in victims and pid != victim_pid and t >= killed_at
    ]
    executions: dict[tuple[str, int], int] = {}
    for wid, idx, _, _ in rows:
        executions[(wid, idx)] = executions.get((wid, idx), 0) + 1
    # Which worker continued each of the victim's workflows (its first step after the kill).
    first_by: dict[str, tuple[float, int]] = {}
    for wid, _, pid, t in rows:
        if (
            wid in victims
            and pid != victim_pid
            and t >= killed_at
            and (wid not in first_by or t < first_by[wid][0])
        ):
            first_by[wid] = (t, pid)
    per_pid: dict[int, int] = {}
    for _, pid in first_by.values():
        per_pid[pid] = per_pid.get(pid, 0) + 1
    return {
        "resumed_by_worker": sorted(per_pid.values(), reverse=True),
        "first_resumed_step_s": (min(resumed) - killed_at) if resumed else None,
        "resumed_step_executions": len(resumed),
        "steps_run_twice": sum(n - 1 for n in executions.values() if n > 1),
        "victim_steps_before_kill": sum(1 for _, _, pid, _ in rows if pid == victim_pid),
        "distinct_steps": len(executions),
    }


def _takeover_cs(args: argparse.Namespace, fake_hosts: bool) -> h.JsonDict:
    tmpdir = os.path.dirname(args.db)
    fresh = Fresh(args.pg, "cs")
    workers = Workers(tmpdir)
    lease_env = {
        "BENCH_LEASE": str(args.lease),
        "BENCH_HEARTBEAT": str(args.heartbeat),
        "BENCH_SWEEP": str(args.sweep),
    }
    total = args.takeover_workflows
    try:
        _cs_env(args, fresh.url, tmpdir, **lease_env)
        import _workers_app as wa

        wa.app.launch()
        _spawn_cs_workers(
            args,
            workers,
            fresh.url,
            lambda i: {
                **lease_env,
                "BENCH_STEP_SLEEP": str(args.step_sleep),
                **({"BENCH_FAKE_HOST": f"bench-host-{i}"} if fake_hosts else {}),
            },
        )
        time.sleep(1.0)
        for w in range(total):
            wa.bench_queue.enqueue(wa.slow_sync, f"w-{w}", args.steps, workflow_id=f"w-{w}")
        wa.app.close()  # the enqueuer leaves: only workers may take over
        _wait_ledger(tmpdir, int(total * args.steps * args.kill_at), workers)
        conn = _pg_connect(args.pg)
        # The victim: the worker running the most workflows right now.
        busiest = conn.execute(
            f"SELECT e.pid FROM {fresh.prefix}workflows w JOIN {fresh.prefix}executors e "
            "ON e.id = w.owner WHERE w.status = 'running' AND NOT e.stopped "
            "GROUP BY e.pid ORDER BY count(*) DESC LIMIT 1"
        ).fetchone()
        pids = [p.pid for p in workers.procs]
        victim = pids.index(busiest[0]) if busiest and busiest[0] in pids else 0
        victim_pid = pids[victim]
        killed_at = _kill(workers, victim)
        seen = _track(
            conn,
            f"SELECT id FROM {fresh.prefix}workflows WHERE status = 'succeeded'",
            total,
            RUN_TIMEOUT_S,
            workers,
            victim,
        )
        # Taken over = fencing token raised again after the dequeue's (1): token >= 2.
        victims = {
            r[0] for r in conn.execute(f"SELECT id FROM {fresh.prefix}workflows WHERE token >= 2")
        }
        hb = conn.execute(
            f"SELECT heartbeat_at FROM {fresh.prefix}executors WHERE pid = %s AND NOT stopped",
            (victim_pid,),
        ).fetchone()
        steps = _count(conn, f"SELECT count(*) FROM {fresh.prefix}journal WHERE kind = 'step'")
        conn.close()
        if len(seen) != total:
            raise RuntimeError(f"{total - len(seen)} workflows never finished")
        if not victims:
            raise RuntimeError("the killed worker had no workflow in flight")
        assert steps == total * args.steps, steps
        figures = _ledger_figures(tmpdir, victim_pid, victims, killed_at)
        assert figures["distinct_steps"] == total * args.steps, figures
        return {
            "victim_workflows": len(victims),
            "victim_workflows_finished": sum(1 for v in victims if v in seen),
            "all_victim_workflows_done_s": max(seen[v] for v in victims) - killed_at,
            "lease_expiry_s": (hb[0] + args.lease - killed_at) if hb else None,
            "lease_s": args.lease,
            **figures,
        }
    finally:
        workers.stop()
        fresh.drop()


def case_takeover_cs_lease(args: argparse.Namespace) -> h.JsonDict:
    return _takeover_cs(args, fake_hosts=True)


def case_takeover_cs_host(args: argparse.Namespace) -> h.JsonDict:
    return _takeover_cs(args, fake_hosts=False)


def case_takeover_dbos(args: argparse.Namespace) -> h.JsonDict:
    tmpdir = os.path.dirname(args.db)
    fresh = Fresh(args.pg, "dbos")
    workers = Workers(tmpdir)
    total = args.takeover_workflows
    try:
        from dbos import DBOS, SetWorkflowID

        os.environ.update({"BENCH_LEDGER_DIR": tmpdir, "BENCH_STEP_SLEEP": str(args.step_sleep)})
        queue, fns = _dbos_launch_enqueuer(args, fresh.url)
        _spawn_dbos_workers(args, workers, fresh.url)
        time.sleep(1.5)
        for w in range(total):
            with SetWorkflowID(f"w-{w}"):
                queue.enqueue(fns["slow_sync"], f"w-{w}", args.steps)
        _wait_ledger(tmpdir, int(total * args.steps * args.kill_at), workers)
        conn = _pg_connect(fresh.url)
        # The victim: the worker running the most workflows right now.
        busiest = conn.execute(
            f"SELECT executor_id FROM {fresh.prefix}workflow_status WHERE status = 'PENDING' "
            "AND executor_id LIKE 'worker-%' GROUP BY executor_id ORDER BY count(*) DESC LIMIT 1"
        ).fetchone()
        victim = int(busiest[0].split("-")[1]) if busiest else 0
        victim_pid = workers.procs[victim].pid
        success_sql = (
            f"SELECT workflow_uuid FROM {fresh.prefix}workflow_status WHERE status = 'SUCCESS'"
        )
        killed_at = _kill(workers, victim)
        # The victim can finish nothing more, and DBOS resumes nothing within
        # milliseconds: what has succeeded now is what had succeeded at the kill.
        done_at_kill = {r[0] for r in conn.execute(success_sql)}
        seen = _track(conn, success_sql, total, args.dbos_wait, workers, victim)
        waited = time.time() - killed_at
        ran_on_victim = {
            r[0]
            for r in conn.execute(
                f"SELECT workflow_uuid FROM {fresh.prefix}workflow_status WHERE executor_id = %s",
                (f"worker-{victim}",),
            )
        }
        statuses = dict(
            conn.execute(
                f"SELECT status, count(*) FROM {fresh.prefix}workflow_status GROUP BY status"
            ).fetchall()
        )
        conn.close()
        import _workers_app as wa

        # The victim's workflows not finished at the kill: those it had dequeued (its
        # executor id) or had run a step of (the ledger), less those already done.
        ran_on_victim |= {wid for wid, _, pid, _ in wa.read_ledger(tmpdir) if pid == victim_pid}
        victims = ran_on_victim - done_at_kill
        figures = _ledger_figures(tmpdir, victim_pid, victims, killed_at)
        DBOS.destroy(workflow_completion_timeout_sec=0)
        return {
            "victim_workflows": len(victims),
            "victim_workflows_finished": sum(1 for v in victims if v in seen),
            "all_victim_workflows_done_s": (
                max(seen[v] for v in victims) - killed_at
                if victims and all(v in seen for v in victims)
                else None
            ),
            "waited_s": waited,
            "statuses_at_end": statuses,
            **figures,
        }
    finally:
        workers.stop()
        fresh.drop()


CASES: dict[str, h.CaseFn] = {
    "cs_sync_4w": case_cs_sync_4w,
    "cs_async_4w": case_cs_async_4w,
    "cs_sync_4w_backlog": case_cs_sync_4w_backlog,
    "cs_async_4w_backlog": case_cs_async_4w_backlog,
    "dbos_4w": case_dbos_4w,
    "cs_seq": case_cs_seq,
    "dbos_seq": case_dbos_seq,
    "takeover_cs_lease": case_takeover_cs_lease,
    "takeover_cs_host": case_takeover_cs_host,
    "takeover_dbos": case_takeover_dbos,
}

TAKEOVER_METRICS = [
    ("first_resumed_step_s", "kill → first resumed step (s)"),
    ("all_victim_workflows_done_s", "kill → all its workflows done (s)"),
    ("lease_expiry_s", "kill → its lease expired (s)"),
    ("victim_workflows", "its workflows in flight"),
    ("victim_workflows_finished", "of which finished"),
    ("steps_run_twice", "steps run twice"),
]


# --------------------------------------------------------------------------- parent


def _fmt_stats(s: h.Stats | None, digits: int) -> tuple[str, str]:
    return (h.fmt(s.min if s else None, digits), h.fmt(s.median if s else None, digits))


def _stats(measurements: list[h.Measurement], case: str, key: str) -> h.Stats | None:
    """Like ``h.metric_stats`` but skipping runs where the metric is None (never)."""
    return h.Stats.of(
        [
            float(m.result[key])
            for m in measurements
            if m.case == case and m.ok and m.result.get(key) is not None
        ]
    )


def report(
    measurements: list[h.Measurement], cases: list[str], args: argparse.Namespace
) -> h.JsonDict:
    summary: h.JsonDict = {}
    rows: list[list[str]] = []
    for case in [c for c in cases if c in THROUGHPUT_CASES]:
        sps = h.metric_stats(measurements, case, "steps_per_s")
        el = h.metric_stats(measurements, case, "elapsed_s")
        failed = len(h.failures(measurements, case))
        summary[case] = {
            "steps_per_s": sps.__dict__ if sps else None,
            "elapsed_s": el.__dict__ if el else None,
            "failed": failed,
        }
        wf = (
            args.seq_workflows
            if case.endswith("_seq")
            else args.backlog_workflows
            if case.endswith("_backlog")
            else args.workflows
        )
        rows.append(
            [
                case,
                str(wf),
                f"{sps.n if sps else 0}" + (f" ({failed} failed)" if failed else ""),
                h.fmt(sps.median if sps else None),
                h.fmt(sps.max if sps else None),
                h.fmt(sps.min if sps else None),
                h.fmt(el.median if el else None, 2),
            ]
        )
    if rows:
        h.print_table(
            f"throughput: workflows x {args.steps} trivial steps; {args.workers} workers x "
            f"{args.worker_concurrency} (the _4w cases); {args.reps} interleaved reps",
            [
                "case",
                "workflows",
                "runs",
                "steps/s med",
                "steps/s best",
                "steps/s worst",
                "wall s med",
            ],
            rows,
        )

    ratio_rows: list[list[str]] = []
    ratios: list[h.JsonDict] = []
    for num, den, target in RATIOS:
        if num not in cases or den not in cases:
            continue
        a = h.metric_stats(measurements, num, "steps_per_s")
        b = h.metric_stats(measurements, den, "steps_per_s")
        med = h.ratio(a.median if a else None, b.median if b else None)
        best = h.ratio(a.max if a else None, b.max if b else None)
        paired = h.Stats.of(h.paired_ratios(measurements, num, den, "steps_per_s"))
        verdict = "" if target is None or med is None else ("ok" if med >= target else "BELOW")
        ratios.append(
            {
                "num": num,
                "den": den,
                "of_medians": med,
                "of_bests": best,
                "per_rep": paired.__dict__ if paired else None,
                "target": target,
            }
        )
        ratio_rows.append(
            [
                f"{num} / {den}",
                h.fmt(med, 2),
                h.fmt(best, 2),
                h.fmt(paired.median if paired else None, 2),
                f"{h.fmt(paired.min, 2)} .. {h.fmt(paired.max, 2)}" if paired else "-",
                "" if target is None else f">= {target:.1f}",
                verdict,
            ]
        )
    if ratio_rows:
        h.print_table(
            "ratios of steps/s, same run (verdict on the ratio of medians)",
            ["ratio", "of medians", "of bests", "per-rep median", "per-rep range", "target", ""],
            ratio_rows,
        )

    take_cases = [c for c in cases if c in TAKEOVER_CASES + SLOW_CASES]
    if take_cases:
        headers = ["metric"]
        for c in take_cases:
            n = len([m for m in measurements if m.case == c and m.ok])
            headers += [f"{c} min", f"med (n={n})"]
        trows: list[list[str]] = []
        for key, label in TAKEOVER_METRICS:
            row = [label]
            for c in take_cases:
                digits = 2 if key.endswith("_s") else 0
                values = [m.result.get(key) for m in measurements if m.case == c and m.ok]
                if any(v is None for v in values):
                    row += ["never" if key == "first_resumed_step_s" else "-", ""]
                    continue
                row += list(_fmt_stats(_stats(measurements, c, key), digits))
            trows.append(row)
        for c in take_cases:
            summary[c] = {
                key: (s.__dict__ if (s := _stats(measurements, c, key)) else None)
                for key, _ in TAKEOVER_METRICS
            }
            summary[c]["failed"] = len(h.failures(measurements, c))
        h.print_table(
            f"takeover after SIGKILL of 1 of {args.workers} workers: crashsafe lease "
            f"{args.lease:g} s, heartbeat {args.heartbeat:g} s, sweep {args.sweep:g} s; "
            f"DBOS watched for {args.dbos_wait:g} s",
            headers,
            trows,
        )
        target = args.lease + 1.0
        for c in [c for c in take_cases if c.startswith("takeover_cs")]:
            s = _stats(measurements, c, "first_resumed_step_s")
            if s:
                ok = "ok" if s.median < target else "ABOVE"
                print(
                    f"{c}: median {s.median:.2f} s to the first resumed step; goal "
                    f"< lease + 1 s = {target:g} s: {ok}"
                )
        for m in measurements:
            if m.case == "takeover_dbos" and m.ok:
                print(
                    f"takeover_dbos rep {m.rep + 1}: statuses {m.result['statuses_at_end']} "
                    f"{m.result['waited_s']:.0f} s after the kill; "
                    f"{m.result['resumed_step_executions']} steps of the killed worker's "
                    "workflows ran elsewhere"
                )
    return {"summary": summary, "ratios": ratios}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--pg", default=DEFAULT_PG, help="PostgreSQL server URL (a database to create schemas in)"
    )
    p.add_argument("--workflows", type=int, default=200, help="workflows per throughput run (W)")
    p.add_argument("--steps", type=int, default=20, help="steps per workflow (S)")
    p.add_argument("--workers", type=int, default=4, help="worker processes (N)")
    p.add_argument(
        "--worker-concurrency",
        type=int,
        default=25,
        help="queued workflows each worker runs at once (K)",
    )
    p.add_argument(
        "--seq-workflows",
        type=int,
        default=50,
        help="workflows of the sequential one-process cases",
    )
    p.add_argument(
        "--backlog-workflows",
        type=int,
        default=600,
        help="workflows of the backlog cases (enqueued before the clock)",
    )
    p.add_argument("--takeover-workflows", type=int, default=200)
    p.add_argument(
        "--step-sleep", type=float, default=0.02, help="seconds each takeover step sleeps"
    )
    p.add_argument(
        "--kill-at",
        type=float,
        default=0.25,
        help="SIGKILL when this share of all takeover steps has started",
    )
    p.add_argument("--lease", type=float, default=3.0, help="crashsafe lease in takeover cases")
    p.add_argument("--heartbeat", type=float, default=0.5)
    p.add_argument("--sweep", type=float, default=0.5, help="crashsafe recovery_interval")
    p.add_argument(
        "--dbos-wait", type=float, default=60.0, help="seconds to watch DBOS after the kill"
    )
    p.add_argument("--dbos-takeover-reps", type=int, default=1)
    p.add_argument(
        "--dbos-pool",
        type=int,
        default=10,
        help="DBOS sys_db_pool_size per process (crashsafe's pool_max is 8)",
    )
    p.add_argument(
        "--dbos-poll",
        type=float,
        default=1.0,
        help="DBOS queue polling_interval_sec (its default is 1 s)",
    )
    h.add_common_args(p, default_reps=3)
    # DBOS worker processes (internal).
    p.add_argument("--dbos-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--executor-id", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dbos_worker:
        dbos_worker_main(args)
        return
    if args.case:
        h.child_main(CASES, args)
        return
    cases = h.select_cases(list(CASES), args.cases)
    env = h.environment()
    h.log(f"bench_workers: {env}")
    child_args = [
        "--pg",
        args.pg,
        "--workflows",
        str(args.workflows),
        "--steps",
        str(args.steps),
        "--workers",
        str(args.workers),
        "--worker-concurrency",
        str(args.worker_concurrency),
        "--seq-workflows",
        str(args.seq_workflows),
        "--backlog-workflows",
        str(args.backlog_workflows),
        "--takeover-workflows",
        str(args.takeover_workflows),
        "--step-sleep",
        str(args.step_sleep),
        "--kill-at",
        str(args.kill_at),
        "--lease",
        str(args.lease),
        "--heartbeat",
        str(args.heartbeat),
        "--sweep",
        str(args.sweep),
        "--dbos-wait",
        str(args.dbos_wait),
        "--dbos-pool",
        str(args.dbos_pool),
        "--dbos-poll",
        str(args.dbos_poll),
    ]
    main_cases = [c for c in cases if c not in SLOW_CASES]
    slow_cases = [c for c in cases if c in SLOW_CASES]
    load_before = os.getloadavg()
    started = time.monotonic()
    measurements = h.run_interleaved(
        SCRIPT,
        main_cases,
        args.reps,
        child_args,
        tmp_root=args.tmpdir,
        timeout=args.timeout,
        progress=h.log,
    )
    if slow_cases:
        measurements += h.run_interleaved(
            SCRIPT,
            slow_cases,
            args.dbos_takeover_reps,
            child_args,
            tmp_root=args.tmpdir,
            timeout=args.timeout,
            progress=h.log,
        )
    load_after = os.getloadavg()
    h.log(f"bench_workers: {time.monotonic() - started:.0f} s in all")
    load = (
        f"load average before {' '.join(f'{x:.1f}' for x in load_before)}, after "
        f"{' '.join(f'{x:.1f}' for x in load_after)} (2 cores: above ~2, other work "
        "competes for the CPU and PostgreSQL; compare ratios within this run)"
    )
    print(load)
    out = report(measurements, cases, args)
    out["load_average"] = {"before": load_before, "after": load_after}
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "workers",
                "environment": env,
                "params": {
                    k: v
                    for k, v in vars(args).items()
                    if k not in ("case", "db", "dbos_worker", "url", "executor_id")
                },
                **out,
                "measurements": h.measurements_json(measurements),
            },
        )
    if any(not m.ok for m in measurements):
        sys.exit(1)


if __name__ == "__main__":
    main()
