"""retrieve's writing side: DESTINATION/USERNAME/TIMESTAMP/, built by root from what the reader sends.

Per student, a root worker (``collect_home``) owns the snapshot side; it forks a
reader that becomes the student (``homeread``), and gets from it each regular
file's open descriptor. Root re-checks each descriptor (a regular file, under
the size limits) and copies at most ``max_file_size`` bytes from it.

Every version is kept: a snapshot is only made when something changed, files
unchanged since the previous snapshot are hard links to it, ``latest`` points
at the newest, and DESTINATION/manifest.csv gets one row per file of each new
snapshot. Under ``--dry-run`` nothing is written here (``Snapshot.begin``,
``user_dir``, ``ensure_destination``, ``append_manifest`` decide that).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.addresses import USERNAME
from ..core.errors import InvalidInput
from ..core.retrieverules import MANIFEST_HEADER, Caps, StillSame, Tally, grew, split_rows
from . import safefs, workers
from .files import write_atomic
from .homeread import HomeReader, unchanged_by_stat
from .safefs import Unsafe
from .system import dry_run

if TYPE_CHECKING:
    import pandas

READ_TIMEOUT = 300.0


def ensure_destination(dest: Path, owner: pwd.struct_passwd) -> None:
    """DESTINATION is (or is made, unless a dry run) a folder no one but its owner and root can change.

    The folders above it are checked first: one that someone else can change
    could be swapped for a link that sends the submissions elsewhere.
    """
    for parent in Path(os.path.realpath(dest)).parents:
        try:
            pst = os.stat(parent)
        except FileNotFoundError:
            continue  # made below, by root
        sticky = pst.st_mode & stat.S_ISVTX
        if pst.st_uid not in (0, owner.pw_uid) or (pst.st_mode & 0o022 and not sticky):
            raise InvalidInput(
                f"[retrieve] destination {dest}: the folder {parent} above it can be changed by "
                "other users, who could redirect the submissions; choose a folder under one only "
                "root or the owner can change"
            )
    if not dry_run() and not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(dest, 0o750)
        except FileExistsError:
            pass
        else:
            os.chown(dest, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InvalidInput(f"[retrieve] destination {dest}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"[retrieve] destination {dest} is not a folder")
    if st.st_mode & 0o022 or st.st_uid not in (0, owner.pw_uid):
        raise InvalidInput(
            f"[retrieve] destination {dest} can be written by other users (owner uid {st.st_uid}, "
            f"mode {stat.S_IMODE(st.st_mode):04o}); students could tamper with the submissions: "
            f"chmod go-w it, or choose another folder"
        )


def user_dir(dest_fd: int, username: str, owner: tuple[int, int]) -> int | None:
    """DESTINATION/USERNAME: created 0700 for the owner (unless a dry run); refused if anyone
    else could write it. None if it is not there."""
    if not USERNAME.fullmatch(username):  # a path component: never "..", never a "/"
        raise RuntimeError(f"{username!r} is not a username")
    if not dry_run():
        try:
            os.mkdir(username, 0o700, dir_fd=dest_fd)
        except FileExistsError:
            pass
        else:
            os.chown(username, *owner, dir_fd=dest_fd, follow_symlinks=False)
    try:
        fd = os.open(username, safefs.DIR_FLAGS, dir_fd=dest_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RuntimeError(f"destination folder {username}: {exc.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid not in (0, owner[0]) or st.st_mode & 0o022:
        os.close(fd)
        raise RuntimeError(
            f"destination folder {username} can be written by others; fix its owner and mode"
        )
    return fd


LEFTOVERS = (".partial-", ".latest-")  # what a run that was cut off can leave


def remove_leftovers(user_fd: int) -> None:
    """What a run that was cut off left in DESTINATION/USERNAME (not under a dry run)."""
    if dry_run():
        return
    for name in os.listdir(user_fd):
        with contextlib.suppress(OSError):
            if name.startswith(".partial-"):
                shutil.rmtree(name, dir_fd=user_fd)
            elif name.startswith(".latest-"):
                os.unlink(name, dir_fd=user_fd)


def has_leftovers(user_dir: Path) -> bool:
    """Did a run that was cut off leave something in DESTINATION/USERNAME?"""
    try:
        return any(name.startswith(LEFTOVERS) for name in os.listdir(user_dir))
    except OSError:
        return False


class Snapshot:
    """A snapshot being built in DESTINATION/USERNAME/.partial-STAMP, renamed when complete.

    Under ``--dry-run`` (``begin``) it writes nothing: files are only hashed.
    """

    def __init__(self, user_fd: int | None, stamp: str, owner: tuple[int, int]):
        self.user_fd = user_fd
        self.stamp = stamp
        self.uid, self.gid = owner
        self.partial = f".partial-{stamp}-{os.getpid()}"
        self.fd: int | None = None
        self.dirs: set[str] = set()

    @classmethod
    def begin(cls, user_fd: int | None, stamp: str, owner: tuple[int, int]) -> Snapshot:
        snap = cls(user_fd, stamp, owner)
        if not dry_run():
            assert user_fd is not None
            os.mkdir(snap.partial, 0o700, dir_fd=user_fd)
            snap.fd = safefs.open_dir(user_fd, snap.partial)
            os.fchown(snap.fd, snap.uid, snap.gid)
        return snap

    def parent(self, rel: str) -> None:
        """The folders ``rel`` is in, made in the snapshot."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in self.dirs or self.fd is None:
                continue
            with contextlib.suppress(FileExistsError):
                os.mkdir(sub, 0o755, dir_fd=self.fd)
            os.chown(sub, self.uid, self.gid, dir_fd=self.fd, follow_symlinks=False)
            self.dirs.add(sub)

    def copy(self, rel: str, src_fd: int, mode: int, mtime_ns: int, cap: int) -> tuple[str, int]:
        """Copy (at most ``cap`` bytes, else ``TooLarge``) and hash ``src_fd`` as ``rel``."""
        if self.fd is None:
            return safefs.copy_hashing(src_fd, None, cap, workers.beat)
        self.parent(rel)
        fd = os.open(rel, safefs.NEW_FILE_FLAGS, 0o400, dir_fd=self.fd)
        try:
            sha, size = safefs.copy_hashing(src_fd, fd, cap, workers.beat)
            os.fchown(fd, self.uid, self.gid)
            os.fchmod(fd, 0o555 if mode & 0o100 else 0o444)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(rel, dir_fd=self.fd)
            raise
        os.close(fd)
        return sha, size

    def link(self, rel: str, prev_fd: int) -> bool:
        """``rel`` as a hard link to the previous snapshot's copy; False if that is gone."""
        if self.fd is None:
            return True
        self.parent(rel)
        try:
            os.link(rel, rel, src_dir_fd=prev_fd, dst_dir_fd=self.fd, follow_symlinks=False)
            return True
        except OSError:
            return False

    def abandon(self) -> None:
        """Delete the half-built snapshot (this student failed)."""
        if self.fd is None or self.user_fd is None:
            return
        os.close(self.fd)
        self.fd = None
        with contextlib.suppress(OSError):
            shutil.rmtree(self.partial, dir_fd=self.user_fd)

    def finish(self) -> str:
        """Rename into place under a new TIMESTAMP name and point ``latest`` at it."""
        if self.fd is None or self.user_fd is None:
            return self.stamp
        name, n = self.stamp, 1
        while safefs.lstat(self.user_fd, name) is not None:
            n += 1
            name = f"{self.stamp}.{n}"
        os.fchmod(self.fd, 0o755)
        os.rename(self.partial, name, src_dir_fd=self.user_fd, dst_dir_fd=self.user_fd)
        os.close(self.fd)
        self.fd = None  # in place: nothing to abandon
        tmp = f".latest-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self.user_fd)
        os.symlink(name, tmp, dir_fd=self.user_fd)
        os.chown(tmp, self.uid, self.gid, dir_fd=self.user_fd, follow_symlinks=False)
        os.rename(tmp, "latest", src_dir_fd=self.user_fd, dst_dir_fd=self.user_fd)
        return name


