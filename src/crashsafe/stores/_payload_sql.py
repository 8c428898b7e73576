"""The payload columns of the SQL stores, for maintenance passes (key rotation).

Both SQL backends keep the same tables and columns; this walks them with the driver's
placeholder. Only the constant table and column names below are formatted into SQL;
every value is a bound parameter.
"""

from __future__ import annotations

from typing import Any

from .base import PayloadRewrite

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
