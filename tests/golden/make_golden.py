"""Record the golden journals: ``python tests/golden/make_golden.py``.

Runs the reference workflows of ``golden_app.py`` on a fresh SQLite file and writes
its rows as SQL text to ``journal_vN.sql``, N being the schema version that wrote
them (reviewable in diffs). The tests build a database of that schema version, load
the rows, and let the current code migrate it before replaying. Keep old files:
each one proves that journals written by that schema still replay.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "golden.db"
        os.environ["GOLDEN_DB"] = f"sqlite:///{db}"
        sys.path.insert(0, str(HERE))
        import golden_app as g

        g.app.start(g.golden_ticket, {"order_id": "A-1", "text": "refund please"},
                    workflow_id="golden-refund").result(timeout=30)
        g.app.start(g.golden_ticket, {"order_id": "B-2", "text": "where is it?"},
                    workflow_id="golden-question").result(timeout=30)
        g.app.start(g.golden_async, "T-9", workflow_id="golden-async").result(timeout=30)
        approval = g.app.start(g.golden_approval, 120.0, workflow_id="golden-approval")
        g.app.signal("golden-approval", "approve", {"approved": True, "by": "ops"})
        approval.result(timeout=30)
        g.app.close()
        conn = sqlite3.connect(db)
        lines = [line for line in conn.iterdump()
                 if line.startswith("INSERT INTO") and '"executors"' not in line]
        conn.close()
    from crashsafe.stores.sqlite import SCHEMA_VERSION

    out = HERE / f"journal_v{SCHEMA_VERSION}.sql"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} rows to {out}")


if __name__ == "__main__":
    main()
