"""Storage backends and the URL that picks one."""

from __future__ import annotations

import os

from ..exceptions import ConfigurationError
from .base import (
    ClaimResult,
    ExecutorRecord,
    FinishWorkflow,
    JournalEntry,
    ListFilter,
    Op,
    Status,
    Store,
    WorkflowRecord,
)
from .memory import MemoryStore

DEFAULT_URL = "sqlite:///crashsafe.db"


def default_url() -> str:
    """``$CRASHSAFE_DATABASE``, else ``sqlite:///crashsafe.db``."""
    return os.environ.get("CRASHSAFE_DATABASE") or DEFAULT_URL


def open_store(url: str | None = None) -> Store:
    """Open the store a URL names (``sqlite:///file.db``,
    ``postgresql://user@host:5432/db`` or ``memory://``), its payloads sealed
    (:mod:`crashsafe.stores.sealed`; encrypted when ``$CRASHSAFE_KEYS`` is set)."""
    from .._keys import Keyring
    from .sealed import sealed

    raw = open_raw_store(url)
    try:
        return sealed(raw, Keyring.from_env())
    except BaseException:
        raw.close()
        raise


def open_raw_store(url: str | None = None) -> Store:
    """The backend a URL names, without sealing (for tools that inspect stored bytes)."""
    url = url or default_url()
    if not isinstance(url, str):
        raise ConfigurationError(f"database URL must be a string, not {type(url).__name__}")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(url)
    if scheme == "memory":
        return MemoryStore(url)
    if scheme in ("postgresql", "postgres"):
        return _open_postgres(url)
    raise ConfigurationError(
        f"unsupported database URL {url!r}: use sqlite:///relative.db, "
        "sqlite:////absolute/path.db, postgresql://user@host:5432/dbname or memory://"
    )


def _open_postgres(url: str) -> Store:
    try:
        from .postgres import PostgresStore
    except ImportError as exc:
        raise ConfigurationError(
            f"the PostgreSQL store needs psycopg 3 and psycopg-pool ({exc}); install them "
            "with: pip install 'crashsafe[postgres]'"
        ) from exc
    return PostgresStore(url)


__all__ = [
    "DEFAULT_URL",
    "ClaimResult",
    "ExecutorRecord",
    "FinishWorkflow",
    "JournalEntry",
    "ListFilter",
    "MemoryStore",
    "Op",
    "Status",
    "Store",
    "WorkflowRecord",
    "default_url",
    "open_store",
]
