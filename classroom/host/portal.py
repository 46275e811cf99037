"""The portal: a small tornado page that sends each student to their own Jupyter server.

With ``access = redirect``:

    GET /                  the course title and a username form (never a list of students)
    GET /go?username=NAME  and  GET /user/NAME: 302 to that student's running server
    GET /healthz           JSON: status, course name, number of running servers
    anything else, an unknown user or a stopped server: a friendly page, status 404

With ``access = proxy`` the portal is the only door: a login, and each student's
requests forwarded to their own server (``proxy.py``; the login is ``portal_login.py``);
``/healthz`` as above.

A redirect is only ever ``SCHEME://HOST:PORT/PATH`` built from checked parts: HOST is
``[launch] server_address`` or the host name of the browser's Host header (strictly
checked, else the address the connection came in on), PORT and PATH come from the
course's record of running servers, never from the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import re
import signal
import socket
import sqlite3
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import click
import tornado.httpserver
import tornado.netutil
import tornado.web

from ..core.addresses import (
    MAX_INPUT,
    USERNAME,
    clean_username,
    host_from_header,
    host_from_setting,
    https,
    listen_address,
    portal_url,
    probe_host,
    proxied,
    socket_host,
)
from ..core.errors import EXIT_PARTIAL, ClassroomError, InvalidInput
from ..core.settings import Settings
from . import portal_login, proxy
from .portal_pages import LEAD, csp, form, note, render, security_headers

log = logging.getLogger("classroom")

# {username: {"port": int, "url": str}} of the servers running now; read on every request.
Lookup = Callable[[], Mapping[str, Mapping[str, Any]]]

PROBE_TIMEOUT = 2.0  # seconds to wait for a student's port to accept a connection
STOP_TIMEOUT = 5.0  # seconds open connections get to finish when the portal stops
# Each stops the portal, not the servers; SIGHUP: the teacher's terminal closed.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class PortalError(ClassroomError):
    """The portal cannot run (port in use, bad certificate); the servers are unaffected."""

    exit_code = EXIT_PARTIAL


# --- where a student's server is -------------------------------------------------------

_SAFE_PATH = re.compile(r"(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*/?")


def _server_path(url: Any) -> str:
    """The path of a recorded server URL if it is plainly a path (no '..', no '//'), else '/'."""
    if not isinstance(url, str):
        return "/"
    try:
        path = urlsplit(url).path
    except ValueError:
        return "/"
    return path if path and _SAFE_PATH.fullmatch(path) else "/"


def _server_port(entry: Any) -> int | None:
    port = entry.get("port") if isinstance(entry, Mapping) else None
    if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
        return port
    return None


async def _answers(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """True if something accepts a TCP connection on host:port."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


# --- the application ---------------------------------------------------------------------


@dataclass(frozen=True)
class Portal:
    """What the handlers share: the settings, the lookup and what follows from the settings."""

    settings: Settings
    lookup: Lookup
    scheme: str
    fixed_host: str | None  # [launch] server_address, checked
    probe_host: str | None  # where to check that a port answers; None: do not check
    title: str


