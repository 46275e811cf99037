"""What send and retrieve remember in the course state: every SQL statement of theirs.

send keeps, per student and folder, what it wrote to each path (so an edit is
told from an old version) and the sha256 of each source file by its stat (so
an unchanged source is not read again). ``return`` applies send's rules with
its own record of what it wrote (table ``returned``), so that neither mistakes
the other's files for its own; the sha256 cache of source files is shared (it
is only content). The shared folder's record is send's, under the username "". retrieve keeps, per student and
destination, the last snapshot's files (to link what did not change) and one
row per snapshot. A dry run's state is read-only: nothing is recorded then.
"""

from __future__ import annotations

import os
import sqlite3

from ..core import sendrules
from .state import State, now

SEND_SQL = """
CREATE TABLE IF NOT EXISTS sent (
    username TEXT NOT NULL,
    folder TEXT NOT NULL,
    path BLOB NOT NULL,          -- relative to HOME/FOLDER, bytes as on disk
    sha256 TEXT NOT NULL,        -- what the course wrote there last
    size INTEGER NOT NULL,
    stat_key TEXT,               -- dev:ino:size:mtime_ns:ctime_ns of the file as written
    sent_at TEXT NOT NULL,
    PRIMARY KEY (username, folder, path)
);
CREATE TABLE IF NOT EXISTS source_hashes (
    path BLOB PRIMARY KEY,
    stat_key TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
"""

RETURN_SQL = """
CREATE TABLE IF NOT EXISTS returned (   -- as ``sent``, for what return wrote
    username TEXT NOT NULL,
    folder TEXT NOT NULL,
    path BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    stat_key TEXT,
    sent_at TEXT NOT NULL,
    PRIMARY KEY (username, folder, path)
);
"""

# What send's engine wrote: table -> the command that records its events.
SENT, RETURNED = "sent", "returned"
EVENTS = {SENT: "send", RETURNED: "return"}

RETRIEVE_SQL = """
CREATE TABLE IF NOT EXISTS retrieved (
    username TEXT NOT NULL,
    destination TEXT NOT NULL,
    path BLOB NOT NULL,          -- relative to HOME/FOLDER, bytes as on disk
    snapshot TEXT NOT NULL,
    sha256 TEXT NOT NULL,        -- or 'skipped: REASON' for a file the snapshot lacks
    size INTEGER NOT NULL,
    stat_key TEXT NOT NULL,      -- the student's file when it was collected (or skipped)
    PRIMARY KEY (username, destination, path)
);
CREATE TABLE IF NOT EXISTS snapshots (
    username TEXT NOT NULL,
    destination TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    folder TEXT NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    taken_at TEXT NOT NULL,
    PRIMARY KEY (username, destination, snapshot)
);
"""


def _rows(state: State, sql: str, params: tuple = ()) -> list:
    """Rows of a query; none when a dry run's read-only state lacks the table."""
    try:
        return state.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        if state.readonly:
            return []
        raise


def _by_user(state: State, sql: str, params: tuple = ()) -> dict[str, list]:
    """One query for every student (first column: username), grouped; a worker gets its own list.

    One query is much cheaper than one per student; the rows stay raw tuples
    until the worker (in parallel) turns them into what it needs.
    """
    grouped: dict[str, list] = {}
    for row in _rows(state, sql, params):
        grouped.setdefault(row[0], []).append(tuple(row)[1:])
    return grouped


# --- send --------------------------------------------------------------------------------------


def source_hashes(state: State) -> dict[bytes, tuple[str, str]]:
    """The source files' sha256 as last computed: absolute path -> (stat key, sha256)."""
    rows = _rows(state, "SELECT path, stat_key, sha256 FROM source_hashes")
    return {bytes(r["path"]): (r["stat_key"], r["sha256"]) for r in rows}


