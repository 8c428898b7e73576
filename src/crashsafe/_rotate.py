"""``crashsafe keys rotate``: re-seal every record with the keyring's active key.

Walks the backend's raw records one workflow at a time; each workflow's records are
rewritten in one transaction, and only records that need it (sealed with another key,
unencrypted, or bare JSON from before sealing) are touched. So the rotation may be
killed at any instant and simply run again: every record is readable with exactly one
key of the ring at every moment, and the second run continues where the first
stopped. The same command turns encryption on for a store written without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ._keys import Keyring
from ._seal import RecordContext, Sealer
from .stores.base import ListFilter, Store
from .stores.sealed import ENCRYPTION_MARK


@dataclass(slots=True)
class RotationReport:
    workflows: int = 0
    resealed: int = 0


def rotate(raw: Store, keyring: Keyring,
           progress: Callable[[int, int], None] | None = None) -> RotationReport:
    """Re-seal every record of ``raw`` (an unsealed backend) under ``keyring``'s active
    key; returns how many records changed."""
    sealer = Sealer(keyring, allow_plaintext=True)
    raw.update_shared(ENCRYPTION_MARK, lambda cur, now: (b"1", None))
    report = RotationReport()
    ids = [r.id for r in raw.list_workflows(ListFilter(limit=10**9))]
    for n, wid in enumerate(ids, 1):

        def reseal(index: int, kind: str, data: bytes, wid: str = wid) -> bytes | None:
            ctx = RecordContext(wid, index, kind)
            if not sealer.needs_rotation(data, ctx):
                return None
            return sealer.reseal(data, ctx)

        report.resealed += raw.rewrite_payloads(wid, reseal)
        report.workflows += 1
        if progress is not None:
            progress(n, len(ids))
    return report
