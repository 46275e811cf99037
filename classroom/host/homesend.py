"""send's file work: the source opened by root, and a worker per home that acts as the student.

The source is opened by root (``scan_source``); the files stay open while a
forked worker per student, running as that student (``send_to_home``), applies
the decision table of ``core.sendrules`` inside HOME/FOLDER through directory
descriptors that never follow a link (see ``safefs``). The files are the
student's by construction, and nothing the student puts in their folder can
make the tool write outside it. A repeat run first checks, as root and by
metadata only (``unchanged_by_stat``), whether every file is exactly as the
course wrote it; such a student needs no worker at all.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core import sendrules as rules
from ..core.errors import InvalidInput
from ..core.paths import shown
from ..core.sendrules import Sent
from . import safefs, workers
from .safefs import Unsafe


@dataclass(frozen=True)
class SourceFile:
    rel: str
    size: int
    mode: int
    atime_ns: int
    mtime_ns: int
    sha256: str
    fd: int


@dataclass
class Source:
    """The material, opened: its folders, its files (each an open descriptor), what was skipped,
    and the sha256 computed afresh (``fresh``: (absolute path, stat key, sha256), to remember)."""

    root: Path
    dirs: list[tuple[str, int]]  # (relative path, mode)
    files: list[SourceFile]
    skipped: list[str]
    fresh: list[tuple[bytes, str, str]] = field(default_factory=list)

    def fds(self) -> list[int]:
        return [f.fd for f in self.files]

    def close(self) -> None:
        for f in self.files:
            os.close(f.fd)
        self.files = []


def scan_source(
    root: Path, *, exclude: tuple[str, ...], known: dict[bytes, tuple[str, str]], where: str
) -> Source:
    """Open every file of the source (no links followed) and know its sha256.

    ``known``: sha256 computed before, by absolute path: (stat key, sha256), used
    while the stat is the same. ``where`` names the setting, for the error message.
    """
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidInput(
            f"{where}: material source {root}: {exc.strerror} "
            "(set [material] source, or give --source DIR)"
        ) from None
    src = Source(root, [], [], [])
    try:
        for entry in safefs.walk(root_fd, exclude=exclude, dirs=True):
            if entry.problem:
                src.skipped.append(f"{shown(entry.rel)}: {entry.problem}")
                continue
            assert entry.st is not None
            if stat.S_ISDIR(entry.st.st_mode):
                src.dirs.append((entry.rel, entry.st.st_mode))
                continue
            try:
                src.files.append(_open_source_file(src, entry, known))
            except Unsafe as exc:
                src.skipped.append(f"{shown(entry.rel)}: {exc}")
            if len(src.files) % 512 == 0:
                workers.raise_fd_limit(len(src.files) + 512)
    except safefs.TooLarge:
        src.close()
        raise InvalidInput(
            f"material source {root}: a file grew while it was being read; try again"
        ) from None
    except BaseException:
        src.close()
        raise
    finally:
        os.close(root_fd)
    return src


def _open_source_file(
    src: Source, entry: safefs.Entry, known: dict[bytes, tuple[str, str]]
) -> SourceFile:
    fd, st = safefs.open_file(entry.dir_fd, entry.name, expect=entry.st)
    try:
        key = safefs.stat_key(st)
        absolute = os.fsencode(src.root / entry.rel)
        hit = known.get(absolute)
        if hit and hit[0] == key:
            sha = hit[1]
        else:
            sha, _ = safefs.copy_hashing(fd, None, st.st_size)
            src.fresh.append((absolute, key, sha))
    except BaseException:
        os.close(fd)
        raise
    return SourceFile(entry.rel, st.st_size, st.st_mode, st.st_atime_ns, st.st_mtime_ns, sha, fd)


@dataclass
class SendJob:
    """One student's part of a send: the source (open), what was sent there, ``--force``."""

    pw: pwd.struct_passwd
    folder: str
    src: Source
    sent_rows: list  # (path, sha256, size, stat key), raw from the state
    force: bool
    stamp: str  # this run's TIMESTAMP, for .backup/TIMESTAMP
    # The class's shared folder (``pw`` stands for root, with the folder's parent as its
    # home): acted on as root, files and folders writable by their group (the staff).
    shared: bool = False

    def file_mode(self, mode: int) -> int:
        if self.shared:
            return (stat.S_IMODE(mode) & 0o750) | 0o660
        return (stat.S_IMODE(mode) & 0o755) | 0o600

    def dir_mode(self, mode: int) -> int:
        if self.shared:
            return (stat.S_IMODE(mode) & 0o750) | 0o2770  # setgid: the group is inherited
        return (stat.S_IMODE(mode) & 0o755) | 0o700


