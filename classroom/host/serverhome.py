"""What a student's server needs before it starts.

In the home, made as the student: the folder it opens in, and its own copies of the
certificate and key (HTTPS in redirect mode) -- or no copies at all once HTTPS is off
or TLS ends at the portal (proxy mode), so the student no longer holds the private key.

Outside the home, made by root under ``/run/classroom/COURSE`` (root-owned, so no
student can plant anything on the way): the folder of the student's socket (proxy
mode: the student's, 0700) and JupyterLab's settings overrides (news and update
checks off), which every server reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import stat
import sys
from pathlib import Path

from ..core.addresses import https, proxied
from ..core.errors import StepFailed
from ..core.launchplan import (
    LAB_OVERRIDES,
    RUN_BASE,
    TLS_DIR,
    lab_settings_dir,
    root_dir,
    run_dir,
    socket_dir,
)
from ..core.settings import Settings
from .files import read_json_object, write_atomic
from .system import dry_run
from .workers import as_user, as_users

TLS_FILES = ("cert.pem", "key.pem")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SETTINGS = 1 << 20  # bytes of an installed overrides.json read


def read_tls(settings: Settings) -> tuple[bytes, bytes] | None:
    """The certificate and key to copy (root reads them once), or None when HTTPS is off
    or TLS ends at the portal (proxy mode).

    Raises ``OSError`` when one cannot be read.
    """
    if not https(settings) or proxied(settings):
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


# --- root's folders under /run/classroom -------------------------------------------------


def _root_dir(parent_fd: int | None, name: str, mode: int) -> int:
    """Open folder ``name`` of ``parent_fd`` (made if missing), root's with ``mode``; never
    through a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=parent_fd)
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_gid != 0:
            os.fchown(fd, 0, 0)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_run_dir(settings: Settings, *parts: str) -> int:
    """RUN_BASE/COURSE[/PARTS...]: each root's, 0711 (students pass, never list)."""
    fd = _root_dir(None, str(RUN_BASE), 0o755)
    try:
        for name in (settings.name, *parts):
            inner = _root_dir(fd, name, 0o711)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_lab_settings(settings: Settings) -> Path:
    """JupyterLab's settings overrides for the course's servers (root's, readable by all):
    the installed ones, if any, with news and update checks turned off. Returns the folder."""
    folder = lab_settings_dir(settings)
    if dry_run():
        return folder
    os.close(_open_run_dir(settings))
    os.close(_root_dir(None, str(folder), 0o755))
    installed = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings"
    overrides = read_json_object(installed / "overrides.json", MAX_SETTINGS)
    for plugin, values in LAB_OVERRIDES.items():
        section = overrides.get(plugin)
        overrides[plugin] = {**(section if isinstance(section, dict) else {}), **values}
    write_atomic(folder / "overrides.json", json.dumps(overrides, indent=2) + "\n", mode=0o644)
    page_config = read_json_object(installed / "page_config.json", MAX_SETTINGS)
    if page_config:
        write_atomic(folder / "page_config.json", json.dumps(page_config) + "\n", mode=0o644)
    return folder


def prepare_socket_dir(settings: Settings, pw: pwd.struct_passwd) -> Path:
    """The folder of the student's server socket: the student's alone (0700), in root's
    folders; a socket left there by an earlier server is removed. Returns the folder."""
    folder = socket_dir(settings, pw.pw_name)
    if dry_run():
        return folder
    parent = _open_run_dir(settings, "servers")
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(pw.pw_name, 0o700, dir_fd=parent)
        fd = os.open(pw.pw_name, DIR_FLAGS, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        if st.st_uid != pw.pw_uid:  # an earlier account's: nothing of it is kept
            for name in os.listdir(fd):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)
        os.fchown(fd, pw.pw_uid, pw.pw_gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return folder


def remove_socket_dir(settings: Settings, username: str) -> None:
    """Remove the folder of a stopped student's socket (and what is in it), if any."""
    if dry_run():
        return
    try:
        parent = os.open(run_dir(settings) / "servers", DIR_FLAGS)
    except OSError:
        return
    try:
        fd = os.open(username, DIR_FLAGS, dir_fd=parent)
    except OSError:
        os.close(parent)
        return
    try:
        for name in os.listdir(fd):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(username, dir_fd=parent)
    os.close(parent)


def remove_run_dir(settings: Settings) -> None:
    """Remove the course's folder under /run/classroom (the course has no student left)."""
    if dry_run():
        return
    import shutil

    shutil.rmtree(run_dir(settings), ignore_errors=True)  # never follows a link (fd-based)
