"""Retention: drop finished workflows after a while, keep the last N checkpoints.

Two rules, both for *finished* workflows only (succeeded, failed, cancelled, dead
letter); a running, waiting or queued workflow is never touched:

* ``finished_older_than=D``: a workflow finished more than D ago is deleted with
  everything it owns — journal, attempts, signals, rolled-back entries, its saved
  partial outputs — and its finished child workflows with it. A child is never
  dropped on its own while its parent is kept (a resumed parent replays it). The
  deduplication rows of its effects stay until their own expiry
  (``App(effect_retention=...)``; forever without one), so a key that was applied is
  still recognised after the workflow that applied it is gone.
* ``keep_checkpoints=N``: a finished workflow keeps the *state* of its last N
  checkpoints. The older ones become stubs that keep their ordinal, label and hash
  (replay after a resume still checks the state at that point) and drop the state.
  Deltas are compacted first: when the oldest kept checkpoint is a delta, it is
  rewritten as a full snapshot in the same transaction that drops its base, and every
  kept checkpoint is read back and hash-checked against its recorded hash before
  anything is written.

Each batch is one transaction, so a collection killed at any instant leaves every
batch either done or untouched, and running it again finishes the job
(:func:`collect` is idempotent). :class:`Retention` makes a serving app apply the
same rules by itself, a bounded amount of work at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from . import _codec
from ._checkpoint import KIND, METADATA, CheckpointInfo, state_at, state_hash
from ._step import seconds
from .exceptions import ConfigurationError, CorruptRecordError, CrashsafeError
from .stores.base import FINISHED_STATUSES, JournalEntry, Store, choose_drops

log = logging.getLogger("crashsafe")

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called after each batch; ``done`` never decreases."""

STATE_KEY = "crashsafe:retention"
"""The shared value that spaces automatic passes across processes and holds the
checkpoint cursor."""
PAGE = 1000


@dataclass(frozen=True, slots=True)
class Retention:
    """The automatic retention policy of a serving app: ``App(retention=Retention(...))``.

    Every ``interval`` (across all processes sharing the store: one of them does the
    pass), at most ``max_per_pass`` finished workflows are dropped and at most
    ``max_per_pass`` have their checkpoints compacted, ``batch`` per transaction.
    """

    keep_checkpoints: int | None = None
    """Keep the state of the last N checkpoints of each finished workflow (None: all)."""
    finished_older_than: float | timedelta | None = None
    """Drop workflows finished longer ago than this, in seconds (None: never)."""
    interval: float | timedelta = 300.0
    """Seconds between passes."""
    batch: int = 50
    """Workflows per transaction."""
    max_per_pass: int = 500
    """Bound on the workflows each rule handles in one pass."""
    settle: float | timedelta = 60.0
    """Checkpoints are compacted only for workflows finished at least this long ago, so
    a finish committed late, or stamped by a slightly slow clock, is not stepped over
    by the cursor."""

    def __post_init__(self) -> None:
        check(self.keep_checkpoints, self.finished_older_than)
        if (seconds(self.interval, "interval") or 0.0) <= 0:
            raise ConfigurationError("Retention(interval=...) must be a positive duration")
        if (seconds(self.settle, "settle") or 0.0) < 0:
            raise ConfigurationError("Retention(settle=...) must not be negative")
        if self.batch < 1 or self.max_per_pass < 1:
            raise ConfigurationError("Retention(batch=..., max_per_pass=...) must be >= 1")


def check(keep_checkpoints: int | None, older: float | timedelta | None) -> float | None:
    """Validate the two rules; the age in seconds."""
    if keep_checkpoints is not None and (isinstance(keep_checkpoints, bool) or not isinstance(
            keep_checkpoints, int) or keep_checkpoints < 1):
        raise ConfigurationError(
            f"keep_checkpoints must be an int >= 1 (the latest checkpoint is always kept), "
            f"got {keep_checkpoints!r}")
    age = seconds(older, "finished_older_than")
    if age is not None and age < 0:
        raise ConfigurationError("finished_older_than must not be negative")
    return age


