"""Agent-state checkpoints: storage against LangGraph SqliteSaver, and checkpoint latency.

Two measurements, every case in a fresh child process on a fresh database file, the
repetitions of all cases interleaved (see bench/README.md):

* **storage** (``store_*``): the same 20-turn agent run for crashsafe and LangGraph 1.2.
  Each turn appends a user message, runs one deterministic fake LLM step that appends
  an assistant message, and checkpoints the full state (the message list and a small
  dict). Two sizes: ``small`` (the history grows from ~1 KB to ~3.3 KB, as in
  PEERS.md) and ``large`` (~1 KB per message, ~40 KB at the end); ``--runs`` runs (10)
  per database. Reported per run: the sum of the stored payload bytes and the growth of
  the SQLite file plus its WAL (after ``PRAGMA wal_checkpoint(TRUNCATE)`` + ``VACUUM``;
  ``file_growth_novac_per_run`` without the ``VACUUM``) over a database holding only the
  schema, measured the same way for both libraries; also the whole files.
* **latency** (``lat_*``): ``crashsafe.checkpoint(state)`` of a ~100 KB state (100
  messages of ~1 KB and a small dict), one message appended per checkpoint, timed around
  the call (which commits its journal entry); p50/p95/p99 with ``synchronous=FULL`` and
  ``normal``, with and without encryption; a raw SQLite one-row commit for scale.
  ``lat_full_auto`` takes the same checkpoints through ``CheckpointPolicy(every_steps=1)``
  instead: each timed call is a trivial step that takes the checkpoint and commits it
  with its own result.

    python bench/bench_checkpoints.py                 # 3 reps, all cases (~2-3 minutes)
    python bench/bench_checkpoints.py --reps 1 --cases store_small_crashsafe,store_small_langgraph
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import random
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypedDict

import _harness as h

SCRIPT = Path(__file__).resolve()
RESULT_TIMEOUT_S = 300.0
LATENCY_TARGET_MS = 5.0
STORAGE_TARGET = 0.10

# Characters of message content: the system prompt, then each turn's user message and
# assistant reply. JSON overhead brings "small" from ~1.0 KB to ~3.3 KB over 20 turns.
SIZES: dict[str, dict[str, int]] = {
    "small": {"system": 900, "user": 20, "assistant": 35},
    "large": {"system": 1000, "user": 1000, "assistant": 1000},
}
MODEL = "fake-llm-1"

# ------------------------------------------------------------------ the workload

_rng = random.Random(20261122)
_VOCAB = [
    f"{_rng.choice('bcdfghklmnprstvz')}{_rng.choice('aeiou')}"
    f"{_rng.choice('bcdfghklmnprstvz')}{_rng.choice('aeiouy')}"
    + ("" if i % 3 else _rng.choice(["ing", "ed", "s", "er", "ly"]))
    for i in range(3000)
]


def text(seed: int, n: int) -> str:
    """``n`` characters of word-like text, the same for the same seed in any process
    (it compresses about as well as chat transcripts: a vocabulary, no repetition)."""
    rng = random.Random(seed)
    words: list[str] = []
    length = 0
    while length < n:
        w = rng.choice(_VOCAB)
        words.append(w)
        length += len(w) + 1
    return " ".join(words)[:n]


def system_message(size: str) -> dict[str, str]:
    return {"role": "system", "content": text(1, SIZES[size]["system"])}


def user_message(turn: int, size: str) -> dict[str, str]:
    return {"role": "user", "content": text(1000 + turn, SIZES[size]["user"])}


def fake_llm(history: list[dict[str, str]], size: str) -> dict[str, str]:
    """A deterministic stand-in for an LLM call: the reply depends on the history."""
    seed = 7919 * len(history) + len(history[-1]["content"])
    return {"role": "assistant", "content": text(seed, SIZES[size]["assistant"])}


def meta(turn: int, messages: list[dict[str, str]]) -> dict[str, Any]:
    chars = sum(len(m["content"]) for m in messages)
    return {"turn": turn, "model": MODEL, "tokens": chars // 4, "cost_usd": chars * 1e-6}


def initial_state(size: str) -> dict[str, Any]:
    return {"messages": [system_message(size)], "meta": meta(0, [system_message(size)])}


def expected_final(size: str, turns: int) -> dict[str, Any]:
    state = initial_state(size)
    for t in range(turns):
        msgs = [*state["messages"], user_message(t, size)]
        msgs.append(fake_llm(msgs, size))
        state = {"messages": msgs, "meta": meta(t + 1, msgs)}
    return state


def json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")).encode())


# ------------------------------------------------------------------ measuring files


def checkpointed_size(db: str) -> int:
    """Bytes of the database file plus its WAL after folding the WAL in
    (``PRAGMA wal_checkpoint(TRUNCATE)``), as the run left the pages (no VACUUM)."""
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = db + "-wal"
    return os.path.getsize(db) + (os.path.getsize(wal) if os.path.exists(wal) else 0)


def vacuumed_size(db: str) -> int:
    """Bytes of the database file after folding the WAL in and vacuuming (no -wal left)."""
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = db + "-wal"
    return os.path.getsize(db) + (os.path.getsize(wal) if os.path.exists(wal) else 0)


def blob_bytes(db: str, columns: dict[str, list[str]]) -> dict[str, int]:
    """``sum(length(col))`` per ``table.col``."""
    out: dict[str, int] = {}
    with closing(sqlite3.connect(db)) as conn:
        for table, cols in columns.items():
            for col in cols:
                out[f"{table}.{col}"] = int(
                    conn.execute(f"SELECT coalesce(sum(length({col})), 0) FROM {table}")
                    .fetchone()[0]
                )
    return out


def _set_keys(encrypted: bool) -> None:
    if encrypted:
        from crashsafe._keys import Keyring

        os.environ["CRASHSAFE_KEYS"] = Keyring.generate("bench").export()
    else:
        os.environ.pop("CRASHSAFE_KEYS", None)


# ------------------------------------------------------------- storage: crashsafe

CS_COLUMNS = {"journal": ["output", "error"], "workflows": ["inputs", "output", "error"]}
LG_COLUMNS = {"checkpoints": ["checkpoint", "metadata"], "writes": ["value"]}


def _store_crashsafe(args: argparse.Namespace, size: str, whole: bool,
                     encrypted: bool) -> h.JsonDict:
    _set_keys(encrypted)
    import crashsafe

    turns = args.turns
    app = crashsafe.App(f"sqlite:///{args.db}")

    @app.step(name="llm")
    def llm(history: list[dict[str, str]]) -> dict[str, str]:
        return fake_llm(history, size)

    @app.step(name="llm_whole")
    def llm_whole(history: list[dict[str, str]]) -> list[dict[str, str]]:
        return [*history, fake_llm(history, size)]

    @app.workflow(name="agent")
    def agent(initial: dict[str, Any], turns: int) -> dict[str, int]:
        state = initial
        for t in range(turns):
            msgs = [*state["messages"], user_message(t, size)]
            msgs = llm_whole(msgs) if whole else [*msgs, llm(msgs)]
            state = {"messages": msgs, "meta": meta(t + 1, msgs)}
            crashsafe.checkpoint(state)
        return {"turns": turns, "messages": len(state["messages"])}

    app.launch()
    want = expected_final(size, turns)
    started = time.perf_counter()
    for r in range(args.runs):
        out = app.start(agent, initial_state(size), turns, workflow_id=f"agent-{r}").result(
            timeout=RESULT_TIMEOUT_S)
        assert out == {"turns": turns, "messages": len(want["messages"])}, out
    elapsed = time.perf_counter() - started
    last = f"agent-{args.runs - 1}"
    infos = app.checkpoints(last)
    assert len(infos) == turns, len(infos)
    assert app.checkpoint_state(last) == want, "latest checkpoint does not read back"
    assert app.checkpoint_state(last, at="#4") == expected_final(size, 5)
    journal_rows = len(app.journal(last))
    app.close()

    blobs = blob_bytes(args.db, CS_COLUMNS)
    with closing(sqlite3.connect(args.db)) as conn:
        ckpt_bytes = int(conn.execute(
            "SELECT coalesce(sum(length(output)), 0) FROM journal WHERE kind = 'checkpoint'"
        ).fetchone()[0])
    result = {
        "elapsed_s": elapsed,
        "turns": turns,
        "history_first": json_size(expected_final(size, 1)["messages"]),
        "history_last": json_size(want["messages"]),
        "state_last": json_size(want),
        "journal_rows": journal_rows,
        "checkpoints_full": sum(1 for i in infos if i.full),
        "checkpoints_delta": sum(1 for i in infos if not i.full),
        "ckpt_stored_before_seal": sum(i.stored for i in infos),
        "ckpt_state_bytes": sum(i.size for i in infos),
        "ckpt_sealed_bytes_per_run": ckpt_bytes / args.runs,
        "journal_bytes_per_run": (blobs["journal.output"] + blobs["journal.error"]) / args.runs,
    }

    def empty_db(path: str) -> None:
        app2 = crashsafe.App(f"sqlite:///{path}")
        app2.launch()
        app2.close()

    return _file_figures(args, result, blobs, empty_db)


def _file_figures(args: argparse.Namespace, result: h.JsonDict, blobs: dict[str, int],
                  empty_db: Callable[[str], None]) -> h.JsonDict:
    """Payload and file bytes per run; the file of the same schema holding nothing (its
    fixed cost, which more runs in one database amortise) is made with ``empty_db``."""
    result["runs"] = args.runs
    result["blobs"] = blobs
    result["payload_per_run"] = sum(blobs.values()) / args.runs
    result["file_bytes_novac"] = checkpointed_size(args.db)
    result["file_bytes"] = vacuumed_size(args.db)
    empty = os.path.join(os.path.dirname(args.db), "empty.db")
    empty_db(empty)
    result["empty_file_bytes"] = vacuumed_size(empty)
    result["file_growth_per_run"] = (result["file_bytes"] - result["empty_file_bytes"]) / args.runs
    result["file_growth_novac_per_run"] = (
        result["file_bytes_novac"] - result["empty_file_bytes"]) / args.runs
    return result


# ------------------------------------------------------------- storage: LangGraph


def _store_langgraph(args: argparse.Namespace, size: str, lc_messages: bool) -> h.JsonDict:
    from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import END, START, StateGraph
    from langgraph.graph.message import add_messages

    turns = args.turns
    roles = {"system": "system", "human": "user", "ai": "assistant"}

    def as_dicts(msgs: list[Any]) -> list[dict[str, str]]:
        if not lc_messages:
            return list(msgs)
        return [{"role": roles[m.type], "content": str(m.content)} for m in msgs]

    # Functional syntax: the annotations must be objects, not strings, for LangGraph to
    # read the reducers (this module uses postponed annotations).
    MsgState = TypedDict(  # noqa: UP013
        "MsgState", {"messages": Annotated[list[AnyMessage], add_messages],
                     "meta": dict[str, Any]})
    DictState = TypedDict(  # noqa: UP013
        "DictState", {"messages": Annotated[list[dict[str, str]], operator.add],
                      "meta": dict[str, Any]})
    schema: Any = MsgState if lc_messages else DictState

    def turn(state: Any) -> dict[str, Any]:
        t = state["meta"]["turn"]
        user = user_message(t, size)
        reply = fake_llm([*as_dicts(state["messages"]), user], size)
        new: list[Any] = [user, reply]
        if lc_messages:
            new = [HumanMessage(content=user["content"]),
                   AIMessage(content=reply["content"])]
        return {"messages": new,
                "meta": meta(t + 1, [*as_dicts(state["messages"]), user, reply])}

    def route(state: Any) -> str:
        return "turn" if state["meta"]["turn"] < turns else END

    builder: Any = StateGraph(schema)
    builder.add_node("turn", turn)
    builder.add_edge(START, "turn")
    builder.add_conditional_edges("turn", route)
    conn = sqlite3.connect(args.db, check_same_thread=False)
    graph = builder.compile(checkpointer=SqliteSaver(conn))
    want = expected_final(size, turns)
    started = time.perf_counter()
    for r in range(args.runs):
        config: RunnableConfig = {"configurable": {"thread_id": f"agent-{r}"},
                                  "recursion_limit": turns + 5}
        init = initial_state(size)
        if lc_messages:
            init = {"messages": [SystemMessage(content=init["messages"][0]["content"])],
                    "meta": init["meta"]}
        out = graph.invoke(init, config, durability="sync")
        assert as_dicts(out["messages"]) == want["messages"], "wrong history"
        assert out["meta"] == want["meta"], out["meta"]
    elapsed = time.perf_counter() - started
    history = list(graph.get_state_history(config))
    conn.close()

    blobs = blob_bytes(args.db, LG_COLUMNS)
    with closing(sqlite3.connect(args.db)) as c:
        n_ckpt = int(c.execute("SELECT count(*) FROM checkpoints").fetchone()[0])
        n_writes = int(c.execute("SELECT count(*) FROM writes").fetchone()[0])
    result = {
        "elapsed_s": elapsed,
        "turns": turns,
        "history_first": json_size(expected_final(size, 1)["messages"]),
        "history_last": json_size(want["messages"]),
        "state_last": json_size(want),
        "checkpoint_rows": n_ckpt // args.runs,
        "write_rows": n_writes // args.runs,
        "state_history": len(history),
        "ckpt_sealed_bytes_per_run": blobs["checkpoints.checkpoint"] / args.runs,
    }

    def empty_db(path: str) -> None:
        with closing(sqlite3.connect(path, check_same_thread=False)) as c:
            SqliteSaver(c).setup()

    return _file_figures(args, result, blobs, empty_db)


# ------------------------------------------------------------------------ latency


def big_state(n_messages: int, msg_chars: int) -> dict[str, Any]:
    msgs = [{"role": "user" if i % 2 else "assistant", "content": text(50_000 + i, msg_chars)}
            for i in range(n_messages)]
    return {"messages": msgs, "meta": meta(0, msgs)}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def _latency_summary(times_ms: list[float], prefix: str = "") -> h.JsonDict:
    s = sorted(times_ms)
    return {
        f"{prefix}n": len(s),
        f"{prefix}p50_ms": percentile(s, 50),
        f"{prefix}p95_ms": percentile(s, 95),
        f"{prefix}p99_ms": percentile(s, 99),
        f"{prefix}max_ms": s[-1],
        f"{prefix}mean_ms": statistics.fmean(s),
    }


def _latency_crashsafe(args: argparse.Namespace, synchronous: str, encrypted: bool,
                       auto: bool = False) -> h.JsonDict:
    _set_keys(encrypted)
    import crashsafe
    from crashsafe import _checkpoint, _codec

    url = f"sqlite:///{args.db}" + ("?synchronous=normal" if synchronous == "normal" else "")
    app = crashsafe.App(url)
    base = big_state(args.lat_messages, args.lat_chars)
    every = app.checkpoint_full_every
    times: list[float] = []
    cpu: list[float] = []  # CPU time of the whole process (all threads) during the call
    kinds: list[bool] = []  # full snapshot?

    @app.step(name="tick")
    def tick(i: int) -> int:
        return i

    # auto: CheckpointPolicy(every_steps=1) instead of checkpoint(). Each timed call is
    # then a (trivial) step whose start takes the checkpoint of the state as updated
    # since the previous step; it is committed with the step's result.
    policy = crashsafe.CheckpointPolicy(every_steps=1) if auto else None

    @app.workflow(name="agent", checkpoint=policy)
    def agent(k: int, wid: int) -> int:
        state = base  # the workflow's in-memory state; arguments stay small
        crashsafe.track(lambda: state)
        if auto:
            tick(-1)
        for i in range(k):
            msg = {"role": "user" if i % 2 else "assistant",
                   "content": text(900_000 + 1000 * wid + i, args.lat_chars)}
            msgs = [*state["messages"], msg]
            state = {"messages": msgs, "meta": meta(i + 1, msgs)}
            c0 = time.process_time()
            t0 = time.perf_counter()
            if auto:
                tick(i)
            else:
                crashsafe.checkpoint(state)
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
            kinds.append(i % every == 0)
        return k  # auto: the end takes one more checkpoint (untimed, not counted)

    app.launch()
    started = time.perf_counter()
    for w in range(args.lat_workflows):
        out = app.start(agent, args.lat_checkpoints, w, workflow_id=f"lat-{w}").result(
            timeout=RESULT_TIMEOUT_S)
        assert out == args.lat_checkpoints, out
    elapsed = time.perf_counter() - started
    infos = app.checkpoints(f"lat-{args.lat_workflows - 1}")[:args.lat_checkpoints]
    assert len(infos) == args.lat_checkpoints
    assert [i.full for i in infos] == kinds[-args.lat_checkpoints:], "unexpected full/delta"
    last = app.checkpoint_state(f"lat-{args.lat_workflows - 1}")
    assert len(last["messages"]) == args.lat_messages + args.lat_checkpoints
    state_bytes = infos[0].size
    app.close()

    # Where the time goes, outside the timed calls: the CPU parts of one checkpoint of
    # the same state, run here in the same process after the timed loop.
    state = {"messages": [*base["messages"], {"role": "user", "content": "x" * args.lat_chars}],
             "meta": meta(1, base["messages"])}
    prev = base

    def t_ms(fn: Callable[[], object], n: int = 50) -> float:
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    encoded = _codec.encode(state, "x")[0]
    parts = {
        "cpu_state_hash_ms": t_ms(lambda: _checkpoint.state_hash(state)),
        "cpu_encode_state_ms": t_ms(lambda: _codec.encode(state, "x")),
        "cpu_decode_state_ms": t_ms(lambda: _codec.decode(encoded)),
        "cpu_diff_ms": t_ms(lambda: _checkpoint.diff(prev, state)),
    }
    from crashsafe._keys import Keyring
    from crashsafe._seal import RecordContext, Sealer

    full_doc = _codec.encode({"full": state}, "x")[0]
    sealer = Sealer(Keyring.generate("b") if encrypted else None)
    ctx = RecordContext("lat-0", 3, "checkpoint")
    parts["cpu_seal_full_ms"] = t_ms(lambda: sealer.seal(full_doc, ctx))
    result = {
        "elapsed_s": elapsed,
        "state_bytes_first": state_bytes,
        "state_bytes_last": infos[-1].size,
        "delta_stored_bytes": statistics.median(i.stored for i in infos if not i.full),
        **_latency_summary(times),
        **_latency_summary([t for t, f in zip(times, kinds, strict=True) if f], "full_"),
        **_latency_summary([t for t, f in zip(times, kinds, strict=True) if not f], "delta_"),
        **_latency_summary(cpu, "cpu_"),
        # The slowest calls: (ms, position in the run, full snapshot?).
        "slowest": sorted(zip(times, range(len(times)), kinds, strict=True), reverse=True)[:5],
        **parts,
    }
    with closing(sqlite3.connect(args.db)) as conn:
        rows = conn.execute("SELECT workflow_id, length(output) FROM journal "
                            "WHERE kind = 'checkpoint' ORDER BY workflow_id, idx").fetchall()
        ordinals: dict[str, int] = {}
        deltas = []
        for wid, length in rows:
            n = ordinals[wid] = ordinals.get(wid, -1) + 1
            if n % every:
                deltas.append(length)
        result["sealed_delta_bytes"] = statistics.median(deltas)
    return result


def _raw_commit(args: argparse.Namespace, synchronous: str) -> h.JsonDict:
    """One ``INSERT`` + ``COMMIT`` per row of a delta-sized blob: the disk's floor."""
    conn = sqlite3.connect(args.db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE journal (workflow_id TEXT NOT NULL, idx INTEGER NOT NULL,"
                 " output BLOB, PRIMARY KEY (workflow_id, idx)) WITHOUT ROWID")
    payload = os.urandom(args.raw_bytes)
    n = args.lat_workflows * args.lat_checkpoints
    times, cpu = [], []
    for i in range(n):
        c0 = time.process_time()
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        conn.execute("INSERT INTO journal VALUES (?, ?, ?)", ("raw", i, payload))
        conn.execute("COMMIT")
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    rows = conn.execute("SELECT count(*) FROM journal").fetchone()[0]
    conn.close()
    assert rows == n, rows
    return {"row_bytes": args.raw_bytes, **_latency_summary(times),
            **_latency_summary(cpu, "cpu_")}


# ---------------------------------------------------------------------------- cases

CASES: dict[str, h.CaseFn] = {}
for _size in SIZES:
    CASES[f"store_{_size}_crashsafe"] = partial(
        _store_crashsafe, size=_size, whole=False, encrypted=False)
    CASES[f"store_{_size}_crashsafe_whole"] = partial(
        _store_crashsafe, size=_size, whole=True, encrypted=False)
    CASES[f"store_{_size}_crashsafe_enc"] = partial(
        _store_crashsafe, size=_size, whole=False, encrypted=True)
    CASES[f"store_{_size}_langgraph"] = partial(_store_langgraph, size=_size, lc_messages=False)
    CASES[f"store_{_size}_langgraph_msgs"] = partial(
        _store_langgraph, size=_size, lc_messages=True)
CASES.update({
    "lat_full": partial(_latency_crashsafe, synchronous="full", encrypted=False),
    "lat_normal": partial(_latency_crashsafe, synchronous="normal", encrypted=False),
    "lat_full_enc": partial(_latency_crashsafe, synchronous="full", encrypted=True),
    "lat_full_auto": partial(_latency_crashsafe, synchronous="full", encrypted=False,
                             auto=True),
    "lat_normal_enc": partial(_latency_crashsafe, synchronous="normal", encrypted=True),
    "raw_commit_full": partial(_raw_commit, synchronous="FULL"),
    "raw_commit_normal": partial(_raw_commit, synchronous="NORMAL"),
})

STORE_LABELS = {
    "crashsafe": "crashsafe, step returns the new message",
    "crashsafe_whole": "crashsafe, step returns the whole history",
    "crashsafe_enc": "crashsafe, new message, $CRASHSAFE_KEYS",
    "langgraph": "LangGraph SqliteSaver, operator.add of dicts",
    "langgraph_msgs": "LangGraph SqliteSaver, add_messages",
}


# ----------------------------------------------------------------------------- report


def _stat(ms: list[h.Measurement], case: str, metric: str) -> h.Stats | None:
    return h.metric_stats(ms, case, metric)


def _kib(v: float | None) -> str:
    return "-" if v is None else f"{v / 1024:,.1f}"


def report(ms: list[h.Measurement], cases: list[str], args: argparse.Namespace) -> h.JsonDict:
    summary: h.JsonDict = {}
    metrics = ["payload_per_run", "file_growth_per_run", "file_bytes", "empty_file_bytes",
               "ckpt_sealed_bytes_per_run", "elapsed_s", "p50_ms", "p95_ms", "p99_ms",
               "max_ms", "full_p50_ms", "delta_p50_ms", "delta_p99_ms", "cpu_p50_ms",
               "cpu_p99_ms", "cpu_state_hash_ms", "cpu_encode_state_ms",
               "cpu_decode_state_ms", "cpu_diff_ms", "cpu_seal_full_ms"]
    for case in cases:
        summary[case] = {m: s.__dict__ for m in metrics
                         if (s := _stat(ms, case, m)) is not None}
        summary[case]["failed"] = len(h.failures(ms, case))

    def cell(case: str, metric: str) -> str:
        s = _stat(ms, case, metric)
        return "-" if s is None else f"{_kib(s.min)} / {_kib(s.median)}"

    ratio_metrics = ("payload_per_run", "file_growth_per_run", "file_bytes")
    ratios: list[h.JsonDict] = []
    for size in SIZES:
        store = [c for c in cases if c.startswith(f"store_{size}_")]
        if not store:
            continue
        first = next((m.result for m in ms if m.ok and m.case in store), {})
        rows = []
        for case in store:
            res = next((m.result for m in ms if m.ok and m.case == case), {})
            detail = (f"{res.get('checkpoints_full', '?')} full + "
                      f"{res.get('checkpoints_delta', '?')} delta"
                      if "checkpoints_full" in res else
                      f"{res.get('checkpoint_rows', '?')} ckpt + {res.get('write_rows', '?')} "
                      "write rows" if res else "-")
            rows.append([STORE_LABELS[case.split("_", 2)[2]], cell(case, "payload_per_run"),
                         cell(case, "file_growth_per_run"), cell(case, "file_bytes"),
                         cell(case, "empty_file_bytes"), detail])
        h.print_table(
            f"storage, {size}: {args.turns} turns, history {first.get('history_first', 0):,} B"
            f" -> {first.get('history_last', 0):,} B of JSON; {args.runs} runs per database"
            " (KiB, min / median; file = after wal_checkpoint(TRUNCATE) + VACUUM)",
            ["case", "payload per run", "file growth per run", "file, all runs",
             "empty schema", "records per run"], rows)
        rrows = []
        for den in (f"store_{size}_langgraph", f"store_{size}_langgraph_msgs"):
            for num in (f"store_{size}_crashsafe", f"store_{size}_crashsafe_whole",
                        f"store_{size}_crashsafe_enc"):
                if num not in cases or den not in cases:
                    continue
                row = [f"{num.split('_', 2)[2]} / {den.split('_', 2)[2]}"]
                for metric in ratio_metrics:
                    x, y = _stat(ms, num, metric), _stat(ms, den, metric)
                    r = h.ratio(x.median if x else None, y.median if y else None)
                    ratios.append({"num": num, "den": den, "metric": metric,
                                   "of_medians": r, "target": STORAGE_TARGET})
                    row.append("-" if r is None else
                               f"{r:.3f} (1/{1 / r:,.1f})" if r else "0")
                    if metric != "file_bytes":
                        row[-1] += "" if r is None else (" ok" if r <= STORAGE_TARGET
                                                         else " ABOVE")
                rrows.append(row)
        if rrows:
            h.print_table(
                f"storage ratios, {size} (of medians; target <= 1/10 on per-run bytes)",
                ["ratio", "payload per run", "file growth per run", "file, all runs"], rrows)

    lat = [c for c in cases if c.startswith(("lat_", "raw_commit_"))]
    if lat:
        rows = []
        for case in lat:
            cells = [case]
            for k in ("p50_ms", "p95_ms", "p99_ms", "full_p50_ms", "delta_p50_ms",
                      "cpu_p50_ms", "cpu_p99_ms"):
                s = _stat(ms, case, k)
                cells.append("-" if s is None else f"{s.min:.2f} / {s.median:.2f}")
            p99 = _stat(ms, case, "p99_ms")
            cells.append("" if p99 is None or not case.startswith("lat_") else
                         ("ok" if p99.median < LATENCY_TARGET_MS else "ABOVE 5 ms"))
            rows.append(cells)
        first = next((m.result for m in ms if m.ok and m.case.startswith("lat_")), {})
        h.print_table(
            f"checkpoint latency, wall and process CPU (ms, min / median over reps): state "
            f"{first.get('state_bytes_first', 0):,} -> {first.get('state_bytes_last', 0):,} B,"
            f" {args.lat_workflows} workflows x {args.lat_checkpoints} checkpoints;"
            f" raw = 1 row of {args.raw_bytes} B per commit",
            ["case", "p50", "p95", "p99", "full p50", "delta p50", "CPU p50", "CPU p99",
             "p99 < 5 ms"], rows)
        prow = []
        for case in [c for c in lat if c.startswith("lat_")]:
            cells = [case]
            for k in ("cpu_state_hash_ms", "cpu_encode_state_ms", "cpu_decode_state_ms",
                      "cpu_diff_ms", "cpu_seal_full_ms"):
                s = _stat(ms, case, k)
                cells.append("-" if s is None else f"{s.median:.3f}")
            res = next((m.result for m in ms if m.ok and m.case == case), {})
            cells.append(f"{res.get('delta_stored_bytes', 0):,.0f} / "
                         f"{res.get('sealed_delta_bytes', 0):,.0f}")
            prow.append(cells)
        h.print_table(
            "CPU parts of one checkpoint of that state (ms, median; measured after the loop)",
            ["case", "state_hash", "encode", "decode", "diff", "seal full", "delta B / sealed"],
            prow)
    return {"summary": summary, "ratios": ratios}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=20, help="agent turns (storage cases)")
    p.add_argument("--runs", type=int, default=10,
                   help="agent runs (workflows / threads) per database in the storage cases;"
                        " figures are per run")
    p.add_argument("--lat-workflows", type=int, default=12,
                   help="workflows per latency case (each starts from the ~100 KB state)")
    p.add_argument("--lat-checkpoints", type=int, default=20,
                   help="checkpoints per workflow (latency cases)")
    p.add_argument("--lat-messages", type=int, default=100, help="messages in the base state")
    p.add_argument("--lat-chars", type=int, default=1000, help="characters per message")
    p.add_argument("--raw-bytes", type=int, default=1000,
                   help="row size of raw_commit_* (about a sealed delta)")
    h.add_common_args(p, default_reps=3)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case:
        h.child_main(CASES, args)
        return
    cases = h.select_cases(list(CASES), args.cases)
    env = h.environment()
    h.log(f"bench_checkpoints: {env}")
    child_args = ["--turns", str(args.turns), "--runs", str(args.runs),
                  "--lat-workflows", str(args.lat_workflows),
                  "--lat-checkpoints", str(args.lat_checkpoints),
                  "--lat-messages", str(args.lat_messages), "--lat-chars", str(args.lat_chars),
                  "--raw-bytes", str(args.raw_bytes)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    ms = h.run_interleaved(SCRIPT, cases, args.reps, child_args, tmp_root=args.tmpdir,
                           timeout=args.timeout, progress=h.log)
    load_after = os.getloadavg()
    env["loadavg_1_5_15"] = {"before": load_before, "after": load_after}
    print(f"python {' '.join(sys.argv)}  ({args.reps} interleaved reps, "
          f"{time.perf_counter() - started:.0f} s; load average before "
          f"{load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} CPUs)")
    out = report(ms, cases, args)
    if args.json:
        h.write_json(args.json, {"benchmark": "checkpoints", "environment": env,
                                 "params": {k: v for k, v in vars(args).items()
                                            if k not in ("case", "db")},
                                 **out, "measurements": h.measurements_json(ms)})
    if any(not m.ok for m in ms):
        sys.exit(1)


if __name__ == "__main__":
    main()
