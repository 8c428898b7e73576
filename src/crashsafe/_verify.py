"""``crashsafe verify``: check every stored record's checksum (and decryptability).

Reads the backend's raw records (below the sealing wrapper) and opens each payload
with the context it was sealed for: a workflow's inputs, output and error, every
journal entry's output and error, every recorded attempt's error, the outcomes of its
effects, its signals, its rolled-back entries; then the same for the rows left by
workflows retention dropped (effect outcomes, kept until their expiry); then the
partial outputs of streaming steps. A record that fails is listed with the reason;
the others are not affected.

One kind of failure is expected and not counted as bad: a damaged record that an
``on_corrupt="rollback"`` already rolled back (the rollback keeps it for audit, under
a reason that names that very record). It is listed apart, in ``rolled_back``. Damage
to a rolled-back entry that no rollback recorded is bad like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ._partial import PREFIX as PARTIAL_PREFIX
from ._partial import record_context
from ._seal import RecordContext, Sealer
from .exceptions import CorruptRecordError
from .stores.base import JournalEntry, ListFilter, Store


@dataclass(frozen=True, slots=True)
class BadRecord:
    workflow_id: str
    index: int
    kind: str
    reason: str
    table: str = ""
    """Where it is stored: ``workflows``, ``journal``, ``attempts``, ``effects``,
    ``signals``, ``rewound`` (a rolled-back entry) or ``shared`` (a partial output)."""


@dataclass(slots=True)
class VerifyReport:
    workflows: int = 0
    orphans: int = 0
    """Ids without a workflow row (retention dropped it) whose rows were checked."""
    records: int = 0
    bad: list[BadRecord] = field(default_factory=list)
    rolled_back: list[BadRecord] = field(default_factory=list)
    """Damaged records a rollback already took out of use and kept for audit."""

    @property
    def ok(self) -> bool:
        return not self.bad


def _known_damage(rewound: list[tuple[float, str, JournalEntry]], ctx: RecordContext,
                  data: bytes) -> bool:
    """Whether the rolled-back entry holding ``data`` was rolled back because of it."""
    return any(e.index == ctx.index and getattr(e, ctx.kind, None) == data
               and ctx.describe() in reason for _, reason, e in rewound)


BATCH = 500
"""Workflows read per call of :meth:`Store.load_payloads`."""


def verify(raw: Store, sealer: Sealer,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Open every stored payload of ``raw`` (an unsealed backend)."""
    report = VerifyReport()
    ids = [r.id for r in raw.list_workflows(ListFilter(limit=10**9))]
    report.workflows = len(ids)
    listed = set(ids)
    ids += [wid for wid in raw.orphaned_workflow_ids() if wid not in listed]
    report.orphans = len(ids) - report.workflows
    for start in range(0, len(ids), BATCH):
        rewound: dict[str, list[tuple[float, str, JournalEntry]]] = {}
        for wid, table, index, kind, data in raw.load_payloads(ids[start:start + BATCH]):
            report.records += 1
            ctx = RecordContext(wid, index, kind)
            try:
                sealer.open(data, ctx)
            except CorruptRecordError as exc:
                bad = BadRecord(wid, index, kind, str(exc), table)
                if table == "rewound":
                    if wid not in rewound:
                        rewound[wid] = raw.load_rewound(wid)
                    if _known_damage(rewound[wid], ctx, data):
                        report.rolled_back.append(bad)
                        continue
                report.bad.append(bad)
        if progress is not None:
            progress(min(start + BATCH, len(ids)), len(ids))
    for key, data, _ in raw.list_shared(PARTIAL_PREFIX):
        where = record_context(key)
        if where is None:
            continue
        report.records += 1
        try:
            sealer.open(data, where)
        except CorruptRecordError as exc:
            report.bad.append(BadRecord(where.workflow_id, where.index, where.kind, str(exc),
                                        "shared"))
    return report
