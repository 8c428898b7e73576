"""Checkpoint deltas compressed against the journal (crashsafe._checkpoint_pack): what
they reference, that every checkpoint reads back exactly, and that a missing or altered
base is refused with a typed error instead of rebuilding a wrong state. Every store."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import zstandard

import crashsafe
from crashsafe import App, CorruptRecordError, _codec
from crashsafe import _checkpoint as ckpt
from crashsafe import _checkpoint_pack as pack
from crashsafe.stores.base import JournalEntry

WORDS = [f"w{i:03d}x" for i in range(400)]


def _text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7919 + i * 104729) % len(WORDS)] for i in range(words))


def _agent(app: App) -> Any:
    @app.step(name="llm")
    def llm(turn: int) -> dict[str, str]:
        return {"role": "assistant", "content": _text(turn, 150)}

    @app.workflow(name="agent")
    def agent(turns: int) -> int:
        messages: list[dict[str, str]] = [{"role": "system", "content": _text(0, 100)}]
        for turn in range(turns):
            messages.append({"role": "user", "content": _text(1000 + turn, 150)})
            messages.append(llm(turn))
            crashsafe.checkpoint({"messages": messages, "turn": turn})
        return len(messages)

    return agent


def _expected(turn: int) -> dict[str, Any]:
    messages = [{"role": "system", "content": _text(0, 100)}]
    for t in range(turn + 1):
        messages += [{"role": "user", "content": _text(1000 + t, 150)},
                     {"role": "assistant", "content": _text(t, 150)}]
    return {"messages": messages, "turn": turn}


def _records(app: App, wid: str) -> list[tuple[JournalEntry, dict[str, Any]]]:
    return [(e, _codec.decode(e.output or b"{}")) for e in app.journal(wid)
            if e.kind == ckpt.KIND]


def test_deltas_are_compressed_against_the_step_results_and_read_back(app: App) -> None:
    agent = _agent(app)
    assert app.start(agent, 12, workflow_id="p1").result(timeout=30) == 25
    records = _records(app, "p1")
    packed = [(e, m) for e, m in records if "zd" in m]
    assert len(packed) >= 9, [sorted(m) for _, m in records]
    for e, m in packed:
        # The step result recorded just before the checkpoint is in its dictionary.
        assert m["base"] == [e.index - 1] and 0 < m["prev"] <= pack.PREV_BYTES
    # The assistant's reply is found in the dictionary: a delta costs about the user's
    # new message, not both.
    plain = len(_codec.encode(ckpt.diff(_expected(1), _expected(2)), "x")[0])
    assert len(packed[1][1]["zd"]) * 3 < plain
    for n in range(12):
        assert app.checkpoint_state("p1", f"#{n}") == _expected(n)


def test_a_fork_and_a_rollback_keep_packed_checkpoints_readable(app: App) -> None:
    agent = _agent(app)
    app.start(agent, 6, workflow_id="p2").result(timeout=30)
    fork = app.fork("p2", at="#3", new_id="p2-fork")
    assert fork.result(timeout=30) == 13
    for n in range(6):
        assert app.checkpoint_state("p2-fork", f"#{n}") == _expected(n)
    # A rollback replays up to checkpoint #3; the ones after it are written again,
    # compressed against what the replay met.
    app.rollback("p2", to="#3").result(timeout=30)
    again = _records(app, "p2")
    assert len(again) == 6 and all("zd" in m for _, m in again[4:])
    for n in range(6):
        assert app.checkpoint_state("p2", f"#{n}") == _expected(n)


@pytest.mark.parametrize(("old", "new"), [(1, 1.0), (1.0, True), (0.0, -0.0), (0, False),
                                      ({1, 2}, frozenset({1, 2}))])
def test_values_python_finds_equal_are_not_lost(app: App, old: Any, new: Any) -> None:
    @app.workflow(name="loose")
    def loose() -> None:
        crashsafe.checkpoint({"log": ["x" * 400] * 3, "v": old})
        crashsafe.checkpoint({"log": ["x" * 400] * 4, "v": new})

    app.start(loose, workflow_id="p3").result(timeout=30)
    got = app.checkpoint_state("p3")["v"]
    assert got == new and type(got) is type(new) and repr(got) == repr(new)


def _tamper(journal: list[JournalEntry], index: int, output: bytes | None) -> list[JournalEntry]:
    return [dataclasses.replace(e, output=output) if e.index == index else e for e in journal]


def test_a_missing_or_changed_base_is_refused(app: App) -> None:
    agent = _agent(app)
    app.start(agent, 4, workflow_id="p4").result(timeout=30)
    journal = app.journal("p4")
    info = ckpt.resolve(journal, "#3")
    _, meta = _records(app, "p4")[3]
    base = meta["base"][0]
    other = _codec.encode({"role": "assistant", "content": _text(99, 150)}, "x")[0]
    for broken in (_tamper(journal, base, None),  # the entry is gone (or has no output)
                   _tamper(journal, base, other)):  # it holds other bytes
        with pytest.raises(CorruptRecordError, match="checkpoint #3") as exc:
            ckpt.state_at(broken, info)
        assert exc.value.workflow_id == "p4" and exc.value.index == info.index
    # A previous checkpoint whose rebuilt state does not hash as recorded.
    first, first_meta = _records(app, "p4")[0]
    wrong = dict(first_meta, full={"messages": [], "turn": 0})
    with pytest.raises(CorruptRecordError, match="does not match its recorded SHA-256"):
        ckpt.state_at(_tamper(journal, first.index, _codec.encode(wrong, "x")[0]), info)


def test_decompression_is_bounded() -> None:
    entry = JournalEntry("w", 5, ckpt.KIND, ckpt.KIND, b"", None, 1, 0.0, 0.0)
    huge = zstandard.ZstdCompressor().compress(b"\0" * (pack.MAX_PLAIN_DEFAULT + 1))
    lying = bytearray(zstandard.ZstdCompressor().compress(b"[1,2,3]" * 10))
    for frame, why in ((huge, "declares"), (b"not zstd", "not a zstd frame"),
                       (bytes(lying[:-3]), "does not decompress")):
        meta = {"n": 2, "zd": frame, "prev": 0, "base": []}
        with pytest.raises(CorruptRecordError, match=why):
            pack.unpack(entry, meta, b"", {})
    with pytest.raises(CorruptRecordError, match="malformed"):
        pack.unpack(entry, {"n": 2, "zd": b"x", "prev": 10, "base": []}, b"short", {})


def test_a_hostile_record_cannot_make_the_reader_build_a_huge_dictionary() -> None:
    entry = JournalEntry("w", 5, ckpt.KIND, ckpt.KIND, b"", None, 1, 0.0, 0.0)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b'{"append":[1]}')
    big = b"a" * (pack.BASE_BYTES // 2)
    prev = b"p" * (2 * pack.PREV_BYTES)
    cases = [
        ({"prev": 0, "base": [0] * 150}, {0: big}, "out of bounds"),  # repeats, too many
        ({"prev": 0, "base": [0, 0]}, {0: big}, "no repeats"),
        ({"prev": 0, "base": list(range(pack.MAX_BASE + 1))},
         dict.fromkeys(range(pack.MAX_BASE + 1), b"x"), "out of bounds"),
        ({"prev": pack.PREV_BYTES + 1, "base": []}, {}, "out of bounds"),
        ({"prev": 0, "base": [0, 1, 2]}, {0: big, 1: big, 2: big}, "exceed"),
    ]
    for fields, outputs, why in cases:
        with pytest.raises(CorruptRecordError, match=why):
            pack.unpack(entry, {"n": 2, "zd": frame, **fields}, prev, outputs)


CANARY = "canary-7f3e-not-for-disk"


def test_credentials_stay_visible_to_redaction(make_app: Any, database: Any,
                                               tmp_path: Any) -> None:
    """A packed delta would hide its fields from the store's redaction: a delta or a
    step result holding a credential-like field is stored so that redaction sees it,
    and the dictionary is built from results as the store keeps them."""
    app = make_app()

    @app.step(name="llm")
    def llm(turn: int) -> dict[str, str]:
        reply = {"role": "assistant", "content": _text(turn, 150)}
        if turn % 2:
            reply["api_key"] = CANARY  # a tool echoing a credential back
        return reply

    @app.workflow(name="leaky")
    def leaky(turns: int) -> int:
        messages: list[dict[str, str]] = []
        for turn in range(turns):
            messages.append({"role": "user", "content": _text(1000 + turn, 150)})
            messages.append(llm(turn))
            crashsafe.checkpoint({"messages": messages, "password": CANARY})
        return len(messages)

    assert app.start(leaky, 6, workflow_id="p5").result(timeout=30) == 12
    for n in range(6):
        state = app.checkpoint_state("p5", f"#{n}")
        assert state["password"] == "***" and len(state["messages"]) == 2 * (n + 1)
        assert all(m.get("api_key", "***") == "***" for m in state["messages"])
    records = _records(app, "p5")
    assert any("zd" in m for _, m in records)  # turns without a credential are packed
    for _, m in records:
        assert CANARY.encode() not in _codec.encode(m, "x")[0]
    if database.kind == "sqlite":
        raw = b"".join(p.read_bytes() for p in tmp_path.rglob("*.db*") if p.is_file())
        assert CANARY.encode() not in raw