def save_source_hashes(state: State, fresh: list[tuple[bytes, str, str]]) -> None:
    """Remember newly computed (path, stat key, sha256) of source files."""
    if not fresh or state.readonly:
        return
    with state.transaction():
        state.conn.executemany(
            "INSERT OR REPLACE INTO source_hashes (path, stat_key, sha256) VALUES (?, ?, ?)",
            fresh,
        )


def sent_rows(state: State, folder: str, table: str = SENT) -> dict[str, list]:
    """What was sent (``table``: or returned) into ``folder``: username -> [(path, sha256,
    size, stat key)]."""
    assert table in EVENTS
    return _by_user(
        state,
        f"SELECT username, path, sha256, size, stat_key FROM {table} WHERE folder = ?",  # noqa: S608 - a table of EVENTS
        (folder,),
    )


def handed_out(state: State, folder: str) -> dict[str, dict[str, str]]:
    """What send last wrote into ``folder``: username -> {path: sha256} (for what is late)."""
    return {
        username: {os.fsdecode(bytes(path)): sha for path, sha, _size, _key in rows}
        for username, rows in sent_rows(state, folder).items()
    }


def record_sent(state: State, username: str, folder: str, result: dict, table: str = SENT) -> None:
    """What was written to this student (``table``: by send or return), in the state,
    before it counts as done."""
    assert table in EVENTS
    what = sendrules.outcome(result["actions"])
    forgotten = result.get("forgotten") or []
    if state.readonly or (not result["records"] and not what and not forgotten):
        return
    at = now()
    with state.transaction():
        state.conn.executemany(
            f"DELETE FROM {table} WHERE username = ? AND folder = ? AND path = ?",  # noqa: S608
            [(username, folder, os.fsencode(rel)) for rel in forgotten],
        )
        state.conn.executemany(
            f"INSERT OR REPLACE INTO {table} "  # noqa: S608 - a table of EVENTS
            "(username, folder, path, sha256, size, stat_key, sent_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (username, folder, os.fsencode(rel), sha, size, key, at)
                for rel, sha, size, key in result["records"]
            ],
        )
        if what:
            counts = {k: len(v) for k, v in result["actions"].items() if v}
            state.record(EVENTS[table], username or None, what, {"folder": folder, **counts})


# --- retrieve ----------------------------------------------------------------------------------


def retrieved_rows(state: State, dest: str) -> dict[str, list]:
    """The last snapshot of each student in ``dest``: username -> [(path, snapshot, sha256,
    size, stat key)]."""
    return _by_user(
        state,
        "SELECT username, path, snapshot, sha256, size, stat_key FROM retrieved "
        "WHERE destination = ?",
        (dest,),
    )


def record_retrieved(state: State, username: str, dest: str, folder: str, result: dict) -> None:
    """A new snapshot (its files replace the last one's), or the new stat of unchanged files."""
    if state.readonly or result["state"] == "nothing":
        return
    if result["state"] == "unchanged" and not result["cache"]:
        return
    snap = result.get("snapshot") or ""
    rows = [
        (username, dest, snap, os.fsencode(rel), sha, size, key)
        for rel, sha, size, key in result["cache"]
    ]
    with state.transaction():
        if result["state"] != "collected":  # the same content: remember the files' new stat
            state.conn.executemany(
                "UPDATE retrieved SET stat_key = ? "
                "WHERE username = ? AND destination = ? AND path = ?",
                [(key, u, d, p) for u, d, _snap, p, _sha, _size, key in rows],
            )
            return
        state.execute(
            "DELETE FROM retrieved WHERE username = ? AND destination = ?", (username, dest)
        )
        state.conn.executemany(
            "INSERT INTO retrieved "
            "(username, destination, snapshot, path, sha256, size, stat_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        state.execute(
            "INSERT OR REPLACE INTO snapshots "
            "(username, destination, snapshot, folder, files, bytes, taken_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (username, dest, snap, folder, result["files"], result["bytes"], now()),
        )
        state.record(
            "retrieve",
            username,
            "collected",
            {"snapshot": snap, **result["counts"], "late": len(result["late"])},
        )
