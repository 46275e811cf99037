"""retrieve: collect each student's HOME/FOLDER into DESTINATION/USERNAME/TIMESTAMP/.

Every version is kept: a snapshot is only made when something changed, files
unchanged since the previous snapshot are hard links to it, ``latest`` points
at the newest, and DESTINATION/manifest.csv gets one row per file of each new
snapshot (username, snapshot, path, size, mtime, sha256, status, late).

Per student, a root worker owns the snapshot side; it forks a reader that
becomes the student, walks the folder through directory descriptors that
never follow a link, opens each regular file (``O_NOFOLLOW``, fstat-checked)
and hands the open descriptor over a socket. So root never opens a file
inside a home, and nothing the student could not read themselves can reach
the teacher. Root re-checks each descriptor (a regular file, under the size
limits) and copies at most ``max_file_size`` bytes from it.

Repeat runs take a fast path first (``_unchanged_by_stat``): root looks at
metadata only (folders opened with O_NOFOLLOW and owned by the student, files
lstat'ed, never opened); if every file still has the dev:ino:size:mtime:ctime
it had when collected, nothing changed and no worker is started.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import sys
from pathlib import Path

import click

from ..core.errors import InvalidInput
from ..host import safefs
from ..host.safefs import Unsafe
from ..host.system import is_root, sudo_caller
from .course import Course

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS retrieved (
    username TEXT NOT NULL,
    destination TEXT NOT NULL,
    path BLOB NOT NULL,          -- relative to HOME/FOLDER, bytes as on disk
    snapshot TEXT NOT NULL,
    sha256 TEXT NOT NULL,        -- or 'skipped: REASON' for a file the snapshot lacks
    size INTEGER NOT NULL,
    stat_key TEXT NOT NULL,      -- the student's file when it was collected (or skipped)
    PRIMARY KEY (username, destination, path)
);
CREATE TABLE IF NOT EXISTS snapshots (
    username TEXT NOT NULL,
    destination TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    folder TEXT NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    taken_at TEXT NOT NULL,
    PRIMARY KEY (username, destination, snapshot)
);
"""

MANIFEST_HEADER = ["username", "snapshot", "path", "size", "mtime", "sha256", "status", "late"]
READ_TIMEOUT = 300.0


