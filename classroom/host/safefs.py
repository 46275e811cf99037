"""Safe file work inside folders that students control.

How a path inside a student's folder is handled (SPEC §5 rule 4):

- it is never resolved as a whole: each folder is opened relative to its
  already open parent with ``O_NOFOLLOW | O_DIRECTORY`` and checked with
  ``fstat`` (same inode as listed, same filesystem, owned by the student)
  before anything inside it is looked at;
- a file is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat``
  (a regular file, the inode that was listed) before a byte is read, and
  every read is capped;
- symlinks, FIFOs, sockets, devices, mount points and folders nested absurdly
  deep are never opened, only reported;
- the processes that do this run as the student (``workers.become``), so the
  kernel also refuses anything the student could not do themselves;
- the functions that change something (``ensure_dir``, ``replace_file``,
  ``move``) change nothing under ``--dry-run``.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .system import dry_run

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20
TEMP_PREFIX, TEMP_SUFFIX = ".classroom-", ".tmp"  # replace_file's temporary names
TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + "[0-9a-f]{12}" + re.escape(TEMP_SUFFIX))
MAX_DEPTH = 64
MAX_ENTRIES = 100_000


class Unsafe(Exception):
    """This entry is not something the tool will open; the message says what it is."""


def kind(st: os.stat_result) -> str:
    """What a non-regular entry is, in words for a report."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    return "not a regular file"


def stat_key(st: os.stat_result) -> str:
    """What identifies one version of a file without reading it: dev:ino:size:mtime:ctime.

    ctime cannot be set by users and changes with every write, so an equal key
    means equal content (used to skip re-hashing unchanged files).
    """
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _explain(exc: OSError, what: str) -> Unsafe:
    if exc.errno == errno.ELOOP:
        return Unsafe(f"{what} is a symlink")
    if exc.errno == errno.ENOTDIR:
        return Unsafe(f"{what} is not a folder")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Unsafe(f"{what} cannot be read (permission denied)")
    return Unsafe(f"{what}: {exc.strerror or exc}")


def _replaced(st: os.stat_result, expect: os.stat_result | None) -> bool:
    return expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino)


def _open_checked(
    parent_fd: int | None,
    name: str,
    flags: int,
    what: str,
    check: Callable[[os.stat_result], str | None],
) -> tuple[int, os.stat_result]:
    """Open ``name`` of ``parent_fd`` with ``flags``, then vet it with fstat: ``check`` names
    a problem (the descriptor is closed and ``Unsafe`` raised) or None."""
    try:
        fd = os.open(name, flags, dir_fd=parent_fd)
    except OSError as exc:
        raise _explain(exc, what) from None
    try:
        st = os.fstat(fd)
        problem = check(st)
        if problem is not None:
            raise Unsafe(f"{what} {problem}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_dir(
    parent_fd: int | None,
    name: str,
    *,
    expect: os.stat_result | None = None,
    uid: int | None = None,
    dev: int | None = None,
    what: str | None = None,
) -> int:
    """Open folder ``name`` of ``parent_fd`` without following a symlink; check it with fstat."""

    def check(st: os.stat_result) -> str | None:
        if _replaced(st, expect):
            return "was replaced while it was being read"
        if dev is not None and st.st_dev != dev:
            return "is on another filesystem (a mount point)"
        if uid is not None and st.st_uid != uid:
            return f"belongs to uid {st.st_uid}, not to the student"
        return None

    return _open_checked(parent_fd, name, DIR_FLAGS, what or name, check)[0]


def open_file(
    dir_fd: int, name: str, *, expect: os.stat_result | None = None, what: str = ""
) -> tuple[int, os.stat_result]:
    """Open regular file ``name`` of ``dir_fd`` for reading, never following a link; fstat-checked."""

    def check(st: os.stat_result) -> str | None:
        if not stat.S_ISREG(st.st_mode):
            return f"is {kind(st)}"
        return "was replaced while it was being read" if _replaced(st, expect) else None

    return _open_checked(dir_fd, name, FILE_FLAGS, what or name, check)