def append_manifest(dest: Path, rows: list[list], owner: pwd.struct_passwd) -> None:
    """Append rows to DESTINATION/manifest.csv in one write (an append-only log); not in a dry run."""
    if not rows or dry_run():
        return
    fd = os.open(
        dest / "manifest.csv",
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o640,
    )
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{dest / 'manifest.csv'} is not a regular file")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if st.st_size == 0:
            writer.writerow(MANIFEST_HEADER)
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
        writer.writerows(rows)
        view = memoryview(buf.getvalue().encode("utf-8", "backslashreplace"))
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_manifest(dest: Path) -> pandas.DataFrame:
    """DESTINATION/manifest.csv as text columns (``MANIFEST_HEADER``); empty if there is none."""
    import pandas as pd

    path = dest / "manifest.csv"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return pd.DataFrame(columns=MANIFEST_HEADER, dtype=str)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidInput(f"{path} is not a regular file")
        table = pd.read_csv(
            f, dtype=str, keep_default_na=False, encoding="utf-8", encoding_errors="replace"
        )
    return table.reindex(columns=MANIFEST_HEADER, fill_value="")


def write_summary(dest: Path, owner: pwd.struct_passwd, files: dict[str, str]) -> None:
    """DESTINATION/NAME for each NAME: text, written atomically, owned like the manifest (0640);
    not in a dry run."""
    for name, text in files.items():
        write_atomic(dest / name, text, mode=0o640, owner=(owner.pw_uid, owner.pw_gid))


