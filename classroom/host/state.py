"""Course state: a SQLite file and a lock in the root-only state folder.

The state says which accounts the course created (so nothing else is ever
touched), and keeps a journal of what every command did. Modules that need
their own tables declare them with ``SCHEMA`` entries or ``State.ensure``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import InvalidInput, Refused

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    username TEXT PRIMARY KEY,
    uid INTEGER,             -- NULL while useradd has not finished
    home TEXT NOT NULL,
    status TEXT NOT NULL,    -- creating | created
    password_set INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS given_ids (
    id INTEGER PRIMARY KEY   -- a uid or gid the course gave: never given again
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    command TEXT NOT NULL,
    username TEXT,
    action TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_user ON events (username, command);
CREATE TABLE IF NOT EXISTS servers (
    username TEXT PRIMARY KEY,
    port INTEGER NOT NULL,
    pid INTEGER,
    start_time REAL,
    uid INTEGER,
    mode TEXT,
    url TEXT,
    started_at TEXT
);
CREATE TABLE IF NOT EXISTS ports (
    username TEXT PRIMARY KEY,
    port INTEGER NOT NULL
);
"""


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _foreign(path: Path, fd: int) -> str | None:
    """Why the folder open as ``fd`` cannot become the course's state folder, or None
    (root's and 0700, or empty: then it is made so)."""
    st = os.fstat(fd)
    if (st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o700) and os.listdir(fd):
        return (
            f"state_dir {path} already exists with owner uid {st.st_uid} and mode "
            f"{stat.S_IMODE(st.st_mode):04o}, and is not empty; a course's state folder is "
            "root's alone (0700): point [course] state_dir at a new folder"
        )
    return None


def _unusable(path: Path, exc: OSError) -> InvalidInput:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        reason = "it is a symlink or a file, not a folder"
    return InvalidInput(
        f"state_dir {path}: cannot use it as the course's state folder: {reason} "
        "(set [course] state_dir to a folder root can write)"
    )


