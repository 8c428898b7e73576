"""Sealed records: round trips, every tampering and corruption detected, bounded
decompression, key rotation building blocks, keyring parsing, no key leaks.

Records are forged by hand from the format documented in ``crashsafe._seal`` (the
``forge`` helper), which also checks that documentation against the code.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import json
import os
import random
import stat
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crashsafe
from crashsafe import ConfigurationError, CorruptRecordError, SerializationError
from crashsafe._keys import KEYS_ENV, Keyring
from crashsafe._seal import MAGIC, MAX_PLAIN_DEFAULT, RecordContext, Sealer, record_info

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SRC = Path(crashsafe.__file__).parent

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
KEY_C = bytes(range(200, 232))
RING = Keyring({"k1": KEY_A})
CTX = RecordContext("wf-1", 3, "output")
SMALL = b'{"ok":true}'
STATE = json.dumps({"messages": [{"role": "user", "content": f"message number {i}"}
                                 for i in range(40)]}).encode()
NOISE = random.Random(7).randbytes(600)  # incompressible: stored uncompressed


def plain() -> Sealer:
    return Sealer(None)


def encrypted(ring: Keyring = RING, **kw: object) -> Sealer:
    return Sealer(ring, **kw)  # type: ignore[arg-type]


def refused(sealer: Sealer, stored: bytes, ctx: RecordContext = CTX,
            *reasons: str) -> str:
    """Open must fail with CorruptRecordError naming the record (and the reason)."""
    with pytest.raises(CorruptRecordError) as info:
        sealer.open(stored, ctx)
    msg = str(info.value)
    assert repr(ctx.workflow_id[:200]) in msg or ctx.workflow_id[:200] in msg, msg
    assert f"index {ctx.index}" in msg, msg
    assert repr(ctx.kind) in msg, msg
    for reason in reasons:
        assert reason in msg, msg
    return msg


def forge(ctx: RecordContext, body: bytes, *, flags: int = 0, key_id: bytes = b"",
          nonce: bytes = b"", version: int = 1, magic: bytes = MAGIC) -> bytes:
    """A record built from the documented format, with a valid checksum."""
    header = magic + bytes((version, flags, len(key_id))) + key_id + nonce
    return header + body + hashlib.sha256(ctx.encode() + header + body).digest()


def forge_encrypted(ctx: RecordContext, plain_body: bytes, *, key: bytes = KEY_A,
                    key_id: bytes = b"k1", flags: int = 0x02,
                    aad_ctx: RecordContext | None = None) -> bytes:
    """An encrypted record as someone holding ``key`` would write it."""
    nonce = os.urandom(12)
    header = MAGIC + bytes((1, flags, len(key_id))) + key_id + nonce
    aad = header + (aad_ctx or ctx).encode()
    body = AESGCM(key).encrypt(nonce, plain_body, aad)
    return header + body + hashlib.sha256(ctx.encode() + header + body).digest()


def variants() -> list[tuple[str, Sealer, bytes]]:
    """One record of each shape: (name, sealer, sealed record of CTX)."""
    out = []
    for name, sealer in (("plain", plain()), ("encrypted", encrypted())):
        for what, payload in (("small", SMALL), ("compressed", STATE), ("raw", NOISE)):
            out.append((f"{name}-{what}", sealer, sealer.seal(payload, CTX)))
    return out


VARIANTS = variants()
VARIANT_IDS = [v[0] for v in VARIANTS]


# -- format and round trips -----------------------------------------------------------------


def test_documented_layout_of_an_encrypted_compressed_record() -> None:
    stored = encrypted().seal(STATE, CTX)
    assert stored[:3] == MAGIC == b"\xc5CS"
    assert stored[3] == 1
    assert stored[4] == 0x03  # compressed | encrypted
    assert stored[5] == 2 and stored[6:8] == b"k1"
    nonce, body, trailer = stored[8:20], stored[20:-32], stored[-32:]
    header = stored[:20]
    assert trailer == hashlib.sha256(CTX.encode() + header + body).digest()
    frame = AESGCM(KEY_A).decrypt(nonce, body, header + CTX.encode())
    assert zstandard.frame_content_size(frame) == len(STATE)
    assert zstandard.ZstdDecompressor().decompress(frame) == STATE


def test_documented_layout_of_a_plain_record_and_context_encoding() -> None:
    stored = plain().seal(SMALL, CTX)
    assert stored == MAGIC + b"\x01\x00\x00" + SMALL + hashlib.sha256(
        CTX.encode() + MAGIC + b"\x01\x00\x00" + SMALL).digest()
    assert CTX.encode() == (b"\x00\x00\x00\x04wf-1" + (3).to_bytes(8, "big", signed=True)
                            + b"\x00\x06output")
    assert forge(CTX, SMALL) == stored


contexts = st.builds(
    RecordContext,
    st.text(st.characters(exclude_categories=()), max_size=30),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(st.characters(exclude_categories=()), max_size=12),
)
payloads = st.binary(max_size=3000) | st.lists(st.sampled_from(
    [b'{"role":"user"}', b"[1,2,3]", b"hello ", b"\x00" * 40]), max_size=200).map(b"".join)


@FAST
@given(payloads, contexts, st.sampled_from(["plain", "encrypted", "no-compress"]))
def test_round_trip(payload: bytes, ctx: RecordContext, mode: str) -> None:
    sealer = {"plain": plain(), "encrypted": encrypted(),
              "no-compress": Sealer(RING, compress_min=10**9)}[mode]
    stored = sealer.seal(payload, ctx)
    assert sealer.open(stored, ctx) == payload
    info = record_info(stored)
    assert info.sealed and info.encrypted == (mode != "plain")
    if info.compressed:
        assert len(payload) >= 256
    assert not sealer.needs_rotation(stored)
    assert payload not in stored or len(payload) < 24 or not info.encrypted


def test_compression_only_when_large_enough_and_worth_it() -> None:
    assert not record_info(plain().seal(STATE[:255], CTX)).compressed
    assert record_info(plain().seal(STATE, CTX)).compressed
    assert not record_info(plain().seal(NOISE, CTX)).compressed  # would not save bytes
    assert not record_info(Sealer(None, compress_min=0).seal(b"", CTX)).compressed
    assert len(plain().seal(STATE, CTX)) < len(STATE) // 2


def test_bytearray_and_memoryview_are_accepted() -> None:
    stored = encrypted().seal(STATE, CTX)
    assert encrypted().open(bytearray(stored), CTX) == STATE
    assert encrypted().open(memoryview(stored), CTX) == STATE


def test_a_sealer_is_safe_to_share_between_threads() -> None:
    sealer = encrypted()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(200):
                ctx = RecordContext(f"wf-{n}", i, "checkpoint")
                data = STATE + str(i).encode()
                assert sealer.open(sealer.seal(data, ctx), ctx) == data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_invalid_options_are_refused() -> None:
    for kw in ({"level": 0}, {"level": 20}, {"level": True}, {"compress_min": -1},
               {"max_plain": 0}):
        with pytest.raises(ConfigurationError):
            Sealer(None, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Sealer("k1=abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RecordContext("wf", True, "output")
    with pytest.raises(ValueError, match="64-bit"):
        RecordContext("wf", 2**63, "output")


def test_a_payload_over_max_plain_is_refused_at_seal_time() -> None:
    with pytest.raises(SerializationError, match="max_plain"):
        Sealer(None, max_plain=100).seal(b"x" * 101, CTX)


# -- R3 / S2: corruption and tampering --------------------------------------------------------


@pytest.mark.parametrize(("name", "sealer", "stored"), VARIANTS, ids=VARIANT_IDS)
def test_every_single_bit_flip_is_detected(name: str, sealer: Sealer, stored: bytes) -> None:
    for pos in range(len(stored)):
        for bit in range(8):
            bad = bytearray(stored)
            bad[pos] ^= 1 << bit
            refused(sealer, bytes(bad))


@pytest.mark.parametrize(("name", "sealer", "stored"), VARIANTS, ids=VARIANT_IDS)
def test_truncation_at_every_length_is_detected(name: str, sealer: Sealer,
                                                stored: bytes) -> None:
    for n in range(len(stored)):
        refused(sealer, stored[:n])


@pytest.mark.parametrize(("name", "sealer", "stored"), VARIANTS, ids=VARIANT_IDS)
def test_zeroed_regions_are_detected(name: str, sealer: Sealer, stored: bytes) -> None:
    for size in (1, 2, 4, 16, 64, 512, 4096):
        for start in range(0, len(stored), max(1, size // 2)):
            bad = bytearray(stored)
            bad[start:start + size] = bytes(len(bad[start:start + size]))
            if bytes(bad) != stored:
                refused(sealer, bytes(bad))


@pytest.mark.parametrize(("name", "sealer", "stored"), VARIANTS, ids=VARIANT_IDS)
def test_appended_or_removed_bytes_are_detected(name: str, sealer: Sealer,
                                                stored: bytes) -> None:
    refused(sealer, stored + b"\x00")
    refused(sealer, stored + stored)
    for pos in range(0, len(stored), 7):
        refused(sealer, stored[:pos] + stored[pos + 1:])


MOVES = [RecordContext("wf-2", 3, "output"), RecordContext("wf-1", 4, "output"),
         RecordContext("wf-1", 3, "checkpoint"), RecordContext("wf-1", -3, "output"),
         RecordContext("wf-1 ", 3, "output"), RecordContext("wf-", 13, "output")]


@pytest.mark.parametrize(("name", "sealer", "stored"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("moved", MOVES, ids=lambda c: f"{c.workflow_id}:{c.index}:{c.kind}")
def test_a_record_moved_to_another_workflow_index_or_kind_is_detected(
        name: str, sealer: Sealer, stored: bytes, moved: RecordContext) -> None:
    refused(sealer, stored, moved, "checksum mismatch")


def test_older_record_replayed_under_another_index_is_detected() -> None:
    for sealer in (plain(), encrypted()):
        first = sealer.seal(b'{"balance":100}', RecordContext("acct", 1, "output"))
        sealer.seal(b'{"balance":40}', RecordContext("acct", 2, "output"))
        refused(sealer, first, RecordContext("acct", 2, "output"))


@pytest.mark.parametrize("moved", MOVES, ids=lambda c: f"{c.workflow_id}:{c.index}:{c.kind}")
def test_moved_ciphertext_fails_authentication_even_with_a_recomputed_checksum(
        moved: RecordContext) -> None:
    # Someone with write access can recompute the checksum; the GCM tag still binds
    # the ciphertext to where it was written.
    stored = encrypted().seal(STATE, CTX)
    rehashed = forge(moved, stored[20:-32], flags=stored[4], key_id=b"k1",
                     nonce=stored[8:20])
    refused(encrypted(), rehashed, moved, "authentication failed", "'k1'")


def test_edited_header_fails_authentication_even_with_a_recomputed_checksum() -> None:
    stored = encrypted().seal(STATE, CTX)
    body, nonce = stored[20:-32], stored[8:20]
    # "not compressed": would hand the zstd frame out as the payload if unauthenticated
    refused(encrypted(), forge(CTX, body, flags=0x02, key_id=b"k1", nonce=nonce),
            CTX, "authentication failed")
    # another key id of the same ring
    ring = Keyring({"k1": KEY_A, "k2": KEY_B})
    refused(Sealer(ring), forge(CTX, body, flags=0x03, key_id=b"k2", nonce=nonce),
            CTX, "authentication failed", "'k2'")
    # a different nonce
    refused(encrypted(), forge(CTX, body, flags=0x03, key_id=b"k1", nonce=bytes(12)),
            CTX, "authentication failed")


def test_wrong_key_is_detected_and_named() -> None:
    stored = encrypted().seal(STATE, CTX)
    other = Sealer(Keyring({"k1": KEY_B}))
    msg = refused(other, stored, CTX, "authentication failed", "'k1'")
    assert "not the key this record was sealed with" in msg


def test_unknown_key_id_is_named() -> None:
    stored = Sealer(Keyring({"old-2024": KEY_C})).seal(STATE, CTX)
    msg = refused(encrypted(), stored, CTX, "'old-2024'", "not in the keyring", KEYS_ENV)
    assert "'k1'" in msg  # what the keyring does hold
    refused(plain(), stored, CTX, "'old-2024'", "no keyring is configured")


def test_hostile_key_id_bytes_are_named_safely() -> None:
    stored = forge(CTX, bytes(40), flags=0x02, key_id=b"\xff\n\x00'x", nonce=bytes(12))
    refused(encrypted(), stored, CTX, "not in the keyring", "\\xff")


LEGACY = [b'{"a":1}', b"[1,2]", b'"text"', b"-1", b"0", b"42", b"true", b"false", b"null",
          b' {"a": 1}', b"\n[]", b"\t1", b"\r\nnull"]


@pytest.mark.parametrize("record", LEGACY)
def test_legacy_plaintext_is_returned_unchanged_without_encryption(record: bytes) -> None:
    assert plain().open(record, CTX) == record
    assert record_info(record).sealed is False
    assert not plain().needs_rotation(record)


@pytest.mark.parametrize("record", LEGACY)
def test_legacy_plaintext_is_refused_when_encryption_is_on(record: bytes) -> None:
    refused(encrypted(), record, CTX, "plaintext", "encryption is on")
    assert encrypted(allow_plaintext=True).open(record, CTX) == record
    assert encrypted().needs_rotation(record)


def test_unencrypted_sealed_record_is_refused_when_encryption_is_on() -> None:
    for payload in (SMALL, STATE, NOISE):
        stored = plain().seal(payload, CTX)
        refused(encrypted(), stored, CTX, "not encrypted", "downgrade")
        assert encrypted(allow_plaintext=True).open(stored, CTX) == payload
        assert encrypted().needs_rotation(stored)


def test_encrypted_flag_stripped_with_recomputed_checksum_is_refused() -> None:
    stored = encrypted().seal(STATE, CTX)
    # Keep the key id and nonce bytes but claim "not encrypted": inconsistent header.
    refused(encrypted(), forge(CTX, stored[20:-32], flags=0x01, key_id=b"k1",
                               nonce=stored[8:20]), CTX, "garbled")
    # Drop them as well: a well-formed unencrypted record, refused as a downgrade.
    refused(encrypted(), forge(CTX, stored[20:-32], flags=0x01), CTX, "downgrade")


def test_damaged_first_byte_is_not_mistaken_for_legacy_json() -> None:
    for sealer in (plain(), encrypted()):
        stored = sealer.seal(STATE, CTX)
        for first in b'{["-0123456789tfn \t\r\n':
            refused(sealer, bytes((first,)) + stored[1:])


def test_unsupported_format_version_is_named() -> None:
    refused(plain(), forge(CTX, SMALL, version=2), CTX, "format version 2")


def test_ten_thousand_random_mutations_are_all_detected() -> None:
    seed = int(os.environ.get("CRASHSAFE_SEED", random.randrange(2**32)))
    print(f"mutation campaign seed={seed} (CRASHSAFE_SEED={seed} replays it)")
    rng = random.Random(seed)
    corpus: list[tuple[Sealer, bytes, RecordContext]] = []
    for sealer in (plain(), encrypted(), Sealer(Keyring({"k2": KEY_B, "k1": KEY_A}))):
        for i in range(8):
            ctx = RecordContext(f"wf-{i % 3}", i, rng.choice(["output", "checkpoint"]))
            payload = STATE[: rng.randrange(1, len(STATE))] if i % 2 else NOISE[: 50 * i + 1]
            corpus.append((sealer, sealer.seal(payload, ctx), ctx))

    def mutate(stored: bytes, ctx: RecordContext) -> tuple[bytes, RecordContext]:
        kind = rng.randrange(7)
        b = bytearray(stored)
        n = len(b)
        if kind == 0:
            pos = rng.randrange(n)
            b[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[rng.randrange(n)] = rng.randrange(256)
        elif kind == 2:
            del b[rng.randrange(n):]
        elif kind == 3:
            start = rng.randrange(n)
            b[start:start + rng.randrange(1, 64)] = bytes(len(b[start:start + 64]))
        elif kind == 4:
            b += rng.randbytes(rng.randrange(1, 8))
        elif kind == 5:
            start = rng.randrange(n)
            del b[start:start + rng.randrange(1, 16)]
        else:
            other = rng.choice(corpus)
            return stored, RecordContext(other[2].workflow_id, other[2].index + 1,
                                         other[2].kind)
        return bytes(b), ctx

    detected = 0
    for _ in range(10_000):
        sealer, stored, ctx = rng.choice(corpus)
        bad, where = mutate(stored, ctx)
        if bad == stored and where == ctx:
            continue
        with pytest.raises(CorruptRecordError, match=f"index {where.index} "):
            sealer.open(bad, where)
        detected += 1
    assert detected > 9_000


# -- S4: decompression bombs ------------------------------------------------------------------

GIB = 1 << 30


def _bomb(size: int | None) -> bytes:
    """``size`` zero bytes as one zstd frame, built streaming so it stays ~32 KiB
    (``size=None``: the frame does not declare its size)."""
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor(level=1).stream_writer(
        out, size=-1 if size is None else size, closefd=False)
    chunk = bytes(1 << 20)
    for _ in range(GIB // len(chunk)):
        writer.write(chunk)
    writer.close()
    return out.getvalue()


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    honest = _bomb(GIB)
    assert zstandard.frame_content_size(honest) == GIB and len(honest) < 100_000

    def lie(declared: int) -> bytes:
        # Frame header: magic (4), descriptor (1), window (1), 4-byte content size.
        assert honest[4] >> 6 == 2  # the 4-byte content size field
        return honest[:6] + declared.to_bytes(4, "little") + honest[10:]

    return {"honest-1GiB": honest, "lies-1000": lie(1000), "lies-8MiB": lie(8 << 20),
            "lies-max": lie(MAX_PLAIN_DEFAULT), "undeclared": _bomb(None)}


def _sealed_bomb(frame: bytes, encrypt: bool) -> bytes:
    if encrypt:
        return forge_encrypted(CTX, frame, flags=0x03)
    return forge(CTX, frame, flags=0x01)


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("which", ["honest-1GiB", "lies-1000", "lies-8MiB", "lies-max",
                                   "undeclared"])
def test_decompression_bomb_is_rejected_with_bounded_memory(
        bombs: dict[str, bytes], which: str, encrypt: bool) -> None:
    max_plain = 4 << 20
    sealer = Sealer(RING if encrypt else None, max_plain=max_plain)
    stored = _sealed_bomb(bombs[which], encrypt)
    tracemalloc.start()
    try:
        refused(sealer, stored)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < max_plain + (2 << 20), peak


def test_bomb_at_the_default_limit_stays_well_under_100_mib(bombs: dict[str, bytes]) -> None:
    sealer = Sealer(RING)
    for which in ("honest-1GiB", "lies-1000", "lies-max", "undeclared"):
        stored = _sealed_bomb(bombs[which], True)
        tracemalloc.start()
        try:
            msg = refused(sealer, stored)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        print(f"{which}: peak {peak / 2**20:.1f} MiB; {msg.split(': ', 1)[1][:70]}")
        assert peak < MAX_PLAIN_DEFAULT + (4 << 20) < 100 << 20


def _child_env() -> dict[str, str]:
    """The environment for a child Python that imports this very crashsafe."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC.parent), os.environ.get("PYTHONPATH", "")])}