# --- one student -------------------------------------------------------------------------------


@dataclass
class RetrieveJob:
    """One student's part of a retrieve."""

    username: str
    pw: pwd.struct_passwd
    folder: str
    dest: Path
    owner: tuple[int, int]  # uid, gid of who owns what is retrieved
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    caps: Caps
    stamp: str
    prev_rows: list  # the last snapshot's (path, snapshot, sha256, size, stat key), from the state
    read_timeout: float = READ_TIMEOUT  # the longest wait for one message of the reader
    time_limit: float = workers.STUDENT_DEADLINE  # the longest the whole retrieval may take
    handed_out: dict[str, str] = field(default_factory=dict)  # rel -> sha256 send last wrote

    def still_same(self, prev_files: dict, prev_skipped: dict) -> dict | None:
        """The fast path's result, if the folder is exactly as the last snapshot has it."""
        still = StillSame(prev_files, prev_skipped, self.caps, self.handed_out)
        return unchanged_by_stat(self.pw, self.folder, self.include, self.exclude, still)


def quick_check(job: RetrieveJob) -> dict | None:
    """In the parent, before any fork: the fast path's result for a student who changed nothing."""
    if not job.prev_rows:
        return None
    snapshot = job.prev_rows[0][1]
    try:
        if not stat.S_ISDIR(os.lstat(job.dest / job.username / snapshot).st_mode):
            return None
    except OSError:
        return None
    if has_leftovers(job.dest / job.username):
        return None  # the worker removes them
    return job.still_same(*split_rows(job.prev_rows))


