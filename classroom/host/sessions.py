"""Who may use the portal in proxy mode: logins, sessions and the login rate limit.

- A login is checked the way the course gives passwords out: with
  ``notebook_password = same`` through PAM (service ``login``, as JupyterHub's
  PAMAuthenticator does: ``pamela.authenticate`` then ``pamela.check_account``), so a
  student who changed their password with ``passwd`` uses the new one; with
  ``separate``, against the notebook password's hash in the student's
  ``~/.jupyter/jupyter_server_config.json`` (jupyter_server's ``passwd_check``), read
  as root through descriptors that never follow a link. Only the course's own accounts
  are ever checked: any other name (root, the teacher) fails without PAM being asked.
- A session is a random id in a signed cookie (the key: ``STATE_DIR/portal.key``) and a
  row in ``STATE_DIR/sessions.db`` (root-only, like the folder): both survive a
  restart of the portal; ``/logout`` deletes the row, so a copied cookie stops working.
  A new password (``setup --reset-passwords``) and ``remove`` end all of that student's
  sessions (``end_users``): a browser that logged in with a leaked password is out.
  So does any other change of the password a session was made with (``passwd``, an
  edited notebook hash): each session keeps a digest of it (``Authenticator.stamp``),
  compared whenever the session is looked up again.
- More than ``LIMIT`` failures for one username or one client address within
  ``WINDOW`` seconds: the next attempts are refused (429) until the window has passed.
  Counted in memory: a restart of the portal starts the count again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import pwd
import secrets
import sqlite3
import stat
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..core.addresses import valid_username
from ..core.secret import Secret
from ..core.settings import Settings
from .state import State

log = logging.getLogger("classroom")

KEY_FILE = "portal.key"
SESSIONS_FILE = "sessions.db"
SESSION_SECONDS = 12 * 3600  # a school day; then the student logs in again
CACHE_SECONDS = 5.0  # a session row is looked up again after this long (end_users)
LIMIT = 10  # failures per username or client address ...
WINDOW = 300.0  # ... within this many seconds; more are answered 429 until it has passed
MAX_TRACKED = 10_000  # usernames and addresses whose failures are remembered
FAIL_DELAY = 3.0  # every failed login is answered no sooner than this (as PAM's own delay)
PAM_SERVICE = "login"
PAM_THREADS = 8
MAX_CONFIG = 1 << 20  # bytes of a student's Jupyter config read
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,   -- sha256 of the id in the cookie (a copy of the file logs nobody in)
    username TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    stamp TEXT NOT NULL DEFAULT ''  -- digest of the password it was made with (Authenticator.stamp)
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (username);
"""
SHADOW = "/etc/shadow"


