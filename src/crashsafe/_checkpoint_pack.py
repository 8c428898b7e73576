"""Checkpoint deltas compressed against what the journal already holds.

An agent's state grows by messages that a step has usually just returned (and the
journal stored as that step's result), in words the earlier messages already used.
So a delta is not stored as its JSON but as a zstd frame compressed with a raw-content
dictionary made of, in this order:

1. the last ``prev`` bytes of the previous checkpoint's *canonical* state (its JSON with
   keys sorted: the bytes its recorded SHA-256 covers);
2. the outputs of the journal entries listed in ``base``, in that order (results
   recorded between the previous checkpoint and this one).

The checkpoint's record says exactly which bytes it used (``prev`` and ``base``), so a
reader rebuilds the dictionary from nothing but the journal: the previous state (which
applying the delta needs anyway; its hash is checked before it is trusted) and a few
entries between the two checkpoints. Reading any checkpoint therefore still touches at
most one full snapshot and ``checkpoint_full_every`` deltas, and the records between
them.

A frame would hide the delta from the store's redaction (crashsafe._redaction), so a
delta holding a field redaction masks, or a :class:`crashsafe.Secret`, is stored as
plain JSON; and the results in a dictionary are taken as the store keeps them
(redacted), which is what a reader finds. A delta is packed only when that stores
fewer bytes than its plain JSON would.

Decompression is bounded like every sealed record's: the frame must declare its size,
that size must not exceed :data:`~crashsafe._seal.MAX_PLAIN_DEFAULT`, and the
decompressor gets exactly that much room.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec
import zstandard

from . import _codec
from ._seal import MAX_PLAIN_DEFAULT
from .exceptions import CorruptRecordError
from .stores.base import JournalEntry

PREV_BYTES = 16 * 1024
"""At most this much of the previous state (its end: the newest messages) goes into a
delta's dictionary; more costs time on every checkpoint and gains little."""
MAX_BASE = 8
"""At most this many recorded results (the newest) go into a delta's dictionary."""
BASE_BYTES = 256 * 1024
"""...and at most this many bytes of them."""
LEVEL = 3
DELTA_FIELDS = ("delta", "zd", "prev", "base")
"""The fields of a checkpoint record that hold its delta (plain or packed): none of them
survives when retention rewrites a delta as a full snapshot (it keeps only the record's
description, see crashsafe._retention.compact)."""
_MAX_WINDOW = 1 << 23
_SKIP = frozenset({"checkpoint", "compensate"})
_SECRET = b'"$secret"'


class _Zstd(threading.local):
    # zstandard's contexts are not safe to share between threads.
    def __init__(self) -> None:
        self.plain = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)


_zstd = _Zstd()


def canonical(state: Any) -> bytes:
    """The bytes a checkpoint's SHA-256 covers: the state's JSON, keys sorted."""
    data, _ = _codec.encode(state, "checkpoint state")
    return canonical_of(data)


def canonical_of(data: bytes) -> bytes:
    """:func:`canonical` of a state already encoded by the codec."""
    return msgspec.json.encode(msgspec.json.decode(data), order="sorted")


def digest(canonical_bytes: bytes) -> str:
    return hashlib.sha256(canonical_bytes).hexdigest()


def as_stored(store: Any, data: bytes, *, step: str | None = None,
              checkpoint: bool = False) -> bytes:
    """``data`` as the sealing store keeps it: with credentials redacted
    (crashsafe._redaction). A dictionary is built from what a reader will find."""
    redactor = getattr(store, "redactor", None)
    if redactor is None:
        return data
    encrypted = bool(getattr(getattr(store, "sealer", None), "encrypted", False))
    out: bytes = redactor.value(data, encrypted=encrypted, what="a checkpoint delta",
                                step=step, checkpoint=checkpoint)
    return out


def recent_outputs(store: Any, recorded: list[JournalEntry], after: int, before: int,
                   loaded: int = 0) -> list[tuple[int, bytes]]:
    """The results recorded strictly between journal indexes ``after`` and ``before``
    (newest last), as the store keeps them, as many as the dictionary takes. Only the
    tail of ``recorded`` is looked at: entries are appended as they commit. Its first
    ``loaded`` entries were read from the store, so are already as it keeps them
    (redacted under the settings of their time, which may not be the live ones)."""
    start = max(0, len(recorded) - 4 * MAX_BASE)
    found = {e.index: (pos < loaded, e) for pos, e in enumerate(recorded[start:], start)
             if after < e.index < before and e.output is not None and e.kind not in _SKIP}
    out: list[tuple[int, bytes]] = []
    total = 0
    for index in sorted(found, reverse=True)[:MAX_BASE]:
        stored, e = found[index]
        data = bytes(e.output or b"") if stored else as_stored(
            store, bytes(e.output or b""), step=e.name if e.kind == "step" else None)
        if total + len(data) > BASE_BYTES:
            break
        out.append((index, data))
        total += len(data)
    out.reverse()
    return out


