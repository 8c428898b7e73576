"""``crashsafe keys rotate``: re-seal every record with the keyring's active key.

Walks the backend's raw records one workflow at a time; each workflow's records (its
own, its journal, attempts, effect outcomes, signals and rolled-back entries) are
rewritten in one transaction, and only records that need it (sealed with another key,
unencrypted, or bare JSON from before sealing) are touched; then, the same way, the
rows whose workflow is gone (the effect outcomes retention keeps after dropping a
workflow, until their expiry: once the old key leaves the ring they would be
unreadable); then the partial outputs of streaming steps (kept among the store's
shared values), each in its own transaction. So the rotation may be killed at any
instant and simply run again: every record is readable with exactly one key of the
ring at every moment, and the second run continues where the first stopped
(``chaos/rotation.py`` kills it at random points to check exactly that). The same
command turns encryption on for a store written without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ._keys import Keyring
from ._partial import PREFIX as PARTIAL_PREFIX
from ._partial import record_context
from ._seal import RecordContext, Sealer
from .exceptions import CorruptRecordError
from .stores.base import ListFilter, Store
from .stores.sealed import ENCRYPTION_MARK


@dataclass(slots=True)
class RotationReport:
    workflows: int = 0
    orphans: int = 0
    """Ids walked that have no workflow row any more (retention dropped it) but still
    own rows: effect outcomes kept until their expiry."""
    resealed: int = 0
    damaged: list[str] = field(default_factory=list)
    """Records that fail their checksum or authentication (unreadable under any key,
    e.g. a damaged entry a rollback kept for audit): left as they are, named here."""


def rotate(raw: Store, keyring: Keyring,
           progress: Callable[[int, int], None] | None = None) -> RotationReport:
    """Re-seal every record of ``raw`` (an unsealed backend) under ``keyring``'s active
    key; returns how many records changed."""
    sealer = Sealer(keyring, allow_plaintext=True)
    raw.update_shared(ENCRYPTION_MARK, lambda cur, now: (b"1", None))
    report = RotationReport()
    ids = [r.id for r in raw.list_workflows(ListFilter(limit=10**9))]
    live = len(ids)
    listed = set(ids)
    # Listed after the workflows: one dropped in between is walked once, as listed.
    ids += [wid for wid in raw.orphaned_workflow_ids() if wid not in listed]
    for n, wid in enumerate(ids, 1):

        def reseal(index: int, kind: str, data: bytes, wid: str = wid) -> bytes | None:
            ctx = RecordContext(wid, index, kind)
            try:
                if not sealer.needs_rotation(data, ctx):
                    return None
                return sealer.reseal(data, ctx)
            except CorruptRecordError:
                report.damaged.append(ctx.describe())
                return None

        report.resealed += raw.rewrite_payloads(wid, reseal)
        if n <= live:
            report.workflows += 1
        else:
            report.orphans += 1
        if progress is not None:
            progress(n, len(ids))
    for key, _, _ in raw.list_shared(PARTIAL_PREFIX):
        where = record_context(key)
        if where is None:
            continue

        def swap(cur: bytes | None, now: float, where: RecordContext = where
                 ) -> tuple[bytes | None, int]:
            # Read again inside the write: the step may have saved or dropped it since.
            try:
                if cur is None or not sealer.needs_rotation(cur, where):
                    return cur, 0
                return sealer.reseal(cur, where), 1
            except CorruptRecordError:
                report.damaged.append(where.describe())
                return cur, 0

        report.resealed += raw.update_shared(key, swap)
    return report