# --- the worker: runs as the student --------------------------------------------------------------


class HomeSender:
    """Applies the send table inside one home; runs in a worker that has become the student."""

    def __init__(self, job: SendJob):
        self.job = job
        self.uid = job.pw.pw_uid
        self.force = job.force
        self.sent = {os.fsdecode(bytes(p)): Sent(*rest) for p, *rest in job.sent_rows}
        self.records: list[list] = []  # [rel, sha, size, stat_key] of what is now right there
        self.forgotten: list[str] = []  # rels the course wrote before and removed now
        self.actions: dict[str, list[str]] = {}
        self.skipped: list[str] = []
        self.dev = 0
        self.root_fd: int | None = None
        self.backup = Backup(self)

    def sent_sha(self, rel: str) -> str | None:
        """What the course last wrote as ``rel`` (None: never)."""
        rec = self.sent.get(rel)
        return rec.sha256 if rec else None

    def act(self, action: str, text: str) -> None:
        self.actions.setdefault(action, []).append(text)

    def run(self) -> dict:
        if self.job.shared:
            os.umask(0o007)
        else:
            workers.become(self.job.pw, umask=0o022)
        home = self._open_folder()
        with home:
            self.dev, self.root_fd = home.dev, home.fd
            dir_fds = self._folders()
            try:
                for f in self.job.src.files:
                    parent, _, name = f.rel.rpartition("/")
                    pfd = dir_fds.get(parent)
                    if isinstance(pfd, str):
                        continue  # the folder it goes in was not sent; reported once
                    try:
                        self.file(pfd, name, f)
                    except Unsafe as exc:
                        self.skipped.append(f"{shown(f.rel)}: {exc}")
                    except OSError as exc:
                        self.skipped.append(f"{shown(f.rel)}: {exc.strerror or exc}")
                    workers.beat()
            finally:
                for fd in {fd for fd in dir_fds.values() if isinstance(fd, int)} - {home.fd}:
                    os.close(fd)
                self.backup.close()
        return {
            "actions": self.actions,
            "skipped": self.skipped,
            "records": self.records,
            "forgotten": self.forgotten,
        }

    def _open_folder(self) -> safefs.HomeFolder:
        """HOME/FOLDER, made if missing; a link or a file on the way fails this student."""
        try:
            return safefs.open_home_folder(self.job.pw, self.job.folder, make=0o755)
        except safefs.NoHome as exc:
            raise RuntimeError(f"{exc}: run setup for this student") from None
        except safefs.NotAFolder as exc:
            raise RuntimeError(f"{exc}: move it away and send again") from None
        except Unsafe as exc:
            raise RuntimeError(f"{exc}; nothing was sent") from None

    def _folders(self) -> dict[str, int | None | str]:
        """Each folder of the source at the student: its fd, None (would be made), or why not."""
        dir_fds: dict[str, int | None | str] = {"": self.root_fd}
        for rel, mode in sorted(self.job.src.dirs, key=lambda d: d[0].split("/")):
            parent, _, name = rel.rpartition("/")
            pfd = dir_fds.get(parent)
            if isinstance(pfd, str):
                dir_fds[rel] = pfd
                continue
            dir_fds[rel] = self.subfolder(pfd, rel, name, self.job.dir_mode(mode))
        for fd in dir_fds.values():
            if isinstance(fd, int):
                safefs.remove_leftovers(fd)  # what a send that was cut off left behind
        return dir_fds

    def subfolder(self, parent_fd: int | None, rel: str, name: str, mode: int) -> int | None | str:
        """A folder of the source: the table with ``FOLDER`` as content."""
        if parent_fd is None:
            return None
        st = safefs.lstat(parent_fd, name)
        have = None if st is None else rules.FOLDER if stat.S_ISDIR(st.st_mode) else rules.OTHER
        action = rules.decide(None, have, rules.FOLDER, force=self.force)
        if action == rules.CONFLICT:
            assert st is not None
            reason = f"{shown(rel)}: kept your {safefs.kind(st)[2:]}; the folder of that name was not sent"
            self.act(rules.CONFLICT, reason)
            return reason
        if action == rules.OVERWRITE:
            self.act(rules.OVERWRITE, f"{shown(rel)} (yours moved to {self.backup.where(rel)})")
            self.backup.keep(parent_fd, rel, name)
            st = None
        try:
            if st is None:
                return safefs.ensure_dir(
                    parent_fd, name, mode=mode, uid=self.uid, dev=self.dev, what=shown(rel)
                )
            return safefs.open_dir(
                parent_fd, name, expect=st, uid=self.uid, dev=self.dev, what=shown(rel)
            )
        except Unsafe as exc:
            tail = "" if st is None else "; not sent"
            self.skipped.append(f"{shown(rel)}: {exc}{tail}")
            return str(exc)

    def content(
        self, dir_fd: int | None, name: str, rel: str, f: SourceFile
    ) -> tuple[str | None, os.stat_result | None]:
        """What the student has as ``name`` (and its lstat): None (nothing), its sha256 when it
        can equal the source or what was sent there, else ``OTHER``."""
        st = safefs.lstat(dir_fd, name) if dir_fd is not None else None
        if st is None or not stat.S_ISREG(st.st_mode):
            return (None if st is None else rules.OTHER), st
        rec = self.sent.get(rel)
        if rec and rec.stat_key == safefs.stat_key(st):
            return rec.sha256, st  # not touched since the course wrote it
        if st.st_size not in {f.size} | ({rec.size} if rec else set()):
            return rules.OTHER, st  # differs from both: no need to read it
        assert dir_fd is not None
        try:
            fd, _ = safefs.open_file(dir_fd, name, expect=st)
        except Unsafe:
            return rules.OTHER, st
        try:
            return safefs.file_sha256(fd, st.st_size) or rules.OTHER, st
        finally:
            os.close(fd)

    def file(self, dir_fd: int | None, name: str, f: SourceFile) -> None:
        """One file of the source: the table of ``core.sendrules``, then do it."""
        have, st = self.content(dir_fd, name, f.rel, f)
        action = rules.decide(self.sent_sha(f.rel), have, f.sha256, force=self.force)
        if action == rules.NOTHING:
            self.remember(f.rel, f, st)
        elif action == rules.CONFLICT:
            self.beside(dir_fd, name, f)
        elif action == rules.OVERWRITE:
            where = self.backup.where(f.rel)
            self.backup.keep(dir_fd, f.rel, name)
            self.write(dir_fd, name, f.rel, f)
            gone = "".join(f"; {shown(b)} removed" for b in self.drop_beside(dir_fd, name, f))
            self.act(action, f"{shown(f.rel)} (yours moved to {where}{gone})")
        else:
            self.act(action, shown(f.rel))
            self.write(dir_fd, name, f.rel, f)

    def remember(self, rel: str, f: SourceFile, st: os.stat_result | None) -> None:
        """``rel`` (as ``st``) already is the source's version: recorded, unless the state
        knows it so."""
        assert st is not None
        key = safefs.stat_key(st)
        if rules.stale(self.sent.get(rel), f.sha256, key):
            self.records.append([rel, f.sha256, f.size, key])

    def beside(self, dir_fd: int | None, name: str, f: SourceFile) -> None:
        """Keep the student's file; put the new version next to it (or find it already there)."""
        parent = f.rel.rpartition("/")[0]
        for n in range(1, rules.MAX_BESIDE + 1):
            bname = rules.beside_name(name, n)
            brel = f"{parent}/{bname}" if parent else bname
            have, st = self.content(dir_fd, bname, brel, f)
            action = rules.decide_beside(self.sent_sha(brel), have, f.sha256)
            if action == rules.NEXT:
                continue
            shown_as = f"{shown(f.rel)} (new version in {shown(bname)})"
            if action == rules.KEPT:
                self.act(rules.KEPT, shown_as)  # the conflict stands; nothing new to write
                self.remember(brel, f, st)
            else:
                self.act(rules.CONFLICT, shown_as)
                self.write(dir_fd, bname, brel, f)
            return
        self.skipped.append(
            f"{shown(f.rel)}: edited, and no free name for the new version beside it"
        )

    def drop_beside(self, dir_fd: int | None, name: str, f: SourceFile) -> list[str]:
        """After ``--force`` wrote ``name``: remove the new versions an earlier send put beside
        it, each only if it is still exactly what the course wrote there; their names."""
        parent = f.rel.rpartition("/")[0]
        dropped = []
        for n in range(1, rules.MAX_BESIDE + 1):
            bname = rules.beside_name(name, n)
            brel = f"{parent}/{bname}" if parent else bname
            sent = self.sent_sha(brel)
            if sent is None or dir_fd is None:
                continue
            have, _ = self.content(dir_fd, bname, brel, f)
            if have == sent:
                safefs.unlink(dir_fd, bname)
                self.forgotten.append(brel)
                dropped.append(bname)
        return dropped

    def write(self, dir_fd: int | None, name: str, rel: str, f: SourceFile) -> None:
        """A copy of ``f`` as ``name`` in ``dir_fd``, whole or not at all; recorded."""
        st = safefs.replace_file(
            dir_fd,
            name,
            lambda fd: safefs.copy_fd(f.fd, fd, f.size, workers.beat),
            mode=self.job.file_mode(f.mode),
            times_ns=(f.atime_ns, f.mtime_ns),
        )
        if st is not None:
            self.records.append([rel, f.sha256, f.size, safefs.stat_key(st)])