def _dictionary(prev: bytes, outputs: Iterable[bytes]) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(b"".join((prev, *outputs)),
                                         dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def pack(store: Any, delta: bytes, prev_canonical: bytes, outputs: list[tuple[int, bytes]]
         ) -> dict[str, Any] | None:
    """The fields a delta checkpoint's record holds instead of its JSON ``delta``:
    ``zd`` (the frame), ``prev`` and ``base`` (what its dictionary was made of); or
    None when that would not store fewer bytes (tiny deltas), or when the store must
    see the delta: it holds a :class:`crashsafe.Secret` or a credential-like field
    that redaction masks (a frame would hide them from it)."""
    if not outputs:
        # The previous state alone rarely finds matches in new text (a few per cent);
        # not worth its cost on every checkpoint of a state that changes by itself.
        return None
    plain = b'{"delta":' + delta + b"}"
    if _SECRET in delta or as_stored(store, plain, checkpoint=True) != plain:
        return None
    prev = prev_canonical[-PREV_BYTES:]
    cdict = _dictionary(prev, (data for _, data in outputs))
    frame = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True,
                                     dict_data=cdict).compress(delta)
    fields = {"zd": frame, "prev": len(prev), "base": [index for index, _ in outputs]}
    if _sealed_size(_codec.encode(fields, "checkpoint delta")[0]) >= _sealed_size(plain):
        return None
    return fields


def _sealed_size(data: bytes) -> int:
    """About what the sealing layer stores for ``data`` (it compresses from 256 bytes
    when that saves any)."""
    if len(data) < 256:
        return len(data)
    return min(len(data), len(_zstd.plain.compress(data)))


def _refused(workflow_id: str, index: int, n: int, reason: str) -> CorruptRecordError:
    return CorruptRecordError(
        f"checkpoint #{n} (journal index {index}) of workflow {workflow_id!r} cannot be "
        f"rebuilt: {reason}", workflow_id, index, "output")


def unpack(entry: JournalEntry, meta: Mapping[str, Any], prev_canonical: bytes,
           outputs: Mapping[int, bytes | None]) -> Any:
    """The delta of a packed checkpoint record (``meta`` is its decoded record),
    given the previous state's canonical bytes and the journal's outputs by index."""
    wid, idx, n = entry.workflow_id, entry.index, int(meta.get("n", -1))
    frame, used, base = meta.get("zd"), meta.get("prev"), meta.get("base")
    if not isinstance(frame, bytes) or not isinstance(used, int) or isinstance(used, bool) \
            or not 0 <= used <= len(prev_canonical) or not isinstance(base, list):
        raise _refused(wid, idx, n, "its delta fields are malformed")
    # What a writer may use, checked before anything is built: a hostile record must
    # not make the reader assemble a huge dictionary.
    if used > PREV_BYTES or len(base) > MAX_BASE or len(set(map(repr, base))) != len(base):
        raise _refused(wid, idx, n, f"its dictionary is out of bounds (prev {used} bytes, "
                                    f"{len(base)} base entries; allowed {PREV_BYTES} and "
                                    f"{MAX_BASE}, no repeats)")
    parts = [prev_canonical[len(prev_canonical) - used:]]
    for i in base:
        data = outputs.get(i) if isinstance(i, int) else None
        if data is None:
            raise _refused(wid, idx, n, f"the journal entry at index {i!r} its delta was "
                                        "compressed against is missing")
        parts.append(data)
    if sum(map(len, parts[1:])) > BASE_BYTES:
        raise _refused(wid, idx, n, f"its dictionary's journal entries exceed {BASE_BYTES} "
                                    "bytes")
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise _refused(wid, idx, n, "its delta is not a zstd frame") from None
    if not 0 < declared <= MAX_PLAIN_DEFAULT:
        raise _refused(wid, idx, n, f"its delta declares {declared} bytes (allowed: 1 to "
                                    f"{MAX_PLAIN_DEFAULT})")
    try:
        if len(parts) == 1 and not parts[0]:
            dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
        else:
            dctx = zstandard.ZstdDecompressor(
                dict_data=_dictionary(parts[0], parts[1:]), max_window_size=_MAX_WINDOW)
        data = dctx.decompress(frame, max_output_size=declared)
    except zstandard.ZstdError as exc:
        raise _refused(wid, idx, n, f"its delta does not decompress ({exc})") from None
    if len(data) != declared:  # pragma: no cover - zstandard checks this too
        raise _refused(wid, idx, n, "its delta does not match its declared size")
    return _codec.decode(data, "checkpoint delta")


def check_hash(entry: JournalEntry, meta: Mapping[str, Any], canonical_bytes: bytes) -> None:
    """Refuse a rebuilt state whose hash differs from the one recorded with it."""
    if digest(canonical_bytes) != meta.get("hash"):
        raise _refused(entry.workflow_id, entry.index, int(meta.get("n", -1)),
                       "the state rebuilt from its snapshot and deltas does not match its "
                       "recorded SHA-256")


def rebuilds(previous: Any, delta: Any, patch: Callable[[Any, Any], Any], state: Any) -> bool:
    """Whether applying ``delta`` to ``previous`` gives exactly ``state`` (the same JSON:
    Python's ``==`` also finds ``1``, ``1.0`` and ``True`` equal)."""
    return canonical(patch(previous, delta)) == canonical(state)


def rebuild(chain: list[tuple[JournalEntry, dict[str, Any]]], journal: list[JournalEntry],
            patch: Callable[[Any, Any], Any]) -> Any:
    """Apply a chain of checkpoint records, oldest (the full snapshot) first, and check
    the result against the newest one's recorded hash."""
    entry, meta = chain[0]
    state = meta["full"]
    outputs: dict[int, bytes | None] | None = None
    for e, m in chain[1:]:
        if "zd" in m:
            if outputs is None:
                outputs = {x.index: x.output for x in journal}
            prev = canonical(state)
            check_hash(entry, meta, prev)  # the dictionary is only as good as its base
            delta = unpack(e, m, prev, outputs)
        else:
            delta = m["delta"]
        state = patch(state, delta)
        entry, meta = e, m
    check_hash(entry, meta, canonical(state))
    return state
