"""Structured logs: one JSON object per line, with the workflow, step and attempt.

crashsafe logs through ``logging.getLogger("crashsafe")``. Its lines carry fields in
``extra``: ``workflow_id`` and ``workflow`` (the name) on every line about a workflow,
``step``, ``step_index`` and ``attempt`` on lines about a step, ``failure_class`` on a
failed attempt, ``outcome`` when a run ends, ``trace_id``/``span_id`` when the app
traces. What is logged, and at which level:

* INFO: a run resumed (with its fencing token) or ended; a takeover of a dead
  process's workflow; a failed attempt that will be retried, with its failure class
  and delay; a wait for a signal began or ended.
* WARNING: a step that gave up; a workflow that failed, was dead-lettered or stopped
  on a store error.
* DEBUG: a first run started; each step's result, each checkpoint and durable sleep,
  with its commit time.

Secrets: the engine masks credentials in every exception text it puts in a line
(:func:`crashsafe.redact_text`), and :class:`JsonFormatter` masks the whole message,
every string field and the traceback again, and every field whose *name* looks
sensitive (:func:`crashsafe.redact`).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import msgspec

from .._secrets import is_sensitive_name, redact, redact_text

_SEP = "\n"
# The attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
_PLAIN = (str, int, float, bool, type(None))


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ``time`` (UTC, ISO 8601), ``level``,
    ``logger``, ``message``, ``thread``, every ``extra`` field, and ``exception``
    (the traceback) when there is one; secrets redacted (see the module)."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")
        self._safe_names: set[str] = set()
        """Field names seen not to be sensitive (crashsafe's own are a handful)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        second, stamp = self._second
        if seconds != second:  # one line in many starts a new second
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            self._second = (seconds, stamp)  # one tuple: formatters may be shared
        message = record.getMessage()
        doc: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            "thread": record.threadName,
        }
        fields = {k: v for k, v in vars(record).items()
                  if k not in _STANDARD and not k.startswith("_")}
        if fields and not self._plain(fields):
            fields = redact(fields)
        # One look for anything credential-like over the message and all the string
        # fields together, not one per string: most lines hold none (ids and names).
        texts = _SEP.join([message, *(v for v in fields.values() if isinstance(v, str))])
        if redact_text(texts) != texts:
            doc["message"] = redact_text(message)
            fields = _texts(fields)
        elif any(isinstance(v, dict | list | tuple) for v in fields.values()):
            fields = _texts(fields)
        doc.update(fields)
        if record.exc_info:
            doc["exception"] = redact_text(self.formatException(record.exc_info))
        elif record.stack_info:
            doc["stack"] = redact_text(record.stack_info)
        return _encode(doc).decode()


    def _plain(self, fields: dict[str, Any]) -> bool:
        """Whether ``redact`` would leave ``fields`` as they are: flat values under names
        known not to be sensitive (most lines: ids, names, counts). One line per
        workflow goes through here, so the names' verdicts are kept."""
        safe = self._safe_names
        for name, value in fields.items():
            if type(value) not in _PLAIN:
                return False
            if name not in safe:
                if is_sensitive_name(name):
                    return False
                if len(safe) < 1024:
                    safe.add(name)
        return True


def _fallback(value: Any) -> str:
    return redact_text(str(value))


_encode = msgspec.json.Encoder(enc_hook=_fallback).encode


def _texts(value: Any) -> Any:
    """Mask credentials in every string of a JSON-like value."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _texts(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_texts(v) for v in value]
    return value


def configure(fmt: str = "json", level: int | str = logging.INFO,
              stream: IO[str] | None = None) -> logging.Handler:
    """Send crashsafe's log lines to ``stream`` (stderr by default) as JSON (``fmt``
    ``"json"``) or plain text (``"text"``), from ``level`` up; returns the handler.
    What ``crashsafe worker --log-format`` does."""
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', not {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("crashsafe")
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


__all__ = ["JsonFormatter", "configure"]