def cookie_secret(state_dir: Path) -> bytes:
    """The key that signs session cookies: made once (0600, root's), then read."""
    path = Path(state_dir) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        key = _read_key(path)
        if key:
            return key
        path.unlink()  # empty or unreadable: a new key (every session ends)
        return cookie_secret(state_dir)
    key = secrets.token_hex(32).encode()
    with os.fdopen(fd, "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())
    return key


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as inp:
        st = os.fstat(inp.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(f"{path} must be {os.geteuid()}'s alone (0600)")
        return inp.read(4096).strip()


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    """Sessions in ``STATE_DIR/sessions.db``, with a short in-memory cache.

    ``stamp(username)``: the digest of that student's password now (None: no such
    account); a session made with another one has ended. Without it (``end_users``),
    sessions are not compared.
    """

    def __init__(self, state_dir: Path, stamp: Callable[[str], str | None] | None = None):
        path = Path(state_dir) / SESSIONS_FILE
        old = os.umask(0o077)
        try:
            self.db = sqlite3.connect(path, timeout=10, isolation_level=None)
        finally:
            os.umask(old)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(sessions)")}
        if "stamp" not in columns:  # made by an older portal: its sessions end once
            self.db.execute("ALTER TABLE sessions ADD COLUMN stamp TEXT NOT NULL DEFAULT ''")
        self.stamp = stamp
        self.cache: dict[str, tuple[str | None, float]] = {}

    def create(self, username: str) -> str:
        """A new session for ``username``; returns the id to put in the cookie."""
        session_id = secrets.token_urlsafe(32)
        now = time.time()
        stamp = (self.stamp(username) if self.stamp else None) or ""
        self.db.execute(
            "INSERT INTO sessions (id_hash, username, created, expires, stamp)"
            " VALUES (?, ?, ?, ?, ?)",
            (_hash(session_id), username, now, now + SESSION_SECONDS, stamp),
        )
        self.db.execute("DELETE FROM sessions WHERE expires < ?", (now,))
        return session_id

    def user(self, session_id: str) -> str | None:
        """The username of a live session, or None (unknown, ended, expired, or made with
        a password the student no longer has)."""
        now = time.monotonic()
        cached = self.cache.get(session_id)
        if cached is not None and now - cached[1] < CACHE_SECONDS:
            username = cached[0]
        else:
            row = self.db.execute(
                "SELECT username, stamp FROM sessions WHERE id_hash = ? AND expires > ?",
                (_hash(session_id), time.time()),
            ).fetchone()
            username = row[0] if row else None
            if row and self.stamp is not None and self.stamp(row[0]) != row[1]:
                log.info("portal: a session of %s ended: its password changed", row[0])
                self.end(session_id)
                username = None
            if len(self.cache) > MAX_TRACKED:
                self.cache.clear()
            self.cache[session_id] = (username, now)
        return username

    def end(self, session_id: str) -> None:
        self.cache.pop(session_id, None)
        self.db.execute("DELETE FROM sessions WHERE id_hash = ?", (_hash(session_id),))

    def close(self) -> None:
        self.db.close()


def end_users(state_dir: Path, usernames: set[str] | list[str]) -> int:
    """End every portal session of ``usernames`` (a new password, a removed account): a
    running portal stops honouring them within ``CACHE_SECONDS``. How many ended."""
    path = Path(state_dir) / SESSIONS_FILE
    if not usernames or not path.is_file():
        return 0
    sessions = Sessions(state_dir)
    try:
        with sessions.db:
            return sum(
                sessions.db.execute("DELETE FROM sessions WHERE username = ?", (name,)).rowcount
                for name in sorted(set(usernames))
            )
    finally:
        sessions.close()


class RateLimit:
    """Failed logins per key (a username, a client address) within the last ``WINDOW`` s."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        times = self.failures.get(key)
        if times is None:
            return deque()
        cutoff = self.clock() - WINDOW
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self.failures[key]
        return times

    def retry_after(self, *keys: str) -> int:
        """0 if a login may be tried; else the seconds until one of ``keys`` is under the limit
        again (more than ``LIMIT`` failures within ``WINDOW``)."""
        wait = 0.0
        for key in keys:
            times = self._recent(key)
            if len(times) > LIMIT:
                wait = max(wait, times[-LIMIT - 1] + WINDOW - self.clock())
        return int(wait) + 1 if wait > 0 else 0

    def failed(self, *keys: str) -> None:
        now = self.clock()
        if len(self.failures) > MAX_TRACKED:  # spraying names: forget the oldest
            for key in sorted(self.failures, key=lambda k: self.failures[k][-1])[
                : MAX_TRACKED // 10
            ]:
                del self.failures[key]
        for key in keys:
            self.failures.setdefault(key, deque()).append(now)


# --- checking a password -------------------------------------------------------------------


class Authenticator:
    """Checks a course student's password, PAM or the notebook hash, off the event loop."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pool = ThreadPoolExecutor(PAM_THREADS, thread_name_prefix="login")

    async def check(self, username: str | None, password: Secret) -> bool:
        """True if ``username`` is one of the course's accounts and ``password`` is theirs.

        A failure is answered no sooner than ``FAIL_DELAY`` after the attempt began,
        whatever failed, so that the time taken says nothing.
        """
        started = time.monotonic()
        ok = False
        pw = self.course_account(username) if username else None
        if pw is not None and password.reveal():
            loop = asyncio.get_running_loop()
            try:
                ok = await loop.run_in_executor(self.pool, self._check, pw, password)
            except Exception as exc:  # one line on the log; the student is told "wrong"
                log.warning("portal: cannot check %s's password: %s", pw.pw_name, exc)
        if not ok:
            await asyncio.sleep(max(0.0, FAIL_DELAY - (time.monotonic() - started)))
        return ok

    def course_account(self, username: str) -> pwd.struct_passwd | None:
        """The account of ``username`` if the course created it (its record and uid match)."""
        if not valid_username(username):
            return None
        state = State.peek(self.settings.state_dir)
        try:
            row = state.account(username)
        finally:
            state.close()
        if row is None or row["status"] != "created" or row["uid"] is None:
            return None
        try:
            pw = pwd.getpwnam(username)
        except KeyError:
            return None
        return pw if pw.pw_uid == row["uid"] and pw.pw_uid != 0 else None

    def stamp(self, username: str) -> str | None:
        """A digest of the password ``username`` logs in with now (the hash in /etc/shadow,
        or the notebook password's hash), with the account's uid; None if the account is
        not the course's. A session keeps the one it was made with."""
        pw = self.course_account(username)
        if pw is None:
            return None
        if self.settings.notebook_password == "separate":
            hashed = notebook_hash(pw)
        else:
            hashed = shadow_hash(pw.pw_name)
        return hashlib.sha256(f"{pw.pw_name}:{pw.pw_uid}:{hashed or ''}".encode()).hexdigest()

    def _check(self, pw: pwd.struct_passwd, password: Secret) -> bool:
        if self.settings.notebook_password == "separate":
            hashed = notebook_hash(pw)
            if not hashed:
                return False
            from jupyter_server.auth.security import passwd_check

            return bool(passwd_check(hashed, password.reveal()))
        return pam_check(pw.pw_name, password)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def pam_check(username: str, password: Secret) -> bool:
    """The Unix password, through PAM: authenticate, then the account's own checks (expired,
    locked). No credentials are set in the portal (``resetcred=0``)."""
    import pamela

    try:
        pamela.authenticate(username, password.reveal(), service=PAM_SERVICE, resetcred=0)
        pamela.check_account(username, service=PAM_SERVICE)
    except pamela.PAMError:
        return False
    return True


def shadow_hash(username: str) -> str | None:
    """The password hash /etc/shadow holds for ``username`` (root reads it), or None."""
    try:
        with open(SHADOW, encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == username:
                    return rest.split(":", 1)[0]
    except OSError:
        return None
    return None


def notebook_hash(pw: pwd.struct_passwd) -> str | None:
    """The notebook password's hash setup wrote in the student's Jupyter config; None if it
    is missing or unreadable. Every step is opened without following a link, checked to be
    the student's, and a file is read only if it is a regular one (capped)."""
    fds: list[int] = []
    try:
        home = os.open(pw.pw_dir, DIR_FLAGS)
        fds.append(home)
        folder = os.open(".jupyter", DIR_FLAGS, dir_fd=home)
        fds.append(folder)
        fd = os.open("jupyter_server_config.json", FILE_FLAGS, dir_fd=folder)
        fds.append(fd)
        for each in fds:
            if os.fstat(each).st_uid != pw.pw_uid:
                return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        config = json.loads(os.read(fd, MAX_CONFIG) or b"{}")
    except (OSError, ValueError):
        return None
    finally:
        for each in fds:
            with contextlib.suppress(OSError):
                os.close(each)
    section = config.get("IdentityProvider") if isinstance(config, dict) else None
    hashed = section.get("hashed_password") if isinstance(section, dict) else None
    return hashed if isinstance(hashed, str) and hashed else None