def check_private_dir(path: Path) -> None:
    """Refuse (``InvalidInput``) a state folder ``ensure_private_dir`` would refuse; change
    nothing. Without root, a folder this user cannot open is taken as fine."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return  # made by the first command that changes something
    except PermissionError:
        if os.geteuid() != 0:
            return
        raise
    except OSError as exc:
        raise _unusable(path, exc) from None
    try:
        problem = _foreign(path, fd)
    except PermissionError:
        problem = None  # not root: cannot list it; root will
    finally:
        os.close(fd)
    if problem:
        raise InvalidInput(problem)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (root, 0700) or make an existing one so; refuse a symlink or a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        path.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise _unusable(path, exc) from None
    try:
        problem = _foreign(path, fd)
        if problem:
            raise InvalidInput(problem)
        st = os.fstat(fd)
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o700:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o700)
        probe = path / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise InvalidInput(
            f"state_dir {path}: not writable: {exc.strerror} (set [course] state_dir to a folder root can write)"
        ) from None
    finally:
        os.close(fd)


class State:
    """The course's SQLite state. ``State.open`` for real runs, ``State.peek`` for read-only ones."""

    FILE = "state.db"

    def __init__(self, conn: sqlite3.Connection, path: Path | None, readonly: bool):
        self.conn = conn
        self.path = path  # None: an empty in-memory stand-in
        self.readonly = readonly
        conn.row_factory = sqlite3.Row

    @classmethod
    def open(cls, state_dir: Path) -> State:
        ensure_private_dir(state_dir)
        db = state_dir / cls.FILE
        old = os.umask(0o077)
        try:
            conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        finally:
            os.umask(old)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        return cls(conn, db, readonly=False)

    @classmethod
    def peek(cls, state_dir: Path) -> State:
        """Open read-only if it exists and is readable, else an empty in-memory state (path None)."""
        db = state_dir / cls.FILE
        try:
            if db.is_file() and os.access(db, os.R_OK):
                conn = sqlite3.connect(
                    f"file:{db}?mode=ro", uri=True, timeout=30, isolation_level=None
                )
                conn.execute("SELECT 1 FROM accounts LIMIT 1")
                return cls(conn, db, readonly=True)
        except (OSError, sqlite3.Error):
            pass
        conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.executescript(SCHEMA)
        return cls(conn, None, readonly=True)

    def ensure(self, schema: str) -> None:
        """Create a module's own tables (``CREATE TABLE IF NOT EXISTS ...``)."""
        if self.readonly and self.path is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.executescript(schema)
            return
        self.conn.executescript(schema)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change: committed when the block ends, rolled back on error."""
        self.conn.execute("BEGIN IMMEDIATE" if not self.readonly else "BEGIN")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def execute(self, sql: str, params: tuple | dict = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def record(self, command: str, username: str | None, action: str, detail: Any = "") -> None:
        if self.readonly:
            return
        if not isinstance(detail, str):
            detail = json.dumps(detail, sort_keys=True)
        self.conn.execute(
            "INSERT INTO events (at, command, username, action, detail) VALUES (?, ?, ?, ?, ?)",
            (now(), command, username, action, detail),
        )

    # -- accounts the course created ---------------------------------------------------

    def account(self, username: str) -> sqlite3.Row | None:
        return self.conn.execute(
            "SELECT * FROM accounts WHERE username = ?", (username,)
        ).fetchone()

    def accounts(self) -> dict[str, sqlite3.Row]:
        return {r["username"]: r for r in self.conn.execute("SELECT * FROM accounts")}

    def claim_account(self, username: str, uid: int, home: str) -> None:
        """Record an account about to be made with ``uid`` (status 'creating', no password)."""
        self.conn.execute(
            "INSERT OR REPLACE INTO accounts (username, uid, home, status, password_set, created_at) "
            "VALUES (?, ?, ?, 'creating', 0, ?)",
            (username, uid, home, now()),
        )

    def account_made(self, username: str) -> None:
        """The recorded account exists now (status 'created')."""
        self.conn.execute("UPDATE accounts SET status = 'created' WHERE username = ?", (username,))

    def password_known(self, username: str, known: bool) -> None:
        """Whether the account's password is the one in credentials.csv (set and written)."""
        self.conn.execute(
            "UPDATE accounts SET password_set = ? WHERE username = ?", (int(known), username)
        )

    def forget_account(self, username: str) -> None:
        """The account is gone (or was never made): forget it and any server it had."""
        self.conn.execute("DELETE FROM accounts WHERE username = ?", (username,))
        self.conn.execute("DELETE FROM servers WHERE username = ?", (username,))

    def given_ids(self) -> set[int]:
        """Every uid and gid the course ever gave (or was about to give): never again."""
        if not self.readonly and self.meta("given_ids_from_journal") is None:
            # A state from before given_ids: take the ids its journal names, once.
            old = {int(self.meta("group_gid") or 0)}
            old |= {r["uid"] or 0 for r in self.conn.execute("SELECT uid FROM accounts")}
            for (detail,) in self.conn.execute(
                "SELECT detail FROM events WHERE action IN ('account created', 'group created')"
            ):
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    data = json.loads(detail)
                    old |= {int(data.get("uid") or 0), int(data.get("gid") or 0)}
            with self.transaction():
                self.give_ids(*(old - {0}))
                self.set_meta("given_ids_from_journal", "done")
        return {r["id"] for r in self.conn.execute("SELECT id FROM given_ids")}

    def give_ids(self, *ids: int) -> None:
        """Record ``ids`` as given (in a transaction, before the account or group is made)."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO given_ids (id) VALUES (?)", [(i,) for i in ids]
        )

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self.conn.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value)
            )

    def last(self, username: str, command: str) -> str | None:
        """When ``command`` last changed something for ``username``."""
        row = self.conn.execute(
            "SELECT at FROM events WHERE username = ? AND command = ? ORDER BY id DESC LIMIT 1",
            (username, command),
        ).fetchone()
        return row["at"] if row else None

    def close(self) -> None:
        self.conn.close()


class Lock:
    """One command at a time per course: an exclusive ``flock`` on STATE_DIR/lock."""

    def __init__(self, state_dir: Path, command: str):
        self.path = state_dir / "lock"
        self.command = command
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another command"
            os.close(fd)
            raise Refused(
                f"the course is locked by {holder}; wait for it to finish "
                f"(or stop it) and run this again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"'{self.command}' (pid {os.getpid()}, since {now()})\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
