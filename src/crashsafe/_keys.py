"""Keyrings: the named AES-256 keys that seal records, and where they come from.

``$CRASHSAFE_KEYS`` holds either the keys themselves, ``id1=<base64>,id2=<base64>``
(the first key is active), or ``file:/path/to/keys``: a file, readable by its owner
only, with one ``id=<base64>`` per line and ``#`` comment lines. A key is 32 random
bytes in standard or URL-safe base64; ``Keyring.generate("k2").export()`` makes one.

Rotation: put the new key first (it becomes active, the old ones still open their
records), run ``crashsafe keys rotate``, then retire the old key.

Key material never appears in ``repr``, ``str`` or exception text: messages name key
ids and positions (``entry 2``, ``line 5``), and a malformed entry's id is not echoed
because it may be key material pasted in the wrong place.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .exceptions import ConfigurationError

KEYS_ENV = "CRASHSAFE_KEYS"
"""The environment variable :meth:`Keyring.from_env` reads."""

KEY_BYTES = 32
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_KEY_ID_RULE = "1-32 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"


def _decode_key(text: str, where: str) -> bytes:
    cleaned = "".join(text.split()).translate(str.maketrans("-_", "+/"))
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        raw = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(
            f"{where}: the key is not valid base64; create a key with: "
            "openssl rand -base64 32"
        ) from None
    if len(raw) != KEY_BYTES:
        raise ConfigurationError(
            f"{where}: the key is {len(raw)} bytes but AES-256 needs exactly {KEY_BYTES} "
            "(44 base64 characters); create a key with: openssl rand -base64 32"
        )
    return raw


class Keyring:
    """Named AES-256 keys: one *active* key seals new records, every key opens records.

    ``Keyring({"k2": key2, "k1": key1}, active="k2")``; ``active`` defaults to the
    first key. Key ids are 1-32 characters (letters, digits, ``.``, ``_``, ``-``).
    Key material never appears in ``repr``, ``str`` or exception text, and a keyring
    cannot be pickled; :meth:`export` is the one explicit way to read it back out.
    """

    __slots__ = ("_active", "_aead", "_raw")

    def __init__(self, keys: Mapping[str, bytes], *, active: str | None = None) -> None:
        if not keys:
            raise ConfigurationError("a Keyring needs at least one key")
        raw: dict[str, bytes] = {}
        for key_id, key in keys.items():
            if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
                raise ConfigurationError(f"a key id is invalid: use {_KEY_ID_RULE}")
            if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
                size = len(key) if isinstance(key, bytes | bytearray) else "not bytes"
                raise ConfigurationError(
                    f"key {key_id!r} must be exactly {KEY_BYTES} bytes (got {size})")
            raw[key_id] = bytes(key)
        if len(set(raw.values())) != len(raw):
            raise ConfigurationError(
                "two key ids hold the same key; every key id needs its own key")
        if active is None:
            active = next(iter(raw))
        elif active not in raw:
            raise ConfigurationError(f"active key {active!r} is not in the keyring")
        self._raw = raw
        self._active = active
        self._aead = {key_id: AESGCM(key) for key_id, key in raw.items()}

    @classmethod
    def generate(cls, key_id: str = "k1") -> Keyring:
        """A keyring holding one new random key (from the OS's CSPRNG)."""
        return cls({key_id: AESGCM.generate_key(bit_length=256)})

    @classmethod
    def parse(cls, text: str, *, source: str = f"${KEYS_ENV}") -> Keyring:
        """Parse ``id1=<base64>,id2=<base64>``: the first key is active.

        Whitespace around entries is ignored, and so are empty entries. ``source``
        names the text in error messages. Standard and URL-safe base64 both work.
        """
        entries = [(n, e.strip()) for n, e in enumerate(text.split(","), 1) if e.strip()]
        return cls._from_entries(entries, source, "entry")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a key file: one ``id=<base64>`` per line, ``#`` starts a comment line;
        the first key is active.

        The file must be accessible by its owner only (``chmod 600``): a key file
        that group or others can read or write is refused.
        """
        p = Path(path).expanduser()
        try:
            st = p.stat()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read key file {str(p)!r}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"key file {str(p)!r} is not a regular file")
        if os.name == "posix" and st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise ConfigurationError(
                f"key file {str(p)!r} is accessible by group or others (mode {mode:o}); "
                f"make it private with: chmod 600 {p}"
            )
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise ConfigurationError(f"cannot read key file {str(p)!r}: {reason}") from None
        entries = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
                   if line.strip() and not line.strip().startswith("#")]
        return cls._from_entries(entries, f"key file {str(p)!r}", "line")

    @classmethod
    def from_env(cls, var: str = KEYS_ENV, *,
                 environ: Mapping[str, str] | None = None) -> Keyring | None:
        """The keyring configured in ``$CRASHSAFE_KEYS``, or ``None`` (encryption off)
        when the variable is unset or blank.

        Two forms: ``id1=<base64>,id2=<base64>`` (the first key is active), or
        ``file:/path/to/keys`` naming a key file (see :meth:`from_file`).
        """
        value = (os.environ if environ is None else environ).get(var, "").strip()
        if not value:
            return None
        if value.startswith("file:"):
            return cls.from_file(value[len("file:"):].strip())
        return cls.parse(value, source=f"${var}")

    @classmethod
    def _from_entries(cls, entries: list[tuple[int, str]], source: str,
                      unit: str) -> Keyring:
        if not entries:
            raise ConfigurationError(f"{source} holds no keys; expected id=<base64>")
        keys: dict[str, bytes] = {}
        first_seen: dict[str, int] = {}
        for n, entry in entries:
            where = f"{source}, {unit} {n}"
            key_id, sep, encoded = entry.partition("=")
            key_id = key_id.strip()
            if not sep:
                raise ConfigurationError(f"{where}: expected id=<base64>")
            if not _KEY_ID.fullmatch(key_id):
                # Not echoed: a malformed entry may be key material pasted in the wrong place.
                raise ConfigurationError(f"{where}: invalid key id; use {_KEY_ID_RULE}")
            if key_id in keys:
                raise ConfigurationError(
                    f"{where}: key id {key_id!r} already appears at {unit} "
                    f"{first_seen[key_id]}; every key id must be unique")
            key = _decode_key(encoded, f"{where} (key id {key_id!r})")
            for other, other_key in keys.items():
                if hmac.compare_digest(other_key, key):
                    raise ConfigurationError(
                        f"{where}: key {key_id!r} is the same key as {other!r}; "
                        "every key id needs its own key")
            keys[key_id] = key
            first_seen[key_id] = n
        return cls(keys)

    @property
    def active_id(self) -> str:
        """The id of the key that seals new records."""
        return self._active

    @property
    def ids(self) -> tuple[str, ...]:
        """Every key id, in order (the active one is not necessarily first)."""
        return tuple(self._raw)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._raw

    def __len__(self) -> int:
        return len(self._raw)

    def export(self) -> str:
        """The keyring in ``$CRASHSAFE_KEYS`` form, active key first.

        This reveals key material: print it only to put it where keys belong.
        """
        order = [self._active, *(k for k in self._raw if k != self._active)]
        return ",".join(f"{k}={base64.b64encode(self._raw[k]).decode('ascii')}" for k in order)

    def _aead_for(self, key_id: str) -> AESGCM | None:
        return self._aead.get(key_id)

    def __repr__(self) -> str:
        return f"Keyring(ids={self.ids!r}, active={self._active!r})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Keyring cannot be pickled (it holds key material); "
                        "have each process load it with Keyring.from_env()")


__all__ = ["KEYS_ENV", "KEY_BYTES", "Keyring"]
