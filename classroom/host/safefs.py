"""Safe file work inside folders that students control, and a pool of forked workers.

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
- the processes that do this run as the student (``run_as``), so the kernel
  also refuses anything the student could not do themselves.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import gc
import hashlib
import json
import os
import re
import resource
import select
import signal
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20
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
    what = what or name
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise _explain(exc, what) from None
    try:
        st = os.fstat(fd)
        if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
            raise Unsafe(f"{what} was replaced while it was being read")
        if dev is not None and st.st_dev != dev:
            raise Unsafe(f"{what} is on another filesystem (a mount point)")
        if uid is not None and st.st_uid != uid:
            raise Unsafe(f"{what} belongs to uid {st.st_uid}, not to the student")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(
    dir_fd: int, name: str, *, expect: os.stat_result | None = None, what: str = ""
) -> tuple[int, os.stat_result]:
    """Open regular file ``name`` of ``dir_fd`` for reading, never following a link; fstat-checked."""
    what = what or name
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _explain(exc, what) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unsafe(f"{what} is {kind(st)}")
        if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
            raise Unsafe(f"{what} was replaced while it was being read")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def ensure_dir(
    parent_fd: int, name: str, *, mode: int, uid: int, dev: int | None, what: str
) -> tuple[int, bool]:
    """Open folder ``name`` (creating it with ``mode`` if missing); return (fd, created)."""
    created = False
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise _explain(exc, what) from None
    fd = open_dir(parent_fd, name, uid=uid, dev=dev, what=what)
    if created:
        os.fchmod(fd, mode)
    return fd, created


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
    Excluded paths are left out silently; ``include`` applies to files.
    """
    count = 0
    excluded = Patterns(exclude)
    included = Patterns(include)

    def skip(rel: str, name: str) -> bool:
        return bool(excluded) and (
            excluded.name(name) or bool(excluded.path and excluded.path(rel))
        )

    def visit(dir_fd: int, prefix: str, depth: int) -> Iterator[Entry]:
        nonlocal count
        try:
            with os.scandir(dir_fd) as it:
                names = sorted(e.name for e in it)
        except OSError as exc:
            yield Entry(
                prefix.rstrip("/") or ".", "", dir_fd, None, f"cannot be listed: {exc.strerror}"
            )
            return
        for name in names:
            rel = prefix + name
            if skip(rel, name):
                continue
            count += 1
            if count > max_entries:
                yield Entry(
                    rel,
                    name,
                    dir_fd,
                    None,
                    f"more than {max_entries} entries: the rest is not read",
                )
                return
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone since the listing
            except OSError as exc:
                yield Entry(rel, name, dir_fd, None, f"cannot be read: {exc.strerror}")
                continue
            if stat.S_ISREG(st.st_mode):
                if included(rel):
                    yield Entry(rel, name, dir_fd, st)
            elif stat.S_ISDIR(st.st_mode):
                if depth >= max_depth:
                    yield Entry(rel, name, dir_fd, st, f"folders nested deeper than {max_depth}")
                    continue
                try:
                    sub = open_dir(dir_fd, name, expect=st, uid=uid, dev=dev, what="it")
                except Unsafe as exc:
                    yield Entry(rel, name, dir_fd, st, str(exc))
                    continue
                try:
                    if dirs:
                        yield Entry(rel, name, dir_fd, st)
                    yield from visit(sub, rel + "/", depth + 1)
                finally:
                    os.close(sub)
            else:
                yield Entry(rel, name, dir_fd, st, kind(st))
            if count > max_entries:
                return

    yield from visit(root_fd, "", 0)


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


# --- forked workers ---------------------------------------------------------------------------

_beat_fd: int | None = None
_last_beat = 0.0


def beat() -> None:
    """In a worker: tell the parent it is still making progress (at most twice a second)."""
    global _last_beat
    now = time.monotonic()
    if _beat_fd is not None and now - _last_beat > 0.5:
        _last_beat = now
        with contextlib.suppress(OSError):
            os.write(_beat_fd, b".")


