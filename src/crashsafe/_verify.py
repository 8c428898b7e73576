"""``crashsafe verify``: check every stored record's checksum (and decryptability).

Reads the backend's raw records (below the sealing wrapper) and opens each payload
with the context it was sealed for: a workflow's inputs, output and error, every
journal entry's output and error, every recorded attempt's error. A record that fails
is listed with the reason; the others are not affected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ._seal import RecordContext, Sealer
from .exceptions import CorruptRecordError
from .stores.base import ListFilter, Store
from .stores.sealed import WORKFLOW


@dataclass(frozen=True, slots=True)
class BadRecord:
    workflow_id: str
    index: int
    kind: str
    reason: str


@dataclass(slots=True)
class VerifyReport:
    workflows: int = 0
    records: int = 0
    bad: list[BadRecord] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


def _payloads(raw: Store, wid: str) -> Iterator[tuple[bytes, RecordContext]]:
    for e in raw.load_journal(wid):
        for kind, data in (("output", e.output), ("error", e.error)):
            if data is not None:
                yield data, RecordContext(wid, e.index, kind)
    for a in raw.load_attempts(wid):
        if a.error is not None:
            yield a.error, RecordContext(wid, a.index, f"attempt-error:{a.attempt}")


def verify(raw: Store, sealer: Sealer,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Open every payload of every workflow in ``raw`` (an unsealed backend)."""
    report = VerifyReport()
    rows = raw.list_workflows(ListFilter(limit=10**9))
    for n, rec in enumerate(rows, 1):
        report.workflows += 1
        own = [(rec.inputs, RecordContext(rec.id, WORKFLOW, "inputs"))]
        own += [(data, RecordContext(rec.id, WORKFLOW, kind))
                for kind, data in (("output", rec.output), ("error", rec.error))
                if data is not None]
        for data, ctx in [*own, *_payloads(raw, rec.id)]:
            report.records += 1
            try:
                sealer.open(data, ctx)
            except CorruptRecordError as exc:
                report.bad.append(BadRecord(ctx.workflow_id, ctx.index, ctx.kind, str(exc)))
        if progress is not None:
            progress(n, len(rows))
    return report