def test_bomb_in_a_child_process_keeps_rss_bounded(tmp_path: Path) -> None:
    # tracemalloc does not see zstd's own allocations; the child's peak RSS does.
    script = textwrap.dedent("""
        import io, resource, sys, zstandard
        sys.path.insert(0, sys.argv[1])
        from test_seal import _bomb, forge, CTX
        from crashsafe import CorruptRecordError
        from crashsafe._seal import Sealer
        frame = _bomb(1 << 30)
        stored = forge(CTX, frame, flags=0x01)
        lying = forge(CTX, frame[:6] + (1000).to_bytes(4, "little") + frame[10:], flags=0x01)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for record in (stored, lying, forge(CTX, _bomb(None), flags=0x01)):
            try:
                Sealer(None).open(record, CTX)
            except CorruptRecordError:
                pass
            else:
                raise SystemExit("bomb accepted")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=240, check=True,
                         env=_child_env())
    grew_mib = int(out.stdout.strip())
    assert grew_mib < 32, out.stdout


def test_oversized_uncompressed_body_is_refused_before_decryption() -> None:
    sealer = Sealer(RING, max_plain=1000)
    stored = forge_encrypted(CTX, bytes(2000), flags=0x02)
    refused(sealer, stored, CTX, "too large")
    refused(Sealer(None, max_plain=1000), forge(CTX, bytes(2000)), CTX, "too large")


def test_frame_declaring_zero_bytes_with_trailing_data_is_refused() -> None:
    frame = zstandard.ZstdCompressor().compress(b"") + b"smuggled"
    refused(plain(), forge(CTX, frame, flags=0x01), CTX, "does not declare")


def test_frame_with_extra_data_after_it_is_refused() -> None:
    frame = zstandard.ZstdCompressor().compress(STATE)
    refused(plain(), forge(CTX, frame + frame, flags=0x01), CTX, "garbled")


# -- S1: hostile stored bytes ---------------------------------------------------------------

SEALERS = [plain(), encrypted(), encrypted(allow_plaintext=True)]


def _open_any(stored: bytes, ctx: RecordContext = CTX) -> None:
    for sealer in SEALERS:
        try:
            sealer.open(stored, ctx)
        except CorruptRecordError:
            pass
        try:
            sealer.needs_rotation(stored, ctx)
            record_info(stored, ctx)
        except CorruptRecordError:
            pass


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_corrupt_record_error(data: bytes) -> None:
    _open_any(data)
    _open_any(MAGIC + data)
    _open_any(MAGIC + b"\x01" + data)


@FAST
@given(flags=st.integers(0, 255), id_len=st.integers(0, 255), tail=st.binary(max_size=200))
def test_hostile_headers_with_valid_checksums_only_raise_corrupt_record_error(
        flags: int, id_len: int, tail: bytes) -> None:
    header = MAGIC + bytes((1, flags, id_len))
    stored = header + tail + hashlib.sha256(CTX.encode() + header + tail).digest()
    _open_any(stored)


@FAST
@given(st.binary(max_size=400))
def test_garbage_bodies_behind_valid_checksums_only_raise_corrupt_record_error(
        body: bytes) -> None:
    for flags in (0x01, 0x03):
        _open_any(forge(CTX, body, flags=flags, key_id=b"k1" if flags & 2 else b"",
                        nonce=bytes(12) if flags & 2 else b""))
    _open_any(forge_encrypted(CTX, body, flags=0x03))
    _open_any(forge(CTX, zstandard.ZstdCompressor().compress(STATE)[:18] + body, flags=0x01))


@pytest.mark.parametrize("stored", [
    b"", b"\x00", b"\xc5", b"\xc5C", MAGIC, MAGIC + b"\x01", MAGIC + b"\x01\xff\xff",
    MAGIC + b"\x01\x02\xff" + bytes(300), MAGIC + b"\x01\x02\x20" + bytes(60),
    MAGIC + b"\xff" + bytes(100), b"\x80\x04\x95" + bytes(50),  # a pickle stream
    b"\x28\xb5\x2f\xfd" + bytes(64),  # a bare zstd frame
], ids=repr)
def test_malformed_envelopes_are_refused(stored: bytes) -> None:
    for sealer in SEALERS:
        refused(sealer, stored)


def _dangerous_calls(tree: ast.AST) -> list[str]:
    bad_modules = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle",
                   "jsonpickle", "yaml"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in bad_modules]
        elif isinstance(node, ast.ImportFrom) and node.module \
                and node.module.split(".")[0] in bad_modules:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Name) and fn.id in {"eval", "exec", "__import__"}:
                found.append(fn.id)
            if isinstance(fn, ast.Attribute) and fn.attr in {"eval", "exec"} \
                    and isinstance(fn.value, ast.Name) and fn.value.id == "builtins":
                found.append(f"builtins.{fn.attr}")
    return found


def test_package_has_no_pickle_marshal_or_eval() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    offenders = {str(f.relative_to(SRC)): bad for f in files
                 if (bad := _dangerous_calls(ast.parse(f.read_text(encoding="utf-8"))))}
    assert offenders == {}
    assert _dangerous_calls(ast.parse("import pickle\neval('1')\nfrom marshal import loads"))


def test_tamper_checks_hold_under_python_dash_o() -> None:
    script = textwrap.dedent("""
        import sys
        assert False, "asserts are on"
    """)
    # Sanity: under -O the assert above is stripped and the script succeeds.
    subprocess.run([sys.executable, "-O", "-c", script], check=True)
    script = textwrap.dedent("""
        import sys
        from crashsafe import CorruptRecordError
        from crashsafe._keys import Keyring
        from crashsafe._seal import RecordContext, Sealer
        if sys.flags.optimize != 1:
            sys.exit("not running under -O")
        ctx = RecordContext("wf", 1, "output")
        enc, plain = Sealer(Keyring.generate("k1")), Sealer(None)
        data = b'{"state": "' + b"x" * 500 + b'"}'
        cases = []
        s = bytearray(enc.seal(data, ctx)); s[40] ^= 1; cases.append((enc, bytes(s), ctx))
        cases.append((enc, enc.seal(data, ctx), RecordContext("wf", 2, "output")))
        cases.append((enc, plain.seal(data, ctx), ctx))
        cases.append((enc, data, ctx))
        cases.append((Sealer(Keyring.generate("k1")), enc.seal(data, ctx), ctx))
        cases.append((plain, plain.seal(data, ctx)[:-1], ctx))
        for sealer, stored, where in cases:
            try:
                sealer.open(stored, where)
            except CorruptRecordError:
                continue
            sys.exit("accepted a bad record under -O")
        print("all rejected")
    """)
    out = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True,
                         text=True, timeout=60, env=_child_env())
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.strip() == "all rejected"


def test_seal_module_has_no_assert_statements() -> None:
    for name in ("_seal.py", "_keys.py", "_secrets.py"):
        tree = ast.parse((SRC / name).read_text(encoding="utf-8"))
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Assert)], name


# -- key rotation building blocks ----------------------------------------------------------------


def _ring_of(*ids: str) -> Keyring:
    keys = {"k1": KEY_A, "k2": KEY_B, "k3": KEY_C}
    return Keyring({i: keys[i] for i in ids})


def test_reseal_moves_a_record_to_the_active_key() -> None:
    old = Sealer(_ring_of("k1"))
    new = Sealer(_ring_of("k2", "k1"))
    stored = old.seal(STATE, CTX)
    assert new.needs_rotation(stored) and not old.needs_rotation(stored)
    rotated = new.reseal(stored, CTX)
    assert record_info(rotated).key_id == "k2"
    assert not new.needs_rotation(rotated)
    assert Sealer(_ring_of("k2")).open(rotated, CTX) == STATE
    refused(Sealer(_ring_of("k1")), rotated, CTX, "'k2'", "not in the keyring")


def test_every_record_is_readable_with_exactly_one_key_of_the_ring() -> None:
    # A rotation cut off half way (as by kill -9): some records moved, some not.
    old, new = Sealer(_ring_of("k1")), Sealer(_ring_of("k2", "k1"))
    records = []
    for i in range(20):
        ctx = RecordContext("wf", i, "checkpoint")
        records.append((ctx, old.seal(STATE + bytes([i]), ctx)))
    for n, (ctx, stored) in enumerate(records):
        if n % 2 and new.needs_rotation(stored, ctx):
            records[n] = (ctx, new.reseal(stored, ctx))
    singles = [Sealer(_ring_of(k)) for k in ("k1", "k2", "k3")]
    for ctx, stored in records:
        assert new.open(stored, ctx)[:-1] == STATE
        readable = []
        for single in singles:
            try:
                single.open(stored, ctx)
                readable.append(single)
            except CorruptRecordError:
                pass
        assert len(readable) == 1
    # Resuming finishes the job; afterwards the old key can be retired.
    records = [(c, new.reseal(s, c) if new.needs_rotation(s, c) else s) for c, s in records]
    assert not any(new.needs_rotation(s) for _, s in records)
    assert all(Sealer(_ring_of("k2")).open(s, c)[:-1] == STATE for c, s in records)


def test_reseal_of_plaintext_needs_allow_plaintext() -> None:
    legacy = b'{"written": "before encryption"}'
    unencrypted = plain().seal(STATE, CTX)
    for stored, expected in ((legacy, legacy), (unencrypted, STATE)):
        refused(encrypted(), stored)
        with pytest.raises(CorruptRecordError):
            encrypted().reseal(stored, CTX)
        migrated = encrypted(allow_plaintext=True).reseal(stored, CTX)
        assert encrypted().open(migrated, CTX) == expected


def test_reseal_to_another_place_for_a_fork() -> None:
    sealer = encrypted()
    stored = sealer.seal(STATE, CTX)
    fork = RecordContext("wf-1-fork", 3, "output")
    copied = sealer.reseal(stored, CTX, to=fork)
    assert sealer.open(copied, fork) == STATE
    refused(sealer, copied, CTX)


def test_reseal_refuses_a_corrupt_record() -> None:
    stored = bytearray(Sealer(_ring_of("k1")).seal(STATE, CTX))
    stored[30] ^= 4
    refused(Sealer(_ring_of("k2", "k1")), bytes(stored))
    with pytest.raises(CorruptRecordError, match="checksum"):
        Sealer(_ring_of("k2", "k1")).reseal(bytes(stored), CTX)


def test_needs_rotation_without_a_keyring_is_always_false() -> None:
    for stored in (b"{}", plain().seal(STATE, CTX), encrypted().seal(STATE, CTX)):
        assert plain().needs_rotation(stored) is False
    with pytest.raises(CorruptRecordError, match="index 3"):
        encrypted().needs_rotation(b"\x00garbage", CTX)
    with pytest.raises(CorruptRecordError, match="stored record"):
        encrypted().needs_rotation(b"")


# -- keyrings ----------------------------------------------------------------------------------


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_keyring_from_env_forms() -> None:
    ring = Keyring.from_env(environ={KEYS_ENV: f" k2={b64(KEY_B)} , k1={b64(KEY_A)},"})
    assert ring is not None
    assert ring.active_id == "k2" and ring.ids == ("k2", "k1") and len(ring) == 2
    assert "k1" in ring and "k9" not in ring
    assert Keyring.from_env(environ={}) is None
    assert Keyring.from_env(environ={KEYS_ENV: "  "}) is None
    urlsafe = base64.urlsafe_b64encode(KEY_C).decode().rstrip("=")
    ring = Keyring.from_env(environ={KEYS_ENV: f"k3={urlsafe}"})
    assert ring is not None and ring.export() == f"k3={b64(KEY_C)}"
    ring = Keyring.from_env("MY_KEYS", environ={"MY_KEYS": f"a.b_c-1={b64(KEY_A)}"})
    assert ring is not None and ring.active_id == "a.b_c-1"


def test_keyring_round_trips_through_export_and_the_real_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ring = Keyring({"k1": KEY_A, "k2": KEY_B}, active="k2")
    assert ring.export().startswith("k2=")
    monkeypatch.setenv(KEYS_ENV, ring.export())
    again = Keyring.from_env()
    assert again is not None and again.active_id == "k2" and set(again.ids) == {"k1", "k2"}
    stored = Sealer(ring).seal(STATE, CTX)
    assert Sealer(again).open(stored, CTX) == STATE
    generated = Keyring.generate("fresh")
    assert generated.active_id == "fresh"
    assert Keyring.parse(generated.export()).export() == generated.export()


def _key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "keys"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_keyring_from_a_key_file(tmp_path: Path) -> None:
    path = _key_file(tmp_path, f"# rotated 2026-05\n\n k2 = {b64(KEY_B)}\n"
                               f"# old\nk1={b64(KEY_A)}\n")
    ring = Keyring.from_env(environ={KEYS_ENV: f"file:{path}"})
    assert ring is not None and ring.active_id == "k2" and ring.ids == ("k2", "k1")
    assert Keyring.from_file(path).ids == ("k2", "k1")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602])
def test_a_key_file_others_can_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, f"k1={b64(KEY_A)}\n", mode)
    with pytest.raises(ConfigurationError, match="chmod 600") as info:
        Keyring.from_env(environ={KEYS_ENV: f"file:{path}"})
    assert oct(stat.S_IMODE(mode))[2:] in str(info.value)
    assert b64(KEY_A) not in str(info.value)


def test_key_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read key file"):
        Keyring.from_file(tmp_path / "missing")
    with pytest.raises(ConfigurationError, match="not a regular file"):
        Keyring.from_file(tmp_path)
    with pytest.raises(ConfigurationError, match="holds no keys"):
        Keyring.from_file(_key_file(tmp_path, "# nothing here\n"))
    with pytest.raises(ConfigurationError, match="line 3"):
        Keyring.from_file(_key_file(tmp_path, f"k1={b64(KEY_A)}\n#\nk2=AAAA\n"))


CANARY_KEY = bytes.fromhex("c0ffee" * 10 + "ab1e")
CANARY_B64 = b64(CANARY_KEY)


def _leaks(text: str) -> bool:
    forms = [CANARY_B64, CANARY_B64.rstrip("="), CANARY_KEY.hex(), repr(CANARY_KEY),
             base64.urlsafe_b64encode(CANARY_KEY).decode().rstrip("="), CANARY_B64[:20]]
    return any(f in text for f in forms)


@pytest.mark.parametrize(("value", "fragment"), [
    (f"k1={CANARY_B64[:-4]}", "is 30 bytes"),  # wrong length
    (f"k1={CANARY_B64}!", "not valid base64"),
    (f"k1={CANARY_B64}A", "not valid base64"),
    (f"k1={b64(CANARY_KEY + b'xx')}", "is 34 bytes"),
    (f"k1={CANARY_B64},k1={b64(KEY_A)}", "'k1' already appears at entry 1"),
    (f"k1={CANARY_B64},k2={CANARY_B64}", "same key"),
    (CANARY_B64, "invalid key id"),  # the key pasted without an id: "=" splits it
    (f"{CANARY_B64[:30]}={b64(KEY_A)}", "invalid key id"),
    (f"bad id={CANARY_B64}", "invalid key id"),
    (f"k1{CANARY_B64[:-1]}", "expected id=<base64>"),
    (",,", "holds no keys"),
], ids=lambda v: v if len(v) < 20 else None)
def test_bad_key_configuration_is_explained_without_echoing_keys(value: str,
                                                                 fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Keyring.from_env(environ={KEYS_ENV: value})
    text = "".join(traceback.format_exception(info.value))
    assert fragment in str(info.value)
    assert KEYS_ENV in str(info.value)
    assert not _leaks(text), text


@pytest.mark.parametrize(("keys", "kw", "fragment"), [
    ({}, {}, "at least one key"),
    ({"k1": CANARY_KEY[:16]}, {}, "got 16"),
    ({"k1": "x" * 32}, {}, "not bytes"),
    ({"k 1": CANARY_KEY}, {}, "key id is invalid"),
    ({"k1": CANARY_KEY, "k2": CANARY_KEY}, {}, "same key"),
    ({"k1": CANARY_KEY}, {"active": "k2"}, "'k2' is not in the keyring"),
])
def test_keyring_constructor_errors(keys: dict[str, bytes], kw: dict[str, str],
                                    fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment) as info:
        Keyring(keys, **kw)
    assert not _leaks("".join(traceback.format_exception(info.value)))


def test_key_material_never_appears_in_repr_str_errors_or_pickles() -> None:
    import pickle  # only to prove pickling is refused

    ring = Keyring({"canary": CANARY_KEY, "k1": KEY_A})
    sealer = Sealer(ring)
    texts = [repr(ring), str(ring), repr(sealer), str(sealer), repr([ring, sealer])]
    stored = sealer.seal(STATE, CTX)
    errors: list[BaseException] = []
    for bad_sealer, bad in (
        (Sealer(Keyring({"canary": KEY_B})), stored),  # wrong key
        (sealer, stored[:-1]),
        (Sealer(Keyring({"other": CANARY_KEY})), stored),  # unknown id
        (sealer, b'{"plain": 1}'),
        (sealer, plain().seal(STATE, CTX)),
    ):
        with pytest.raises(CorruptRecordError) as info:
            bad_sealer.open(bad, CTX)
        errors.append(info.value)
    with pytest.raises(TypeError, match="cannot be pickled") as pick:
        pickle.dumps(ring)
    errors.append(pick.value)
    texts += ["".join(traceback.format_exception(e)) for e in errors]
    for text in texts:
        assert not _leaks(text), text
    assert CANARY_KEY not in stored


# -- performance sanity (printed, not asserted) ------------------------------------------------


def _timed(fn: Callable[[], object], n: int = 200) -> Iterator[float]:
    for _ in range(n):
        t = time.perf_counter()
        fn()
        yield (time.perf_counter() - t) * 1e6


def test_seal_and_open_of_a_100_kb_state_is_fast() -> None:
    state = json.dumps({"messages": [
        {"role": "user" if i % 2 else "assistant",
         "content": f"turn {i}: " + " ".join(f"word{(i * 7 + j) % 997}" for j in range(60))}
        for i in range(250)]}).encode()[:100_000]
    ctx = RecordContext("bench", 0, "checkpoint")
    for name, sealer in (("compressed", plain()), ("compressed+encrypted", encrypted())):
        times = sorted(_timed(lambda s=sealer: s.open(s.seal(state, ctx), ctx)))
        stored = sealer.seal(state, ctx)
        print(f"seal+open 100 KB {name}: p50 {times[len(times) // 2]:.0f} us, "
              f"p99 {times[int(len(times) * 0.99)]:.0f} us, stored {len(stored)} bytes")