def lstat(dir_fd: int, name: str) -> os.stat_result | None:
    """What ``name`` in ``dir_fd`` is, not following a link; None if there is nothing."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


# --- changes: the one place that writes in a student's folder (nothing under --dry-run) ----------


def ensure_dir(
    parent_fd: int | None, name: str, *, mode: int, uid: int, dev: int | None, what: str
) -> int | None:
    """Open folder ``name`` of ``parent_fd``, creating it with ``mode`` if missing.

    Under ``--dry-run`` a missing folder is not made: None (as for a ``parent_fd``
    of None, a folder that would have been made).
    """
    if parent_fd is None:
        return None
    created = False
    if not dry_run():
        try:
            os.mkdir(name, mode, dir_fd=parent_fd)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise _explain(exc, what) from None
    elif lstat(parent_fd, name) is None:
        return None
    fd = open_dir(parent_fd, name, uid=uid, dev=dev, what=what)
    if created:
        os.fchmod(fd, mode)
    return fd


def replace_file(
    dir_fd: int | None,
    name: str,
    fill: Callable[[int], None],
    *,
    mode: int,
    times_ns: tuple[int, int] | None = None,
) -> os.stat_result | None:
    """Write ``name`` in ``dir_fd`` whole or not at all; return the new file's stat.

    ``fill(fd)`` writes a new file under a temporary name, which then gets ``mode``
    (and ``times_ns``, atime and mtime) and is renamed over ``name``. Under
    ``--dry-run`` nothing is written: None.
    """
    if dry_run() or dir_fd is None:
        return None
    tmp = f"{TEMP_PREFIX}{secrets.token_hex(6)}{TEMP_SUFFIX}"
    fd = os.open(tmp, NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        fill(fd)
        os.fchmod(fd, mode)
        if times_ns is not None:
            os.utime(fd, ns=times_ns)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return os.fstat(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)


def unlink(dir_fd: int, name: str) -> None:
    """Delete the name ``name`` of ``dir_fd`` (a link is removed, never followed); nothing under
    ``--dry-run``; nothing if it is gone already."""
    if dry_run():
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def leftovers(dir_fd: int) -> list[str]:
    """The temporary files of ``replace_file`` in ``dir_fd`` (left by a run that was cut off):
    regular files with exactly the tool's temporary names, nothing else."""
    with os.scandir(dir_fd) as entries:
        return [
            e.name
            for e in entries
            if TEMP_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False)
        ]


def remove_leftovers(dir_fd: int | None) -> int:
    """Delete ``leftovers(dir_fd)`` (never followed: an unlink of a name); how many.
    Nothing under ``--dry-run``."""
    if dry_run() or dir_fd is None:
        return 0
    names = leftovers(dir_fd)
    for name in names:
        unlink(dir_fd, name)
    return len(names)


def move(from_fd: int, name: str, to_fd: int | None) -> None:
    """Move ``name`` (whatever it is, never followed) from one open folder to another, same name.

    A rename: nothing is read or copied. Nothing under ``--dry-run``.
    """
    if dry_run() or to_fd is None:
        return
    os.rename(name, name, src_dir_fd=from_fd, dst_dir_fd=to_fd)


# --- HOME/FOLDER -----------------------------------------------------------------------------------


class NoHome(Unsafe):
    """The home itself cannot be opened safely."""


class Missing(Unsafe):
    """A folder on the way to HOME/FOLDER is not there."""


class NotAFolder(Unsafe):
    """Something else than a folder is where a folder on the way to HOME/FOLDER should be."""


