"""The web dashboard: workflows, timelines, breakers and alerts, with control buttons.

``crashsafe dashboard`` runs it; from Python::

    from crashsafe.dashboard import serve
    serve(crashsafe.App("sqlite:///agent.db"), host="127.0.0.1", port=8470)

It reads and controls workflows only through the App's methods (the ones the
command line uses) and :func:`crashsafe.observe.compute`. It needs the extra
``crashsafe[dashboard]`` (Starlette and uvicorn). The security model is described in
:mod:`crashsafe.dashboard._server` and in docs/observability.md.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._app import App
from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from starlette.types import ASGIApp

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
TOKEN_ENV = "CRASHSAFE_DASHBOARD_TOKEN"  # noqa: S105 (a variable's name, not a secret)
"""The environment variable that gives the token when ``--token`` does not."""
MIN_TOKEN = 16
EXTRA = "pip install 'crashsafe[dashboard]'"


def require_extra() -> None:
    """Raise ConfigurationError naming the extra to install if Starlette or uvicorn is
    missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"the dashboard needs Starlette and uvicorn ({exc}); install them with: {EXTRA}"
        ) from exc


def new_token() -> str:
    """A random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def create_app(app: App, *, token: str, public: bool = False) -> ASGIApp:
    """The dashboard as an ASGI application over ``app``. ``token`` guards control
    actions; with ``public`` (for a binding beyond loopback) it guards every read too,
    and must have at least :data:`MIN_TOKEN` characters."""
    require_extra()
    if public:
        _check_token(token)
    from ._server import Dashboard

    return Dashboard(app, token=token, public=public).asgi()


def _check_token(token: str) -> None:
    if len(token) < MIN_TOKEN:
        raise ConfigurationError(f"the dashboard token must be at least {MIN_TOKEN} characters "
                                 "(a guessable token guards nothing); leave it out to get a "
                                 "random one")


def url_for(host: str, port: int, token: str | None = None) -> str:
    """The address to open: the token rides in the fragment, which browsers never send
    to the server (nor put in logs or Referer headers)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"#token={token}" if token else "")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only listens on this machine."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def serve(app: App, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          token: str | None = None,
          announce: Callable[[int, str, bool], None] | None = None) -> None:
    """Serve the dashboard until interrupted (Ctrl-C or SIGTERM).

    The token is ``token``, else ``$CRASHSAFE_DASHBOARD_TOKEN``, else a new random one.
    ``port`` 0 picks a free port. Once listening, ``announce(port, token, generated)``
    is called so the caller can show where, and the token.
    """
    require_extra()
    import uvicorn

    given = token or os.environ.get(TOKEN_ENV) or None
    if given is not None:
        _check_token(given)
    chosen = given or new_token()
    asgi = create_app(app, token=chosen, public=not is_loopback(host))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host.strip("[]"), port), family=family)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port} ({exc}); pick another "
                                 "--port or --host") from exc
    with sock:
        if announce is not None:
            announce(sock.getsockname()[1], chosen, given is None)
        config = uvicorn.Config(asgi, log_level="warning", access_log=False,
                                server_header=False, lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "TOKEN_ENV", "create_app", "is_loopback", "new_token",
           "require_extra", "serve", "url_for"]
