"""The students' server logs: STATE_DIR/logs/USERNAME.log, root's (0600), appended to."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.settings import Settings
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


def open_log(settings: Settings, username: str, header: str) -> int:
    """The student's server log, opened for appending, after a header line; a descriptor."""
    fd = os.open(
        log_path(settings, username),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    os.write(fd, f"\n===== {now()} {header}\n".encode())
    return fd


def log_tail(settings: Settings, username: str) -> str:
    """The last telling line of a student's server log (for a failure message)."""
    try:
        with open(log_path(settings, username), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("=====")]
    for line in reversed(lines):
        if any(word in line for word in TELLING):
            return line[-300:]
    return lines[-1][-300:] if lines else ""


def failure(settings: Settings, username: str, problem: str) -> str:
    """``problem``, with what the log says and where the full log is."""
    tail = log_tail(settings, username)
    detail = f"; its log says: {tail}" if tail else ""
    return f"{problem}{detail} (full log: {log_path(settings, username)})"
