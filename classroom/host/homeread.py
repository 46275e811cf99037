"""retrieve's reading side: a student's HOME/FOLDER, walked as the student or by metadata only.

``HomeReader`` runs in a child that has become the student: it walks the folder
through directory descriptors that never follow a link, opens each regular file
(``O_NOFOLLOW``, fstat-checked) and hands the open descriptor over a socket to
root's side (``snapshot``). So root never opens a file inside a home, and
nothing the student could not read themselves can reach the teacher.

``unchanged_by_stat`` is the repeat-run fast path, run by root: folders opened
with O_NOFOLLOW and owned by the student, files lstat'ed, never opened.

The messages, one JSON object each (``t`` says which):
``missing`` / ``error`` (``why``), ``same`` (``items``: [rel, stat key, size, mtime] of
files with the stat they had when last collected; ``dirs``), ``skip`` (``rel``, ``why``,
``size``, ``mtime``, ``key``), ``file`` (``rel``, ``key``, ``size``, ``mtime``, with its
descriptor), and ``end``.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
from collections.abc import Sequence

from ..core.retrieverules import StillSame, too_large
from . import safefs, workers
from .safefs import Unsafe

BATCH = 200  # unchanged files and folders per "same" message


class HomeReader:
    """The student's side of one retrieval: walks HOME/FOLDER and sends what is there."""

    def __init__(self, sock: socket.socket, prev_keys: dict[str, str], max_file: int):
        self.sock = sock
        self.prev_keys = prev_keys  # rel -> stat key, of the last snapshot's files
        self.max_file = max_file
        self.same: list[list] = []
        self.dirs: list[str] = []

    def send(self, msg: dict, fd: int | None = None) -> None:
        socket.send_fds(self.sock, [json.dumps(msg).encode()], [fd] if fd is not None else [])

    def flush(self) -> None:
        if self.same or self.dirs:
            self.send({"t": "same", "items": self.same, "dirs": self.dirs})
            self.same, self.dirs = [], []

    def skip(self, entry: safefs.Entry, why: str) -> None:
        self.flush()
        st = entry.st
        size, mtime = (st.st_size, st.st_mtime_ns) if st is not None else (0, 0)
        key = safefs.stat_key(st) if st is not None else ""
        msg = {"t": "skip", "rel": entry.rel, "why": why, "size": size, "mtime": mtime, "key": key}
        self.send(msg)

    def run(
        self, pw: pwd.struct_passwd, folder: str, include: Sequence[str], exclude: Sequence[str]
    ) -> None:
        """Become the student and send everything in their folder, then ``end``."""
        workers.become(pw, umask=0o022)
        try:
            home = safefs.open_home_folder(pw, folder)
        except safefs.NoHome as exc:
            return self.send({"t": "error", "why": str(exc)})
        except safefs.Missing as exc:
            return self.send({"t": "missing", "why": str(exc)})
        except Unsafe as exc:
            return self.send({"t": "error", "why": f"{exc}; not followed"})
        with home:
            assert home.fd is not None
            walk = safefs.walk(
                home.fd, exclude=exclude, include=include, dev=home.dev, uid=pw.pw_uid, dirs=True
            )
            for entry in walk:
                self.entry(entry)
        self.flush()
        self.send({"t": "end"})

    def entry(self, entry: safefs.Entry) -> None:
        st = entry.st
        if entry.problem:
            return self.skip(entry, entry.problem)
        assert st is not None
        if stat.S_ISDIR(st.st_mode):  # kept in the snapshot too, even when empty
            self.dirs.append(entry.rel)
            return None
        why = too_large(st.st_size, self.max_file)
        if why:
            return self.skip(entry, why)
        key = safefs.stat_key(st)
        if self.prev_keys.get(entry.rel) == key:
            self.same.append([entry.rel, key, st.st_size, st.st_mtime_ns])
            if len(self.same) + len(self.dirs) >= BATCH:
                self.flush()
            return None
        self.flush()
        try:
            fd, fst = safefs.open_file(entry.dir_fd, entry.name, expect=st, what="it")
        except Unsafe as exc:
            return self.skip(entry, str(exc))
        try:
            msg = {"t": "file", "rel": entry.rel, "key": safefs.stat_key(fst)}
            self.send({**msg, "size": fst.st_size, "mtime": fst.st_mtime_ns}, fd)
        finally:
            os.close(fd)
        return None


def unchanged_by_stat(
    pw: pwd.struct_passwd,
    folder: str,
    include: Sequence[str],
    exclude: Sequence[str],
    still: StillSame,
) -> dict | None:
    """The repeat-run fast path: the result if nothing changed since the last snapshot, else None.

    Only metadata is looked at (directories opened with O_NOFOLLOW, owned by the
    student, on the home's filesystem; files lstat'ed, never opened), so root may
    do it; no file's content is read. ``still`` judges each entry. Any doubt
    returns None: the student's reader does the full run.
    """
    try:
        with safefs.open_home_folder(pw, folder) as home:
            assert home.fd is not None
            walk = safefs.walk(
                home.fd, exclude=exclude, include=include, dev=home.dev, uid=pw.pw_uid
            )
            for entry in walk:
                st = entry.st
                problem = bool(entry.problem) or st is None
                size, mtime = (st.st_size, st.st_mtime_ns) if st is not None else (0, 0)
                key = safefs.stat_key(st) if st is not None else ""
                if not still.see(entry.rel, problem, size, key, mtime):
                    return None
    except (Unsafe, OSError):
        return None
    return still.result()
