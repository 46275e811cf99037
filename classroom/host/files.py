"""Files root writes: one atomic write (a fresh temporary file beside the target, then a
rename); and whether other users can reach a path.

Readers see the old file or the new one, never half of one; a crash leaves at most
a stray temporary file, never a truncated target. Under ``--dry-run`` nothing is
written (the write is logged).
"""

from __future__ import annotations

import contextlib
import logging
import os
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
