"""Sealed records: how every stored payload is compressed, encrypted and checksummed.

The codec (``_codec``) turns a value into JSON bytes; this module turns those bytes into
the record a store keeps, and back. Sealing is: compress with zstd (when that saves
bytes), encrypt with AES-256-GCM (when a keyring is configured), then append a SHA-256
checksum. Opening reverses it and checks everything before a single byte is trusted.

Record format, version 1 (all integers big-endian)::

    offset  size  field
    0       3     magic: C5 43 53 (0xC5 "CS"); 0xC5 can never start JSON text
    3       1     format version: 1
    4       1     flags: bit 0 = body is a zstd frame, bit 1 = body is AES-256-GCM
                  ciphertext; bits 2-7 are zero
    5       1     n = length of the key id: 1..32 when encrypted, 0 otherwise
    6       n     key id, ASCII ``[A-Za-z0-9][A-Za-z0-9._-]*``
    6+n     12    nonce (random; only when encrypted)
    h       ...   body: the payload, zstd-compressed if bit 0, then encrypted if bit 1
                  (ciphertext followed by the 16-byte GCM tag)
    end-32  32    SHA-256 over context || header || body

``header`` is bytes 0..h. ``context`` binds the record to its place in the store::

    u32 length, workflow id (UTF-8) | i64 index | u16 length, kind (UTF-8)

(lone surrogates in either string are encoded as they are, "surrogatepass").

The AES-GCM associated data is ``header || context``: the format version, the flags,
the key id and the nonce are authenticated along with the workflow id, the index
and the kind, so a ciphertext copied to another workflow, step or record kind, or
with its flags edited (say, "not compressed"), fails authentication.

Compression is bounded on read: a zstd frame must declare its decompressed size, that
size must not exceed ``max_plain``, and the decompressor gets an output buffer of
exactly that size, so a decompression bomb is refused before it is expanded and a frame
that lies about its size fails as soon as it overruns. Peak memory for a hostile
record is at most ``max_plain`` plus the zstd context (a few MiB).

Records written before sealing existed are bare JSON: their first byte is one of
``{["-0123456789tfn`` or JSON whitespace, which never starts a sealed record, and they
are UTF-8 without raw control bytes, which every sealed record holds (so a sealed
record whose first bytes were damaged is not taken for plaintext). They are
returned unchanged while encryption is off, and refused while it is on (unless the
sealer was built with ``allow_plaintext=True`` for a migration), so nobody can slip a
forged plaintext record past encryption.

Threat model, honestly:

* The SHA-256 checksum detects accidental damage (bit rot, torn or truncated writes,
  zeroed pages, a buggy backup) and records copied to the wrong place (it covers the
  context). It is not a defence against someone who can write to the database: they
  can recompute it. Without encryption, such a person can forge any record.
* With encryption on, the GCM tag is what stops tampering: altering a record, moving
  it to another workflow, index or kind, stripping its encryption, or presenting
  plaintext is detected without the key.
* Not detected here: a record deleted outright, or replaced by an *older version of
  the same slot* (same workflow id, index and kind). Journal records are written
  once, so the latter only matters for rows that are overwritten; those need a
  revision number in ``index`` or ``kind``.
* Nonces are random 96-bit values: keep each key well below 2**32 records (rotate
  keys long before that). Key material lives in Python ``bytes``, which cannot be
  wiped from memory; it never appears in ``repr``, ``str`` or exception text.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
import threading
from dataclasses import dataclass

import zstandard
from cryptography.exceptions import InvalidTag

from ._keys import KEYS_ENV, Keyring
from .exceptions import ConfigurationError, CorruptRecordError, SerializationError

MAGIC = b"\xc5CS"
"""The first three bytes of every sealed record."""
FORMAT_VERSION = 1
"""The record format this module writes and reads."""
MAX_PLAIN_DEFAULT = 64 * 1024 * 1024
"""Default limit on a record's size once opened: 64 MiB."""

_COMPRESSED = 0x01
_ENCRYPTED = 0x02
_NONCE = 12
_TAG = 16
_DIGEST = 32
_FIXED = len(MAGIC) + 3  # magic, version, flags, key id length
_MAX_LEVEL = 19  # levels 20-22 need windows past _MAX_WINDOW
_MAX_WINDOW = 1 << 23
_LEGACY_FIRST = frozenset(b'{["-0123456789tfn \t\r\n')
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_I64 = struct.Struct(">q")