def close_fds_except(keep: set[int]) -> None:
    """In a child: close every inherited descriptor but ``keep``; 0, 1, 2 become /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        if std not in keep:
            os.dup2(null, std)
    keep = keep | {0, 1, 2}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def raise_fd_limit(needed: int) -> None:
    """Make room for ``needed`` more open descriptors (the source files are kept open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fork_map(
    tasks: Sequence[tuple[str, Callable[..., Any], tuple]],
    *,
    workers: int,
    idle_timeout: float = 300.0,
    keep_fds: Sequence[int] = (),
) -> Iterator[tuple[str, dict]]:
    """Run each ``(key, func, args)`` as ``func(*args)`` in its own forked child.

    ``args`` may be a function returning them, called just before the fork.
    At most ``workers`` children at once. Yields ``(key, payload)`` as each one
    ends: ``{"ok": result}`` (the JSON-able return value) or ``{"error": message}``.
    A child that neither finishes nor calls ``beat()`` for ``idle_timeout``
    seconds is killed. The children inherit ``keep_fds`` and nothing else.
    """
    pending = list(tasks)
    pending.reverse()
    # The children only read the parent's objects: keep the collector from walking (and so
    # copying) the whole inherited heap in each of them.
    gc.collect()
    gc.freeze()
    running: dict[int, list] = {}  # read fd -> [pid, key, chunks, last_activity]
    exited: list[int] = []
    poller = select.poll()
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                key, func, args = pending.pop()
                if callable(args):  # built now, so the parent holds one job's data at a time
                    args = args()
                rfd, wfd = os.pipe()
                pid = os.fork()
                if pid == 0:  # child
                    code = 0
                    try:
                        gc.disable()
                        signal.signal(signal.SIGINT, signal.SIG_DFL)
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        close_fds_except({wfd, *keep_fds})
                        global _beat_fd
                        _beat_fd = wfd
                        try:
                            payload: dict = {"ok": func(*args)}
                        except Exception as exc:  # reported to the parent, never a traceback
                            payload = {"error": str(exc) or type(exc).__name__}
                        _write_all(wfd, json.dumps(payload).encode())
                    except BaseException:  # noqa: BLE001 - a child never returns into the parent
                        code = 1
                    finally:
                        os._exit(code)
                os.close(wfd)
                del args
                running[rfd] = [pid, key, [], time.monotonic()]
                poller.register(rfd, select.POLLIN | select.POLLHUP | select.POLLERR)
            for fd, _event in poller.poll(1000):
                job = running[fd]
                data = os.read(fd, 1 << 16)
                job[3] = time.monotonic()
                if data:
                    job[2].append(data)
                    continue
                poller.unregister(fd)
                os.close(fd)
                del running[fd]
                raw = b"".join(job[2]).lstrip(b".")
                try:
                    payload = json.loads(raw) if raw else {}
                except ValueError:
                    payload = {}
                if "ok" in payload or "error" in payload:
                    exited.append(job[0])  # reaped later: no need to wait for its exit now
                else:
                    _, status = os.waitpid(job[0], 0)
                    payload = {"error": f"the worker process died (status {status})"}
                yield job[1], payload
            now = time.monotonic()
            for fd, job in list(running.items()):
                if now - job[3] > idle_timeout:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(job[0], signal.SIGKILL)
                    os.waitpid(job[0], 0)
                    poller.unregister(fd)
                    os.close(fd)
                    del running[fd]
                    yield job[1], {"error": f"no progress for {idle_timeout:.0f} s: stopped"}
            exited[:] = [pid for pid in exited if os.waitpid(pid, os.WNOHANG)[0] == 0]
    finally:
        for fd, job in running.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(job[0], signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(job[0], 0)
            with contextlib.suppress(OSError):
                os.close(fd)
        for pid in exited:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        gc.unfreeze()


def become(pw) -> None:
    """In a worker: become the student for good (uid, gid, groups), or raise."""
    from .identity import become as become_student

    become_student(pw)
    os.umask(0o022)


def rows(state, sql: str, params: tuple = ()) -> list:
    """Rows of a query on the course state; none when a dry run's read-only state lacks the table."""
    import sqlite3

    try:
        return state.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        if state.readonly:
            return []
        raise


def rows_by_user(state, sql: str, params: tuple = ()) -> dict[str, list]:
    """One query for every student (first column: username), grouped; a worker gets its own list.

    One query is much cheaper than one per student; the rows stay raw tuples
    until the worker (in parallel) turns them into what it needs.
    """
    grouped: dict[str, list] = {}
    for row in rows(state, sql, params):
        grouped.setdefault(row[0], []).append(tuple(row)[1:])
    return grouped


def workers_for(n_tasks: int) -> int:
    """How many workers to run at once: enough to keep the disks and CPUs busy."""
    wanted = os.environ.get("CLASSROOM_WORKERS", "")
    if wanted.isdigit() and int(wanted) > 0:
        return min(n_tasks, int(wanted))
    return max(1, min(n_tasks, max(8, 2 * (os.cpu_count() or 2)), 16))
