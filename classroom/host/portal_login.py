"""The portal's login in proxy mode: the session a browser holds, and the pages that
make and end it. ``proxy.py`` forwards a logged-in student's requests.

    GET  /                 the login form (username and password), or "logged in as NAME"
    POST /login            PAM or the notebook hash (``sessions.Authenticator``); 403 with
                           the same message for a wrong password and an unknown user; 429
                           after more than 10 failures (``sessions.RateLimit``)
    GET|POST /logout       ends the session (a cross-site GET only offers the button)
    anything else          404, on the portal's own page

``/login`` and ``/logout`` accept only the portal's own forms (``PageHandler.same_origin``).
The session cookie is signed, HttpOnly, SameSite=Lax, and Secure and ``__Host-`` prefixed
over HTTPS; after logging in, ``next`` may only lead to the student's own server.
"""

from __future__ import annotations

import contextlib
import html
import logging
import pwd
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import tornado.web

from ..core.addresses import MAX_INPUT, clean_username, https, server_path
from ..core.secret import Secret
from ..core.settings import Settings
from .portal_pages import (
    LOGIN_LEAD,
    MAX_PASSWORD,
    login_form,
    note,
    render,
    security_headers,
    signed_in,
)
from .sessions import (
    SESSION_SECONDS,
    Authenticator,
    RateLimit,
    Sessions,
    cookie_secret,
)

log = logging.getLogger("classroom")

COOKIE = "classroom-session"
UID_CACHE = 60.0  # seconds a student's uid is remembered
# Browsers send "Origin: null" for a form posted from a no-referrer page: same-origin it is.
REFERRER = "same-origin"


@dataclass
class Gate:
    """What the proxy-mode handlers share: sessions, the rate limit, the password check."""

    settings: Settings
    sessions: Sessions
    limit: RateLimit
    auth: Authenticator
    secure: bool  # HTTPS: the cookie is Secure and __Host- prefixed
    uids: dict[str, tuple[int | None, float]] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings) -> Gate:
        auth = Authenticator(settings)
        return cls(
            settings,
            Sessions(settings.state_dir, stamp=auth.stamp),
            RateLimit(),
            auth,
            https(settings),
        )

    @property
    def cookie(self) -> str:
        return f"__Host-{COOKIE}" if self.secure else COOKIE

    def uid(self, username: str) -> int | None:
        now = time.monotonic()
        cached = self.uids.get(username)
        if cached is None or now - cached[1] > UID_CACHE:
            try:
                uid: int | None = pwd.getpwnam(username).pw_uid
            except KeyError:
                uid = None
            cached = self.uids[username] = (uid, now)
        return cached[0]

    def close(self) -> None:
        self.auth.close()
        self.sessions.close()


def application_settings(settings: Settings) -> dict[str, Any]:
    """The tornado settings proxy mode needs (the cookie key from the state folder)."""
    return {"cookie_secret": cookie_secret(settings.state_dir)}


# --- pages -------------------------------------------------------------------------------


class PageHandler(tornado.web.RequestHandler):
    """The portal's own pages in proxy mode: security headers, no traceback, no Server."""

    gate: Gate

    def initialize(self, gate: Gate) -> None:
        self.gate = gate

    def set_default_headers(self) -> None:
        security_headers(self, referrer=REFERRER)

    def check_xsrf_cookie(self) -> None:  # the Origin checks below do this job
        return None

    def compute_etag(self) -> None:
        return None

    def page(self, body: str, status: int = 200, headers: dict[str, str] | None = None) -> None:
        if self._finished:
            return
        self.clear()
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        for name, value in (headers or {}).items():
            self.set_header(name, value)
        title = self.gate.settings.title or self.gate.settings.name
        self.finish(render(title, body, referrer=REFERRER))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        heading = {
            400: "That request was not understood",
            404: "There is nothing at this address",
            405: "That is not something this page does",
        }.get(status_code, "Something went wrong")
        self.page(note(html.escape(heading), '<a href="/">Go to the login page</a>.'), status_code)

    # --- who is asking ---------------------------------------------------------------------

    def session_id(self) -> str | None:
        value = self.get_signed_cookie(self.gate.cookie, max_age_days=SESSION_SECONDS / 86400)
        return value.decode("ascii", "replace") if value else None

    def session_user(self) -> str | None:
        """The student this browser is logged in as, or None."""
        session_id = self.session_id()
        return self.gate.sessions.user(session_id) if session_id else None

    def origin(self) -> str:
        return f"{self.request.protocol}://{self.request.host}"

    def same_origin(self, *, required: bool = False) -> bool:
        """The request comes from a page of the portal itself (or from no page at all, unless
        ``required``): its Origin, when given, is ours, and no browser says another site
        made it."""
        origin = self.request.headers.get("Origin")
        if origin is None:
            if required:
                return False
            return self.request.headers.get("Sec-Fetch-Site", "same-origin") in (
                "same-origin",
                "none",
            )
        return origin == self.origin()


