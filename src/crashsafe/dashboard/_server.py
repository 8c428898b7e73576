"""The dashboard's HTTP layer: Starlette routes over :mod:`._views`, and its guards.

Security model (docs/observability.md, "Dashboard"):

- Bound to a loopback address, reads need no token, and requests whose ``Host`` is not
  a loopback name are refused (a hostile page cannot reach the dashboard through DNS
  rebinding). Bound to any other address, every API read and ``/metrics`` needs the
  token too.
- Control actions (``POST``) always need the token, sent as ``Authorization: Bearer``.
  A browser never attaches that header on its own, and a cross-site page cannot add
  it without a CORS preflight, which this server never approves: no cookie, so no
  CSRF. ``POST`` bodies must also be ``application/json``, and a request whose
  ``Origin`` is another site's is refused.
- Tokens are compared in constant time. Every response forbids framing and sniffing;
  the page's Content-Security-Policy allows only its own script, which writes user
  data (workflow ids, step names, errors) as text, never as HTML.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import _rollback_check
from .._app import App
from .._checkpoint import CheckpointNotFoundError
from .._redaction import install_log_filter
from ..exceptions import (
    ConfigurationError,
    CorruptRecordError,
    CrashsafeError,
    InvalidStateError,
    StoreUnavailableError,
    UnknownWorkflowError,
)
from ..stores.base import Status
from . import _views, is_loopback

ROLLBACK_FROM = frozenset({"waiting", "succeeded", "failed", "cancelled", "dead_letter"})
"""The statuses the page may roll a workflow back from: not while it runs a step, is
being cancelled or has not started (``dashboard.js`` enables the button alike)."""
TOO_DEEP = "nested too deeply"
MAX_BODY = 1 << 20
"""The largest POST body accepted (a signal's payload included), in bytes."""
STATIC = {"dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
     b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
]

Handler = Callable[[Request], Awaitable[Response]]
log = logging.getLogger("crashsafe")


def _host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:80`` gives ``::1``)."""
    if header.startswith("["):
        return header[1:].partition("]")[0].lower()
    return header.rpartition(":")[0].lower() if header.count(":") == 1 else header.lower()


class _Guard:
    """ASGI middleware: security headers on every response; on a loopback binding,
    requests naming another host are refused (DNS rebinding)."""

    def __init__(self, inner: ASGIApp, *, loopback: bool) -> None:
        self.inner = inner
        self.loopback = loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if self.loopback and not is_loopback(_host_name(host)):
            await _json({"error": "this dashboard only answers requests addressed to "
                                  "127.0.0.1 or localhost"}, 403)(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.inner(scope, receive, with_headers)


def _json(data: Any, status: int = 200) -> Response:
    # "<", ">" and "&" only occur inside JSON strings, so escaping them there keeps user
    # data inert even if a response were ever read as HTML.
    body = json.dumps(_views.finite(data), ensure_ascii=False, allow_nan=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        body = body.replace(raw, escaped)
    return Response(body.encode(), status, media_type="application/json")


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


async def _bounded_body(request: Request) -> bytes | None:
    """The request's body, or None past :data:`MAX_BODY` (read no further: a chunked
    body announces no length)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _failure(exc: CrashsafeError) -> Response:
    """An error of the App, as the HTTP status that says what to do about it."""
    if isinstance(exc, UnknownWorkflowError | CheckpointNotFoundError):
        return _error(str(exc), 404)
    if isinstance(exc, InvalidStateError):
        return _error(str(exc), 409)
    if isinstance(exc, ConfigurationError | ValueError | TypeError):
        return _error(str(exc), 400)
    if isinstance(exc, StoreUnavailableError):
        return _error(str(exc), 503)
    if isinstance(exc, CorruptRecordError):
        return _error(f"{exc}; run `crashsafe verify`", 500)
    return _error(str(exc), 500)


def _unexpected(request: Request) -> Response:
    """A bug or an unforeseen failure: logged here with its traceback (through the
    ``crashsafe`` logger, whose filter masks credentials), answered with a generic
    message: no traceback or stored value reaches the client."""
    log.error("dashboard: %s %s failed", request.method, request.url.path, exc_info=True)
    return _error("the dashboard failed to answer this request (an internal error, "
                  "logged by the dashboard's process)", 500)


