"""A PostgreSQL wire-protocol proxy that cuts one connection at a chosen statement.

Sit it between crashsafe and the server (``CutProxy(...).url(schema)``) and it relays
every byte, while reading the protocol well enough to number the *statements* that
cross it: one statement is one round trip of one connection, everything the client
sends up to a ``Sync`` or a simple ``Query``, answered by the server up to
``ReadyForQuery``. A pipelined ``executemany`` is one statement; ``BEGIN`` and
``COMMIT`` are statements of their own. Statements are numbered from 1 across all
connections, in the order their first message reaches the proxy.

Armed with :meth:`CutProxy.plan`, it cuts the connection that carries statement *N*,
in one of three ways (:data:`MODES`):

* ``drop-request``: the statement never reaches the server. The backend is
  terminated (``pg_terminate_backend``) and both sockets closed: the client has sent
  its statement and reads the end of the connection. A COMMIT cut this way did not
  land (its transaction dies with the backend).
* ``drop-reply``: the server runs the statement to the end and answers; the answer is
  withheld, the backend terminated and the sockets closed. A COMMIT cut this way
  landed, and the client cannot know it.
* ``terminate``: the statement is relayed and ``pg_terminate_backend`` is sent at
  once from a second connection; the proxy goes on relaying both ways until the
  server hangs up. The race inside the server decides whether the statement ran.

For a cut COMMIT the proxy records what really happened (:attr:`Cut.landed`): from
the server's own answer when it saw one, else from ``pg_xact_status`` of the
transaction id it read from ``pg_stat_activity`` just before relaying the COMMIT.

Only plain-text connections are understood: the URL it hands out says
``sslmode=disable``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

MODES = ("drop-request", "drop-reply", "terminate")
SSL_REQUEST, GSS_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
WRITES = ("INSERT", "UPDATE", "DELETE", "WITH", "MERGE")


@dataclass
class Statement:
    """One round trip of one connection."""

    number: int
    link: int
    """Which proxied connection (numbered from 1) carried it."""
    sql: str = ""
    in_transaction: bool = False
    """Sent inside an explicit transaction (the server's last ReadyForQuery said so)."""
    tags: list[str] = field(default_factory=list)
    """The server's CommandComplete tags for it ("COMMIT", "INSERT 0 1", ...)."""
    errors: list[str] = field(default_factory=list)
    """SQLSTATEs of the server's ErrorResponses for it."""
    answered: bool = False
    """The server's ReadyForQuery for it arrived."""
    outage: bool = False
    """Cut by the outage that followed the planned cut (:meth:`CutProxy.plan`)."""
    executes: bool = False
    """It runs something (a Query or an Execute), rather than only preparing a
    statement for later (psycopg prepares a statement it has sent five times)."""

    @property
    def kind(self) -> str:
        """``commit``, ``autocommit write`` (a write outside BEGIN: its own
        transaction, committed by the server as it runs), ``begin``, ``rollback``,
        ``write`` (inside a transaction), ``read``, ``prepare`` or ``other``."""
        if not self.executes:
            return "prepare"
        head = self.sql.lstrip().split(None, 1)[0].upper() if self.sql.strip() else ""
        if head in ("COMMIT", "END"):
            return "commit"
        if head in ("BEGIN", "START"):
            return "begin"
        if head == "ROLLBACK":
            return "rollback"
        if head in WRITES:
            return "write" if self.in_transaction else "autocommit write"
        if head in ("SELECT", "SHOW"):
            return "read"
        return "other"

    @property
    def commits(self) -> bool:
        """Ending it ends a transaction with writes whose outcome a lost answer hides."""
        return self.kind in ("commit", "autocommit write")

    def label(self, width: int = 60) -> str:
        text = " ".join(self.sql.split())
        return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class Cut:
    """What the planned cut hit, and what became of the statement it hit."""

    mode: str
    statement: Statement
    pid: int | None = None
    xid: int | None = None
    """For a cut COMMIT: the transaction's 64-bit id (None: it wrote nothing)."""
    landed: bool | None = None
    """For a cut statement that commits: whether it committed; None if it cannot be
    told (a ``terminate`` race on an autocommit write the server never answered)."""
    how_known: str = ""
    at: float = field(default_factory=time.monotonic)


class _Link:
    """One client connection and its server connection."""

    def __init__(self, number: int, client: socket.socket, server: socket.socket) -> None:
        self.number = number
        self.client = client
        self.server = server
        self.pid: int | None = None
        self.ready = False  # the first ReadyForQuery (startup done) was seen
        self.status = b"I"  # the transaction status of the last ReadyForQuery
        self.one_byte_answers = 0  # SSL/GSS requests whose one-byte answer is due
        self.current: Statement | None = None  # being sent by the client
        self.sent: deque[Statement] = deque()  # sent in full, answer pending
        self.prepared: dict[bytes, str] = {}
        self.withhold = False  # drop-reply armed on this link: answers are held back
        self.dead = False
        self.lock = threading.Lock()

    def close(self) -> None:
        self.dead = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _cstr(payload: bytes, start: int = 0) -> tuple[bytes, int]:
    end = payload.index(b"\0", start)
    return payload[start:end], end + 1


class CutProxy:
    """Relay connections to ``target`` (a PostgreSQL URL) and cut one as planned."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target_url = target
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.admin = psycopg.connect(target, autocommit=True)
        self._admin_lock = threading.Lock()
        self._lock = threading.Lock()
        self.statements: list[Statement] = []
        self.links: list[_Link] = []
        self.counting = True
        self.cut: Cut | None = None
        self._plan: tuple[int, str] | None = None
        self._outage = 0
        self.also_cut: list[Statement] = []
        """Statements cut by the outage that followed the planned cut."""
        self.on_cut: Callable[[Cut], None] | None = None
        """Called at the moment of the cut, before the backend is terminated (a
        campaign kills its child process here to cut the process and its link at once)."""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="cut-proxy", daemon=True).start()

    # -- control ------------------------------------------------------------------------
    def url(self, **options: str) -> str:
        """The target URL, pointed at this proxy, plain text, with ``options`` added."""
        parts = urlsplit(self.target_url)
        user = f"{parts.username}@" if parts.username else ""
        if parts.password:
            user = f"{parts.username}:{parts.password}@"
        query = dict(parse_qsl(parts.query))
        query.update(options)
        query["sslmode"] = "disable"
        return urlunsplit((parts.scheme, f"{user}127.0.0.1:{self.port}", parts.path,
                           urlencode(query), ""))

    def reset(self) -> None:
        """Forget counted statements and any cut; count from 1 again."""
        with self._lock:
            self.statements = []
            self.cut = None
            self._plan = None
            self._outage = 0
            self.also_cut = []
            self.links = [link for link in self.links if not link.dead]

    def plan(self, number: int, mode: str, outage: int = 0) -> None:
        """Cut the connection that carries statement ``number``, in ``mode``; then
        the ``outage`` statements that follow it, on any connection, never reach the
        server either (their connections are cut as ``drop-request`` ones are), as
        when the server stays unreachable for a moment."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        with self._lock:
            self._plan = (number, mode)
            self._outage = outage

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        for link in list(self.links):
            link.close()
        with contextlib.suppress(psycopg.Error):
            self.admin.close()

    # -- the cut --------------------------------------------------------------------------
    def _admin(self, query: str, params: tuple[Any, ...]) -> Any:
        with self._admin_lock:
            row = self.admin.execute(query, params).fetchone()
        return None if row is None else row[0]

    def _xid_of(self, pid: int) -> int | None:
        """The 64-bit id of backend ``pid``'s open transaction (None: it wrote nothing)."""
        with self._admin_lock:
            row = self.admin.execute(
                "SELECT a.backend_xid::text::bigint, "
                "pg_snapshot_xmax(pg_current_snapshot())::text::bigint "
                "FROM pg_stat_activity a WHERE a.pid = %s", (pid,)).fetchone()
        if row is None or row[0] is None:
            return None
        xid32, xmax = int(row[0]), int(row[1])
        epoch = xmax >> 32
        if xid32 > (xmax & 0xFFFFFFFF):  # the counter wrapped since xid32 was assigned
            epoch -= 1
        return (epoch << 32) | xid32

    def _begin_cut(self, link: _Link, st: Statement, mode: str) -> Cut:
        cut = Cut(mode, st, pid=link.pid)
        if st.kind == "commit" and link.pid is not None:
            cut.xid = self._xid_of(link.pid)
        self.cut = cut
        if self.on_cut is not None and mode != "drop-reply":
            self.on_cut(cut)  # drop-reply: once the answer is in (_server_message)
        return cut

    def _terminate(self, pid: int | None) -> None:
        if pid is not None:
            self._admin("SELECT pg_terminate_backend(%s)", (pid,))

    def settle(self, timeout: float = 10.0) -> Cut | None:
        """Once the cut backend is gone, decide whether a cut COMMIT landed."""
        cut = self.cut
        if cut is None or cut.pid is None:
            return cut
        deadline = time.monotonic() + timeout
        while self._admin("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                          (cut.pid,)) and time.monotonic() < deadline:
            time.sleep(0.01)
        st = cut.statement
        if not st.commits:
            return cut
        if cut.mode == "drop-request":
            cut.landed, cut.how_known = False, "never reached the server"
        elif st.answered:
            ok = not st.errors and (st.kind != "commit" or "COMMIT" in st.tags)
            cut.landed, cut.how_known = ok, "the server's answer (withheld or relayed)"
        elif cut.xid is not None:
            status = self._admin("SELECT pg_xact_status(%s::text::xid8)", (str(cut.xid),))
            cut.landed, cut.how_known = status == "committed", f"pg_xact_status: {status}"
        elif st.kind == "commit":
            cut.landed, cut.how_known = True, "read-only transaction: nothing to commit"
        else:
            cut.how_known = "terminated before the server answered"
        return cut

    # -- relaying -------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                link = _Link(len(self.links) + 1, client, server)
                self.links.append(link)
            threading.Thread(target=self._from_client, args=(link,), daemon=True).start()
            threading.Thread(target=self._from_server, args=(link,), daemon=True).start()

    def _from_client(self, link: _Link) -> None:
        try:
            self._startup(link)
            while not link.dead:
                head = _recv_exact(link.client, 5)
                kind, size = head[:1], struct.unpack("!I", head[1:])[0]
                msg = head + _recv_exact(link.client, size - 4)
                verdict = self._client_message(link, kind, msg[5:])
                if verdict == "cut":
                    break
                if verdict == "hold":
                    continue
                terminate = self._before_sent(link, kind)
                link.server.sendall(msg)
                if terminate:
                    self._terminate(link.pid)
        except (OSError, ConnectionError, ValueError):
            pass
        link.close()

    def _startup(self, link: _Link) -> None:
        while True:
            head = _recv_exact(link.client, 8)
            size, code = struct.unpack("!II", head)
            msg = head + _recv_exact(link.client, size - 8)
            if code in (SSL_REQUEST, GSS_REQUEST):
                with link.lock:
                    link.one_byte_answers += 1
                link.server.sendall(msg)
                continue
            link.server.sendall(msg)
            if code == CANCEL_REQUEST:
                raise ConnectionError("cancel request relayed")
            return

    def _client_message(self, link: _Link, kind: bytes, payload: bytes) -> str:
        """Note a client message: ``relay`` it, ``hold`` it back, or ``cut`` here."""
        if not link.ready or kind == b"X":
            return "relay"
        if kind == b"P":
            name, at = _cstr(payload)
            sql, _ = _cstr(payload, at)
            link.prepared[name] = sql.decode(errors="replace")
        with self._lock:
            st = link.current
            if st is None:
                st = Statement(0, link.number, in_transaction=link.status != b"I")
                link.current = st
                if self.counting:
                    st.number = len(self.statements) + 1
                    self.statements.append(st)
            st.executes = st.executes or kind in (b"Q", b"E")
            if not st.sql:
                if kind == b"Q":
                    st.sql = _cstr(payload)[0].decode(errors="replace")
                elif kind == b"P":
                    st.sql = link.prepared[_cstr(payload)[0]]
                elif kind == b"B":
                    _, at = _cstr(payload)  # the portal
                    st.sql = link.prepared.get(_cstr(payload, at)[0], "?")
            if st.number and self.cut is not None and self._outage > 0 \
                    and st.number > self.cut.statement.number and not st.outage:
                self._outage -= 1
                st.outage = True
                self.also_cut.append(st)
            if st.outage:  # an outage after the cut: nothing gets through
                if kind not in (b"S", b"Q"):
                    return "hold"
                cut = True
                hit = False
                plan = None
            else:
                plan = self._plan
                hit = plan is not None and self.cut is None and st.number == plan[0]
                cut = False
            if hit and plan is not None and plan[1] == "drop-request":
                # Held back whole, so what the statement was is known; then cut.
                if kind not in (b"S", b"Q"):
                    return "hold"
                self._begin_cut(link, st, plan[1])
                cut = True
        if cut:
            self._terminate(link.pid)
            link.close()
            return "cut"
        if hit and plan is not None and kind in (b"S", b"Q"):
            with self._lock:
                self._begin_cut(link, st, plan[1])
            if plan[1] == "drop-reply":
                link.withhold = True
        return "relay"

    def _before_sent(self, link: _Link, kind: bytes) -> bool:
        """The message ends a statement: queue it for its answer (before relaying, so
        the answer never arrives first). True if the cut is a ``terminate`` here."""
        if not link.ready or kind not in (b"S", b"Q"):
            return False
        with self._lock:
            st, link.current = link.current, None
            if st is not None:
                link.sent.append(st)
            return (self.cut is not None and self.cut.statement is st
                    and self.cut.mode == "terminate")

    def _from_server(self, link: _Link) -> None:
        try:
            while not link.dead:
                with link.lock:
                    single = not link.ready and link.one_byte_answers > 0
                    if single:
                        link.one_byte_answers -= 1
                if single:
                    link.client.sendall(_recv_exact(link.server, 1))
                    continue
                head = _recv_exact(link.server, 5)
                kind, size = head[:1], struct.unpack("!I", head[1:])[0]
                msg = head + _recv_exact(link.server, size - 4)
                if self._server_message(link, kind, msg[5:]):
                    break
                if not link.withhold:
                    link.client.sendall(msg)
        except (OSError, ConnectionError, ValueError):
            pass
        link.close()

    def _server_message(self, link: _Link, kind: bytes, payload: bytes) -> bool:
        """Note a server message; True if the link must be cut now."""
        if kind == b"K":
            link.pid = struct.unpack("!I", payload[:4])[0]
            return False
        if not link.ready:
            if kind == b"Z":
                link.ready = True
                link.status = payload[:1]
            return False
        st = link.sent[0] if link.sent else None
        if kind == b"C" and st is not None:
            st.tags.append(_cstr(payload)[0].decode(errors="replace"))
        elif kind == b"E" and st is not None:
            st.errors.append(_sqlstate(payload))
        elif kind == b"Z":
            link.status = payload[:1]
            if st is not None:
                link.sent.popleft()
                st.answered = True
                if link.withhold and self.cut is not None and self.cut.statement is st:
                    if self.on_cut is not None:
                        self.on_cut(self.cut)
                    self._terminate(link.pid)
                    return True
        return False


def _sqlstate(payload: bytes) -> str:
    at = 0
    while at < len(payload) and payload[at:at + 1] != b"\0":
        field_type = payload[at:at + 1]
        value, at = _cstr(payload, at + 1)
        if field_type == b"C":
            return value.decode(errors="replace")
    return "?"
