"""The portal in proxy mode: its routes, and each logged-in student's requests forwarded to
their own server only (the login is ``portal_login.py``).

    ANY  /user/NAME/...    forwarded, HTTP and WebSocket, to NAME's server's Unix socket:
                           only for NAME's own session, else 403 and nothing is forwarded;
                           503 while NAME's server is stopped

How a request is judged (read with jupyter-server-proxy's and JupyterHub's checks):

- The upstream is chosen from the session, never from the path: the raw, still
  percent-encoded path must start byte for byte with ``/user/<session's user>/``, so
  ``%62ob``, ``..``, ``//`` or another case can never lead to someone else's server.
- The socket's listener must run as the student (``SO_PEERCRED``): root follows the
  links a student may plant in their own socket's folder, the peer's uid does not lie.
- A WebSocket handshake must carry ``Origin`` equal to the portal's own origin; any
  other non-GET request may not carry a different one; a request a page on another
  origin (another port of this host included) makes is refused. Behind that, the
  student's server still checks its own ``_xsrf`` cookie and the Origin.
- Upstream gets no ``Authorization``, no ``Cookie`` but the server's own (``_xsrf``,
  ``username-*``), no ``X-Forwarded-*`` from the browser; the browser gets no
  ``Set-Cookie`` but those, scoped to ``/user/NAME/``, and no ``Clear-Site-Data``.
- Bodies are streamed both ways with backpressure (``HTTP1Connection`` on the socket):
  a 50 MB upload or download never sits whole in the portal. A WebSocket is a byte
  tunnel once the server has answered 101; it ends with its session.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
import socket
from http.cookies import CookieError, SimpleCookie
from typing import Any

import tornado.web
from tornado import httputil, iostream
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters

from ..core.addresses import server_path
from ..core.launchplan import socket_path
from ..core.settings import Settings
from .portal_login import (
    Gate,
    LandingHandler,
    LoginHandler,
    LogoutHandler,
    PageHandler,
    safe_next,
)
from .portal_pages import SECURITY_HEADERS, login_form, note
from .server import peer_uid
from .sessions import CACHE_SECONDS

log = logging.getLogger("classroom")

HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_FORWARDED = frozenset(
    {
        "authorization",
        "cookie",
        "expect",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-real-ip",
    }
)
SERVER_COOKIE = re.compile(r"(?:_xsrf|username-[A-Za-z0-9_-]{1,200})")
UNSAFE_SITES = ("cross-site", "same-site")  # Sec-Fetch-Site of a page on another origin
MAX_BODY = 1 << 30  # per forwarded request (JupyterLab uploads big files in 1 MiB chunks)
BODY_TIMEOUT = 3600.0  # seconds a forwarded body may take
CHUNK = 64 * 1024
MAX_HANDSHAKE = 64 * 1024  # bytes of a server's answer to a WebSocket handshake
OWN_HEADERS = ("Server", "Content-Type", "Date", "Content-Security-Policy", *SECURITY_HEADERS)


class Unreachable(Exception):
    """The student's server does not answer on its socket (stopped, or not theirs)."""


def upstream_headers(request: httputil.HTTPServerRequest) -> httputil.HTTPHeaders:
    """The request's headers for the student's server: no hop-by-hop or auth headers, no
    client-made X-Forwarded-*, and only the cookies a student's server sets itself."""
    incoming = request.headers
    drop = set(HOP | NOT_FORWARDED)
    for value in incoming.get_list("Connection"):
        drop |= {name.strip().lower() for name in value.split(",")}
    out = httputil.HTTPHeaders()
    for name, value in incoming.get_all():
        if name.lower() not in drop:
            out.add(name, value)
    kept = []
    for value in incoming.get_list("Cookie"):
        for part in value.split(";"):
            name, eq, _ = part.strip().partition("=")
            if eq and SERVER_COOKIE.fullmatch(name):
                kept.append(part.strip())
    if kept:
        out["Cookie"] = "; ".join(kept)
    return out


def scoped_cookie(value: str, prefix: str, secure: bool = False) -> str | None:
    """A student's server's Set-Cookie, kept only for its own cookies and its own path (and
    ``secure``: only sent over HTTPS, so a classmate's plain-HTTP listener never gets it)."""
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(value)
    except CookieError:
        return None
    if len(jar) != 1:
        return None
    ((name, morsel),) = jar.items()
    if not SERVER_COOKIE.fullmatch(name):
        return None
    morsel["domain"] = ""
    if not (morsel["path"] or "").startswith(prefix):
        morsel["path"] = prefix
    if secure:
        morsel["secure"] = True
    return morsel.OutputString()


def downstream_headers(
    headers: httputil.HTTPHeaders, prefix: str, *, secure: bool = False, upgrade: bool = False
):
    """(name, value) of a server's response headers that may reach the browser."""
    for name, value in headers.get_all():
        low = name.lower()
        if low in ("connection", "upgrade") and upgrade:
            yield name, value
            continue
        if low in HOP or low in ("content-length", "clear-site-data"):
            continue
        if low == "set-cookie":
            scoped = scoped_cookie(value, prefix, secure)
            if scoped is not None:
                yield name, scoped
            continue
        yield name, value


