"""Conformance checks for the :class:`crashsafe.stores.base.Store` contract.

Every backend runs these unchanged. Each check is a plain function taking a
*factory* that returns a new, empty store; ``CHECKS`` lists them all, so a backend's
test module only has to say how to make a store::

    from store_conformance import CHECKS

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_conformance(check, tmp_path):
        check(lambda: PostgresStore(make_empty_database()))

Checks close the stores they open.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from crashsafe.exceptions import StoreConflictError
from crashsafe.stores import (
    ClaimResult,
    ExecutorRecord,
    FinishWorkflow,
    JournalEntry,
    ListFilter,
    Status,
    Store,
    WorkflowRecord,
)
from crashsafe.stores.base import CreateWorkflow, WorkflowExists, WorkflowNotRunning

StoreFactory = Callable[[], Store]
Check = Callable[[StoreFactory], None]

CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


@contextmanager
def opened(factory: StoreFactory) -> Iterator[Store]:
    store = factory()
    try:
        yield store
    finally:
        store.close()


def wf(
    wid: str,
    *,
    name: str = "flow",
    status: Status = Status.RUNNING,
    owner: str | None = "ex-1",
    created_at: float = 1000.0,
    inputs: bytes = b'{"args":[],"kwargs":{}}',
    parent_id: str | None = None,
    recovery_attempts: int = 0,
) -> WorkflowRecord:
    return WorkflowRecord(
        id=wid, name=name, version="1", status=status, inputs=inputs,
        created_at=created_at, updated_at=created_at, owner=owner, parent_id=parent_id,
        recovery_attempts=recovery_attempts,
    )


def entry(wid: str, index: int, name: str = "step", output: bytes | None = b"1") -> JournalEntry:
    return JournalEntry(wid, index, "step", name, output, None, 1, 10.0 + index, 11.0 + index)


def indexes(store: Store, wid: str) -> list[int]:
    return [e.index for e in store.load_journal(wid)]


def claim(store: Store, wid: str, expected_owner: str | None, new_owner: str,
          max_recoveries: int) -> ClaimResult:
    results = store.claim_workflows([(wid, expected_owner)], new_owner, max_recoveries)
    assert len(results) == 1
    return results[0]


def must_get(store: Store, wid: str) -> WorkflowRecord:
    rec = store.get_workflow(wid)
    assert rec is not None, f"workflow {wid!r} missing"
    return rec


# -- workflows ----------------------------------------------------------------------------
@check
def create_workflow_is_idempotent(factory: StoreFactory) -> None:
    with opened(factory) as store:
        first = wf("w1", name="original", inputs=b"first")
        stored, created = store.create_workflow(first)
        assert created is True
        assert stored == first

        again, created_again = store.create_workflow(wf("w1", name="impostor", inputs=b"second"))
        assert created_again is False
        assert again.name == "original"
        assert again.inputs == b"first"
        assert must_get(store, "w1") == first


@check
def workflow_record_round_trips_every_field(factory: StoreFactory) -> None:
    with opened(factory) as store:
        rec = WorkflowRecord(
            id="w/ünïcode 'quoted\"", name="n", version="7", status=Status.FAILED,
            inputs=bytes(range(256)) * 4, created_at=1234.5678901, updated_at=2345.25,
            owner=None, parent_id="parent-1", output=b"\x00out", error=b"\xffboom",
            recovery_attempts=3, reason="because", recovery_mark=2,
        )
        store.create_workflow(rec)
        assert store.get_workflow(rec.id) == rec
        assert store.get_workflow("missing") is None


@check
def returned_records_are_copies(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1"))
        store.apply([[entry("w1", 0)]])
        got = must_get(store, "w1")
        got.status = Status.SUCCEEDED
        got.owner = "someone-else"
        journal = store.load_journal("w1")
        journal[0].name = "mutated"
        assert must_get(store, "w1").status is Status.RUNNING
        assert must_get(store, "w1").owner == "ex-1"
        assert store.load_journal("w1")[0].name == "step"


@check
def list_workflows_filters_and_orders_newest_first(factory: StoreFactory) -> None:
    with opened(factory) as store:
        specs = [
            ("a-1", "alpha", Status.RUNNING, 1.0),
            ("a-2", "alpha", Status.SUCCEEDED, 2.0),
            ("b-1", "beta", Status.RUNNING, 3.0),
            ("a-3", "alpha", Status.RUNNING, 4.0),
            ("b-2", "beta", Status.FAILED, 5.0),
        ]
        for wid, name, status, at in specs:
            store.create_workflow(wf(wid, name=name, status=status, created_at=at))

        def ids(**kw: object) -> list[str]:
            return [r.id for r in store.list_workflows(ListFilter(**kw))]  # type: ignore[arg-type]

        assert ids() == ["b-2", "a-3", "b-1", "a-2", "a-1"]
        assert ids(status=Status.RUNNING) == ["a-3", "b-1", "a-1"]
        assert ids(name="alpha") == ["a-3", "a-2", "a-1"]
        assert ids(name="alpha", status=Status.RUNNING) == ["a-3", "a-1"]
        assert ids(limit=2) == ["b-2", "a-3"]
        assert ids(status=Status.RUNNING, limit=1) == ["a-3"]
        assert ids(limit=0) == []
        assert ids(id_prefix="b-") == ["b-2", "b-1"]
        assert ids(status=Status.CANCELLED) == []
        assert ids(name="gamma") == []


@check
def list_workflows_treats_hostile_filters_as_data(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1", name="flow"))
        for hostile in ["x' OR '1'='1", "flow'; DROP TABLE workflows; --", "%", "_", "\\"]:
            assert store.list_workflows(ListFilter(name=hostile)) == []
            assert store.list_workflows(ListFilter(id_prefix=hostile)) == []
        assert [r.id for r in store.list_workflows(ListFilter())] == ["w1"]


@check
def list_workflows_orders_ties_deterministically(factory: StoreFactory) -> None:
    with opened(factory) as store:
        for wid in ["m", "z", "a"]:
            store.create_workflow(wf(wid, created_at=5.0))
        assert [r.id for r in store.list_workflows(ListFilter())] == ["z", "m", "a"]


# -- apply: journal and finish --------------------------------------------------------------
@check
def apply_lands_many_batches_in_one_call(factory: StoreFactory) -> None:
    with opened(factory) as store:
        for wid in ["w1", "w2", "w3"]:
            store.create_workflow(wf(wid))
        results = store.apply([
            [entry("w1", 0), entry("w1", 1)],
            [entry("w2", 0)],
            [entry("w3", 0), entry("w3", 1), entry("w3", 2)],
        ])
        assert results == [None, None, None]
        assert indexes(store, "w1") == [0, 1]
        assert indexes(store, "w2") == [0]
        assert indexes(store, "w3") == [0, 1, 2]


@check
def apply_duplicate_index_fails_only_its_batch(factory: StoreFactory) -> None:
    with opened(factory) as store:
        for wid in ["w1", "w2"]:
            store.create_workflow(wf(wid))
        assert store.apply([[entry("w1", 0, name="original", output=b"1")]]) == [None]

        results = store.apply([
            [entry("w1", 1)],
            # The offender: a fresh index and an index that is already taken.
            [entry("w1", 5), entry("w1", 0, name="impostor", output=b"2")],
            [entry("w2", 0)],
        ])
        assert results[0] is None
        assert isinstance(results[1], StoreConflictError)
        assert "w1" in str(results[1])
        assert results[2] is None
        journal = store.load_journal("w1")
        assert [e.index for e in journal] == [0, 1]  # index 5 of the failed batch: not kept
        assert journal[0].name == "original"
        assert journal[0].output == b"1"
        assert indexes(store, "w2") == [0]


@check
def apply_rejects_a_batch_that_repeats_an_index(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1"))
        results = store.apply([[entry("w1", 0, name="a"), entry("w1", 0, name="b")]])
        assert len(results) == 1
        assert isinstance(results[0], StoreConflictError)
        assert store.load_journal("w1") == []


@check
def apply_two_batches_racing_for_one_index_keeps_the_first(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1"))
        results = store.apply([[entry("w1", 0, name="first")], [entry("w1", 0, name="second")]])
        assert results[0] is None
        assert isinstance(results[1], StoreConflictError)
        assert [e.name for e in store.load_journal("w1")] == ["first"]


@check
def apply_with_no_batches_is_a_no_op(factory: StoreFactory) -> None:
    with opened(factory) as store:
        assert store.apply([]) == []


@check
def finish_applies_only_while_running_under_its_owner(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1", owner="ex-1"))
        wrong_owner = FinishWorkflow("w1", "ex-2", Status.SUCCEEDED, output=b"stolen", at=50.0)
        (refused,) = store.apply([[wrong_owner]])
        assert isinstance(refused, WorkflowNotRunning)
        assert isinstance(refused, StoreConflictError)
        assert must_get(store, "w1").status is Status.RUNNING
        assert must_get(store, "w1").output is None

        done = FinishWorkflow("w1", "ex-1", Status.SUCCEEDED, output=b"42", at=60.0)
        assert store.apply([[done]]) == [None]
        rec = must_get(store, "w1")
        assert rec.status is Status.SUCCEEDED
        assert rec.output == b"42"
        assert rec.updated_at == 60.0

        late = FinishWorkflow("w1", "ex-1", Status.FAILED, error=b"late", at=70.0)
        assert isinstance(store.apply([[late]])[0], WorkflowNotRunning)
        rec = must_get(store, "w1")
        assert rec.status is Status.SUCCEEDED
        assert rec.error is None
        assert rec.output == b"42"
        assert rec.updated_at == 60.0


@check
def finish_does_not_revive_a_cancelled_workflow(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1", owner="ex-1"))
        assert store.set_status("w1", Status.CANCELLED, only_from=[Status.RUNNING]) is not None
        (refused,) = store.apply(
            [[FinishWorkflow("w1", "ex-1", Status.SUCCEEDED, output=b"1", at=1.0)]])
        assert isinstance(refused, WorkflowNotRunning)
        assert must_get(store, "w1").status is Status.CANCELLED


@check
def refused_finish_fails_only_its_batch_and_keeps_nothing_of_it(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("mine", owner="ex-1"))
        store.create_workflow(wf("taken", owner="ex-2"))
        results = store.apply([
            [entry("mine", 0), FinishWorkflow("mine", "ex-1", Status.SUCCEEDED, b"1", at=5.0)],
            [entry("taken", 0), FinishWorkflow("taken", "ex-1", Status.SUCCEEDED, b"2", at=5.0)],
        ])
        assert results[0] is None
        assert isinstance(results[1], WorkflowNotRunning)
        assert must_get(store, "mine").status is Status.SUCCEEDED
        assert must_get(store, "taken").status is Status.RUNNING
        assert store.load_journal("taken") == []  # the refused batch's entry is gone too


@check
def create_op_inserts_once_and_fails_its_batch_on_a_taken_id(factory: StoreFactory) -> None:
    with opened(factory) as store:
        fresh = wf("new", owner="ex-1", created_at=7.0)
        assert store.apply([[CreateWorkflow(fresh), entry("new", 0)]]) == [None]
        assert must_get(store, "new") == fresh
        assert indexes(store, "new") == [0]

        results = store.apply([
            [CreateWorkflow(wf("new", name="impostor")), entry("new", 1)],
            [CreateWorkflow(wf("other"))],
        ])
        assert isinstance(results[0], WorkflowExists)
        assert isinstance(results[0], StoreConflictError)
        assert results[1] is None
        assert must_get(store, "new").name == "flow"
        assert indexes(store, "new") == [0]
        assert must_get(store, "other").id == "other"


@check
def journal_and_finish_in_one_batch_land_together(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1", owner="ex-1"))
        store.create_workflow(wf("w2", owner="ex-1"))
        store.apply([[entry("w2", 0)]])
        results = store.apply([
            [entry("w1", 0), FinishWorkflow("w1", "ex-1", Status.SUCCEEDED, b"ok", at=9.0)],
            [entry("w2", 0), FinishWorkflow("w2", "ex-1", Status.SUCCEEDED, b"ok", at=9.0)],
        ])
        assert results[0] is None
        assert isinstance(results[1], StoreConflictError)
        assert must_get(store, "w1").status is Status.SUCCEEDED
        assert indexes(store, "w1") == [0]
        # The failed batch's finish must not have been applied either.
        assert must_get(store, "w2").status is Status.RUNNING


@check
def load_journal_orders_by_index(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1"))
        store.create_workflow(wf("w2"))
        written = {i: JournalEntry("w1", i, "step", f"s{i}", f"{i}".encode(), None, i + 1,
                                   100.0 + i, 200.5 + i) for i in [3, 0, 2, 1]}
        for e in written.values():
            assert store.apply([[e]]) == [None]
        store.apply([[JournalEntry("w2", 0, "sleep", "sleep", None, b"err", 2, 1.0, 2.0)]])
        journal = store.load_journal("w1")
        assert [e.index for e in journal] == [0, 1, 2, 3]
        assert journal == [written[i] for i in range(4)]
        assert store.load_journal("w2") == [
            JournalEntry("w2", 0, "sleep", "sleep", None, b"err", 2, 1.0, 2.0)
        ]
        assert store.load_journal("missing") == []


@check
def concurrent_apply_from_many_threads_loses_nothing(factory: StoreFactory) -> None:
    with opened(factory) as store:
        wids = [f"t{i}" for i in range(8)]
        for wid in wids:
            store.create_workflow(wf(wid))
        errors: list[BaseException | None] = []
        lock = threading.Lock()

        def writer(wid: str) -> None:
            for i in range(25):
                res = store.apply([[entry(wid, i)]])
                with lock:
                    errors.extend(res)

        threads = [threading.Thread(target=writer, args=(w,)) for w in wids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [None] * 200
        for wid in wids:
            assert indexes(store, wid) == list(range(25))


# -- ownership and status ---------------------------------------------------------------
@check
def claim_is_compare_and_swap_on_the_owner(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1", owner="dead"))

        wrong = claim(store, "w1", "someone-else", "me", max_recoveries=5)
        assert wrong.claimed is False
        assert wrong.dead_lettered is False
        assert must_get(store, "w1").owner == "dead"
        assert must_get(store, "w1").recovery_attempts == 0

        res = claim(store, "w1", "dead", "me", max_recoveries=5)
        assert res.claimed is True
        assert res.record is not None
        assert res.record.owner == "me"
        assert res.record.recovery_attempts == 1
        rec = must_get(store, "w1")
        assert rec.owner == "me"
        assert rec.recovery_attempts == 1
        assert rec.status is Status.RUNNING

        # A second claimer that read the old owner loses the race.
        assert claim(store, "w1", "dead", "other", max_recoveries=5).claimed is False
        assert must_get(store, "w1").owner == "me"


@check
def claim_takes_ownerless_rows(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1", owner=None))
        assert claim(store, "w1", "ex-x", "me", max_recoveries=3).claimed is False
        res = claim(store, "w1", None, "me", max_recoveries=3)
        assert res.claimed is True
        assert must_get(store, "w1").owner == "me"


@check
def claim_ignores_finished_and_missing(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1", owner="dead", status=Status.SUCCEEDED))
        assert claim(store, "w1", "dead", "me", 3) == ClaimResult(claimed=False)
        assert must_get(store, "w1").recovery_attempts == 0
        assert claim(store, "missing", None, "me", 3).claimed is False


@check
def claim_dead_letters_past_max_recoveries(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1", owner="ex-0"))
        for n in (1, 2):
            res = claim(store, "w1", f"ex-{n - 1}", f"ex-{n}", max_recoveries=2)
            assert res.claimed is True
            assert must_get(store, "w1").recovery_attempts == n
        res = claim(store, "w1", "ex-2", "ex-3", max_recoveries=2)
        assert res.claimed is False
        assert res.dead_lettered is True
        assert res.record is not None
        assert res.record.status is Status.DEAD_LETTER
        rec = must_get(store, "w1")
        assert rec.status is Status.DEAD_LETTER
        assert rec.owner is None
        assert rec.recovery_attempts == 3
        assert rec.reason
        assert "2" in rec.reason
        assert [r[0] for r in store.running_workflows("nobody")] == []


@check
def claim_counts_only_recoveries_without_progress(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1", owner="ex-0"))
        for n in range(1, 6):
            store.apply([[entry("w1", n - 1)]])  # the workflow made progress in every life
            res = claim(store, "w1", f"ex-{n - 1}", f"ex-{n}", max_recoveries=2)
            assert res.claimed is True, f"recovery {n} after progress was refused"
            assert must_get(store, "w1").recovery_attempts == 1
        # No progress any more: the counter climbs to the limit and parks the workflow.
        assert claim(store, "w1", "ex-5", "ex-6", max_recoveries=2).claimed is True
        res = claim(store, "w1", "ex-6", "ex-7", max_recoveries=2)
        assert res.dead_lettered is True
        assert must_get(store, "w1").status is Status.DEAD_LETTER


@check
def claim_workflows_decides_each_claim_in_one_call(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("a", owner="dead"))
        store.create_workflow(wf("b", owner="alive"))
        store.create_workflow(wf("c", owner="dead", recovery_attempts=1))
        store.create_workflow(wf("d", owner=None))
        results = store.claim_workflows(
            [("a", "dead"), ("b", "dead"), ("c", "dead"), ("missing", None), ("d", None),
             ("a", "dead")],  # the same workflow twice: the second claim sees the new owner
            "me", 1,
        )
        assert [(r.claimed, r.dead_lettered) for r in results] == [
            (True, False), (False, False), (False, True), (False, False), (True, False),
            (False, False),
        ]
        assert must_get(store, "a").owner == "me"
        assert must_get(store, "a").recovery_attempts == 1
        assert must_get(store, "b").owner == "alive"
        assert must_get(store, "c").status is Status.DEAD_LETTER
        assert must_get(store, "d").owner == "me"
        assert store.claim_workflows([], "me", 1) == []


@check
def set_status_changes_only_from_allowed_states(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1", owner="ex-1", recovery_attempts=4))
        res = store.set_status("w1", Status.CANCELLED, only_from=[Status.RUNNING],
                               reason="by hand")
        assert res is not None
        assert res.status is Status.CANCELLED
        assert res.reason == "by hand"
        assert res.owner == "ex-1"  # not cleared unless asked
        assert res.recovery_attempts == 4

        assert store.set_status("w1", Status.DEAD_LETTER, only_from=[Status.RUNNING]) is None
        assert must_get(store, "w1").status is Status.CANCELLED

        back = store.set_status("w1", Status.RUNNING,
                                only_from=[Status.CANCELLED, Status.DEAD_LETTER],
                                clear_owner=True, reset_recoveries=True)
        assert back is not None
        rec = must_get(store, "w1")
        assert rec.status is Status.RUNNING
        assert rec.owner is None
        assert rec.recovery_attempts == 0
        assert rec.reason is None
        assert store.set_status("missing", Status.RUNNING, only_from=list(Status)) is None


@check
def cancelled_among_reports_workflows_that_left_running(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("run"))
        store.create_workflow(wf("cancel"))
        store.create_workflow(wf("done", status=Status.SUCCEEDED))
        store.set_status("cancel", Status.CANCELLED, only_from=[Status.RUNNING])
        got = store.cancelled_among(["run", "cancel", "done", "missing"])
        assert sorted(got) == ["cancel", "done"]
        assert store.cancelled_among([]) == []
        many = [f"x{i}" for i in range(1200)] + ["cancel"]
        assert store.cancelled_among(many) == ["cancel"]


@check
def running_workflows_excludes_the_given_owner(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("mine", owner="me", name="a"))
        store.create_workflow(wf("theirs", owner="them", name="b"))
        store.create_workflow(wf("orphan", owner=None, name="c"))
        store.create_workflow(wf("finished", owner="them", status=Status.SUCCEEDED))
        got = sorted(store.running_workflows("me"), key=lambda r: r[0])
        assert got == [("orphan", None, "c"), ("theirs", "them", "b")]


# -- executors ------------------------------------------------------------------------------
@check
def executors_register_heartbeat_stop_and_read(factory: StoreFactory) -> None:
    with opened(factory) as store:
        a = ExecutorRecord("host:1:a", "host", 1, "100", 10.0, 10.0)
        b = ExecutorRecord("host:2:b", "host", 2, "", 11.0, 11.0)
        store.register_executor(a)
        store.register_executor(b)
        assert store.get_executors([]) == {}
        assert store.get_executors(["host:1:a", "nope"]) == {"host:1:a": a}

        store.heartbeat("host:1:a", 99.5)
        store.stop_executor("host:2:b")
        store.heartbeat("nope", 1.0)  # unknown ids are ignored
        store.stop_executor("nope")
        got = store.get_executors(["host:1:a", "host:2:b"])
        assert got["host:1:a"].heartbeat_at == 99.5
        assert got["host:1:a"].stopped is False
        assert got["host:2:b"].stopped is True
        assert got["host:2:b"].heartbeat_at == 11.0

        # Registering the same id again (a restart reusing it) replaces the row.
        store.register_executor(ExecutorRecord("host:2:b", "host", 3, "300", 20.0, 20.0))
        again = store.get_executors(["host:2:b"])["host:2:b"]
        assert again.pid == 3
        assert again.stopped is False


@check
def store_satisfies_the_protocol(factory: StoreFactory) -> None:
    with opened(factory) as store:
        assert isinstance(store, Store)
        assert isinstance(store.url, str)
        assert store.url


# -- attempts ------------------------------------------------------------------------------
@check
def attempts_upsert_and_load_in_order(factory: StoreFactory) -> None:
    from crashsafe.stores.base import AttemptRecord

    with opened(factory) as store:
        store.create_workflow(wf("w1"))
        started = AttemptRecord("w1", 2, 2, "call", 5.0)
        failed1 = AttemptRecord("w1", 2, 1, "call", 1.0, 2.0, "rate_limited", b"err", 3.0,
                                "retry-after header", 5.0, "429")
        other = AttemptRecord("w1", 0, 1, "first", 0.5, 0.6, "unknown", None, 0.1, "backoff",
                              0.7)
        store.apply([[failed1, started], [other]])
        assert store.load_attempts("w1") == [other, failed1, started]
        # The started attempt fails later: the same row is replaced, not duplicated.
        ended = AttemptRecord("w1", 2, 2, "call", 5.0, 6.0, "server_error", b"e2", None, None,
                              None)
        store.apply([[ended]])
        assert store.load_attempts("w1") == [other, failed1, ended]
        assert store.load_attempts("nobody") == []


@check
def attempts_ride_in_the_same_transaction_as_journal_entries(factory: StoreFactory) -> None:
    from crashsafe.stores.base import AttemptRecord

    with opened(factory) as store:
        store.create_workflow(wf("w1"))
        store.apply([[entry("w1", 0)]])
        # A batch whose journal entry conflicts must not leave its attempt row behind.
        results = store.apply([[AttemptRecord("w1", 0, 2, "step", 1.0), entry("w1", 0)]])
        assert isinstance(results[0], StoreConflictError)
        assert store.load_attempts("w1") == []


# -- shared values (breakers, budgets, limits) ----------------------------------------------
@check
def update_shared_reads_modifies_writes_and_deletes(factory: StoreFactory) -> None:
    with opened(factory) as store:
        seen: list[bytes | None] = []

        def bump(current: bytes | None, now: float) -> tuple[bytes | None, int]:
            seen.append(current)
            assert now > 1_600_000_000  # the store's clock is a real Unix time
            n = int(current or b"0") + 1
            return str(n).encode(), n

        assert store.update_shared("b:x", bump) == 1
        assert store.update_shared("b:x", bump) == 2
        assert seen == [None, b"1"]
        value, now = store.read_shared("b:x")
        assert value == b"2"
        assert now > 1_600_000_000
        assert store.read_shared("b:missing")[0] is None
        assert store.update_shared("b:x", lambda cur, now: (None, "gone")) == "gone"
        assert store.read_shared("b:x")[0] is None


@check
def update_shared_unchanged_value_keeps_its_timestamp(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.update_shared("k", lambda cur, now: (b"v", None))
        (_, _, at1), = store.list_shared("k")
        store.update_shared("k", lambda cur, now: (cur, None))
        assert store.list_shared("k") == [("k", b"v", at1)]


@check
def list_shared_filters_by_prefix(factory: StoreFactory) -> None:
    with opened(factory) as store:
        for key in ("breaker:b", "breaker:a", "budget:a", "breaker%", "breaker_"):
            store.update_shared(key, lambda cur, now, k=key: (k.encode(), None))
        listed = store.list_shared("breaker:")
        assert [k for k, _, _ in listed] == ["breaker:a", "breaker:b"]
        assert [v for _, v, _ in listed] == [b"breaker:a", b"breaker:b"]
        # LIKE wildcards in the prefix are literal characters.
        assert [k for k, _, _ in store.list_shared("breaker%")] == ["breaker%"]
        assert [k for k, _, _ in store.list_shared("breaker_")] == ["breaker_"]


@check
def update_shared_is_atomic_across_threads(factory: StoreFactory) -> None:
    with opened(factory) as store:
        def bump(current: bytes | None, now: float) -> tuple[bytes | None, None]:
            return str(int(current or b"0") + 1).encode(), None

        def work() -> None:
            for _ in range(25):
                store.update_shared("counter", bump)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.read_shared("counter")[0] == b"100"


@check
def update_shared_error_in_fn_writes_nothing(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.update_shared("k", lambda cur, now: (b"before", None))

        def broken(current: bytes | None, now: float) -> tuple[bytes | None, None]:
            raise RuntimeError("policy bug")

        try:
            store.update_shared("k", broken)
        except RuntimeError as exc:
            assert str(exc) == "policy bug"
        else:
            raise AssertionError("update_shared swallowed the error")
        assert store.read_shared("k")[0] == b"before"


# -- fencing tokens -------------------------------------------------------------------------
@check
def claim_raises_the_fencing_token(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("w1", owner="dead"))
        assert must_get(store, "w1").token == 0
        res = claim(store, "w1", "dead", "ex-2", 5)
        assert res.claimed and res.record is not None and res.record.token == 1
        assert must_get(store, "w1").token == 1
        claim(store, "w1", "ex-2", "ex-3", 5)
        assert must_get(store, "w1").token == 2


@check
def writes_with_a_stale_token_are_refused(factory: StoreFactory) -> None:
    from crashsafe.stores.base import AttemptRecord, MarkWaiting

    with opened(factory) as store:
        store.create_workflow(wf("w1", owner="old"))
        store.apply([[JournalEntry("w1", 0, "step", "s", b"1", None, 1, 1.0, 2.0, token=0)]])
        claim(store, "w1", "old", "new", 5)  # token 0 -> 1: the old holder is fenced off
        stale = [
            [JournalEntry("w1", 1, "step", "s", b"2", None, 1, 1.0, 2.0, token=0)],
            [AttemptRecord("w1", 1, 2, "s", 1.0, token=0)],
            [MarkWaiting("w1", "new", "parked", token=0)],
            [FinishWorkflow("w1", "new", Status.SUCCEEDED, b"1", at=3.0, token=0)],
            # a stale entry in a batch with a good one: the whole batch is refused
            [JournalEntry("w1", 1, "step", "s", b"2", None, 1, 1.0, 2.0, token=1),
             JournalEntry("w1", 2, "step", "s", b"3", None, 1, 1.0, 2.0, token=0)],
        ]
        for batch in stale:
            (result,) = store.apply([batch])
            assert isinstance(result, WorkflowNotRunning), (batch, result)
        assert indexes(store, "w1") == [0]
        assert store.load_attempts("w1") == []
        assert must_get(store, "w1").status is Status.RUNNING
        # The new holder's writes go through, also grouped with a refused stale batch.
        good = [JournalEntry("w1", 1, "step", "s", b"2", None, 1, 1.0, 2.0, token=1)]
        results = store.apply([good, stale[0]])
        assert results[0] is None and isinstance(results[1], WorkflowNotRunning)
        assert indexes(store, "w1") == [0, 1]
        (done,) = store.apply([[FinishWorkflow("w1", "new", Status.SUCCEEDED, b"1", at=3.0,
                                               token=1)]])
        assert done is None and must_get(store, "w1").status is Status.SUCCEEDED


@check
def rewrite_payloads_visits_every_payload_of_one_workflow(factory: StoreFactory) -> None:
    from crashsafe.stores.base import AttemptRecord, CompleteEffect

    with opened(factory) as store:
        for wid in ("w1", "w2"):
            store.create_workflow(wf(wid, inputs=b"in-" + wid.encode()))
            store.apply([[entry(wid, 0, output=b"out0"),
                          JournalEntry(wid, 1, "step", "s", None, b"err1", 1, 1.0, 2.0),
                          AttemptRecord(wid, 1, 1, "s", 1.0, 2.0, "unknown", b"att1")]])
            store.begin_effect(wid, 2, "pay", f"key-{wid}", "h", 1.0)
            store.apply([[entry(wid, 2, output=b"eff"),
                          CompleteEffect(f"key-{wid}", wid, 2, b"eff-out", None, 3.0)]])
            store.send_signal(wid, "approval", b"yes", 4.0)
        seen: list[tuple[int, str, bytes]] = []

        def upper(index: int, kind: str, data: bytes) -> bytes | None:
            seen.append((index, kind, data))
            return data.upper() if kind != "output" or index != 2 else None

        changed = store.rewrite_payloads("w1", upper)
        assert sorted(seen) == sorted([
            (-1, "inputs", b"in-w1"), (0, "output", b"out0"), (1, "error", b"err1"),
            (1, "attempt-error:1", b"att1"), (2, "output", b"eff"),
            (2, "effect-output", b"eff-out"), (0, "signal:approval", b"yes")])
        assert changed == len(seen) - 1
        assert must_get(store, "w1").inputs == b"IN-W1"
        assert [(e.output, e.error) for e in store.load_journal("w1")] == [
            (b"OUT0", None), (None, b"ERR1"), (b"eff", None)]
        assert store.load_attempts("w1")[0].error == b"ATT1"
        effect = store.get_effect("key-w1")
        assert effect is not None and effect.output == b"EFF-OUT"
        assert store.get_signal("w1", "approval", 0) == b"YES"
        # The other workflow is untouched.
        assert must_get(store, "w2").inputs == b"in-w2"
        assert store.get_signal("w2", "approval", 0) == b"yes"
        assert store.rewrite_payloads("nobody", upper) == 0


@check
def payloads_of_rolled_back_entries_and_dropped_workflows_are_reached(
        factory: StoreFactory) -> None:
    """What ``crashsafe keys rotate`` and ``crashsafe verify`` must not miss: the entries
    a rollback keeps for audit, and the effect outcomes kept after retention dropped the
    workflow that recorded them."""
    from crashsafe.stores.base import CompleteEffect

    with opened(factory) as store:
        store.create_workflow(wf("live", inputs=b"in"))
        store.apply([[entry("live", 0, output=b"kept"),
                      JournalEntry("live", 1, "step", "s", None, b"err1", 1, 1.0, 2.0),
                      entry("live", 2, output=b"out2")]])
        store.send_signal("live", "go", b"sig", 3.0)
        assert store.rewind("live", 1, "operator", 4.0) == 2
        store.create_workflow(wf("gone"))
        store.begin_effect("gone", 0, "pay", "key-gone", "h", 1.0)
        store.apply([[entry("gone", 0, output=b"paid"),
                      CompleteEffect("key-gone", "gone", 0, b"receipt", None, 2.0),
                      FinishWorkflow("gone", "ex-1", Status.SUCCEEDED, b"done", at=5.0)]])
        assert store.drop_workflows(["gone"], 10.0 ** 12) == ["gone"]
        assert store.get_workflow("gone") is None

        assert store.orphaned_workflow_ids() == ["gone"]
        assert store.load_payloads(["gone"]) == [
            ("gone", "effects", 0, "effect-output", b"receipt")]
        live = [("live", "workflows", -1, "inputs", b"in"),
                ("live", "journal", 0, "output", b"kept"),
                ("live", "signals", 0, "signal:go", b"sig"),
                ("live", "rewound", 1, "error", b"err1"),
                ("live", "rewound", 2, "output", b"out2")]
        assert sorted(store.load_payloads(["live"])) == sorted(live)
        both = store.load_payloads(["gone", "nobody", "live"])  # grouped, in that order
        assert both[0] == ("gone", "effects", 0, "effect-output", b"receipt")
        assert sorted(both[1:]) == sorted(live)
        assert store.load_payloads(["nobody"]) == store.load_payloads([]) == []

        def upper(index: int, kind: str, data: bytes) -> bytes | None:
            return data.upper()

        assert store.rewrite_payloads("gone", upper) == 1
        effect = store.get_effect("key-gone")
        assert effect is not None and effect.output == b"RECEIPT"
        assert store.rewrite_payloads("live", upper) == 5
        assert [(e.index, e.output, e.error) for _, _, e in store.load_rewound("live")] == [
            (1, None, b"ERR1"), (2, b"OUT2", None)]
        assert store.get_signal("live", "go", 0) == b"SIG"
        # A workflow started again under a dropped id is no orphan any more.
        store.create_workflow(wf("gone"))
        assert store.orphaned_workflow_ids() == []


# -- retention ------------------------------------------------------------------------------
def _finished(store: Store, wid: str, at: float, *, status: Status = Status.SUCCEEDED,
              parent_id: str | None = None) -> None:
    rec = wf(wid, status=status, owner=None, created_at=at, parent_id=parent_id)
    rec.updated_at = at
    store.create_workflow(rec)


@check
def finished_workflows_pages_by_finish_time(factory: StoreFactory) -> None:
    with opened(factory) as store:
        for i, status in enumerate([Status.SUCCEEDED, Status.FAILED, Status.CANCELLED,
                                    Status.DEAD_LETTER]):
            _finished(store, f"f{i}", 100.0 + i, status=status)
        _finished(store, "tie-b", 103.0)
        _finished(store, "late", 500.0)
        for status in (Status.RUNNING, Status.WAITING, Status.CANCELLING, Status.ENQUEUED):
            store.create_workflow(wf(f"active-{status.value}", status=status,
                                     created_at=1.0))
        assert store.finished_workflows(200.0, None, 10) == [
            ("f0", 100.0), ("f1", 101.0), ("f2", 102.0), ("f3", 103.0), ("tie-b", 103.0)]
        # keyset pagination: strictly after (updated_at, id), ties broken by id
        first = store.finished_workflows(200.0, None, 3)
        assert [w for w, _ in first] == ["f0", "f1", "f2"]
        rest = store.finished_workflows(200.0, (first[-1][1], first[-1][0]), 3)
        assert [w for w, _ in rest] == ["f3", "tie-b"]
        assert store.finished_workflows(200.0, (103.0, "f3"), 10) == [("tie-b", 103.0)]
        assert store.finished_workflows(float("inf"), None, 100)[-1] == ("late", 500.0)
        assert store.finished_workflows(200.0, None, 0) == []


@check
def finished_workflows_roots_skip_children_of_kept_parents(factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("parent", created_at=1.0))  # running
        _finished(store, "child", 10.0, parent_id="parent")
        _finished(store, "orphan", 11.0, parent_id="gone")
        _finished(store, "root", 12.0)
        assert [w for w, _ in store.finished_workflows(100.0, None, 10, roots=True)] == [
            "orphan", "root"]
        assert [w for w, _ in store.finished_workflows(100.0, None, 10)] == [
            "child", "orphan", "root"]


@check
def drop_workflows_deletes_every_row_but_effect_keys(factory: StoreFactory) -> None:
    from crashsafe.stores.base import AttemptRecord, CompleteEffect

    with opened(factory) as store:
        for wid in ("old", "keep"):
            store.create_workflow(wf(wid, owner="ex-1"))
            store.apply([[entry(wid, 0), entry(wid, 1)]])
            assert store.rewind(wid, 1, "audit me", 40.0) == 1  # entry 1 kept for audit
            store.apply([[entry(wid, 1), AttemptRecord(wid, 2, 2, "s", 1.0, 2.0, "x", b"e")]])
            store.send_signal(wid, "go", b"1", 2.0)
            store.begin_effect(wid, 2, "pay", f"done-{wid}", "h", 1.0)
            store.apply([[entry(wid, 2),
                          CompleteEffect(f"done-{wid}", wid, 2, b"r", None, 3.0, None)]])
            store.begin_effect(wid, 3, "pay", f"unknown-{wid}", "h", 1.0)  # never completed
            assert store.load_attempts(wid) and store.load_rewound(wid)
            store.set_status(wid, Status.FAILED, only_from=[Status.RUNNING])
        # updated_at of both is "now" (set_status stamps the store's clock).
        before = store.clock() + 1.0
        assert store.drop_workflows(["old", "missing"], before) == ["old"]
        assert store.get_workflow("old") is None
        assert store.load_journal("old") == []
        assert store.load_attempts("old") == []
        assert store.get_signal("old", "go", 0) is None
        assert store.load_rewound("old") == []
        # Effect rows stay until they expire: the key still deduplicates.
        done = store.get_effect("done-old")
        assert done is not None and done.state == "done" and done.output == b"r"
        unknown = store.get_effect("unknown-old")
        assert unknown is not None and unknown.state == "started"
        # ... and the unknown outcome is still unknown for a workflow started again
        # under the same id.
        again = store.begin_effect("old", 3, "pay", "unknown-old", "h", 60.0)
        assert again.unknown is True
        # The other workflow is untouched.
        assert must_get(store, "keep").status is Status.FAILED
        assert indexes(store, "keep") == [0, 1, 2]
        assert store.get_signal("keep", "go", 0) == b"1"
        assert store.load_attempts("keep") and store.load_rewound("keep")
        assert store.drop_workflows(["old"], before) == []  # idempotent


@check
def drop_workflows_keeps_running_young_and_children_of_kept_parents(
        factory: StoreFactory) -> None:
    with opened(factory) as store:
        store.create_workflow(wf("running", created_at=1.0))
        _finished(store, "young", 90.0)
        _finished(store, "kept-parent", 90.0)
        _finished(store, "child-of-kept", 10.0, parent_id="kept-parent")
        _finished(store, "parent", 20.0)
        _finished(store, "child", 10.0, parent_id="parent")
        _finished(store, "grandchild", 5.0, parent_id="child")
        _finished(store, "young-child", 95.0, parent_id="parent")
        dropped = store.drop_workflows(
            ["running", "young", "child-of-kept", "grandchild", "child", "parent",
             "young-child"], 50.0)
        assert sorted(dropped) == ["child", "grandchild", "parent"]
        for wid in ("running", "young", "kept-parent", "child-of-kept", "young-child"):
            assert store.get_workflow(wid) is not None, wid
        # A child alone, its parent kept: not dropped.
        assert store.drop_workflows(["child-of-kept"], 50.0) == []


@check
def rewrite_finished_entries_replaces_only_finished_workflows(factory: StoreFactory) -> None:
    with opened(factory) as store:
        for wid in ("done", "live"):
            store.create_workflow(wf(wid, owner="ex-1"))
            store.apply([[JournalEntry(wid, 0, "checkpoint", "c", b"big", None, 1, 1.0, 1.0),
                          entry(wid, 1)]])
        store.apply([[FinishWorkflow("done", "ex-1", Status.SUCCEEDED, b"1", at=2.0)]])
        new = [JournalEntry(wid, 0, "checkpoint", "c", b"small", None, 1, 1.0, 1.0,
                            note="pruned") for wid in ("done", "live")]
        wrong_kind = JournalEntry("done", 1, "checkpoint", "c", b"x", None, 1, 1.0, 1.0)
        missing = JournalEntry("done", 9, "checkpoint", "c", b"x", None, 1, 1.0, 1.0)
        expect = {wid: _guard(store, wid) for wid in ("done", "live")}
        assert store.rewrite_finished_entries([*new, wrong_kind, missing], expect) == ["done"]
        got = store.load_journal("done")
        assert (got[0].output, got[0].note, got[0].kind, got[0].name) == (
            b"small", "pruned", "checkpoint", "c")
        assert got[1].output == b"1"
        assert store.load_journal("live")[0].output == b"big"
        assert store.rewrite_finished_entries([], expect) == []


def _guard(store: Store, wid: str) -> tuple[int, float]:
    rec = store.get_workflow(wid)
    assert rec is not None
    return rec.token, rec.updated_at


@check
def rewrite_finished_entries_is_a_compare_and_swap(factory: StoreFactory) -> None:
    """A plan made from a journal read before a rollback and re-run must not land on
    the journal the re-run recorded (retention's ABA)."""
    with opened(factory) as store:
        store.create_workflow(wf("aba", owner="ex-1"))
        store.apply([[JournalEntry("aba", 0, "checkpoint", "c", b"first", None, 1, 1.0, 1.0),
                      FinishWorkflow("aba", "ex-1", Status.SUCCEEDED, b"1", at=2.0)]])
        planned_from = _guard(store, "aba")
        plan = [JournalEntry("aba", 0, "checkpoint", "c", b"stub", None, 1, 1.0, 1.0)]
        # Rolled back and run again: the same index and kind, recorded anew.
        assert store.rewind("aba", 0, "operator", 3.0) == 1
        claimed = store.claim_workflows([("aba", None)], "ex-2", 5)
        assert claimed[0].claimed
        store.apply([[JournalEntry("aba", 0, "checkpoint", "c", b"second", None, 1, 4.0, 4.0),
                      FinishWorkflow("aba", "ex-2", Status.SUCCEEDED, b"2", at=5.0)]])
        assert store.rewrite_finished_entries(plan, {"aba": planned_from}) == []
        assert store.load_journal("aba")[0].output == b"second"
        # Only the finish time differs (same token): still refused. No guard: refused.
        token, _ = _guard(store, "aba")
        assert store.rewrite_finished_entries(plan, {"aba": (token, 2.0)}) == []
        assert store.rewrite_finished_entries(plan, {}) == []
        assert store.load_journal("aba")[0].output == b"second"
        # Planned from what is there now: written.
        assert store.rewrite_finished_entries(plan, {"aba": _guard(store, "aba")}) == ["aba"]
        assert store.load_journal("aba")[0].output == b"stub"