class Handler(tornado.web.RequestHandler):
    """Security headers, friendly error pages, no traceback, no Server header."""

    portal: Portal

    def initialize(self, portal: Portal) -> None:
        self.portal = portal

    def set_default_headers(self) -> None:
        security_headers(self)

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        # Undecodable bytes are just a username that does not exist (404), not a 400.
        return value.decode("utf-8", "replace")

    def check_xsrf_cookie(self) -> None:  # nothing here changes state; no cookies are set
        return None

    def compute_etag(self) -> None:  # every answer depends on the moment: nothing to revalidate
        return None

    # Where a student's server is, as the browser should reach it.

    def target_host(self) -> str:
        """server_address, else the browser's Host if it is plainly a host, else our address."""
        if self.portal.fixed_host:
            return self.portal.fixed_host
        host = host_from_header(self.request.headers.get("Host"))
        if host:
            return host
        with contextlib.suppress(Exception):
            host = socket_host(self.request.connection.stream.socket.getsockname())  # type: ignore[union-attr]
        return host or "localhost"

    def form_target(self) -> str:
        host = self.target_host()
        if host.startswith("["):  # CSP host sources cannot name IPv6 literals
            return f"{self.portal.scheme}:"
        return f"{self.portal.scheme}://{host}:*"

    def page(self, body: str, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Content-Security-Policy", csp(self.form_target()))
        self.finish(render(self.portal.title, body))

    def not_running(self, username: str | None, typed: str = "") -> None:
        """The one answer for an unknown user, a stopped server and a malformed name: 404."""
        if username:
            text = (
                f"There is no running server for <code>{html.escape(username)}</code>. "
                "Check the spelling of your username; if it is right, ask your teacher "
                "to start your server."
            )
        elif typed.strip():
            text = (
                "That is not a username: usernames are lower-case letters, digits, "
                "<code>-</code> and <code>_</code>. Check the slip from your teacher."
            )
        else:
            self.page(note("Type your username", "The box was empty.") + form(), status=400)
            return
        self.page(note("Server not found", text) + form(username or ""), status=404)

    def lookup(self) -> Mapping[str, Mapping[str, Any]] | None:
        try:
            running = self.portal.lookup()
        except Exception as exc:  # one line on the terminal; the traceback goes to the log file
            log.warning("portal: cannot look up the running servers: %s", exc)
            log.debug("portal: lookup failed", exc_info=True)
            return None
        return running if isinstance(running, Mapping) else {}

    async def send_to(self, username: str | None, typed: str = "") -> None:
        if not username:
            self.not_running(None, typed)
            return
        running = self.lookup()
        if running is None:
            self.page(
                note(
                    "The portal cannot look up the servers right now",
                    "Please try again in a moment, or ask your teacher.",
                )
                + form(username),
                status=503,
            )
            return
        entry = running.get(username)
        port = _server_port(entry)
        if port is None or (
            self.portal.probe_host and not await _answers(self.portal.probe_host, port)
        ):
            log.info("portal: no running server for %s", username)
            self.not_running(username)
            return
        path = _server_path(entry.get("url"))  # type: ignore[union-attr]
        url = f"{self.portal.scheme}://{self.target_host()}:{port}{path}"
        log.info("portal: %s -> %s", username, url)
        self.redirect(url, status=302)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 404:
            text = "There is nothing at this address. Type your username to open your notebooks."
            self.page(note("Page not found", text) + form(), status=404)
            return
        heading = {
            400: "That request was not understood",
            405: "That is not something this page does",
        }.get(status_code, "Something went wrong")
        self.page(
            note(html.escape(heading), "Type your username below to open your notebooks.") + form(),
            status=status_code,
        )


class LandingHandler(Handler):
    def get(self) -> None:
        self.page(LEAD + form())

    head = get


class GoHandler(Handler):
    """The form's target: trim and lower-case what was typed, then redirect or say 404."""

    async def get(self) -> None:
        typed = self.get_argument("username", default="", strip=True)[: MAX_INPUT + 1]
        await self.send_to(clean_username(typed), typed)

    post = get


class UserHandler(Handler):
    """/user/NAME: the link form. NAME is lower-cased but otherwise taken as it is."""

    async def get(self, name: str) -> None:
        username = None
        if name.isascii() and len(name) <= MAX_INPUT and USERNAME.fullmatch(name.lower()):
            username = name.lower()
        await self.send_to(username, name or "?")


class HealthHandler(Handler):
    """{"status": "ok", "course": NAME, "running": N}; 503 when the servers cannot be looked up."""

    def counts(self, entry: Any) -> bool:
        if proxied(self.portal.settings):  # on a socket: port 0
            return isinstance(entry, Mapping) and entry.get("port") == 0
        return _server_port(entry) is not None

    def get(self) -> None:
        running = self.lookup()
        if running is None:
            self.set_status(503)
            self.finish({"status": "error", "course": self.portal.settings.name, "running": None})
            return
        count = sum(1 for entry in running.values() if self.counts(entry))
        self.finish({"status": "ok", "course": self.portal.settings.name, "running": count})


class NotFoundHandler(Handler):
    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


def make_app(settings: Settings, lookup: Lookup, *, probe: bool = True) -> tornado.web.Application:
    """The portal's tornado application.

    ``lookup()`` gives ``{username: {"port": int, "url": str}}`` of the running servers
    (launch passes the course's record); it is called on every request. With
    ``probe`` a port must also accept a connection before a student is sent there.
    Raises ``InvalidInput`` if ``[launch] server_address`` is not a plain host name.
    """
    fixed = None
    if settings.server_address:
        try:
            fixed = host_from_setting(settings.server_address)
        except ValueError as exc:
            raise InvalidInput(
                f"{settings.where('launch', 'server_address')}: [launch] server_address: {exc}"
            ) from None
    portal = Portal(
        settings=settings,
        lookup=lookup,
        scheme="https" if https(settings) else "http",
        fixed_host=fixed,
        probe_host=probe_host(settings.ip) if probe else None,
        title=settings.title or settings.name,
    )
    args = {"portal": portal}
    common = {
        "log_function": _log_request,
        "compress_response": False,
        "xsrf_cookies": False,
        "serve_traceback": False,
    }
    if proxied(settings):
        try:
            keys = portal_login.application_settings(settings)
            routes, gate = proxy.routes(settings)
        except (OSError, sqlite3.Error) as exc:
            raise PortalError(
                f"portal: cannot keep sessions in {settings.state_dir}: {exc} "
                "(run setup first; the portal runs as root)"
            ) from None
        not_found, not_found_args = portal_login.not_found(gate)
        app = tornado.web.Application(
            [(r"/healthz", HealthHandler, args), *routes],
            default_handler_class=not_found,
            default_handler_args=not_found_args,
            **keys,
            **common,
        )
        app.settings["gate"] = gate
        return app
    return tornado.web.Application(
        [
            (r"/", LandingHandler, args),
            (r"/go", GoHandler, args),
            (r"/user/([^/]*)/?", UserHandler, args),
            (r"/healthz", HealthHandler, args),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        **common,
    )


def _log_request(handler: tornado.web.RequestHandler) -> None:
    request = handler.request
    log.debug(
        "portal: %d %s %r from %s (%.1f ms)",
        handler.get_status(),
        request.method,
        request.uri,
        request.remote_ip,
        1000 * request.request_time(),
    )


# --- serving -----------------------------------------------------------------------------


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context when HTTPS is on (TLS 1.2 or newer)."""
    if not https(settings):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(settings.certfile), str(settings.keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise PortalError(
            f"portal: cannot use certfile {settings.certfile} with keyfile {settings.keyfile}: "
            f"{exc} ({settings.where('launch', 'certfile')})"
        ) from None
    return context


def serve(
    course: Any,
    *,
    lookup: Lookup,
    ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    tick: Callable[[], None] | None = None,
) -> None:
    """Run the portal until Ctrl-C or SIGTERM (or ``stop`` is set), then return normally.

    Listens on ``[launch] ip`` and ``portal_port`` (0: any free port), HTTPS when certfile
    and keyfile are set, prints its address, and calls ``ready(url)`` once it listens.
    ``tick()`` is called about once a second while it runs (launch reaps its children there).
    Raises ``PortalError`` if it cannot listen; never touches the students' servers.
    """
    settings: Settings = course.settings
    context = tls_context(settings)
    address = listen_address(settings.ip) or None  # a wildcard: IPv4 and IPv6
    try:
        sockets = tornado.netutil.bind_sockets(settings.portal_port, address=address)
    except OSError as exc:
        raise PortalError(
            f"portal: cannot listen on {settings.ip}:{settings.portal_port}: "
            f"{exc.strerror or exc} (stop what uses the port, or change [launch] portal_port "
            f"in {settings.where('launch', 'portal_port')}); the students' servers keep running"
        ) from None
    try:
        app = make_app(settings, lookup)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    url = portal_url(settings, sockets[0].getsockname()[1])
    click.echo(
        f"Portal: {url}  (Ctrl-C, or closing this terminal, stops the portal; "
        "the students' servers keep running)"
    )
    log.info("portal: listening on %s:%d as %s", settings.ip, sockets[0].getsockname()[1], url)
    main_thread = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if main_thread else {}
    try:
        asyncio.run(_run(app, sockets, context, url, ready, stop, tick, catch_signals=main_thread))
    finally:
        portal_login.close_quietly(app.settings.get("gate"))
        for sock in sockets:
            sock.close()
        for sig, handler in saved.items():
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(sig, handler)
    with contextlib.suppress(OSError):  # after a hang-up the terminal is gone
        click.echo("Portal stopped.")
    log.info("portal: stopped")


def _stopping(sig: int, done: asyncio.Event) -> None:
    """SIGINT, SIGTERM or a hang-up (the teacher's terminal closed): the portal stops."""
    if sig == signal.SIGHUP:
        with contextlib.suppress(OSError):
            click.echo("The terminal was closed (SIGHUP): the portal stops; servers keep running.")
    log.info("portal: %s received, stopping", signal.Signals(sig).name)
    done.set()


async def _run(
    app: tornado.web.Application,
    sockets: list[socket.socket],
    context: ssl.SSLContext | None,
    url: str,
    ready: Callable[[str], None] | None,
    stop: threading.Event | None,
    tick: Callable[[], None] | None,
    *,
    catch_signals: bool,
) -> None:
    server = tornado.httpserver.HTTPServer(
        app,
        ssl_options=context,
        xheaders=False,  # X-Forwarded-* are not trusted; set server_address behind a proxy
        max_body_size=64 * 1024,
        max_header_size=16 * 1024,
        idle_connection_timeout=60,
        body_timeout=30,
    )
    server.add_sockets(sockets)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = STOP_SIGNALS if catch_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, _stopping, sig, done)
    try:
        if ready:
            ready(url)
        while not done.is_set():
            if stop is not None and stop.is_set():
                break
            if tick is not None:
                try:
                    tick()
                except Exception as exc:  # never the portal's end
                    log.debug("portal: tick failed: %s", exc)
            wait = 0.2 if stop is not None else (1.0 if tick is not None else None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), wait)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        server.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.close_all_connections(), STOP_TIMEOUT)