# --- record context -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordContext:
    """Where a record lives: the checksum and the encryption are bound to it.

    ``kind`` says what the record is (``"inputs"``, ``"output"``, ``"error"``,
    ``"signal"``, ``"checkpoint"``, ...); ``index`` is the step index or any other
    position that is unique within the workflow and kind.
    """

    workflow_id: str
    index: int
    kind: str

    def __post_init__(self) -> None:
        if not isinstance(self.workflow_id, str) or not isinstance(self.kind, str):
            raise TypeError("RecordContext: workflow_id and kind must be str")
        if isinstance(self.index, bool) or not isinstance(self.index, int):
            raise TypeError("RecordContext: index must be an int")
        if not -(2**63) <= self.index < 2**63:
            raise ValueError("RecordContext: index must fit in a signed 64-bit integer")

    def encode(self) -> bytes:
        """The length-prefixed bytes the checksum and the associated data cover."""
        wid = self.workflow_id.encode("utf-8", "surrogatepass")
        kind = self.kind.encode("utf-8", "surrogatepass")
        if len(wid) >= 2**32 or len(kind) >= 2**16:
            raise ValueError("RecordContext: workflow_id or kind is too long")
        return b"".join((len(wid).to_bytes(4, "big"), wid, _I64.pack(self.index),
                         len(kind).to_bytes(2, "big"), kind))

    def describe(self) -> str:
        """How error messages name the record."""
        wid = self.workflow_id if len(self.workflow_id) <= 200 else self.workflow_id[:200] + "..."
        return f"record {self.kind!r} at index {self.index} of workflow {wid!r}"


def _refused(ctx: RecordContext | None, reason: str) -> CorruptRecordError:
    if ctx is None:
        return CorruptRecordError(f"stored record was not used: {reason}")
    return CorruptRecordError(f"{ctx.describe()} was not used: {reason}", ctx.workflow_id,
                              ctx.index, ctx.kind)


# --- sealing --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """What a stored record's header says (read without checking anything else)."""

    sealed: bool
    """False for legacy bare JSON written before sealing existed."""
    compressed: bool
    encrypted: bool
    key_id: str | None
    version: int | None


_LEGACY = RecordInfo(sealed=False, compressed=False, encrypted=False, key_id=None,
                     version=None)


def _is_legacy(data: bytes) -> bool:
    """Whether ``data`` is bare JSON from before sealing. JSON text is UTF-8 without raw
    control bytes; a sealed record always holds some (its header, its checksum), so a
    damaged one whose first byte turned JSON-like is not taken for plaintext."""
    if data[0] not in _LEGACY_FIRST or _CONTROL.search(data) is not None:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _envelope(data: bytes, ctx: RecordContext | None) -> None:
    """Check what must hold before the checksum can be located: magic, version, size."""
    if not data.startswith(MAGIC):
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            raise _refused(ctx, f"it is truncated ({len(data)} bytes)")
        detail = " but holds raw control bytes or invalid UTF-8" \
            if data[0] in _LEGACY_FIRST else ""
        raise _refused(ctx, "it is neither a sealed crashsafe record nor legacy JSON "
                            f"(it starts with byte 0x{data[0]:02x}{detail})")
    if len(data) <= len(MAGIC):
        raise _refused(ctx, f"it is truncated ({len(data)} bytes)")
    if data[3] != FORMAT_VERSION:
        raise _refused(ctx, f"it uses record format version {data[3]}, but this crashsafe "
                            f"reads version {FORMAT_VERSION} (upgrade crashsafe, or the "
                            "header is damaged)")
    if len(data) < _FIXED + _DIGEST:
        raise _refused(ctx, f"it is truncated ({len(data)} bytes; a sealed record has at "
                            f"least {_FIXED + _DIGEST})")


def _header(data: bytes, ctx: RecordContext | None) -> tuple[int, int, str | None]:
    """Parse the rest of the header; return (body start, flags, key id or None)."""
    flags, id_len = data[4], data[5]
    if flags & ~(_COMPRESSED | _ENCRYPTED):
        raise _refused(ctx, f"its header is garbled (unknown flags 0x{flags:02x})")
    encrypted = bool(flags & _ENCRYPTED)
    if encrypted != (id_len > 0) or id_len > 32:
        raise _refused(ctx, f"its header is garbled (key id length {id_len} with flags "
                            f"0x{flags:02x})")
    start = _FIXED + id_len + (_NONCE if encrypted else 0)
    minimum = start + (_TAG if encrypted else 0) + _DIGEST
    if len(data) < minimum:
        raise _refused(ctx, f"it is truncated ({len(data)} bytes; its header needs at "
                            f"least {minimum})")
    key_id = data[_FIXED:_FIXED + id_len].decode("ascii", "backslashreplace") \
        if encrypted else None
    return start, flags, key_id


def record_info(stored: bytes | bytearray | memoryview,
                ctx: RecordContext | None = None) -> RecordInfo:
    """Read a record's header without verifying it (for rotation and reporting).

    Raises :class:`CorruptRecordError` if the header itself is unreadable.
    """
    data = bytes(stored)
    if not data:
        raise _refused(ctx, "it is empty")
    if _is_legacy(data):
        return _LEGACY
    _envelope(data, ctx)
    _, flags, key_id = _header(data, ctx)
    return RecordInfo(sealed=True, compressed=bool(flags & _COMPRESSED),
                      encrypted=bool(flags & _ENCRYPTED), key_id=key_id,
                      version=data[3])