@dataclass
class HomeFolder:
    """HOME/FOLDER, opened without following a link: ``fd`` (None under ``--dry-run`` when it
    would have been made), the home's ``dev``; ``close`` closes every folder on the way."""

    fd: int | None
    dev: int
    uid: int
    fds: list[int]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> HomeFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_home_folder(pw, folder: str, *, make: int | None = None) -> HomeFolder:
    """Open ``pw``'s HOME/FOLDER folder by folder: each one the student's, on the home's filesystem.

    A missing folder raises ``Missing``, or with ``make`` is created with that mode.
    Raises ``NoHome`` for the home, ``NotAFolder`` or ``Unsafe`` on the way.
    """
    try:
        fd = open_dir(None, pw.pw_dir, uid=pw.pw_uid, what=f"home {pw.pw_dir}")
    except Unsafe as exc:
        raise NoHome(str(exc)) from None
    home = HomeFolder(fd, os.fstat(fd).st_dev, pw.pw_uid, [fd])
    try:
        parts = folder.split("/")
        for i, part in enumerate(parts):
            where = "~/" + "/".join(parts[: i + 1])
            home.fd = _down(home, part, where, make)
            if home.fd is None:
                break
            home.fds.append(home.fd)
    except BaseException:
        home.close()
        raise
    return home


def _down(home: HomeFolder, name: str, where: str, make: int | None) -> int | None:
    assert home.fd is not None
    try:
        st = lstat(home.fd, name)
    except OSError as exc:
        raise Unsafe(f"{where}: {exc.strerror}") from None
    if st is None:
        if make is None:
            raise Missing(f"no folder {where}")
        return ensure_dir(home.fd, name, mode=make, uid=home.uid, dev=home.dev, what=where)
    if not stat.S_ISDIR(st.st_mode):
        raise NotAFolder(f"{where} is {kind(st)}, not a folder")
    return open_dir(home.fd, name, expect=st, uid=home.uid, dev=home.dev, what=where)


class Patterns:
    """Shell patterns: one with a '/' matches the path (or a folder above it), others any part."""

    def __init__(self, patterns: Sequence[str]):
        parts, paths = [], []
        for pattern in patterns:
            p = pattern.strip("/")
            if not p:
                continue
            if "/" in p:
                paths.append(fnmatch.translate(p))
                paths.append(fnmatch.translate(p + "/*"))
            else:
                parts.append(fnmatch.translate(p))
        self.everything = list(patterns) == ["*"]
        self.part = re.compile("|".join(parts)).match if parts else None
        self.path = re.compile("|".join(paths)).match if paths else None

    def __bool__(self) -> bool:
        return bool(self.part or self.path)

    def name(self, name: str) -> bool:
        """Does a pattern without '/' match this one name?"""
        return self.everything or bool(self.part and self.part(name))

    def __call__(self, rel: str) -> bool:
        if self.everything:
            return True
        if self.path and self.path(rel):
            return True
        return bool(self.part) and any(self.part(part) for part in rel.split("/"))


def matches(rel: str, patterns: Sequence[str]) -> bool:
    """True if a pattern matches the path (patterns with '/') or any part of it."""
    return Patterns(patterns)(rel)


@dataclass
class Entry:
    """One thing found by ``walk``: ``dir_fd`` is its open parent, valid until the next entry."""

    rel: str
    name: str
    dir_fd: int
    st: os.stat_result | None
    problem: str | None = None  # None for a regular file (or a folder, with dirs=True)


def walk(
    root_fd: int,
    *,
    exclude: Sequence[str] = (),
    include: Sequence[str] = ("*",),
    dev: int | None = None,
    uid: int | None = None,
    dirs: bool = False,
    max_depth: int = MAX_DEPTH,
    max_entries: int = MAX_ENTRIES,
) -> Iterator[Entry]:
    """Every regular file under ``root_fd`` (sorted), never following links or leaving ``dev``.

    Anything else is yielded with ``problem`` set to the reason it is skipped.
    Excluded paths are left out silently; ``include`` applies to files; ``dirs``:
    folders are yielded too (before what is in them). Folders are opened as
    ``open_dir`` does (owned by ``uid``, on ``dev``).
    """
    walker = _Walk(Patterns(exclude), Patterns(include), dev, uid, dirs, max_depth, max_entries)
    yield from walker.folder(root_fd, "", 0)