class LandingHandler(PageHandler):
    """GET / (and /login): the login form, or what a logged-in student can do."""

    def get(self) -> None:
        user = self.session_user()
        if user:
            self.page(signed_in(user))
            return
        self.page(LOGIN_LEAD + login_form(next_url=safe_next(self.get_argument("next", ""))))

    head = get


class LoginHandler(LandingHandler):
    """POST /login: the password checked, a session made; 403 wrong, 429 too many failures."""

    async def post(self) -> None:
        if not self.same_origin():
            self.page(note("Log in from the class page", "Open the portal and log in there."), 403)
            return
        typed = self.get_body_argument("username", "", strip=True)[: MAX_INPUT + 1]
        password = Secret(self.get_body_argument("password", "", strip=False)[: MAX_PASSWORD + 1])
        next_url = safe_next(self.get_body_argument("next", ""))
        username = clean_username(typed)
        keys = (f"user:{(username or typed.lower())[:MAX_INPUT]}", f"addr:{self.request.remote_ip}")
        if self.too_many(keys, typed, next_url):
            return
        if not await self.gate.auth.check(username, password):
            self.gate.limit.failed(*keys)
            log.info(
                "portal: failed login for %r from %s", typed[:MAX_INPUT], self.request.remote_ip
            )
            if self.too_many(keys, typed, next_url):
                return
            text = "Wrong username or password. Check the slip from your teacher and try again."
            self.page(note("Not logged in", text) + login_form(typed, next_url), 403)
            return
        assert username is not None
        session_id = self.gate.sessions.create(username)
        self.set_signed_cookie(
            self.gate.cookie,
            session_id,
            expires_days=None,  # a browser session; the server ends it after SESSION_SECONDS
            path="/",
            httponly=True,
            secure=self.gate.secure,
            samesite="Lax",
        )
        log.info("portal: %s logged in from %s", username, self.request.remote_ip)
        target = next_url if next_url.startswith(server_path(username)) else server_path(username)
        self.redirect(target, status=303)

    def too_many(self, keys: tuple[str, ...], typed: str, next_url: str) -> bool:
        wait = self.gate.limit.retry_after(*keys)
        if not wait:
            return False
        minutes = max(1, round(wait / 60))
        text = f"Too many wrong passwords. Wait {minutes} minute(s), then try again."
        self.page(
            note("Please wait", text) + login_form(typed, next_url),
            429,
            headers={"Retry-After": str(wait)},
        )
        return True


class LogoutHandler(PageHandler):
    """GET or POST /logout: the session ends (here and in the state folder)."""

    def get(self) -> None:
        if not self.same_origin():  # another site may not log a student out: offer the button
            self.page(
                '<form method="post" action="/logout"><button type="submit">Log out</button></form>'
            )
            return
        self.logout()

    def post(self) -> None:
        if not self.same_origin():
            self.page(
                note("Log out from the class page", "Open the portal and log out there."), 403
            )
            return
        self.logout()

    def logout(self) -> None:
        session_id = self.session_id()
        if session_id:
            self.gate.sessions.end(session_id)
        self.clear_cookie(self.gate.cookie, path="/", secure=self.gate.secure, samesite="Lax")
        self.page(note("Logged out", "You can close this page.") + login_form())


class NotFoundHandler(PageHandler):
    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


def safe_next(value: str) -> str:
    """A ``next`` address to go to after logging in: a plain path under /user/, else ''."""
    if not value or len(value) > 2000 or not value.startswith("/user/") or "\\" in value:
        return ""
    try:
        parts = urlsplit(value)
    except ValueError:
        return ""
    if parts.scheme or parts.netloc or "//" in parts.path or not value.isascii():
        return ""
    if any(ord(c) < 0x21 for c in value):
        return ""
    return value


def not_found(gate: Gate) -> tuple[type, dict]:
    """The handler (and its arguments) for any other address: 404 on the portal's page."""
    return NotFoundHandler, {"gate": gate}


def close_quietly(gate: Gate | None) -> None:
    """Close the gate's password check and sessions, if there is a gate; never raises."""
    if gate is not None:
        with contextlib.suppress(Exception):
            gate.close()