def parse_deadline(text: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(text.strip(), "%Y-%m-%d %H:%M").astimezone()
    except ValueError:
        raise InvalidInput(f'--deadline {text!r}: use "YYYY-MM-DD HH:MM"') from None


def _show(rel: str) -> str:
    text = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def _csv_path(rel: str) -> str:
    """The path as the manifest holds it: exact, except undecodable bytes shown as \\xNN."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _iso(mtime_ns: int) -> str:
    return dt.datetime.fromtimestamp(mtime_ns / 1e9).astimezone().isoformat(timespec="seconds")


def owner_account(course: Course) -> pwd.struct_passwd:
    """Who owns what is retrieved: [retrieve] owner, else the sudo caller, else root; never a student."""
    s = course.settings
    if s.retrieve_owner:
        try:
            owner = pwd.getpwnam(s.retrieve_owner)
        except KeyError:
            raise InvalidInput(
                f"{s.where('retrieve', 'owner')}: [retrieve] owner {s.retrieve_owner!r}: no such user"
            ) from None
    else:
        owner = sudo_caller() or pwd.getpwuid(0)
    if owner.pw_name in set(course.roster.names()):
        raise InvalidInput(
            f"{s.where('retrieve', 'owner')}: the submissions would belong to {owner.pw_name}, a student; "
            "set [retrieve] owner to the teacher"
        )
    return owner


def check_destination(dest: Path, owner: pwd.struct_passwd, *, create: bool) -> None:
    """DESTINATION is (or is made) a folder that no one but its owner and root can change.

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
    if create and not dest.exists():
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


# --- the reader: runs as the student ------------------------------------------------------------


def _reader(sock: socket.socket, job: dict) -> None:
    """Walk the student's folder as the student; send each regular file's open descriptor."""

    def send(msg: dict, fd: int | None = None) -> None:
        socket.send_fds(sock, [json.dumps(msg).encode()], [fd] if fd is not None else [])

    pw = job["pw"]
    safefs.become(pw)
    try:
        home_fd = safefs.open_dir(None, pw.pw_dir, uid=pw.pw_uid, what=f"home {pw.pw_dir}")
    except Unsafe as exc:
        send({"t": "error", "why": str(exc)})
        return
    dev = os.fstat(home_fd).st_dev
    fd = home_fd
    done: list[str] = []
    for part in job["folder"].split("/"):
        done.append(part)
        where = "~/" + "/".join(done)
        try:
            st = os.stat(part, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            send({"t": "missing", "why": f"no folder {where}"})
            return
        except OSError as exc:
            send({"t": "error", "why": f"{where}: {exc.strerror}"})
            return
        if not stat.S_ISDIR(st.st_mode):
            send({"t": "error", "why": f"{where} is {safefs.kind(st)}, not a folder; not followed"})
            return
        try:
            fd = safefs.open_dir(fd, part, expect=st, uid=pw.pw_uid, dev=dev, what=where)
        except Unsafe as exc:
            send({"t": "error", "why": f"{exc}; not followed"})
            return
    prev: dict[str, str] = job["prev_keys"]
    max_file = job["max_file"]
    same: list[list] = []  # unchanged files, sent in batches: [rel, key, size, mtime]

    dirs: list[str] = []

    def flush() -> None:
        if same or dirs:
            send({"t": "same", "items": same, "dirs": dirs})
            same.clear()
            dirs.clear()

    def skip(entry: safefs.Entry, why: str) -> None:
        flush()
        st = entry.st
        size, mtime = (st.st_size, st.st_mtime_ns) if st is not None else (0, 0)
        key = safefs.stat_key(st) if st is not None else ""
        send({"t": "skip", "rel": entry.rel, "why": why, "size": size, "mtime": mtime, "key": key})

    for entry in safefs.walk(
        fd, exclude=job["exclude"], include=job["include"], dev=dev, uid=pw.pw_uid, dirs=True
    ):
        st = entry.st
        if entry.problem:
            skip(entry, entry.problem)
            continue
        assert st is not None
        if stat.S_ISDIR(st.st_mode):  # kept in the snapshot too, even when empty
            dirs.append(entry.rel)
            continue
        size = st.st_size
        if size > max_file:
            skip(entry, f"larger than max_file_size ({size} > {max_file} bytes)")
            continue
        key = safefs.stat_key(st)
        mtime = st.st_mtime_ns
        if prev.get(entry.rel) == key:
            same.append([entry.rel, key, size, mtime])
            if len(same) + len(dirs) >= 200:
                flush()
            continue
        flush()
        try:
            ffd, fst = safefs.open_file(entry.dir_fd, entry.name, expect=st, what="it")
        except Unsafe as exc:
            skip(entry, str(exc))
            continue
        try:
            msg = {
                "t": "file",
                "rel": entry.rel,
                "key": safefs.stat_key(fst),
                "size": fst.st_size,
                "mtime": fst.st_mtime_ns,
            }
            send(msg, ffd)
        finally:
            os.close(ffd)
    flush()
    send({"t": "end"})


# --- the collector: runs as root, on the destination side ---------------------------------------


class Snapshot:
    """A snapshot being built in DESTINATION/USERNAME/.partial-STAMP, renamed when complete."""

    def __init__(self, user_fd: int, job: dict):
        self.user_fd = user_fd
        self.job = job
        self.uid, self.gid = job["owner"]
        self.partial = f".partial-{job['stamp']}-{os.getpid()}"
        os.mkdir(self.partial, 0o700, dir_fd=user_fd)
        self.fd = safefs.open_dir(user_fd, self.partial)
        os.fchown(self.fd, self.uid, self.gid)
        self.dirs: set[str] = set()

    def parent(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in self.dirs:
                continue
            with contextlib.suppress(FileExistsError):
                os.mkdir(sub, 0o755, dir_fd=self.fd)
            os.chown(sub, self.uid, self.gid, dir_fd=self.fd, follow_symlinks=False)
            self.dirs.add(sub)

    def copy(self, rel: str, src_fd: int, mode: int, mtime_ns: int, cap: int) -> tuple[str, int]:
        self.parent(rel)
        fd = os.open(rel, safefs.NEW_FILE_FLAGS, 0o400, dir_fd=self.fd)
        try:
            sha, size = safefs.copy_hashing(src_fd, fd, cap, safefs.beat)
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
        self.parent(rel)
        try:
            os.link(rel, rel, src_dir_fd=prev_fd, dst_dir_fd=self.fd, follow_symlinks=False)
            return True
        except OSError:
            return False

    def finish(self) -> str:
        """Rename into place under a new TIMESTAMP name and point ``latest`` at it."""
        name = self.job["stamp"]
        n = 1
        while True:
            try:
                os.stat(name, dir_fd=self.user_fd, follow_symlinks=False)
            except FileNotFoundError:
                break
            n += 1
            name = f"{self.job['stamp']}.{n}"
        os.fchmod(self.fd, 0o755)
        os.rename(self.partial, name, src_dir_fd=self.user_fd, dst_dir_fd=self.user_fd)
        os.close(self.fd)
        tmp = f".latest-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self.user_fd)
        os.symlink(name, tmp, dir_fd=self.user_fd)
        os.chown(tmp, self.uid, self.gid, dir_fd=self.user_fd, follow_symlinks=False)
        os.rename(tmp, "latest", src_dir_fd=self.user_fd, dst_dir_fd=self.user_fd)
        return name


def _user_dir(dest_fd: int, username: str, owner: tuple[int, int], create: bool) -> int | None:
    """DESTINATION/USERNAME: created 0700 for the owner; refused if anyone else could write it."""
    if create:
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


def _unchanged_by_stat(job: dict, prev_files: dict, prev_skipped: dict) -> dict | None:
    """The repeat-run fast path: the result if nothing changed since the last snapshot, else None.

    Only metadata is looked at (directories opened with O_NOFOLLOW, owned by the
    student, on the home's filesystem; files lstat'ed, never opened), so root may
    do it; no file's content is read. The same files with the same
    dev:ino:size:mtime:ctime as when they were collected means the same content.
    What was skipped last time must be exactly what is skipped now (the same
    paths; a regular file among them with the same stat as then).
    Anything else (or any doubt) returns None: the student's reader does the full run.
    """
    pw = job["pw"]
    fds: list[int] = []
    try:
        fd = safefs.open_dir(None, pw.pw_dir, uid=pw.pw_uid)
        fds.append(fd)
        dev = os.fstat(fd).st_dev
        for part in job["folder"].split("/"):
            fd = safefs.open_dir(fd, part, uid=pw.pw_uid, dev=dev)
            fds.append(fd)
        seen = 0
        skipped, late, total = [], [], 0
        deadline, max_file = job["deadline"], job["max_file"]
        for entry in safefs.walk(
            fd, exclude=job["exclude"], include=job["include"], dev=dev, uid=pw.pw_uid
        ):
            st = entry.st
            was = prev_skipped.get(entry.rel)
            if entry.problem or st is None or st.st_size > max_file:
                if was is None:
                    return None  # newly skipped: recorded by a new snapshot
                skipped.append(f"{_show(entry.rel)}: {was[0]}")
                continue
            if was is not None:  # skipped last time (unreadable, say): the same file?
                if was[1] != safefs.stat_key(st):
                    return None
                skipped.append(f"{_show(entry.rel)}: {was[0]}")
                continue
            prev = prev_files.get(entry.rel)
            if prev is None or prev[2] != safefs.stat_key(st):
                return None
            seen += 1
            total += st.st_size
            if deadline is not None and st.st_mtime_ns / 1e9 > deadline:
                late.append(_show(entry.rel))
        if seen != len(prev_files) or len(skipped) != len(prev_skipped):
            return None
    except (Unsafe, OSError):
        return None
    finally:
        for fd in fds:
            os.close(fd)
    counts = {"new": 0, "changed": 0, "unchanged": seen, "skipped": len(skipped)}
    return {
        "state": "unchanged",
        "counts": counts,
        "deleted": [],
        "skipped": skipped,
        "late": late,
        "files": seen,
        "bytes": total,
        "cache": [],
    }


SKIPPED = "skipped: "


def _split_rows(rows) -> tuple[dict[str, list], dict[str, list]]:
    """The last snapshot's rows: (rel -> [sha256, size, stat key] of its files,
    rel -> [reason, stat key] of what was skipped then)."""
    files: dict[str, list] = {}
    skipped: dict[str, list] = {}
    for path, _snap, sha, size, key in rows:
        rel = os.fsdecode(bytes(path))
        if sha.startswith(SKIPPED):
            skipped[rel] = [sha[len(SKIPPED) :], key]
        else:
            files[rel] = [sha, size, key]
    return files, skipped


def _quick_check(job: dict) -> dict | None:
    """In the parent, before any fork: the fast path's result for a student who changed nothing."""
    rows = job["prev_rows"]
    if not rows:
        return None
    snapshot = rows[0][1]
    try:
        if not stat.S_ISDIR(os.lstat(Path(job["dest"]) / job["username"] / snapshot).st_mode):
            return None
    except OSError:
        return None
    prev_files, prev_skipped = _split_rows(rows)
    return _unchanged_by_stat(job, prev_files, prev_skipped)


def collect_home(job: dict) -> dict:
    """Root worker for one student: fork the reader, build a snapshot if anything changed."""
    dry = job["dry_run"]
    # rel -> [sha256, size, stat key] of the last snapshot's files; rel -> key of its skipped ones
    prev_files, prev_skipped = _split_rows(job["prev_rows"])
    job["prev_snapshot"] = job["prev_rows"][0][1] if job["prev_rows"] else None
    dest_fd = (
        os.open(job["dest"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if os.path.isdir(job["dest"])
        else None
    )
    user_fd = (
        _user_dir(dest_fd, job["username"], job["owner"], create=not dry)
        if dest_fd is not None
        else None
    )
    prev_fd = None
    if user_fd is not None:
        if not dry:  # leftovers of a run that was cut off
            for name in os.listdir(user_fd):
                with contextlib.suppress(OSError):
                    if name.startswith(".partial-"):
                        shutil.rmtree(name, dir_fd=user_fd)
                    elif name.startswith(".latest-"):
                        os.unlink(name, dir_fd=user_fd)
        if job["prev_snapshot"]:
            with contextlib.suppress(Unsafe):
                prev_fd = safefs.open_dir(user_fd, job["prev_snapshot"])
    if prev_fd is None:
        prev_files, prev_skipped = {}, {}  # nothing to link to: every file is collected afresh
    job["prev_keys"] = {rel: v[2] for rel, v in prev_files.items()}  # rel -> stat key
    if prev_files:
        quick = _unchanged_by_stat(job, prev_files, prev_skipped)
        if quick is not None:
            return quick

    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the reader, as the student
        code = 0
        try:
            gc.disable()
            parent_sock.close()
            safefs.close_fds_except({child_sock.fileno()})
            _reader(child_sock, job)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    child_sock.close()
    parent_sock.settimeout(job.get("read_timeout", READ_TIMEOUT))
    try:
        return _collect(parent_sock, job, user_fd, prev_fd, prev_files, prev_skipped)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        parent_sock.close()


def _collect(
    sock: socket.socket,
    job: dict,
    user_fd: int | None,
    prev_fd: int | None,
    prev_files: dict,
    prev_skipped: dict,
) -> dict:
    dry = job["dry_run"]
    username = job["username"]
    max_file, max_total = job["max_file"], job["max_total"]
    deadline = job["deadline"]
    snap: Snapshot | None = None
    pending_links: list[str] = []
    entries: list[dict] = []  # manifest rows, in order
    cache: dict[str, list] = {}  # rel -> [sha, size, key] of every collected file
    skip_cache: dict[str, list] = {}  # rel -> ["skipped: why", size, key] of every skipped one
    seen: set[str] = set()
    folders: list[str] = []  # every folder, so that empty ones are in the snapshot too
    counts = {"new": 0, "changed": 0, "unchanged": 0, "skipped": 0}
    skipped: list[str] = []
    late: list[str] = []
    total = 0
    changed = False

    def ensure() -> Snapshot | None:
        nonlocal snap
        if snap is None and not dry:
            snap = Snapshot(user_fd, job)
            for rel in pending_links:
                link_or_skip(rel)
            pending_links.clear()
        return snap

    def link_or_skip(rel: str) -> None:
        assert snap is not None and prev_fd is not None
        if not snap.link(rel, prev_fd):
            cache.pop(rel, None)
            for e in entries:
                if e["rel"] == rel:
                    e.update(sha="", status="skipped: the previous copy is missing; retrieve again")
            skipped.append(f"{_show(rel)}: the previous copy is missing from the destination")

    def skip_row(rel: str, why: str, size: int = 0, mtime: int = 0, key: str = "") -> None:
        counts["skipped"] += 1
        skip_cache[rel] = [SKIPPED + why, size, key]
        skipped.append(f"{_show(rel)}: {why}")
        entries.append(
            {"rel": rel, "size": size, "mtime": mtime, "sha": "", "status": f"skipped: {why}"}
        )

    def add(rel: str, status: str, sha: str, size: int, key: str, mtime: int) -> None:
        nonlocal total, changed
        counts[status] += 1
        total += size
        if status != "unchanged":
            changed = True
        is_late = deadline is not None and mtime / 1e9 > deadline
        if is_late:
            late.append(_show(rel))
        entries.append(
            {
                "rel": rel,
                "size": size,
                "mtime": mtime,
                "sha": sha,
                "status": status,
                "late": is_late,
            }
        )
        cache[rel] = [sha, size, key]

    def unchanged(rel: str, sha: str, size: int, key: str, mtime: int) -> None:
        add(rel, "unchanged", sha, size, key, mtime)
        if snap is not None:
            link_or_skip(rel)
        else:
            pending_links.append(rel)

    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 1)
        except TimeoutError:
            raise RuntimeError("the student's folder could not be read in time (stopped)") from None
        if not data:
            raise RuntimeError("the reader process ended unexpectedly")
        msg = json.loads(data)
        fd = fds[0] if fds else None
        safefs.beat()
        try:
            t = msg["t"]
            if t == "end":
                break
            if t == "missing":  # the last snapshot (if any) is kept as it is
                return {"state": "nothing", "why": msg["why"]}
            if t == "error":
                raise RuntimeError(msg["why"])
            if t == "same":
                folders.extend(msg.get("dirs", ()))
                for rel, key, size, mtime in msg["items"]:
                    seen.add(rel)
                    prev = prev_files.get(rel)
                    if prev is None or prev[2] != key:
                        skip_row(rel, "reported unchanged, but is not", size, mtime)
                    elif total + size > max_total:
                        why = f"over max_total_size ({max_total} bytes) for this retrieval"
                        skip_row(rel, why, size, mtime)
                    else:
                        unchanged(rel, prev[0], size, key, mtime)
                continue
            rel = msg["rel"]
            seen.add(rel)
            size, mtime = msg["size"], msg["mtime"]
            if t == "skip":
                skip_row(rel, msg["why"], size, mtime, msg.get("key", ""))
                continue
            if fd is None:
                skip_row(rel, "could not be opened", size, mtime)
                continue
            # Trust the descriptor, not the message: check it again here.
            fst = os.fstat(fd)
            size, mtime, key = fst.st_size, fst.st_mtime_ns, safefs.stat_key(fst)
            if not stat.S_ISREG(fst.st_mode):
                skip_row(rel, safefs.kind(fst), size, mtime, key)
                continue
            if size > max_file:
                why = f"larger than max_file_size ({size} > {max_file} bytes)"
                skip_row(rel, why, size, mtime, key)
                continue
            if total + size > max_total:
                why = f"over max_total_size ({max_total} bytes) for this retrieval"
                skip_row(rel, why, size, mtime, key)
                continue
            grew = f"grew past max_file_size ({max_file} bytes) while read"
            prev = prev_files.get(rel)
            if prev is not None:
                sha = safefs.file_sha256(fd, max_file)
                if sha is None:
                    skip_row(rel, grew, size, mtime)
                    continue
                if sha == prev[0]:  # touched, not changed
                    unchanged(rel, sha, prev[1], key, mtime)
                    continue
            status = "changed" if prev is not None else "new"
            s = ensure()
            if s is None:  # dry run: nothing is written
                sha = safefs.file_sha256(fd, max_file)
                if sha is None:
                    skip_row(rel, grew, size, mtime)
                else:
                    add(rel, status, sha, size, key, mtime)
                continue
            try:
                sha, copied = s.copy(rel, fd, fst.st_mode, mtime, max_file)
            except safefs.TooLarge:
                skip_row(rel, grew, size, mtime)
                continue
            if copied != size:  # written to while being copied: remember what was copied
                key = f"{key}:changed-while-copied"
            add(rel, status, sha, copied, key, mtime)
        finally:
            if fd is not None:
                os.close(fd)
            for extra in fds[1:]:
                os.close(extra)

    deleted = sorted(set(prev_files) - seen)
    if deleted or set(skip_cache) != set(prev_skipped):
        # What cannot be collected is part of the record too: a file that became (or stopped
        # being) unreadable, too large, a link... makes a new snapshot and manifest rows.
        changed = True
    result = {
        "counts": counts,
        "deleted": [_show(r) for r in deleted],
        "skipped": skipped,
        "late": late,
        "files": len(cache),
        "bytes": total,
    }
    if not cache and not prev_files:
        why = "no files in the folder" + (f" ({len(skipped)} skipped)" if skipped else "")
        return {**result, "state": "nothing", "why": why}
    if not changed:  # only the files whose stat changed need their cache entry refreshed
        fresh = [
            [rel, *v]
            for rel, v in cache.items()
            if prev_files.get(rel, [None, None, None])[2] != v[2]
        ] + [[rel, *v] for rel, v in skip_cache.items() if prev_skipped[rel][1] != v[2]]
        result.update(state="unchanged", cache=fresh)
        return result
    if dry:
        result.update(state="collected", snapshot=job["stamp"], rows=[], cache=[])
        return result
    s = ensure()
    assert s is not None
    for rel in folders:
        s.parent(f"{rel}/-")
    name = s.finish()
    rows = [
        [
            username,
            name,
            _csv_path(e["rel"]),
            e["size"],
            _iso(e["mtime"]) if e["mtime"] else "",
            e["sha"],
            e["status"],
            "late" if e.get("late") else "",
        ]
        for e in entries
    ]
    result.update(
        state="collected",
        snapshot=name,
        rows=rows,
        cache=[[rel, *v] for rel, v in (*cache.items(), *skip_cache.items())],
    )
    return result


# --- the command --------------------------------------------------------------------------------


def _detail(result: dict, limit: int = 5) -> str:
    parts = []
    counts = result.get("counts", {})
    if result.get("snapshot"):
        parts.append(f"snapshot {result['snapshot']}")
    nums = [f"{counts[k]} {k}" for k in ("new", "changed", "unchanged") if counts.get(k)]
    if result.get("deleted"):
        nums.append(f"{len(result['deleted'])} deleted")
    if nums and result.get("state") == "collected":
        parts.append(", ".join(nums))
    late = result.get("late") or []
    if late:
        parts.append(
            f"{len(late)} late: " + ", ".join(late[:limit]) + (" ..." if len(late) > limit else "")
        )
    skipped = result.get("skipped") or []
    if skipped:
        more = f"; ... {len(skipped) - limit} more" if len(skipped) > limit else ""
        parts.append(f"{len(skipped)} skipped: " + "; ".join(skipped[:limit]) + more)
    return "; ".join(parts)


def retrieve(course: Course, *, only=(), deadline=None) -> int:
    """Collect each selected student's folder (see the module docstring); return the exit status."""
    from ..host.state import now
    from .material import account_for

    s = course.settings
    owner = owner_account(course)
    dest = s.retrieve_destination
    check_destination(dest, owner, create=not course.dry_run)
    course.state.ensure(SCHEMA_SQL)
    report = course.report("retrieve")
    students = course.students(only)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    folder = s.material_folder
    inspect_homes = is_root()
    if course.dry_run and not inspect_homes:
        click.echo("  (not root: the homes cannot be looked into; showing what would be collected)")
    prev = safefs.rows_by_user(
        course.state,
        "SELECT username, path, snapshot, sha256, size, stat_key FROM retrieved WHERE destination = ?",
        (str(dest),),
    )
    tasks = []
    fast: dict[str, dict] = {}
    for st in students:
        pw, why = account_for(course, st)
        if pw is None:
            report.failed(st.username, why)
            continue
        if course.dry_run and not inspect_homes:
            where = f"{pw.pw_dir}/{folder} into {dest}/{st.username}/{stamp}"
            report.done(st.username, "collected", f"{where}; not inspected")
            continue
        job = _job(
            course,
            st.username,
            pw,
            settings=s,
            dest=dest,
            owner=owner,
            stamp=stamp,
            deadline=deadline,
            prev_rows=prev.pop(st.username, []),
        )
        quick = _quick_check(job)
        if quick is not None:
            fast[st.username] = quick
            continue
        tasks.append((st.username, collect_home, (job,)))

    results: dict[str, dict] = {u: {"ok": r} for u, r in fast.items()}
    bar = None
    if len(tasks) > 1 and sys.stderr.isatty():
        bar = click.progressbar(length=len(tasks), label="retrieve", file=sys.stderr)
    for username, payload in safefs.fork_map(
        tasks, workers=safefs.workers_for(len(tasks)), idle_timeout=READ_TIMEOUT + 60
    ):
        results[username] = payload
        if "ok" in payload and not course.dry_run:
            _record(course, username, str(dest), folder, payload["ok"], owner, now())
        if bar:
            bar.update(1)
    if bar:
        bar.render_finish()
    for st in students:
        payload = results.get(st.username)
        if payload is None:
            continue
        if "error" in payload:
            report.failed(st.username, payload["error"])
            continue
        result = payload["ok"]
        if result["state"] == "nothing":
            skipped = _detail({"skipped": result.get("skipped")})
            tail = f"; {skipped}" if skipped else ""
            report.unchanged(st.username, f"nothing to collect: {result['why']}{tail}")
        elif result["state"] == "unchanged":
            report.unchanged(st.username, _detail(result))
        else:
            report.done(st.username, "collected", _detail(result))
    return report.finish()


def _job(
    course: Course,
    username: str,
    pw,
    *,
    settings,
    dest: Path,
    owner,
    stamp: str,
    deadline,
    prev_rows,
) -> dict:
    """The worker's input (``prev_rows``: the last snapshot's files, raw from the state)."""
    return {
        "username": username,
        "pw": pw,
        "prev_rows": prev_rows,
        "folder": settings.material_folder,
        "dest": str(dest),
        "owner": (owner.pw_uid, owner.pw_gid),
        "include": settings.retrieve_include,
        "exclude": settings.retrieve_exclude,
        "max_file": settings.max_file_size,
        "max_total": settings.max_total_size,
        "stamp": stamp,
        "deadline": deadline.timestamp() if deadline else None,
        "dry_run": course.dry_run,
    }


def _record(
    course: Course, username: str, dest: str, folder: str, result: dict, owner, at: str
) -> None:
    """The manifest rows (one append), then the state, for one student's new snapshot."""
    if result["state"] == "collected":
        _append_manifest(Path(dest), result["rows"], owner)
    if result["state"] == "nothing" or (result["state"] == "unchanged" and not result["cache"]):
        return
    cache = [
        (username, dest, os.fsencode(rel), result.get("snapshot") or "", sha, size, key)
        for rel, sha, size, key in result["cache"]
    ]
    with course.state.transaction():
        if result["state"] == "collected":
            course.state.execute(
                "DELETE FROM retrieved WHERE username = ? AND destination = ?", (username, dest)
            )
            course.state.conn.executemany(
                "INSERT INTO retrieved (username, destination, snapshot, path, sha256, size, stat_key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(u, d, snap, p, sha, size, key) for u, d, p, snap, sha, size, key in cache],
            )
            course.state.execute(
                "INSERT OR REPLACE INTO snapshots (username, destination, snapshot, folder, files, bytes, taken_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (username, dest, result["snapshot"], folder, result["files"], result["bytes"], at),
            )
            course.state.record(
                "retrieve",
                username,
                "collected",
                {"snapshot": result["snapshot"], **result["counts"], "late": len(result["late"])},
            )
        else:  # unchanged content; remember the files' new stat so they are not read again
            course.state.conn.executemany(
                "UPDATE retrieved SET stat_key = ? WHERE username = ? AND destination = ? AND path = ?",
                [(key, u, d, p) for u, d, p, _snap, _sha, _size, key in cache],
            )


def _append_manifest(dest: Path, rows: list[list], owner) -> None:
    """Append rows to DESTINATION/manifest.csv in one write (an append-only log)."""
    import csv
    import io

    if not rows:
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
        data = buf.getvalue().encode("utf-8", "backslashreplace")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
