"""``crashsafe dashboard``: serve the web dashboard over the same App the commands use."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from ..dashboard import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV, is_loopback, url_for
from ..exceptions import CrashsafeError
from .main import DbOption, _fail, _open_app, err, out


def dashboard_cmd(
    host: Annotated[str, typer.Option(
        help="Address to listen on. Anything but a loopback address requires the token "
             "for every request.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = DEFAULT_PORT,
    token: Annotated[str | None, typer.Option(
        help=f"The token control actions (and, off loopback, reads) need (default: "
             f"${TOKEN_ENV}, else a new random one, printed; a given one is never "
             "printed).")] = None,
    db: DbOption = None,
) -> None:
    """Serve the web dashboard: workflows and their timelines, breakers, alerts, and
    buttons to signal, cancel, resume and roll back (with confirmation)."""
    from ..dashboard import require_extra, serve
    from ..dashboard._views import shown_url

    if not 0 <= port < 65536:
        raise _fail(f"--port must be between 0 (any free port) and 65535, not {port}")

    def announce(bound: int, chosen: str, generated: bool) -> None:
        out.print(Text.assemble("crashsafe dashboard on ", (url_for(host, bound), "bold"),
                                f" ({shown_url(app.store.url)}); Ctrl-C to stop"), highlight=False)
        if not is_loopback(host):
            out.print(Text(f"{host} is reachable from other machines: every request needs "
                           "the token", style="yellow"), highlight=False)
        if not generated:
            # The user has the token already: never echo it to a terminal or a log.
            source = "--token" if token else f"${TOKEN_ENV}"
            out.print(Text(f"open {url_for(host, bound)} (control buttons: the token from "
                           f"{source}, entered in the page or added as #token=...)"),
                      highlight=False)
            return
        out.print(Text(f"open {url_for(host, bound, chosen)} (the token after # unlocks "
                       "the control buttons)"), highlight=False)
        err.print(Text(f"(a token made for this run; set ${TOKEN_ENV} or --token to keep "
                       "one)", style="dim"), highlight=False)

    try:
        require_extra()
        app = _open_app(db)
        serve(app, host=host, port=port, token=token, announce=announce)
    except CrashsafeError as exc:
        raise _fail(str(exc)) from None
