"""A home's archive before it is deleted: a tar.gz, root's alone, named for who and when."""

from __future__ import annotations

import os
import pwd
import stat
import time
from pathlib import Path

from ..core.errors import StepFailed
from .files import replacing
from .system import run

TAR_TIMEOUT = 3600  # seconds for one home


def check_archive_dir(folder: Path) -> None:
    """Create ``folder`` (0700) if need be; refuse one that is not root's or that others can write."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.stat(folder)
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise StepFailed(
            f"archive_dir {folder} must belong to root and not be writable by others "
            f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        )


def archive_home(folder: Path, pw: pwd.struct_passwd) -> Path:
    """tar.gz of the home into ``folder`` (0600 root); the name says who and when."""
    return archive_folder(folder, Path(pw.pw_dir), pw.pw_name)


def archive_folder(folder: Path, path: Path, stem: str) -> Path:
    """tar.gz of ``path`` into ``folder`` as STEM-TIMESTAMP.tar.gz (0600 root)."""
    check_archive_dir(folder)
    target = folder / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.tar.gz"
    with replacing(target) as pending:
        argv = ["tar", "--create", "--gzip", "--sparse", "--one-file-system"]
        argv += ["--file", str(pending.path), "--directory", str(path.parent), "--", path.name]
        run(argv, timeout=TAR_TIMEOUT)
    return target