async def connect(settings: Settings, username: str, uid: int | None) -> iostream.IOStream:
    """A stream to ``username``'s server socket, whose listener must run as ``uid``.

    Raises ``Unreachable`` when nothing listens there or the listener is someone else.
    """
    if uid is None:
        raise Unreachable(f"{username} has no account")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = iostream.IOStream(sock, max_buffer_size=4 * CHUNK + MAX_HANDSHAKE)
    try:
        await stream.connect(str(socket_path(settings, username)))
        holder = peer_uid(sock)
    except (OSError, iostream.StreamClosedError) as exc:
        stream.close()
        raise Unreachable(f"{username}'s server does not answer: {exc}") from None
    if holder != uid:
        stream.close()
        log.warning("portal: %s's socket is held by uid %d, not %d: refused", username, holder, uid)
        raise Unreachable(f"{username}'s socket is not {username}'s")
    return stream


@tornado.web.stream_request_body
class ForwardHandler(PageHandler):
    """Everything under /user/: judged, then forwarded to the session's own server."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    upstream: iostream.IOStream | None = None
    conn: HTTP1Connection | None = None
    prefix = ""

    def finish(self, chunk: Any = None) -> Any:
        if self.conn is None and not self._headers_written:
            # Answered in prepare, before the (streamed) body was read: tornado closes the
            # connection after this answer. Say so, or a client reuses it and loses its
            # next request to the close.
            self.set_header("Connection", "close")
        return super().finish(chunk)

    async def prepare(self) -> None:
        user = self.session_user()
        path = self.request.path  # raw: still percent-encoded
        if user is None:
            self.refuse_anonymous()
            return
        self.prefix = server_path(user)
        if not path.startswith(self.prefix):
            if path == self.prefix[:-1] and self.request.method in ("GET", "HEAD"):
                query = f"?{self.request.query}" if self.request.query else ""
                self.redirect(self.prefix + query)
                return
            log.warning(
                "portal: %s asked for %r from %s: not theirs, refused",
                user,
                self.request.uri[:200],
                self.request.remote_ip,
            )
            self.page(
                note(
                    "This is not your server",
                    f"You are logged in as <code>{html.escape(user)}</code>. "
                    f'<a href="{self.prefix}">Open your own notebooks</a>.',
                ),
                403,
            )
            return
        websocket = self.request.headers.get("Upgrade", "").lower() == "websocket"
        if not self.allowed_origin(websocket):
            self.page(note("Refused", "This request did not come from your notebooks' page."), 403)
            return
        try:
            self.upstream = await connect(self.gate.settings, user, self.gate.uid(user))
        except Unreachable as exc:
            log.info("portal: %s", exc)
            self.page(
                note(
                    "Your server is not running",
                    "Ask your teacher to start it, then reload this page.",
                ),
                503,
                headers={"Retry-After": "10"},
            )
            return
        if websocket:
            await self.tunnel()
            return
        if self.request.method not in ("POST", "PUT", "PATCH") and self.chunked_body():
            self.close_upstream()
            self.page(note("Length required", "Send this request with a length."), 411)
            return
        self.request.connection.set_max_body_size(MAX_BODY)  # type: ignore[attr-defined]
        self.request.connection.set_body_timeout(BODY_TIMEOUT)  # type: ignore[attr-defined]
        self.conn = HTTP1Connection(
            self.upstream,
            True,
            HTTP1ConnectionParameters(
                no_keep_alive=True, decompress=False, chunk_size=CHUNK, max_body_size=1 << 62
            ),
        )
        headers = upstream_headers(self.request)
        headers["Connection"] = "close"
        start = httputil.RequestStartLine(self.request.method, self.request.uri, "HTTP/1.1")
        await self.conn.write_headers(start, headers)

    def chunked_body(self) -> bool:
        return "Transfer-Encoding" in self.request.headers and (
            "Content-Length" not in self.request.headers
        )

    def refuse_anonymous(self) -> None:
        """Not logged in: 403, and the login form that comes back here afterwards."""
        next_url = ""
        if self.request.method in ("GET", "HEAD"):
            next_url = safe_next(self.request.uri or "")
        self.page(
            note("Please log in", "This page belongs to a student.") + login_form("", next_url), 403
        )

    def allowed_origin(self, websocket: bool) -> bool:
        headers = self.request.headers
        if websocket:
            return self.same_origin(required=True)
        if headers.get("Sec-Fetch-Site") in UNSAFE_SITES and headers.get("Sec-Fetch-Mode") != (
            "navigate"
        ):
            return False  # a page on another origin (another port too) is loading this
        if self.request.method in ("GET", "HEAD", "OPTIONS"):
            return True
        return self.same_origin()

    def data_received(self, chunk: bytes) -> Any:
        if self.conn is None:
            return None  # refused: the body is read and dropped
        return self.conn.write(chunk)  # awaited by tornado: the upload waits for the server

    async def forward(self, *args: Any) -> None:
        assert self.conn is not None
        self.conn.finish()
        try:
            await self.conn.read_response(_Relay(self))
        except (iostream.StreamClosedError, httputil.HTTPInputError, OSError) as exc:
            log.info("portal: %s's server broke off: %s", self.prefix, exc)
            if not self._headers_written:
                self.page(note("Your server did not answer", "Reload the page."), 502)
            else:
                self.request.connection.close()  # type: ignore[attr-defined]
        finally:
            self.close_upstream()
        if not self._finished:
            self.finish()

    get = head = post = put = patch = delete = options = forward  # type: ignore[assignment]

    def on_connection_close(self) -> None:
        self.close_upstream()

    def on_finish(self) -> None:
        if not isinstance(self.upstream, _Detached):
            self.close_upstream()

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()

    async def tunnel(self) -> None:
        """Hand the handshake to the server; on its 101, pipe bytes both ways until one ends."""
        assert self.upstream is not None
        upstream = self.upstream
        headers = upstream_headers(self.request)
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = "websocket"
        lines = [f"GET {self.request.uri} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers.get_all()]
        try:
            await upstream.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head = await upstream.read_until_regex(b"\r?\n\r?\n", max_bytes=MAX_HANDSHAKE)
            text = head.decode("latin-1")
            first, _, rest = text.partition("\n")
            status = httputil.parse_response_start_line(first.strip())
            answer = httputil.HTTPHeaders.parse(rest)
        except (iostream.StreamClosedError, iostream.UnsatisfiableReadError, ValueError) as exc:
            upstream.close()
            log.info("portal: WebSocket to %s failed: %s", self.prefix, exc)
            self.page(note("Your server did not answer", "Reload the page."), 502)
            return
        if status.code != 101:
            upstream.close()
            self.set_status(status.code)
            self.finish()
            return
        out = [f"HTTP/1.1 101 {status.reason or 'Switching Protocols'}"]
        out += [
            f"{n}: {v}"
            for n, v in downstream_headers(
                answer, self.prefix, secure=self.gate.secure, upgrade=True
            )
        ]
        self.upstream = _Detached()  # on_finish must not close the tunnel's end
        client = self.detach()
        try:
            await client.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
        except iostream.StreamClosedError:
            upstream.close()
            return
        watch = asyncio.ensure_future(self.end_with_session(client, upstream))
        try:
            await asyncio.gather(_pipe(client, upstream), _pipe(upstream, client))
        finally:
            watch.cancel()

    async def end_with_session(self, client: iostream.IOStream, upstream: Any) -> None:
        """Close the tunnel once its session has ended (logout, a new password, remove):
        an open kernel or terminal connection must not outlive the login it came with."""
        session_id, user = self.session_id(), self.session_user()
        while not client.closed():
            await asyncio.sleep(CACHE_SECONDS)
            if session_id is None or self.gate.sessions.user(session_id) != user:
                log.info("portal: %s's WebSocket closed: its session ended", user)
                client.close()
                upstream.close()
                return


class _Detached:
    """Stands in for the upstream once the tunnel owns it."""

    def close(self) -> None:
        return None


async def _pipe(src: iostream.IOStream, dst: iostream.IOStream) -> None:
    try:
        while True:
            data = await src.read_bytes(CHUNK, partial=True)
            await dst.write(data)
    except iostream.StreamClosedError:
        pass
    finally:
        src.close()
        dst.close()


class _Relay(httputil.HTTPMessageDelegate):
    """The server's answer, passed on as it comes: each chunk waits until the browser took it."""

    def __init__(self, handler: ForwardHandler):
        self.handler = handler

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> None:
        handler = self.handler
        assert isinstance(start_line, httputil.ResponseStartLine)
        handler.clear()
        for name in OWN_HEADERS:  # the server's answer, not the portal's page
            handler.clear_header(name)
        reason = start_line.reason if start_line.reason.isascii() else None
        handler.set_status(start_line.code, reason or None)
        for name, value in downstream_headers(headers, handler.prefix, secure=handler.gate.secure):
            handler.add_header(name, value)
        length = headers.get("Content-Length")
        if length is not None and length.isdigit():
            handler.set_header("Content-Length", length)

    def data_received(self, chunk: bytes) -> Any:
        self.handler.write(chunk)
        return self.handler.flush()

    def finish(self) -> None:
        return None


def routes(settings: Settings) -> tuple[list, Gate]:
    """The proxy-mode routes (``/healthz`` is the portal's) and the gate they share."""
    gate = Gate.open(settings)
    args = {"gate": gate}
    return [
        (r"/", LandingHandler, args),
        (r"/login", LoginHandler, args),
        (r"/logout", LogoutHandler, args),
        (r"/user/.*", ForwardHandler, args),
    ], gate
