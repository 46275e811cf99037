"""Files root writes: one atomic write (a fresh temporary file beside the target, then a
rename); and whether other users can reach a path.

Readers see the old file or the new one, never half of one; a crash leaves at most
a stray temporary file, never a truncated target. Under ``--dry-run`` nothing is
written (the write is logged).
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .system import dry_run

log = logging.getLogger("classroom")


@dataclass(frozen=True)
class Pending:
    """The temporary file being filled: write to ``file``, or let a command write to ``path``."""

    file: BinaryIO
    path: Path


@contextlib.contextmanager
def replacing(
    path: Path, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> Iterator[Pending]:
    """A fresh temporary file beside ``path``, renamed over ``path`` when the block ends.

    The temporary name is random and created exclusively (nobody can have prepared
    it or planted a link there); it has ``mode`` and ``owner`` (uid, gid) before it
    holds a byte, and is flushed to disk before the rename. On an error it is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as out:
            yield Pending(out, tmp)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(
    path: Path, data: str | bytes, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) in one step; see ``replacing``."""
    if dry_run():
        log.debug("dry run, not written: %s", path)
        return
    with replacing(path, mode, owner) as pending:
        pending.file.write(data.encode("utf-8") if isinstance(data, str) else data)


def world_readable_chain(path: Path) -> Path | None:
    """The first folder on the way to ``path`` that others cannot enter, or None."""
    path = path.resolve()
    for part in [*reversed(path.parents), path]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return part
        if part.is_dir() and not mode & 0o001:
            return part
    return None


def changeable_by_others(path: Path, trusted: set[int]) -> str | None:
    """Why someone other than root and the ``trusted`` uids could change what ``path``
    holds (the file, or a folder above it), or None.

    Group write counts only where the group is not root's or the owner's own (the
    user-private group Debian gives every account); a sticky folder (``/tmp``) only
    lets others remove what is theirs.
    """
    path = Path(os.path.abspath(path))
    owners = {0, *trusted}

    def own_group(st: os.stat_result) -> bool:
        if st.st_gid == 0:
            return True
        try:
            group = grp.getgrgid(st.st_gid)
            owner = pwd.getpwuid(st.st_uid)
        except KeyError:
            return False
        return group.gr_name == owner.pw_name and not set(group.gr_mem) - {owner.pw_name}

    real = Path(os.path.realpath(path))  # a link, and the folders above what it points to
    chain = [path, *path.parents] + [p for p in [real, *real.parents] if p != path]
    for part in dict.fromkeys(chain):
        try:
            st = os.stat(part)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"{part}: {exc.strerror}"
        sticky = part != path and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in owners:
            return f"{part} belongs to uid {st.st_uid}, not root or you"
        if mode & 0o002 and not sticky:
            return f"{part} is writable by every user (mode {mode:04o})"
        if mode & 0o020 and not sticky and not own_group(st):
            return f"{part} is writable by the group {_group_name(st.st_gid)} (mode {mode:04o})"
    return None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def read_json_object(path: Path, limit: int = 1 << 20) -> dict:
    """A JSON object from ``path`` (at most ``limit`` bytes read); {} when it is missing, not a
    regular file (a FIFO is not waited on), a link (never followed), or not a JSON object."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as inp:
            if not stat.S_ISREG(os.fstat(inp.fileno()).st_mode):
                return {}
            loaded = json.loads(inp.read(limit) or b"{}")
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
