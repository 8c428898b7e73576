"""The payload columns of the SQL stores, for maintenance passes (key rotation).

Both SQL backends keep the same tables and columns; this walks them with the driver's
placeholder. Only the constant table and column names below are formatted into SQL;
every value is a bound parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import JournalEntry, PayloadRewrite, StoredPayload, choose_drops

# (table, workflow column, primary key, index expression, [(payload column, kind
# expression)]): every payload a store keeps, named as the sealing wrapper names it.
_PAYLOADS: list[tuple[str, str, str, str, list[tuple[str, str]]]] = [
    ("workflows", "id", "id", "-1",
     [("inputs", "'inputs'"), ("output", "'output'"), ("error", "'error'")]),
    ("journal", "workflow_id", "workflow_id, idx", "idx",
     [("output", "'output'"), ("error", "'error'")]),
    ("attempts", "workflow_id", "workflow_id, idx, attempt", "idx",
     [("error", "'attempt-error:' || attempt")]),
    ("effects", "workflow_id", "key", "idx",
     [("output", "'effect-output'"), ("error", "'effect-error'")]),
    ("signals", "workflow_id", "workflow_id, name, seq", "0",
     [("payload", "'signal:' || name")]),
    ("rewound", "workflow_id", "workflow_id, rewound_at, idx", "idx",
     [("output", "'output'"), ("error", "'error'")]),
]


def rewrite_rows(conn: Any, workflow_id: str, fn: PayloadRewrite, mark: str) -> int:
    """Shared by the SQLite and PostgreSQL stores (``mark`` is the driver's placeholder):
    one pass over every payload column of one workflow's rows, inside the caller's
    transaction. Only constant table and column names are formatted into the SQL."""
    changed = 0
    for table, owner, pk, index_expr, columns in _PAYLOADS:
        keys = [c.strip() for c in pk.split(",")]
        where = " AND ".join(f"{k} = {mark}" for k in keys)
        for column, kind_expr in columns:
            rows = conn.execute(
                f"SELECT {pk}, {index_expr}, {kind_expr}, {column} FROM {table} "
                f"WHERE {owner} = {mark} AND {column} IS NOT NULL", (workflow_id,)).fetchall()
            for row in rows:
                ids, (index, kind, data) = row[:len(keys)], row[len(keys):]
                new = fn(int(index), str(kind), bytes(data))
                if new is not None:
                    conn.execute(f"UPDATE {table} SET {column} = {mark} WHERE {where}",
                                 (new, *ids))
                    changed += 1
    return changed


def read_rows(conn: Any, workflow_ids: Sequence[str], mark: str) -> list[StoredPayload]:
    """:meth:`Store.load_payloads`: what :func:`rewrite_rows` visits, read only, 500
    ids per statement."""
    found: dict[str, list[StoredPayload]] = {wid: [] for wid in workflow_ids}
    ids = list(found)
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ", ".join([mark] * len(chunk))
        for table, owner, pk, index_expr, columns in _PAYLOADS:
            for column, kind_expr in columns:
                rows = conn.execute(
                    f"SELECT {owner}, {index_expr}, {kind_expr}, {column} FROM {table} "
                    f"WHERE {owner} IN ({marks}) AND {column} IS NOT NULL ORDER BY {pk}",
                    chunk).fetchall()
                for wid, index, kind, data in rows:
                    found[wid].append((wid, table, int(index), str(kind), bytes(data)))
    return [row for wid in ids for row in found[wid]]


def orphan_ids(conn: Any) -> list[str]:
    """:meth:`Store.orphaned_workflow_ids`: one anti-join per table that hangs off a
    workflow (sorted here, not in SQL: the tables' id columns need not share a
    collation)."""
    found: set[str] = set()
    for table, owner, _, _, _ in _PAYLOADS:
        if table == "workflows":
            continue
        found.update(r[0] for r in conn.execute(
            f"SELECT DISTINCT {owner} FROM {table} t WHERE NOT EXISTS "
            f"(SELECT 1 FROM workflows w WHERE w.id = t.{owner})").fetchall())
    return sorted(found)


_ENTRY_COLS = "idx, kind, name, output, error, attempts, started_at, ended_at, note"


def rewind_rows(conn: Any, workflow_id: str, from_index: int, reason: str, at: float,
                mark: str) -> int:
    """Shared by the SQL stores: :meth:`Store.rewind` inside the caller's transaction."""
    p = mark
    moved = conn.execute(
        f"INSERT INTO rewound (workflow_id, rewound_at, reason, {_ENTRY_COLS}) "
        f"SELECT workflow_id, {p}, {p}, {_ENTRY_COLS} FROM journal "
        f"WHERE workflow_id = {p} AND idx >= {p}",
        (at, reason, workflow_id, from_index)).rowcount
    for table in ("journal", "attempts", "intents", "effects"):
        conn.execute(f"DELETE FROM {table} WHERE workflow_id = {p} AND idx >= {p}",
                     (workflow_id, from_index))
    conn.execute(
        f"UPDATE workflows SET status = 'running', owner = NULL, reason = {p}, output = NULL, "
        f"error = NULL, token = token + 1, recovery_attempts = 0, updated_at = {p} "
        f"WHERE id = {p}", (reason, at, workflow_id))
    return int(moved)


# -- retention ----------------------------------------------------------------------------
_FINISHED_SQL = "('succeeded', 'failed', 'cancelled', 'dead_letter')"
_OWN_TABLES = ("journal", "attempts", "signals", "rewound")


def finished_query(before: float, after: tuple[float, str] | None, limit: int, roots: bool,
                   mark: str) -> tuple[str, list[Any]]:
    """:meth:`Store.finished_workflows` as one SELECT and its parameters."""
    p = mark
    where = f"status IN {_FINISHED_SQL} AND updated_at < {p}"
    params: list[Any] = [before]
    if after is not None:
        where += f" AND (updated_at > {p} OR (updated_at = {p} AND id > {p}))"
        params += [after[0], after[0], after[1]]
    if roots:
        where += (" AND (parent_id IS NULL OR NOT EXISTS "
                  "(SELECT 1 FROM workflows p WHERE p.id = workflows.parent_id))")
    params.append(max(0, int(limit)))
    return (f"SELECT id, updated_at FROM workflows WHERE {where} "
            f"ORDER BY updated_at, id LIMIT {p}", params)


def _in(conn: Any, query: str, ids: list[str], mark: str) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ", ".join([mark] * len(chunk))
        out += conn.execute(query.replace("(?IN)", f"({marks})"), chunk).fetchall()
    return out


def drop_rows(conn: Any, workflow_ids: Sequence[str], before: float, mark: str) -> list[str]:
    """Shared by the SQL stores: :meth:`Store.drop_workflows` inside the caller's
    transaction."""
    p = mark
    ids = list(dict.fromkeys(workflow_ids))
    rows = _in(conn, "SELECT id, parent_id, status, updated_at FROM workflows WHERE id IN (?IN)",
               ids, p)
    dropped = choose_drops(
        [(r[0], r[1], r[2], r[3]) for r in rows], before,
        lambda parents: {r[0] for r in _in(conn, "SELECT id FROM workflows WHERE id IN (?IN)",
                                           sorted(parents), p)})
    for wid in dropped:
        for table in _OWN_TABLES:
            conn.execute(f"DELETE FROM {table} WHERE workflow_id = {p}", (wid,))
        # An intent whose key still has its effect row stays with it: a workflow
        # started again under this id then still sees that outcome as unknown.
        conn.execute(f"DELETE FROM intents WHERE workflow_id = {p} AND NOT EXISTS "
                     "(SELECT 1 FROM effects e WHERE e.key = intents.key)", (wid,))
        conn.execute(f"DELETE FROM workflows WHERE id = {p}", (wid,))
    return dropped


def rewrite_finished_rows(conn: Any, entries: Sequence[JournalEntry],
                          expect: Mapping[str, tuple[int, float]], mark: str) -> list[str]:
    """Shared by the SQL stores: :meth:`Store.rewrite_finished_entries` inside the
    caller's transaction (which holds the workflows' rows, so the compare below and
    the writes are one step)."""
    p = mark
    wids = sorted({e.workflow_id for e in entries if e.workflow_id in expect})
    unchanged = {r[0] for r in _in(
        conn, "SELECT id, token, updated_at FROM workflows WHERE id IN (?IN) "
              f"AND status IN {_FINISHED_SQL}", wids, p)
        if (int(r[1]), float(r[2])) == tuple(expect[r[0]])}
    written: set[str] = set()
    for e in entries:
        if e.workflow_id in unchanged and conn.execute(
                f"UPDATE journal SET output = {p}, note = {p} WHERE workflow_id = {p} "
                f"AND idx = {p} AND kind = {p}",
                (e.output, e.note, e.workflow_id, e.index, e.kind)).rowcount:
            written.add(e.workflow_id)
    return sorted(written)