class Backup:
    """FOLDER/.backup/STAMP/, where ``--force`` moves the student's versions (made when needed)."""

    def __init__(self, sender: HomeSender):
        self.sender = sender
        self.name: str | None = None
        self.dirs: dict[str, int | None] = {}

    def stamp(self) -> str:
        """This run's folder in .backup: TIMESTAMP, or TIMESTAMP.N when an earlier run made that.

        Two ``--force`` runs in the same second must not put the second backup over the first.
        """
        if self.name is None:
            stamp = self.sender.job.stamp
            name, n = stamp, 1
            root_fd = self.sender.root_fd
            while root_fd is not None and _exists(root_fd, f".backup/{name}"):
                n += 1
                name = f"{stamp}.{n}"
            self.name = name
        return self.name

    def where(self, rel: str) -> str:
        return f".backup/{self.stamp()}/{shown(rel)}"

    def keep(self, dir_fd: int | None, rel: str, name: str) -> None:
        """Move the student's ``rel`` to FOLDER/.backup/STAMP/rel (a rename: nothing is read)."""
        if dir_fd is None:
            return
        s = self.sender
        fd, key = s.root_fd, ""
        for part in [".backup", self.stamp(), *rel.split("/")[:-1]]:
            key = f"{key}/{part}"
            if key not in self.dirs:
                what = f".backup{key}"
                self.dirs[key] = safefs.ensure_dir(
                    fd, part, mode=0o700, uid=s.uid, dev=s.dev, what=what
                )
            fd = self.dirs[key]
        safefs.move(dir_fd, name, fd)

    def close(self) -> None:
        for fd in self.dirs.values():
            if fd is not None:
                os.close(fd)
        self.dirs = {}


