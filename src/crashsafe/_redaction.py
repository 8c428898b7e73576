"""Redaction of stored payloads: what :class:`~crashsafe.stores.sealed.SealedStore` does to
a payload before it seals it.

``App(redact=True)`` (the default) masks, in every payload it stores — a workflow's
arguments, result and error, every step's result and error, recorded attempts, effect
outcomes, signals and checkpoints — the values under field names that look like
credentials (:data:`crashsafe._secrets.DEFAULT_PATTERNS`: ``api_key``, ``token``,
``password``, ``authorization``, ...), whatever the nesting. ``App(redact=[...])``
replaces the patterns, ``App(redact=False)`` turns redaction off, ``App(allow=[...])``
and ``@app.step(redact_allow=[...])`` exempt field names (everywhere, or in that step's
results and errors). Error payloads (messages, tracebacks, exception arguments) also go
through :func:`crashsafe._secrets.redact_text`, which masks credentials it recognises in
free text (``Bearer ...``, ``sk-...``, ``password=...``), and so do the plain-text
columns stored beside them: timeline notes and workflow reasons.

Redaction works on the stored JSON and changes what is stored, not what the running
code holds: the first run sees the real value, a replay after a crash sees ``"***"``.
So a workflow that needs a credential back from a step must get it as a
:class:`crashsafe.Secret` (stored only inside encrypted records: refused when the store
has no keyring) or allow the field. Checkpoint hashes are taken over the redacted state
(see :func:`crashsafe._checkpoint.hashed_form`), so a replay that sees ``"***"`` where
the first run saw the value is not a divergence; each checkpoint records the settings
its hash was taken under when they are not the defaults (:attr:`Redactor.hash_tag`),
and a replay hashes under those, so changing ``redact``/``allow`` (or a release
changing the default patterns) does not make running workflows diverge.

:class:`crashsafe.Secret` values are never stored in plaintext: inside an encrypted
record they are kept (the record is ciphertext); without a keyring a payload holding one
is refused with :class:`~crashsafe.SerializationError`; in error payloads they are
always masked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from ._secrets import DEFAULT_PATTERNS, MASK, PATTERN_SETS, _allowed, _matcher, redact_text
from .exceptions import ConfigurationError, SerializationError

SECRET_TAG = "$secret"  # noqa: S105 - a tag name, not a credential
_SECRET_BYTES = b'"$secret"'

Sensitive = Callable[[str], bool]


class _Walk:
    __slots__ = ("changed", "mask_secrets", "secrets", "sensitive", "text")

    def __init__(self, sensitive: Sensitive, *, mask_secrets: bool, text: bool) -> None:
        self.sensitive = sensitive
        self.mask_secrets = mask_secrets
        self.text = text
        self.changed = False
        self.secrets = 0

    def value(self, v: Any) -> Any:
        if isinstance(v, dict):
            if len(v) == 1 and SECRET_TAG in v:
                self.secrets += 1
                if self.mask_secrets:
                    self.changed = True
                    return MASK
                return v
            out = {}
            for k, x in v.items():
                if isinstance(k, str) and x is not None and x != "" and x != MASK \
                        and self.sensitive(k):
                    out[k] = MASK
                    self.changed = True
                else:
                    out[k] = self.value(x)
            return out
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if self.text and isinstance(v, str):
            masked = redact_text(v)
            if masked != v:
                self.changed = True
            return masked
        return v

    def delta(self, d: Any) -> Any:
        """A checkpoint delta (see crashsafe._checkpoint.diff): a sensitive key's delta
        becomes ``{"=": "***"}`` so that patching still works."""
        if not isinstance(d, dict):
            return d
        if "=" in d:
            return {**d, "=": self.value(d["="])}
        if "append" in d:
            return {**d, "append": self.value(d["append"])}
        body = d.get("dict")
        if not isinstance(body, dict) or not isinstance(body.get("set"), dict):
            return d
        changed = {}
        for k, x in body["set"].items():
            if isinstance(k, str) and self.sensitive(k) and x != {"=": MASK} \
                    and not (isinstance(x, dict) and "=" in x and x["="] in (None, "")):
                changed[k] = {"=": MASK}
                self.changed = True
            else:
                changed[k] = self.delta(x)
        return {**d, "dict": {**body, "set": changed}}


class Redactor:
    """The redaction settings of an App (see the module documentation)."""

    def __init__(self, redact: Iterable[str] | bool = True, allow: Iterable[str] = (),
                 step_allow: Callable[[str], Iterable[str]] | None = None) -> None:
        if redact is True:
            patterns: tuple[str, ...] | None = DEFAULT_PATTERNS
        elif redact is False or redact is None:
            patterns = None
        elif isinstance(redact, str):
            raise ConfigurationError("redact must be True, False or a list of field-name "
                                     "patterns, not a single string")
        else:
            patterns = tuple(redact)
            if not all(isinstance(p, str) for p in patterns):
                raise ConfigurationError("redact: every pattern must be a str")
        if isinstance(allow, str):
            allow = (allow,)
        self.patterns = patterns
        self.allow = tuple(allow)
        self._step_allow = step_allow
        if patterns is not None:
            _matcher(patterns, _allowed(self.allow))  # a bad pattern fails now, not later
        self.hash_tag = _tag(patterns, self.allow)
        """How a checkpoint record names these settings, which its hash was taken under
        (see :func:`for_tag`): None (not stored) for default set 1 with nothing allowed,
        ``"off"``, else the patterns (a set number or the sorted list) and the allowed
        names (``{"p": ..., "a": [...]}``). Per-step ``redact_allow`` does not apply to
        checkpoints."""

    @property
    def enabled(self) -> bool:
        return self.patterns is not None

    def _sensitive(self, step: str | None) -> Sensitive:
        extra = tuple(self._step_allow(step)) if step and self._step_allow else ()
        matcher: Sensitive = _matcher(self.patterns or (), _allowed((*self.allow, *extra)))
        return matcher

    def value(self, data: bytes, *, encrypted: bool, what: str, step: str | None = None,
              checkpoint: bool = False) -> bytes:
        """A value payload (arguments, a result, a signal, a checkpoint document)."""
        if not encrypted and _SECRET_BYTES in data:
            _refuse_secrets(data, what)
        if not self.enabled:
            return data
        tree = _decode(data)
        sensitive = self._sensitive(step)
        # Decoding and looking is cheaper than any scan of the bytes (a few µs for a
        # small payload, ~0.25 ms for 100 KB); most payloads end here, unchanged.
        if tree is _BAD or not _has_sensitive(tree, sensitive):
            return data
        walk = _Walk(sensitive, mask_secrets=False, text=False)
        if checkpoint and isinstance(tree, dict):
            out = dict(tree)
            if "full" in out:
                out["full"] = walk.value(out["full"])
            if "delta" in out:
                out["delta"] = walk.delta(out["delta"])
        else:
            out = walk.value(tree)
        return msgspec.json.encode(out) if walk.changed else data

    def text(self, text: str | None) -> str | None:
        """A note or a reason stored as plain text (a timeline note, a workflow's
        reason): credentials recognised in it are masked."""
        if text is None or not self.enabled:
            return text
        return redact_text(text)

    def error(self, data: bytes, *, step: str | None = None) -> bytes:
        """An error payload: its message, traceback and arguments, masked."""
        if not self.enabled and _SECRET_BYTES not in data:
            return data
        tree = _decode(data)
        if tree is _BAD or not isinstance(tree, dict):
            return data
        sensitive = self._sensitive(step) if self.enabled else _never
        walk = _Walk(sensitive, mask_secrets=True, text=self.enabled)
        out = {k: (walk.value(v) if k in ("message", "traceback", "args") else v)
               for k, v in tree.items()}
        return msgspec.json.encode(out) if walk.changed else data


def _tag(patterns: tuple[str, ...] | None, allow: tuple[str, ...]) -> Any:
    if patterns is None:
        return "off"
    listed = sorted(set(patterns))
    p: Any = next((k for k, s in PATTERN_SETS.items() if sorted(set(s)) == listed), listed)
    names = sorted(_allowed(allow))
    if names:
        return {"p": p, "a": names}
    return None if p == 1 else p


_BY_TAG: dict[bytes, Redactor] = {}


def for_tag(tag: Any) -> Redactor:
    """The redaction settings a checkpoint record names (:attr:`Redactor.hash_tag`;
    absent, None, means default set 1). ValueError if the tag is malformed or names a
    set this release does not know."""
    key = msgspec.json.encode(tag)
    found = _BY_TAG.get(key)
    if found is not None:
        return found
    if tag == "off":
        made = Redactor(False)
    else:
        p, allow = (tag.get("p"), tag.get("a", [])) if isinstance(tag, dict) else (tag, [])
        if p is None:
            p = 1
        if isinstance(p, int) and not isinstance(p, bool):
            if p not in PATTERN_SETS:
                raise ValueError(f"unknown default redaction pattern set {p} (written by a "
                                 "newer crashsafe?)")
            patterns: tuple[str, ...] = PATTERN_SETS[p]
        elif isinstance(p, list) and all(isinstance(x, str) for x in p):
            patterns = tuple(p)
        else:
            raise ValueError(f"malformed redaction settings {tag!r}")
        if not isinstance(allow, list) or not all(isinstance(x, str) for x in allow) \
                or (isinstance(tag, dict) and set(tag) - {"p", "a"}):
            raise ValueError(f"malformed redaction settings {tag!r}")
        try:
            made = Redactor(patterns, allow)
        except (ConfigurationError, ValueError) as exc:
            raise ValueError(f"malformed redaction settings {tag!r}: {exc}") from None
    if len(_BY_TAG) < 64:
        _BY_TAG[key] = made
    return made


def _has_sensitive(tree: Any, sensitive: Sensitive) -> bool:
    """Whether :class:`_Walk` would mask a field of ``tree`` (looks, builds nothing)."""
    stack = [tree]
    while stack:
        v = stack.pop()
        if type(v) is dict:
            for k, x in v.items():
                if isinstance(k, str) and x is not None and x != "" and x != MASK \
                        and sensitive(k):
                    return True
                if type(x) is dict or type(x) is list:
                    stack.append(x)
        elif type(v) is list:
            stack.extend(x for x in v if type(x) is dict or type(x) is list)
    return False


def _never(name: str) -> bool:
    return False


_BAD = object()


def _decode(data: bytes) -> Any:
    try:
        return msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return _BAD  # not ours to judge here: the reader reports it


def _secret_error(what: str) -> SerializationError:
    return SerializationError(
        f"{what} holds a crashsafe.Secret, which is stored only inside encrypted records, "
        "and this store has no keyring; set $CRASHSAFE_KEYS (see docs/security.md), or "
        "pass the secret to the step from the environment or a vault instead")


def _refuse_secrets(data: bytes, what: str) -> bytes:
    tree = _decode(data)
    walk = _Walk(_never, mask_secrets=False, text=False)
    walk.value(tree)
    if walk.secrets:
        raise _secret_error(what)
    return data


class LogFilter(logging.Filter):
    """Masks credentials (:func:`~crashsafe._secrets.redact_text`) in crashsafe's log
    records: the message and the traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return True
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


_FILTER = LogFilter()


def install_log_filter() -> None:
    """Put :class:`LogFilter` on the ``crashsafe`` logger (once)."""
    logger = logging.getLogger("crashsafe")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


__all__ = ["SECRET_TAG", "LogFilter", "Redactor", "for_tag", "install_log_filter"]