class Dashboard:
    """The routes over one App. ``token`` guards control actions, and reads too when
    ``public`` (bound beyond loopback)."""

    def __init__(self, app: App, *, token: str, public: bool) -> None:
        if not token:
            raise ConfigurationError("the dashboard needs a non-empty token")
        install_log_filter()  # what _unexpected logs is masked, whatever the App's redact
        self.app = app
        self.token = token.encode()
        self.public = public
        files = resources.files(__package__).joinpath("static")
        self.page = files.joinpath("index.html").read_bytes()
        self.static = {name: files.joinpath(name).read_bytes() for name in STATIC}

    def authorized(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  self.token)

    def asgi(self) -> ASGIApp:
        read, control = self._read, self._control
        routes = [
            Route("/", self.page_view), Route("/workflow", self.page_view),
            Route("/static/{name}", self.static_view),
            Route("/favicon.ico", self.favicon),
            Route("/api/session", self.session),
            Route("/api/workflows", read(self.list_view)),
            Route("/api/workflow", read(self.workflow_view)),
            Route("/api/breakers", read(self.breakers_view)),
            Route("/api/checks", read(self.checks_view)),
            Route("/api/signal", control(self.signal_action), methods=["POST"]),
            Route("/api/cancel", control(self.cancel_action), methods=["POST"]),
            Route("/api/resume", control(self.resume_action), methods=["POST"]),
            Route("/api/rollback", control(self.rollback_action), methods=["POST"]),
            Route("/metrics", read(self.metrics_view)),
        ]
        return _Guard(Starlette(routes=routes), loopback=not self.public)

    # -- guards ------------------------------------------------------------------------
    def _read(self, handler: Callable[[Request], Response]) -> Handler:
        async def guarded(request: Request) -> Response:
            if self.public and not self.authorized(request):
                return _error("this dashboard is exposed beyond this machine: send its "
                              "token as 'Authorization: Bearer TOKEN'", 401)
            try:
                return await run_in_threadpool(handler, request)
            except CrashsafeError as exc:
                return _failure(exc)
            except Exception:
                return _unexpected(request)
        return guarded

    def _control(self, action: Callable[[dict[str, Any]], dict[str, Any]]) -> Handler:
        async def guarded(request: Request) -> Response:
            if not self.authorized(request):
                return _error("control actions need the dashboard's token as "
                              "'Authorization: Bearer TOKEN' (the one given to `crashsafe "
                              "dashboard` by --token or $CRASHSAFE_DASHBOARD_TOKEN, else "
                              "the one it printed when it started)", 401)
            origin = request.headers.get("origin")
            if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
                return _error(f"requests from {origin!r} are not accepted", 403)
            if request.headers.get("content-type", "").split(";")[0].strip() \
                    != "application/json":
                return _error("send the body as application/json", 415)
            raw = await _bounded_body(request)
            if raw is None:
                return _error(f"the body is larger than {MAX_BODY} bytes", 413)
            try:
                body = json.loads(raw)
            except ValueError as exc:
                return _error(f"the body is not valid JSON: {exc}", 400)
            except RecursionError:
                return _error(f"the body is not valid JSON: {TOO_DEEP}", 400)
            if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                return _error('the body must be a JSON object with the workflow "id"', 400)
            try:
                return _json(await run_in_threadpool(action, body))
            except CrashsafeError as exc:
                return _failure(exc)
            except Exception:
                return _unexpected(request)
        return guarded

    # -- pages -------------------------------------------------------------------------
    async def page_view(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8")

    async def static_view(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.static:
            return _error("no such file", 404)
        return Response(self.static[name], media_type=STATIC[name])

    async def favicon(self, request: Request) -> Response:
        return Response(self.static["favicon.svg"], media_type=STATIC["favicon.svg"])

    async def session(self, request: Request) -> Response:
        return _json({"reads_need_token": self.public, "authorized": self.authorized(request),
                      "database": _views.shown_url(self.app.store.url)
                      if not self.public or self.authorized(request) else None})

    # -- reads -------------------------------------------------------------------------
    def list_view(self, request: Request) -> Response:
        q = request.query_params
        status = q.get("status") or None
        if status is not None and status not in {s.value for s in Status}:
            return _error(f"unknown status {status!r}", 400)
        try:
            limit = int(q.get("limit") or 100)
        except ValueError:
            return _error("limit must be a whole number", 400)
        return _json(_views.workflows(self.app, status=status, name=q.get("name"),
                                      prefix=q.get("prefix"), limit=limit))

    def workflow_view(self, request: Request) -> Response:
        workflow_id = request.query_params.get("id")
        if not workflow_id:
            return _error("name the workflow: /api/workflow?id=ID", 400)
        raw = request.query_params.get("before") or None
        try:
            before = int(raw) if raw is not None else None
        except ValueError:
            return _error("before is a journal index (a whole number)", 400)
        if before is not None and not 0 <= before < 1 << 62:
            return _error("before is a journal index (a whole number)", 400)
        return _json(_views.workflow(self.app, workflow_id, before=before))

    def breakers_view(self, request: Request) -> Response:
        return _json(_views.breakers(self.app))

    def checks_view(self, request: Request) -> Response:
        raw = request.query_params.get("since") or None
        try:
            since = float(raw) if raw is not None else None
        except ValueError:
            return _error("since is a number of seconds", 400)
        if since is not None and not since > 0:
            return _error("since must be a positive number of seconds", 400)
        return _json(_views.checks(self.app, since=since, name=request.query_params.get("name")))

    def metrics_view(self, request: Request) -> Response:
        try:
            from ..observe.prometheus import exposition
        except ImportError as exc:
            return _error(f"the Prometheus exposition is not available ({exc}); install "
                          "it with: pip install 'crashsafe[dashboard]'", 501)
        body, content_type = exposition(self.app.store)
        return Response(body, media_type=content_type)

    # -- control: the same App methods as `crashsafe signal/cancel/resume/rollback` -------
    def signal_action(self, body: dict[str, Any]) -> dict[str, Any]:
        name, text = body.get("name"), body.get("payload", "null")
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError("give the signal a name (the one the workflow waits for)")
        if not isinstance(text, str):
            raise ConfigurationError("payload is the JSON text of the signal's value")
        try:
            payload = json.loads(text) if text.strip() else None
        except ValueError as exc:
            raise ConfigurationError(f"the payload is not valid JSON ({exc}); for example "
                                     '{"approved": true}') from None
        except RecursionError:
            raise ConfigurationError(f"the payload is not valid JSON here ({TOO_DEEP})"
                                     ) from None
        self.app.signal(body["id"], name, payload)
        return {"ok": True, "message": f"sent signal {name!r} to {body['id']}"}

    def cancel_action(self, body: dict[str, Any]) -> dict[str, Any]:
        workflow_id = body["id"]
        if not self.app.cancel(workflow_id, reason="cancelled from the dashboard"):
            status = self.app.get_workflow(workflow_id).status
            raise InvalidStateError(f"workflow {workflow_id!r} is already {status}; nothing "
                                    "to cancel")
        return {"ok": True, "message": f"cancelled {workflow_id}"}

    def resume_action(self, body: dict[str, Any]) -> dict[str, Any]:
        self.app.resume(body["id"])
        return {"ok": True, "message": f"{body['id']} is running again; a serving worker "
                                       "picks it up"}

    def rollback_action(self, body: dict[str, Any]) -> dict[str, Any]:
        to = body.get("to")
        if to is not None and (isinstance(to, bool) or not isinstance(to, int | str)):
            raise ConfigurationError("to is a checkpoint label, '#N', a journal index or "
                                     "null for the latest checkpoint")
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise ConfigurationError("force is true or false")
        reason = body.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            point = "the latest checkpoint" if to is None else \
                f"before index {to}" if isinstance(to, int) else f"checkpoint {to!r}"
            reason = f"rolled back from the dashboard to {point}"
        workflow_id = body["id"]
        skipped = _rollback_check.unrunnable(self.app, workflow_id, to)  # 404s first
        status = self.app.get_workflow(workflow_id).status
        if status.value not in ROLLBACK_FROM:
            raise InvalidStateError(
                f"workflow {workflow_id!r} is {status}; roll back a workflow that is "
                f"{', '.join(sorted(ROLLBACK_FROM))} (cancel a running one first)")
        if skipped and not force:
            raise InvalidStateError(_rollback_check.refusal(
                workflow_id, skipped, '"force": true (in the page: tick "without the '
                'compensations")'))
        if skipped:
            reason += (f"; forced: the compensations of {_rollback_check.describe(skipped)} "
                       "did not run (not registered in the dashboard's process)")
        self.app.rollback(workflow_id, to=to, reason=reason)
        return {"ok": True, "message": f"rolled back {workflow_id} (the entries rolled back are "
                                       "kept for audit); a serving worker resumes it"
                + (f"; compensations not run: {_rollback_check.describe(skipped)}"
                   if skipped else "")}