@dataclass
class _Walk:
    excluded: Patterns
    included: Patterns
    dev: int | None
    uid: int | None
    dirs: bool
    max_depth: int
    max_entries: int
    count: int = 0

    def skip(self, rel: str, name: str) -> bool:
        ex = self.excluded
        return bool(ex) and (ex.name(name) or bool(ex.path and ex.path(rel)))

    def folder(self, dir_fd: int, prefix: str, depth: int) -> Iterator[Entry]:
        """What is in one open folder, in name order."""
        try:
            with os.scandir(dir_fd) as it:
                names = sorted(e.name for e in it)
        except OSError as exc:
            rel = prefix.rstrip("/") or "."
            yield Entry(rel, "", dir_fd, None, f"cannot be listed: {exc.strerror}")
            return
        for name in names:
            rel = prefix + name
            if self.skip(rel, name):
                continue
            self.count += 1
            if self.count > self.max_entries:
                why = f"more than {self.max_entries} entries: the rest is not read"
                yield Entry(rel, name, dir_fd, None, why)
                return
            yield from self.one(dir_fd, rel, name, depth)
            if self.count > self.max_entries:
                return

    def one(self, dir_fd: int, rel: str, name: str, depth: int) -> Iterator[Entry]:
        """One entry of a folder; for a folder, all that is in it too."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # gone since the listing
        except OSError as exc:
            yield Entry(rel, name, dir_fd, None, f"cannot be read: {exc.strerror}")
            return
        if stat.S_ISREG(st.st_mode):
            if self.included(rel):
                yield Entry(rel, name, dir_fd, st)
            return
        if not stat.S_ISDIR(st.st_mode):
            yield Entry(rel, name, dir_fd, st, kind(st))
            return
        if depth >= self.max_depth:
            yield Entry(rel, name, dir_fd, st, f"folders nested deeper than {self.max_depth}")
            return
        try:
            sub = open_dir(dir_fd, name, expect=st, uid=self.uid, dev=self.dev, what="it")
        except Unsafe as exc:
            yield Entry(rel, name, dir_fd, st, str(exc))
            return
        try:
            if self.dirs:
                yield Entry(rel, name, dir_fd, st)
            yield from self.folder(sub, rel + "/", depth + 1)
        finally:
            os.close(sub)


class TooLarge(Exception):
    pass


def copy_hashing(
    src_fd: int, dst_fd: int | None, cap: int, beat: Callable[[], None] | None = None
) -> tuple[str, int]:
    """Read ``src_fd`` from offset 0 (positional reads), hash it, write it to ``dst_fd``.

    Raises ``TooLarge`` as soon as more than ``cap`` bytes were read (a file
    that grows, or a sparse giant, never fills the disk).
    """
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    while True:
        n = os.preadv(src_fd, [buf], offset)
        if n == 0:
            break
        offset += n
        if offset > cap:
            raise TooLarge(offset)
        chunk = view[:n]
        h.update(chunk)
        if dst_fd is not None:
            written = 0
            while written < n:
                written += os.write(dst_fd, chunk[written:])
        if beat and offset % (64 * CHUNK) == 0:
            beat()
    return h.hexdigest(), offset


def copy_fd(src_fd: int, dst_fd: int, size: int, beat: Callable[[], None] | None = None) -> None:
    """Copy ``size`` bytes from offset 0 of ``src_fd`` to ``dst_fd`` in the kernel when possible."""
    offset = 0
    use_cfr = hasattr(os, "copy_file_range")
    while offset < size:
        count = min(size - offset, 64 * CHUNK)
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, count, offset_src=offset)
            except OSError as exc:
                if exc.errno not in (
                    errno.EXDEV,
                    errno.EINVAL,
                    errno.ENOSYS,
                    errno.EOPNOTSUPP,
                    errno.EPERM,
                ):
                    raise
                use_cfr = False
                continue
        else:
            n = os.sendfile(dst_fd, src_fd, offset, count)
        if n == 0:
            break  # the source shrank; what was there is copied
        offset += n
        if beat:
            beat()


def file_sha256(fd: int, cap: int) -> str | None:
    """sha256 of an open file, or None if it holds more than ``cap`` bytes."""
    try:
        return copy_hashing(fd, None, cap)[0]
    except TooLarge:
        return None