def collect_home(job: RetrieveJob) -> dict:
    """Root worker for one student: fork the reader, build a snapshot if anything changed."""
    prev_files, prev_skipped = split_rows(job.prev_rows)
    user_fd = prev_fd = None
    if os.path.isdir(job.dest):
        dest_fd = os.open(job.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        user_fd = user_dir(dest_fd, job.username, job.owner)
    if user_fd is not None:
        remove_leftovers(user_fd)
        if job.prev_rows:
            with contextlib.suppress(Unsafe):
                prev_fd = safefs.open_dir(user_fd, job.prev_rows[0][1])
    if prev_fd is None:
        prev_files, prev_skipped = {}, {}  # nothing to link to: every file is collected afresh
    if prev_files:
        quick = job.still_same(prev_files, prev_skipped)
        if quick is not None:
            return quick
    tally = Tally(prev_files, prev_skipped, job.caps, job.handed_out)
    prev_keys = {rel: v[2] for rel, v in prev_files.items()}
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader = HomeReader(child_sock, prev_keys, job.caps.max_file)
    pid = workers.fork_child(
        lambda: reader.run(job.pw, job.folder, job.include, job.exclude), {child_sock.fileno()}
    )
    child_sock.close()
    collector = Collector(job, user_fd, prev_fd, tally)
    try:
        return collector.run(parent_sock)
    except BaseException:
        if collector.snap is not None:
            collector.snap.abandon()
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        parent_sock.close()


class Collector:
    """Root's side of one student's retrieval: the reader's messages into a ``Tally`` and a
    ``Snapshot`` (begun at the first file to copy: none at all if nothing changed)."""

    def __init__(self, job: RetrieveJob, user_fd: int | None, prev_fd: int | None, tally: Tally):
        self.job = job
        self.user_fd = user_fd
        self.prev_fd = prev_fd
        self.tally = tally
        self.snap: Snapshot | None = None
        self.pending_links: list[str] = []  # unchanged files seen before the snapshot was begun

    def snapshot(self) -> Snapshot:
        if self.snap is None:
            self.snap = Snapshot.begin(self.user_fd, self.job.stamp, self.job.owner)
            for rel in self.pending_links:
                self.link(rel)
            self.pending_links.clear()
        return self.snap

    def link(self, rel: str) -> None:
        assert self.snap is not None and self.prev_fd is not None
        if not self.snap.link(rel, self.prev_fd):
            self.tally.lost(rel)

    def unchanged(self, rel: str, sha: str, size: int, key: str, mtime: int) -> None:
        self.tally.add(rel, "unchanged", sha, size, key, mtime)
        if self.snap is not None:
            self.link(rel)
        else:
            self.pending_links.append(rel)

    def receive_one(self, sock: socket.socket, end: float) -> tuple[bytes, list[int]]:
        """The reader's next message, within ``read_timeout`` and before ``end`` (monotonic):
        a reader the student stops, or slows to a trickle, fails this student only."""
        too_long = (
            f"the student's folder was not read within {self.job.time_limit:.0f} s "
            "(its reader was stopped or too slow); retrieve again"
        )
        left = end - time.monotonic()
        if left <= 0:
            raise RuntimeError(too_long)
        sock.settimeout(min(self.job.read_timeout, left))
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 1)
        except TimeoutError:
            if time.monotonic() >= end:
                raise RuntimeError(too_long) from None
            raise RuntimeError("the student's folder could not be read in time (stopped)") from None
        return data, fds

    def run(self, sock: socket.socket) -> dict:
        """Every message up to ``end``; then the snapshot, if anything changed."""
        end = time.monotonic() + self.job.time_limit
        while True:
            data, fds = self.receive_one(sock, end)
            if not data:
                raise RuntimeError("the reader process ended unexpectedly")
            msg = json.loads(data)
            workers.beat()
            try:
                if msg["t"] == "end":
                    break
                if msg["t"] == "missing":  # the last snapshot (if any) is kept as it is
                    return {"state": "nothing", "why": msg["why"]}
                if msg["t"] == "error":
                    raise RuntimeError(msg["why"])
                self.receive(msg, fds[0] if fds else None)
            finally:
                for fd in fds:
                    os.close(fd)
        return self.finish()

    def receive(self, msg: dict, fd: int | None) -> None:
        t = self.tally
        if msg["t"] == "same":
            for rel in msg.get("dirs", ()):
                t.folder(rel)
            for rel, key, size, mtime in msg["items"]:
                sha = t.reported_same(rel, key, size, mtime)
                if sha is not None:
                    self.unchanged(rel, sha, size, key, mtime)
            return
        rel = msg["rel"]
        t.saw(rel)
        if msg["t"] == "skip":
            t.skip(rel, msg["why"], msg["size"], msg["mtime"], msg.get("key", ""))
        elif fd is None:
            t.skip(rel, "could not be opened", msg["size"], msg["mtime"])
        else:
            self.file(rel, fd)

    def file(self, rel: str, fd: int) -> None:
        """A file the reader opened: trust the descriptor, not the message; check it again."""
        t, max_file = self.tally, self.job.caps.max_file
        fst = os.fstat(fd)
        size, mtime, key = fst.st_size, fst.st_mtime_ns, safefs.stat_key(fst)
        why = safefs.kind(fst) if not stat.S_ISREG(fst.st_mode) else t.refuse(size, rel)
        if why:
            return t.skip(rel, why, size, mtime, key)
        prev = t.prev_files.get(rel)
        if prev is not None:
            sha = safefs.file_sha256(fd, max_file)
            if sha is None:
                return t.skip(rel, grew(max_file), size, mtime)
            if sha == prev[0]:  # touched, not changed
                return self.unchanged(rel, sha, prev[1], key, mtime)
        status = t.status(rel)
        try:
            sha, copied = self.snapshot().copy(rel, fd, fst.st_mode, mtime, max_file)
        except safefs.TooLarge:
            return t.skip(rel, grew(max_file), size, mtime)
        if copied != size:  # written to while being copied: remember what was copied
            key = f"{key}:changed-while-copied"
        return t.add(rel, status, sha, copied, key, mtime)

    def finish(self) -> dict:
        result = self.tally.result()
        if result["state"] != "collected":
            return result
        snap = self.snapshot()
        for rel in self.tally.snapshot_folders():
            snap.parent(f"{rel}/-")
        name = snap.finish()
        return {
            **result,
            "snapshot": name,
            "rows": self.tally.rows(self.job.username, name),
            "cache": self.tally.remembered(),
        }
