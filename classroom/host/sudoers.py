"""The course's sudoers file (SPEC §6.4): what the assistants may run as root, and nothing more.

``/etc/sudoers.d/classroom-COURSE`` lets the staff group run the installed console script
for this course's config file only, and only the commands assistants may run::

    %STAFF ALL=(root) NOPASSWD: /usr/local/bin/notebooks status /abs/notebooks.cfg, \\
        /usr/local/bin/notebooks status /abs/notebooks.cfg *, ...
    %STAFF ALL=(root) NOPASSWD: !/usr/local/bin/notebooks send /abs/notebooks.cfg *--source*, ...

A sudoers ``*`` also matches spaces, so ``status CFG *`` allows ``--only x`` but would
allow any other trailing word too: a second config is refused by the tool itself (one
CONFIG argument: an extra one is a usage error), and ``--source DIR`` (send and return
read any folder as root) is taken out again by the negated entries, which come last so
they win. ``setup``, ``remove``, ``export`` and another config file match no entry.

The file is written atomically: a temporary file in /etc/sudoers.d whose name has a
'.' (sudo skips such files), mode 0440, checked with ``visudo -cf`` before it is
renamed into place. A file that fails the check is never installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from ..core.errors import InvalidInput, StepFailed
from .system import CommandFailed, dry_run, run

SUDOERS_D = Path("/etc/sudoers.d")
NOTEBOOKS = "/usr/local/bin/notebooks"  # the console script's link made by scripts/install.sh
COMMANDS = ("status", "send", "retrieve", "return", "launch", "shutdown")
NO_SOURCE = ("send", "return")  # their --source reads any folder as root
# Characters a path may have in the file: nothing sudoers would read as a wildcard,
# an escape, a separator or the end of the argument list.
PLAIN_PATH = re.compile(r"^/[A-Za-z0-9._+/-]+$")
MODE = 0o440


def path_for(course: str) -> Path:
    """``/etc/sudoers.d/classroom-COURSE`` (course names have no '.', which sudo would skip)."""
    return SUDOERS_D / f"classroom-{course}"


def render(staff_group: str, config: Path, program: str = NOTEBOOKS) -> str:
    """The file's text: ``staff_group`` may run ``program`` COMMAND ``config`` [args], as root."""
    where = str(config)
    if not PLAIN_PATH.match(where):
        raise InvalidInput(
            f"{config}: a config path with characters other than letters, digits and ._+-/ "
            "cannot be named safely in a sudoers file; move or rename it"
        )
    allowed = []
    for command in COMMANDS:
        allowed += [f"{program} {command} {where}", f"{program} {command} {where} *"]
    refused = [f"!{program} {command} {where} *--source*" for command in NO_SOURCE]
    head = f"%{staff_group} ALL=(root) NOPASSWD: "
    join = ", \\\n    "
    return (
        "# Written by notebooks setup for the course's assistants; notebooks remove deletes it.\n"
        f"# Config: {where}\n"
        f"{head}{join.join(allowed)}\n"
        f"{head}{join.join(refused)}\n"
    )


def current(course: str) -> str | None:
    """The installed file's text, or None when there is none."""
    try:
        return path_for(course).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def install(course: str, text: str) -> bool:
    """Install the file if it differs (checked with ``visudo -cf`` first); True if it changed.

    Nothing under ``--dry-run``. A text visudo refuses raises ``StepFailed`` and the
    installed file, if any, is left as it was.
    """
    target = path_for(course)
    if current(course) == text and (os.stat(target).st_mode & 0o7777) == MODE:
        return False
    if dry_run():
        return True
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=SUDOERS_D)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchown(f.fileno(), 0, 0)
            os.fchmod(f.fileno(), MODE)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        check(Path(temp))
        os.rename(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return True


def check(path: Path) -> None:
    """``visudo -cf PATH`` (a read-only probe); ``StepFailed`` with visudo's words if it fails."""
    try:
        proc = run(["visudo", "-c", "-f", str(path)], check=False, changes=False)
    except CommandFailed as exc:
        raise StepFailed(f"visudo cannot be run (install Debian's sudo): {exc}") from None
    if proc.returncode != 0:
        said = " ".join((proc.stderr or proc.stdout).split())
        raise StepFailed(f"the sudoers file fails visudo -c, not installed: {said}")


def delete(course: str) -> bool:
    """Delete the course's file; True if there was one. Nothing under ``--dry-run``."""
    target = path_for(course)
    if not os.path.lexists(target):
        return False
    if not dry_run():
        target.unlink()
    return True
