"""What a student's server needs in their home, made as the student before it starts:
the folder it opens in, and its own copies of the certificate and key (HTTPS) -- or no
copies at all once HTTPS is off, so the student no longer holds the private key."""

from __future__ import annotations

import contextlib
import os
import pwd
from pathlib import Path

from ..core.addresses import https
from ..core.errors import StepFailed
from ..core.launchplan import TLS_DIR, root_dir
from ..core.settings import Settings
from .workers import as_user, as_users

TLS_FILES = ("cert.pem", "key.pem")


def read_tls(settings: Settings) -> tuple[bytes, bytes] | None:
    """The certificate and key to copy (root reads them once), or None when HTTPS is off.

    Raises ``OSError`` when one cannot be read.
    """
    if not https(settings):
        return None
    assert settings.certfile is not None and settings.keyfile is not None
    return settings.certfile.read_bytes(), settings.keyfile.read_bytes()


def prepare_home(
    settings: Settings, pw: pwd.struct_passwd, tls: tuple[bytes, bytes] | None
) -> None:
    """As the student: the server's folder if missing, and the TLS copies (or none).

    Raises ``StepFailed`` with the reason.
    """
    folder = root_dir(settings, pw.pw_dir) if settings.root == "folder" else None
    as_user(pw, _prepare, pw.pw_dir, folder, tls)


def prepare_homes(
    settings: Settings,
    pws: list[pwd.struct_passwd],
    tls: tuple[bytes, bytes] | None,
    timeout: float,
) -> list[str | None]:
    """``prepare_home`` for each account, in parallel, each within ``timeout`` seconds
    (a student who stops their own helper fails alone); for each, why it failed, or None."""
    jobs = []
    for pw in pws:
        folder = root_dir(settings, pw.pw_dir) if settings.root == "folder" else None
        jobs.append((pw, _prepare, (pw.pw_dir, folder, tls)))
    return [
        str(result) if isinstance(result, StepFailed) else None
        for result in as_users(jobs, timeout=timeout)
    ]


def _prepare(home: str, folder: str | None, tls: tuple[bytes, bytes] | None) -> None:
    """In a child that is the student."""
    if folder and not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    if tls:
        _write_tls(Path(home) / TLS_DIR, tls)
    else:
        _remove_tls(Path(home) / TLS_DIR)


def _write_tls(folder: Path, tls: tuple[bytes, bytes]) -> None:
    """Each copy written beside its place (0600, never through a link), then renamed."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in zip(TLS_FILES, tls, strict=True):
        tmp = folder / f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, folder / name)


def _remove_tls(folder: Path) -> None:
    if folder.is_symlink() or not folder.is_dir():
        return
    for name in TLS_FILES:
        for stale in (name, f".{name}.tmp"):
            with contextlib.suppress(FileNotFoundError):
                (folder / stale).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