def _exists(dir_fd: int, path: str) -> bool:
    try:
        os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def send_to_home(job: SendJob, others: Sequence[int] = ()) -> dict:
    """The worker: become the student, apply the table in HOME/FOLDER; what was done (JSON-able).

    ``others``: descriptors of other students' sources (``return``), closed first: a
    worker holds only what it hands to its own student.
    """
    for fd in set(others) - set(job.src.fds()):
        os.close(fd)
    return HomeSender(job).run()


def unchanged_by_stat(pw: pwd.struct_passwd, folder: str, src: Source, rows: list) -> bool:
    """The repeat-run fast path: True if every file is exactly what was last sent and is current.

    Only metadata is looked at (folders opened with O_NOFOLLOW, owned by the
    student; files lstat'ed, never opened; folders listed for what a send that was cut off
    left), so root may do it without a worker.
    A file's dev:ino:size:mtime:ctime equal to what it was when the course
    wrote it means it was not touched since. Any doubt: False, and the worker decides.
    """
    if not rows:
        return False
    sent = {os.fsdecode(bytes(path)): (sha, key) for path, sha, _size, key in rows}
    fds: dict[str, int] = {}
    try:
        with safefs.open_home_folder(pw, folder) as home:
            assert home.fd is not None
            fds[""] = home.fd
            for rel, _mode in sorted(src.dirs, key=lambda d: d[0].split("/")):
                parent, _, name = rel.rpartition("/")
                fds[rel] = safefs.open_dir(fds[parent], name, uid=pw.pw_uid, dev=home.dev)
            if any(safefs.leftovers(fd) for fd in fds.values()):
                return False  # a send was cut off: its worker cleans up
            for f in src.files:
                rec = sent.get(f.rel)
                if rec is None or rec[0] != f.sha256:
                    return False
                parent, _, name = f.rel.rpartition("/")
                st = os.stat(name, dir_fd=fds[parent], follow_symlinks=False)
                if safefs.stat_key(st) != rec[1]:
                    return False
            return True
    except (Unsafe, OSError, KeyError):
        return False
    finally:
        for rel, fd in fds.items():
            if rel:
                os.close(fd)