@dataclass(slots=True)
class GcReport:
    """What :meth:`App.gc` did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    workflows_dropped: int = 0
    """Finished workflows deleted with all their rows (children included)."""
    checkpoints_pruned: int = 0
    """Checkpoints whose state was dropped (their stub with the hash stays)."""
    checkpoints_rebased: int = 0
    """Kept delta checkpoints rewritten as full snapshots before their base went."""
    effects_purged: int = 0
    """Deduplication rows whose retention had run out."""
    partials_dropped: int = 0
    """Saved partial outputs of steps of workflows that no longer exist."""
    workflows_examined: int = 0
    skipped: list[str] = field(default_factory=list)
    """``"ID: why"`` for each workflow left as it was (an unreadable record, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- checkpoint compaction -----------------------------------------------------------------
def _meta(e: JournalEntry) -> dict[str, Any]:
    meta = _codec.decode(e.output or b"{}", "checkpoint")
    if not isinstance(meta, dict):
        raise _corrupt(e, "is not a checkpoint record")
    for key, kind in (("n", int), ("hash", str), ("size", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise _corrupt(e, f"has no valid {key!r}")
    return meta


def _corrupt(e: JournalEntry, why: str) -> CorruptRecordError:
    return CorruptRecordError(
        f"the checkpoint record at journal index {e.index} of workflow {e.workflow_id!r} "
        f"{why}; left as it is", e.workflow_id, e.index, "output")


def _info(e: JournalEntry, meta: dict[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(e.index, int(meta["n"]), meta.get("label"), str(meta["hash"]),
                          int(meta["size"]), int(meta.get("stored", 0)), "full" in meta,
                          e.started_at, bool(meta.get("pruned")))


def compact(journal: list[JournalEntry], keep: int) -> tuple[list[JournalEntry], int, int]:
    """The journal entries to rewrite so only the last ``keep`` checkpoints keep their
    state: ``(entries, pruned, rebased)``. Every kept checkpoint is read back from the
    rewritten journal and its hash compared with the recorded one first; a mismatch
    raises :class:`CrashsafeError` and nothing is to be written."""
    marked = [(e, _meta(e)) for e in journal if e.kind == KIND and e.output is not None]
    live = [(e, m) for e, m in marked if not m.get("pruned")]
    if len(live) <= keep:
        return [], 0, 0
    kept, gone = live[-keep:], live[:-keep]
    out: list[JournalEntry] = []
    rebased = 0
    first, meta = kept[0]
    if "full" not in meta:
        state = state_at(journal, _info(first, meta))
        # Only the description carries over: not how the state was stored (a delta, or
        # a packed delta's frame and the records its dictionary was made of).
        full = {k: meta[k] for k in ("n", "label", "hash", "size", *METADATA) if k in meta}
        full.update(full=state, full_n=int(meta["n"]), stored=int(meta["size"]))
        out.append(dataclasses.replace(first, output=_codec.encode(full, "checkpoint")[0]))
        rebased = 1
    for e, m in gone:
        stub = {"n": m["n"], "label": m.get("label"), "hash": m["hash"], "size": m["size"],
                "stored": 0, "full_n": None, "pruned": True,
                **{k: m[k] for k in METADATA if k in m}}
        note = "state dropped by retention (kept: the last checkpoints)"
        out.append(dataclasses.replace(e, output=_codec.encode(stub, "checkpoint")[0],
                                       note=f"{e.note}; {note}" if e.note else note))
    # Read every kept checkpoint back from the journal as it will be.
    new = {e.index: e for e in out}
    after = [new.get(e.index, e) for e in journal]
    for e, m in kept:
        digest = state_hash(state_at(after, _info(new.get(e.index, e), m)))[0]
        if digest != m["hash"]:
            raise CrashsafeError(
                f"checkpoint #{m['n']} would read back with state hash {digest[:12]}, not "
                f"the recorded {str(m['hash'])[:12]}; left as it is")
    return out, len(gone), rebased


# -- the collection ------------------------------------------------------------------------
def _pages(store: Store, before: float, roots: bool,
           after: tuple[float, str] | None = None, limit: int | None = None
           ) -> Iterator[tuple[str, float]]:
    taken = 0
    while limit is None or taken < limit:
        want = PAGE if limit is None else min(PAGE, limit - taken)
        page = store.finished_workflows(before, after, want, roots=roots)
        yield from page
        taken += len(page)
        if len(page) < want:
            return
        after = (page[-1][1], page[-1][0])


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _family(store: Store, roots: Sequence[str], report: GcReport) -> list[str]:
    """``roots`` and every descendant their journals name (child workflows)."""
    out: dict[str, None] = {}
    todo = list(roots)
    while todo:
        wid = todo.pop()
        if wid in out:
            continue
        out[wid] = None
        try:
            journal = store.load_journal(wid)
        except CrashsafeError as exc:
            # Its children, if any, stay; once it is gone they are roots of their own.
            report.skipped.append(f"{wid}: children not followed ({exc})")
            continue
        for e in journal:
            if e.kind == "child" and e.output is not None:
                try:
                    child = _codec.decode(e.output, "child workflow id")
                except CrashsafeError:
                    continue
                if isinstance(child, str):
                    todo.append(child)
    return list(out)


def _would_drop(store: Store, ids: Sequence[str], before: float) -> list[str]:
    """What ``store.drop_workflows(ids, before)`` would drop, read only (dry run)."""
    rows = [(r.id, r.parent_id, r.status.value, r.updated_at)
            for r in map(store.get_workflow, ids) if r is not None]
    return choose_drops(rows, before,
                        lambda parents: {p for p in parents if store.get_workflow(p)})


def _drop_partials(store: Store, gone: set[str] | None, dry_run: bool) -> int:
    """Partial outputs (``partial:ID:INDEX``) of dropped or missing workflows."""
    count = 0
    for key, _, _ in store.list_shared("partial:"):
        wid, _, index = key[len("partial:"):].rpartition(":")
        if not index.isdigit() or not wid:
            continue
        if (gone is not None and wid in gone) or store.get_workflow(wid) is None:
            count += 1
            if not dry_run:
                store.update_shared(key, lambda cur, now: (None, None))
    return count


def drop_finished(store: Store, roots: Sequence[str], before: float, batch: int,
                  dry_run: bool, report: GcReport,
                  tick: Callable[[int], None] | None = None,
                  stop: threading.Event | None = None) -> None:
    """Drop the finished ``roots`` (and their finished children), ``batch`` roots per
    transaction."""
    gone: set[str] = set()
    for chunk in _chunks(roots, batch):
        if stop is not None and stop.is_set():
            break
        family = _family(store, chunk, report)
        if dry_run:
            dropped = _would_drop(store, family, before)
        else:
            dropped = store.drop_workflows(family, before)
        gone.update(dropped)
        report.workflows_dropped += len(dropped)
        report.workflows_examined += len(chunk)
        if tick is not None:
            tick(len(chunk))
    report.partials_dropped += _drop_partials(store, gone, dry_run)
    if not dry_run and gone:
        # The dropped workflows' recovery and corruption logs go with them.
        for prefix in ("recovery:", "corruption:"):
            for key, _, _ in store.list_shared(prefix):
                if key[len(prefix):] in gone:
                    store.update_shared(key, lambda cur, now: (None, None))


def compact_finished(store: Store, ids: Sequence[str], keep: int, batch: int, dry_run: bool,
                     report: GcReport, tick: Callable[[int], None] | None = None,
                     stop: threading.Event | None = None) -> int:
    """Keep the state of the last ``keep`` checkpoints of each finished workflow in
    ``ids``, ``batch`` workflows per transaction."""
    done = 0
    for chunk in _chunks(ids, batch):
        if stop is not None and stop.is_set():
            break
        entries: list[JournalEntry] = []
        expect: dict[str, tuple[int, float]] = {}
        planned: dict[str, tuple[int, int]] = {}
        for wid in chunk:
            try:
                # Its token and finish time first, then the journal the plan is made
                # from: the rewrite is a compare-and-swap on them, so a workflow rolled
                # back or run again in between (which raises the token) is left alone.
                rec = store.get_workflow(wid)
                if rec is None or rec.status not in FINISHED_STATUSES:
                    continue
                out, p, r = compact(store.load_journal(wid), keep)
            except CrashsafeError as exc:
                report.skipped.append(f"{wid}: {exc}")
                continue
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # A record malformed past what _meta checks: one workflow's, not the pass's.
                bad = CorruptRecordError(
                    f"a checkpoint record of workflow {wid!r} is malformed "
                    f"({type(exc).__name__}: {exc}); left as it is", wid)
                report.skipped.append(f"{wid}: {bad}")
                continue
            if out:
                entries += out
                expect[wid] = (rec.token, rec.updated_at)
                planned[wid] = (p, r)
        written = set(planned) if dry_run or not entries else set(
            store.rewrite_finished_entries(entries, expect))
        for wid, (p, r) in planned.items():
            if wid in written:
                report.checkpoints_pruned += p
                report.checkpoints_rebased += r
            else:
                report.skipped.append(f"{wid}: changed since its journal was read (rolled "
                                      "back or run again); left as it is")
        report.workflows_examined += len(chunk)
        done += len(chunk)
        if tick is not None:
            tick(len(chunk))
    return done


def collect(store: Store, *, keep_checkpoints: int | None = None,
            finished_older_than: float | timedelta | None = None, dry_run: bool = False,
            batch: int = 100, progress: Progress | None = None) -> GcReport:
    """A full collection (``crashsafe gc``, :meth:`App.gc`): see the module docs."""
    age = check(keep_checkpoints, finished_older_than)
    if batch < 1:
        raise ConfigurationError("batch must be >= 1")
    report = GcReport(dry_run=dry_run)
    now = store.clock()
    roots = [] if age is None else [w for w, _ in _pages(store, now - age, roots=True)]
    dropping = set(roots)
    keep = [] if keep_checkpoints is None else [
        w for w, _ in _pages(store, float("inf"), roots=False) if w not in dropping]
    total = len(roots) + len(keep)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    if age is not None:
        drop_finished(store, roots, now - age, batch, dry_run, report, tick)
    else:
        report.partials_dropped += _drop_partials(store, None, dry_run)
    if keep_checkpoints is not None:
        compact_finished(store, keep, keep_checkpoints, batch, dry_run, report, tick)
    if not dry_run:
        report.effects_purged = store.purge_effects(now)
    return report


# -- the automatic policy ------------------------------------------------------------------
def _claim_pass(store: Store, interval: float) -> dict[str, Any] | None:
    """Take this interval's pass (None: another process did, or it is not time yet)."""

    def take(cur: bytes | None, now: float) -> tuple[bytes | None, dict[str, Any] | None]:
        doc = _codec.decode(cur, "retention state") if cur is not None else {}
        if not isinstance(doc, dict):
            doc = {}
        if now - float(doc.get("at", 0.0)) < interval:
            return cur, None
        doc["at"] = now
        return _codec.encode(doc, "retention state")[0], dict(doc)

    return store.update_shared(STATE_KEY, take)


def _save_cursor(store: Store, cursor: tuple[float, str]) -> None:
    def advance(cur: bytes | None, now: float) -> tuple[bytes | None, None]:
        doc = _codec.decode(cur, "retention state") if cur is not None else {}
        if not isinstance(doc, dict):
            doc = {}
        old = doc.get("cursor")
        if old is None or tuple(old) < cursor:
            doc["cursor"] = list(cursor)
        return _codec.encode(doc, "retention state")[0], None

    store.update_shared(STATE_KEY, advance)


def auto_pass(store: Store, policy: Retention,
              stop: threading.Event | None = None) -> GcReport | None:
    """One bounded pass of ``policy`` if it is this process's turn (None otherwise).

    Drops up to ``max_per_pass`` of the oldest expired workflows, then compacts the
    checkpoints of up to ``max_per_pass`` workflows finished since the last pass
    (a cursor in the store's shared values, so each finished workflow is compacted
    once, and again only if it runs and finishes again)."""
    doc = _claim_pass(store, seconds(policy.interval, "interval") or 300.0)
    if doc is None:
        return None
    report = GcReport()
    now = store.clock()
    age = check(policy.keep_checkpoints, policy.finished_older_than)
    if age is not None:
        roots = [w for w, _ in _pages(store, now - age, True, limit=policy.max_per_pass)]
        drop_finished(store, roots, now - age, policy.batch, False, report, stop=stop)
    if policy.keep_checkpoints is not None:
        old = doc.get("cursor")
        cursor = (float(old[0]), str(old[1])) if isinstance(old, list) and len(old) == 2 \
            else None
        settle = seconds(policy.settle, "settle") or 0.0
        page = list(_pages(store, now - settle, False, cursor, policy.max_per_pass))
        done = compact_finished(store, [w for w, _ in page], policy.keep_checkpoints,
                                policy.batch, False, report, stop=stop)
        if done:
            _save_cursor(store, (page[done - 1][1], page[done - 1][0]))
    return report


class AutoRetention:
    """Runs :func:`auto_pass` for a serving app on a thread of its own (so a long pass
    never delays the recovery sweep), checking the shared schedule at most every few
    seconds; a pass stops at its next batch once ``stop`` is set (the app closing)."""

    def __init__(self, policy: Retention, stop: threading.Event) -> None:
        self.policy = policy
        self.stop = stop
        self._next = 0.0
        self._thread: threading.Thread | None = None

    def tick(self, store: Store) -> None:
        mono = time.monotonic()
        if mono < self._next or (self._thread is not None and self._thread.is_alive()):
            return
        interval = seconds(self.policy.interval, "interval") or 300.0
        self._next = mono + min(interval, 30.0)
        self._thread = threading.Thread(target=self._pass, args=(store,), daemon=True,
                                        name="crashsafe-retention")
        self._thread.start()

    def _pass(self, store: Store) -> None:
        try:
            report = auto_pass(store, self.policy, self.stop)
        except Exception as exc:  # the next pass tries again
            if not self.stop.is_set():
                log.warning("crashsafe retention pass failed: %s", exc, exc_info=True)
            return
        if report is not None and (report.workflows_dropped or report.checkpoints_pruned):
            log.info("crashsafe retention: dropped %d workflows, the state of %d checkpoints",
                     report.workflows_dropped, report.checkpoints_pruned)


__all__ = ["FINISHED_STATUSES", "GcReport", "Retention", "collect"]
