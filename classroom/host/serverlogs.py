"""The students' server logs: STATE_DIR/logs/USERNAME.log, root's (0600), appended to.

A server never holds the log: its output goes through a pipe to a log writer
(``logwriter.py``), which keeps at most ``logwriter.LIMIT`` bytes of each start. A log
grown past that is moved to ``USERNAME.log.1`` when the next start opens it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..core.settings import Settings
from ..core.text import printable
from .logwriter import LIMIT
from .state import now

TELLING = ("Error", "error", "CRITICAL", "refused", "cannot", "denied")


def log_dir(settings: Settings) -> Path:
    return settings.state_dir / "logs"


def log_path(settings: Settings, username: str) -> Path:
    return log_dir(settings) / f"{username}.log"


def ensure_log_dir(settings: Settings) -> None:
    folder = log_dir(settings)
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)


def open_log(settings: Settings, username: str, header: str) -> tuple[int, int]:
    """The student's server log, opened for appending, after a header line: (descriptor,
    offset where this start's output begins). A log over ``LIMIT`` is moved aside first."""
    path = log_path(settings, username)
    with contextlib.suppress(OSError):
        if os.lstat(path).st_size > LIMIT:
            os.replace(path, path.with_name(path.name + ".1"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.write(fd, f"\n===== {now()} {header}\n".encode())
    return fd, os.lseek(fd, 0, os.SEEK_END)


def log_tail(settings: Settings, username: str, since: int = 0) -> str:
    """The last telling line that a start wrote from offset ``since`` on in a student's
    server log (for a failure message), safe to print: the student wrote it."""
    try:
        with open(log_path(settings, username), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [printable(ln).strip() for ln in lines]
    lines = [ln for ln in lines if ln and not ln.startswith("=====")]
    for line in reversed(lines):
        if any(word in line for word in TELLING):
            return line[-300:]
    return lines[-1][-300:] if lines else ""


def failure(settings: Settings, username: str, problem: str, since: int = 0) -> str:
    """``problem``, with what the log says since offset ``since`` and where the full log is."""
    tail = log_tail(settings, username, since)
    detail = f"; its log says: {tail}" if tail else ""
    return f"{problem}{detail} (full log: {log_path(settings, username)})"