class _Zstd(threading.local):
    # zstandard's contexts are not safe to share between threads.
    def __init__(self, level: int) -> None:
        self.compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self.decompressor = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)


class Sealer:
    """Seals payload bytes into stored records and opens them again, verified.

    ``keyring=None`` turns encryption off (records are still compressed and
    checksummed). ``compress_min``: payloads shorter than this are stored
    uncompressed; longer ones are compressed only if that saves bytes. ``level``:
    the zstd level, 1 to 19. ``max_plain``: the largest payload accepted, before
    compression on write and after decompression on read. ``allow_plaintext``: with
    a keyring, still open legacy plaintext and unencrypted records (for migrating a
    store to encryption only; otherwise they are refused as a downgrade).

    A ``Sealer`` is safe to share between threads.
    """

    __slots__ = ("_allow_plaintext", "_compress_min", "_keyring", "_level", "_max_plain",
                 "_zstd")

    def __init__(self, keyring: Keyring | None = None, *, compress_min: int = 256,
                 level: int = 3, max_plain: int = MAX_PLAIN_DEFAULT,
                 allow_plaintext: bool = False) -> None:
        if keyring is not None and not isinstance(keyring, Keyring):
            raise ConfigurationError("keyring must be a crashsafe Keyring or None")
        if isinstance(level, bool) or not isinstance(level, int) \
                or not 1 <= level <= _MAX_LEVEL:
            raise ConfigurationError(f"level must be an int from 1 to {_MAX_LEVEL}")
        if isinstance(compress_min, bool) or not isinstance(compress_min, int) \
                or compress_min < 0:
            raise ConfigurationError("compress_min must be an int >= 0")
        if isinstance(max_plain, bool) or not isinstance(max_plain, int) or max_plain < 1:
            raise ConfigurationError("max_plain must be an int >= 1")
        self._keyring = keyring
        self._compress_min = compress_min
        self._level = level
        self._max_plain = max_plain
        self._allow_plaintext = allow_plaintext
        self._zstd = _Zstd(level)

    @property
    def keyring(self) -> Keyring | None:
        """The keyring, or ``None`` when encryption is off."""
        return self._keyring

    @property
    def encrypted(self) -> bool:
        """Whether new records are encrypted (and unencrypted ones refused)."""
        return self._keyring is not None

    def __repr__(self) -> str:
        active = self._keyring.active_id if self._keyring is not None else None
        return (f"Sealer(encrypted={self.encrypted}, active_key={active!r}, "
                f"compress_min={self._compress_min}, level={self._level}, "
                f"max_plain={self._max_plain}, allow_plaintext={self._allow_plaintext})")

    def seal(self, plain: bytes, ctx: RecordContext) -> bytes:
        """Turn payload bytes into a stored record bound to ``ctx``."""
        size = len(plain)
        if size > self._max_plain:
            raise SerializationError(
                f"{ctx.describe()}: the payload is {size} bytes, over the limit of "
                f"{self._max_plain} (max_plain); store large data elsewhere and keep a "
                "reference in the workflow")
        context = ctx.encode()
        flags = 0
        body = bytes(plain)
        if size >= self._compress_min:
            packed = self._zstd.compressor.compress(body)
            if len(packed) < size:
                body, flags = packed, _COMPRESSED
        keyring = self._keyring
        if keyring is None:
            header = MAGIC + bytes((FORMAT_VERSION, flags, 0))
        else:
            key_id = keyring.active_id.encode("ascii")
            nonce = os.urandom(_NONCE)
            header = b"".join((MAGIC, bytes((FORMAT_VERSION, flags | _ENCRYPTED,
                                             len(key_id))), key_id, nonce))
            aead = keyring._aead_for(keyring.active_id)
            if aead is None:  # pragma: no cover - the constructor guarantees it
                raise ConfigurationError("the active key is missing from the keyring")
            body = aead.encrypt(nonce, body, header + context)
        digest = hashlib.sha256(context)
        digest.update(header)
        digest.update(body)
        return b"".join((header, body, digest.digest()))

    def open(self, stored: bytes | bytearray | memoryview, ctx: RecordContext) -> bytes:
        """Verify a stored record and return its payload bytes.

        Raises :class:`CorruptRecordError` naming the record and the reason when the
        checksum or the authentication fails, the key is unknown, the record is
        truncated, garbled, too large, or unencrypted while encryption is on.
        """
        data = stored if isinstance(stored, bytes) else bytes(stored)
        if not data:
            raise _refused(ctx, "it is empty")
        if _is_legacy(data):
            if self._keyring is not None and not self._allow_plaintext:
                raise _refused(ctx, "it is unencrypted plaintext but encryption is on "
                                    "(refused so a forged record cannot bypass encryption); "
                                    "records written before encryption was turned on are "
                                    "migrated by `crashsafe keys rotate`")
            return data
        _envelope(data, ctx)
        context = ctx.encode()
        end = len(data) - _DIGEST
        digest = hashlib.sha256(context)
        digest.update(memoryview(data)[:end])
        if not hmac.compare_digest(digest.digest(), data[end:]):
            raise _refused(ctx, "SHA-256 checksum mismatch: the stored bytes are damaged, "
                                "or the record was copied from another workflow, index or "
                                "kind; `crashsafe verify` lists every damaged record")
        start, flags, key_id = _header(data, ctx)
        if end - start > self._max_plain + _TAG:
            raise _refused(ctx, f"it is too large ({end - start} bytes; the limit is "
                                f"{self._max_plain}, max_plain)")
        if key_id is not None:
            body = self._decrypt(data, start, end, key_id, context, ctx)
        elif self._keyring is not None and not self._allow_plaintext:
            raise _refused(ctx, "its header says it is not encrypted but encryption is on "
                                "(refused as a possible downgrade); records written before "
                                "encryption was turned on are migrated by "
                                "`crashsafe keys rotate`")
        else:
            body = data[start:end]
        if flags & _COMPRESSED:
            return self._decompress(body, ctx)
        return body

    def _decrypt(self, data: bytes, start: int, end: int, key_id: str, context: bytes,
                 ctx: RecordContext) -> bytes:
        keyring = self._keyring
        aead = keyring._aead_for(key_id) if keyring is not None else None
        if aead is None:
            where = "no keyring is configured" if keyring is None else \
                f"the keyring holds {', '.join(map(repr, keyring.ids))}"
            raise _refused(ctx, f"it is encrypted with key id {key_id!r}, which is not in "
                                f"the keyring ({where}); add that key to "
                                f"${KEYS_ENV} (retire a key only after "
                                "`crashsafe keys rotate`)")
        nonce = data[start - _NONCE:start]
        try:
            return aead.decrypt(nonce, data[start:end], data[:start] + context)
        except InvalidTag:
            raise _refused(ctx, f"authentication failed: key {key_id!r} in the keyring is "
                                "not the key this record was sealed with, or the record was "
                                "altered or moved from another workflow, index or kind"
                           ) from None

    def _decompress(self, body: bytes, ctx: RecordContext) -> bytes:
        try:
            declared = zstandard.frame_content_size(body)
        except zstandard.ZstdError:
            raise _refused(ctx, "its compressed body is garbled (no valid zstd frame "
                                "header)") from None
        if declared < 1:
            raise _refused(ctx, "its compressed body does not declare its size (crashsafe "
                                "always writes it), so it is not expanded")
        if declared > self._max_plain:
            raise _refused(ctx, f"it is too large after decompression ({declared} bytes; "
                                f"the limit is {self._max_plain}, max_plain)")
        try:
            # With a declared size, zstandard allocates exactly that much and fails
            # as soon as the frame produces more: memory stays within max_plain.
            plain = self._zstd.decompressor.decompress(
                body, max_output_size=self._max_plain, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise _refused(ctx, "its compressed body is garbled or expands past its "
                                f"declared size ({exc})") from None
        if len(plain) != declared:  # pragma: no cover - zstandard checks this too
            raise _refused(ctx, "its compressed body does not match its declared size")
        return plain

    def needs_rotation(self, stored: bytes | bytearray | memoryview,
                       ctx: RecordContext | None = None) -> bool:
        """Whether :meth:`reseal` would change how the record is protected: it is
        sealed with a key other than the active one, or it is plaintext or
        unencrypted while encryption is on. Always ``False`` with encryption off.

        Reads only the header (the checksum is checked by :meth:`reseal`).
        """
        info = record_info(stored, ctx)
        if self._keyring is None:
            return False
        return not info.encrypted or info.key_id != self._keyring.active_id

    def reseal(self, stored: bytes | bytearray | memoryview, ctx: RecordContext, *,
               to: RecordContext | None = None) -> bytes:
        """Open a record with whichever key of the ring sealed it and seal it again
        with the active key (and fresh nonce), bound to ``to`` (default: ``ctx``, the
        same place; another context when a fork copies a record to a new workflow).

        Plaintext records are accepted only by a sealer built with
        ``allow_plaintext=True``.
        """
        return self.seal(self.open(stored, ctx), ctx if to is None else to)


__all__ = [
    "FORMAT_VERSION",
    "KEYS_ENV",
    "MAGIC",
    "MAX_PLAIN_DEFAULT",
    "Keyring",
    "RecordContext",
    "RecordInfo",
    "Sealer",
    "record_info",
]
