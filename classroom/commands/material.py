"""send: copy the tutorial material into every student's HOME/FOLDER, never losing an edit.

Each file is decided by content (sha256) against the source and against what
the course last sent to that place (kept in the state):

==============================================  =========================================
the file at the student                         what send does
==============================================  =========================================
missing, never sent                             copy
missing, sent before (the student deleted it)   restore it
same as the source                              nothing
same as what was last sent, source changed      update it
edited, or a student's own file of that name    keep it; write the new version beside it
                                                (``NAME.new.EXT``) and list a conflict;
                                                ``--force``: move the student's version to
                                                FOLDER/.backup/TIMESTAMP/ and write the new
==============================================  =========================================

The source is opened by root here; the files stay open while a forked worker
per student, running as that student, writes into the home through directory
descriptors that never follow a link (see ``safefs``). The files are the
student's by construction, and nothing the student puts in their folder can
make the tool write outside it. A repeat run first checks, as root and by
metadata only (``unchanged_by_stat``), whether every file is exactly as the
course wrote it; such a student needs no worker at all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pwd
import secrets
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from ..core.errors import InvalidInput
from ..core.settings import safe_folder
from ..host import safefs
from ..host.safefs import Unsafe
from ..host.system import is_root
from .course import Course

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS sent (
    username TEXT NOT NULL,
    folder TEXT NOT NULL,
    path BLOB NOT NULL,          -- relative to HOME/FOLDER, bytes as on disk
    sha256 TEXT NOT NULL,        -- what the course wrote there last
    size INTEGER NOT NULL,
    stat_key TEXT,               -- dev:ino:size:mtime_ns:ctime_ns of the file as written
    sent_at TEXT NOT NULL,
    PRIMARY KEY (username, folder, path)
);
CREATE TABLE IF NOT EXISTS source_hashes (
    path BLOB PRIMARY KEY,
    stat_key TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
"""

OUTCOME_ORDER = ("conflict", "overwritten", "updated", "restored", "copied")


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
    root: Path
    dirs: list[tuple[str, int]]  # (relative path, mode)
    files: list[SourceFile]
    skipped: list[str]

    def close(self) -> None:
        for f in self.files:
            os.close(f.fd)
        self.files = []


def _enc(rel: str) -> bytes:
    return os.fsencode(rel)


def _show(rel: str) -> str:
    """A path as it can be printed: newlines and undecodable bytes made visible."""
    text = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def scan_source(course: Course, root: Path) -> Source:
    """Open every file of the source (no links followed) and know its sha256 (cached by stat)."""
    s = course.settings
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidInput(
            f"{s.where('material', 'source')}: material source {root}: {exc.strerror} "
            "(set [material] source, or give --source DIR)"
        ) from None
    cache: dict[bytes, tuple[str, str]] = {}
    for row in safefs.rows(course.state, "SELECT path, stat_key, sha256 FROM source_hashes"):
        cache[bytes(row["path"])] = (row["stat_key"], row["sha256"])
    dirs: list[tuple[str, int]] = []
    files: list[SourceFile] = []
    skipped: list[str] = []
    fresh: list[tuple[bytes, str, str]] = []
    try:
        for entry in safefs.walk(root_fd, exclude=s.material_exclude, dirs=True):
            st = entry.st
            if entry.problem:
                skipped.append(f"{_show(entry.rel)}: {entry.problem}")
                continue
            assert st is not None
            if stat.S_ISDIR(st.st_mode):
                dirs.append((entry.rel, st.st_mode))
                continue
            try:
                fd, fst = safefs.open_file(entry.dir_fd, entry.name, expect=st)
            except Unsafe as exc:
                skipped.append(f"{_show(entry.rel)}: {exc}")
                continue
            key = safefs.stat_key(fst)
            absolute = os.fsencode(root / entry.rel)
            hit = cache.get(absolute)
            if hit and hit[0] == key:
                sha = hit[1]
            else:
                sha, _ = safefs.copy_hashing(fd, None, fst.st_size)
                fresh.append((absolute, key, sha))
            files.append(
                SourceFile(
                    entry.rel, fst.st_size, fst.st_mode, fst.st_atime_ns, fst.st_mtime_ns, sha, fd
                )
            )
            if len(files) % 512 == 0:
                safefs.raise_fd_limit(len(files) + 512)
    except safefs.TooLarge:
        raise InvalidInput(
            f"material source {root}: a file grew while it was being read; try again"
        ) from None
    finally:
        os.close(root_fd)
    if fresh and not course.state.readonly:
        with course.state.transaction():
            course.state.conn.executemany(
                "INSERT OR REPLACE INTO source_hashes (path, stat_key, sha256) VALUES (?, ?, ?)",
                fresh,
            )
    return Source(root, dirs, files, skipped)


def beside_name(name: str, n: int) -> str:
    """Where the new version goes when the student's file is kept: lesson.ipynb -> lesson.new.ipynb."""
    tag = "new" if n == 1 else f"new{n}"
    stem, ext = os.path.splitext(name)
    if not stem or stem.startswith(".") and not ext:
        return f"{name}.{tag}"
    return f"{stem}.{tag}{ext}"


# --- the worker: runs as the student --------------------------------------------------------------


class HomeSender:
    """Applies the send table inside one home; runs in a child that has become the student."""

    def __init__(self, job: dict):
        self.job = job
        self.pw = job["pw"]
        self.uid = self.pw.pw_uid
        self.dry = job["dry_run"]
        self.force = job["force"]
        self.sent: dict[str, tuple[str, int, str | None]] = {}
        self.records: list[list] = []  # [rel, sha, size, stat_key]
        self.actions: dict[str, list[str]] = {}
        self.skipped: list[str] = []
        self.dev: int | None = None
        self.backup_fd: int | None = None
        self.backup_dirs: dict[str, int] = {}
        self.backup_name: str | None = None
        self.root_fd: int | None = None

    def act(self, action: str, text: str) -> None:
        self.actions.setdefault(action, []).append(text)

    def run(self) -> dict:
        for path, sha, size, key in self.job["sent_rows"]:
            self.sent[os.fsdecode(bytes(path))] = (sha, size, key)
        safefs.become(self.pw)
        folder = self.job["folder"]
        try:
            home_fd = safefs.open_dir(
                None, self.pw.pw_dir, uid=self.uid, what=f"home {self.pw.pw_dir}"
            )
        except Unsafe as exc:
            raise RuntimeError(f"{exc}: run setup for this student") from None
        self.dev = os.fstat(home_fd).st_dev
        fd: int | None = home_fd
        done = []
        for part in folder.split("/"):
            done.append(part)
            where = "~/" + "/".join(done)
            fd = self.folder(fd, part, where)
        self.root_fd = fd
        dir_fds: dict[str, int | None | str] = {"": fd}
        for rel, mode in sorted(self.job["dirs"], key=lambda d: d[0].split("/")):
            parent, _, name = rel.rpartition("/")
            pfd = dir_fds.get(parent)
            if isinstance(pfd, str):
                dir_fds[rel] = pfd
                continue
            dir_fds[rel] = self.subfolder(pfd, rel, name, mode)
        for f in self.job["files"]:
            parent, _, name = f.rel.rpartition("/")
            pfd = dir_fds.get(parent)
            if isinstance(pfd, str):
                continue  # the folder it goes in was not sent; reported once
            try:
                self.file(pfd, name, f)
            except Unsafe as exc:
                self.skipped.append(f"{_show(f.rel)}: {exc}")
            except OSError as exc:
                self.skipped.append(f"{_show(f.rel)}: {exc.strerror or exc}")
            safefs.beat()
        return {"actions": self.actions, "skipped": self.skipped, "records": self.records}

    def folder(self, parent_fd: int | None, name: str, where: str) -> int | None:
        """A folder on the way to HOME/FOLDER: created if missing; a link or a file there fails."""
        if parent_fd is None:
            return None
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            if self.dry:
                return None
            fd, _ = safefs.ensure_dir(
                parent_fd, name, mode=0o755, uid=self.uid, dev=self.dev, what=where
            )
            return fd
        if not stat.S_ISDIR(st.st_mode):
            raise RuntimeError(
                f"{where} is {safefs.kind(st)}, not a folder: move it away and send again"
            )
        try:
            return safefs.open_dir(
                parent_fd, name, expect=st, uid=self.uid, dev=self.dev, what=where
            )
        except Unsafe as exc:
            raise RuntimeError(f"{exc}; nothing was sent") from None

    def subfolder(self, parent_fd: int | None, rel: str, name: str, mode: int) -> int | None | str:
        mode = (stat.S_IMODE(mode) & 0o755) | 0o700
        if parent_fd is None:
            return None
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            if not self.force:
                reason = f"{_show(rel)}: kept your {safefs.kind(st)[2:]}; the folder of that name was not sent"
                self.act("conflict", reason)
                return reason
            if not self.dry:
                self.backup(parent_fd, rel, name)
            self.act("overwritten", f"{_show(rel)} (yours moved to {self.backup_where(rel)})")
            st = None
        if st is None:
            if self.dry:
                return None
            try:
                fd, _ = safefs.ensure_dir(
                    parent_fd, name, mode=mode, uid=self.uid, dev=self.dev, what=_show(rel)
                )
            except Unsafe as exc:
                self.skipped.append(f"{_show(rel)}: {exc}")
                return str(exc)
            return fd
        try:
            return safefs.open_dir(
                parent_fd, name, expect=st, uid=self.uid, dev=self.dev, what=_show(rel)
            )
        except Unsafe as exc:
            self.skipped.append(f"{_show(rel)}: {exc}; not sent")
            return str(exc)

    def current_sha(self, dir_fd: int, name: str, st: os.stat_result, f: SourceFile) -> str | None:
        """The sha256 of the student's file, when it can equal the source or the last sent; else None."""
        rec = self.sent.get(f.rel)
        if rec and rec[2] == safefs.stat_key(st):
            return rec[0]
        sizes = {f.size} | ({rec[1]} if rec else set())
        if st.st_size not in sizes:
            return None  # differs from both: no need to read it
        fd, _ = safefs.open_file(dir_fd, name, expect=st)
        try:
            return safefs.file_sha256(fd, st.st_size)
        finally:
            os.close(fd)

    def file(self, dir_fd: int | None, name: str, f: SourceFile) -> None:
        rel = f.rel
        rec = self.sent.get(rel)
        if dir_fd is None:
            self.act("restored" if rec else "copied", _show(rel))
            return
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            self.act("restored" if rec else "copied", _show(rel))
            self.write(dir_fd, name, rel, f)
            return
        current = None
        if stat.S_ISREG(st.st_mode):
            try:
                current = self.current_sha(dir_fd, name, st, f)
            except Unsafe:
                current = None
        if current == f.sha256:
            if not rec or rec[0] != f.sha256 or rec[2] != safefs.stat_key(st):
                self.records.append([rel, f.sha256, f.size, safefs.stat_key(st)])
            return
        if rec and current == rec[0]:
            self.act("updated", _show(rel))
            self.write(dir_fd, name, rel, f)
            return
        # Edited by the student, or the student's own thing of that name.
        if self.force:
            self.act("overwritten", f"{_show(rel)} (yours moved to {self.backup_where(rel)})")
            if not self.dry:
                self.backup(dir_fd, rel, name)
                self.write(dir_fd, name, rel, f)
            return
        self.beside(dir_fd, name, f)

    def beside(self, dir_fd: int, name: str, f: SourceFile) -> None:
        """Keep the student's file; put the new version next to it (or find it already there)."""
        parent = f.rel.rpartition("/")[0]
        for n in range(1, 100):
            bname = beside_name(name, n)
            brel = f"{parent}/{bname}" if parent else bname
            rec = self.sent.get(brel)
            shown = f"{_show(f.rel)} (new version in {_show(bname)})"
            try:
                st = os.stat(bname, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                self.act("conflict", shown)
                self.write(dir_fd, bname, brel, f)
                return
            if not stat.S_ISREG(st.st_mode):
                continue
            probe = SourceFile(brel, f.size, f.mode, f.atime_ns, f.mtime_ns, f.sha256, f.fd)
            try:
                current = self.current_sha(dir_fd, bname, st, probe)
            except Unsafe:
                continue
            if current == f.sha256:
                self.act("kept", shown)  # the conflict stands; nothing new to write
                if not rec or rec[2] != safefs.stat_key(st):
                    self.records.append([brel, f.sha256, f.size, safefs.stat_key(st)])
                return
            if rec and current == rec[0]:
                self.act("conflict", shown)
                self.write(dir_fd, bname, brel, f)
                return
        self.skipped.append(
            f"{_show(f.rel)}: edited, and no free name for the new version beside it"
        )

    def write(self, dir_fd: int, name: str, rel: str, f: SourceFile) -> None:
        """Write a copy of ``f`` as ``name`` in ``dir_fd``: temporary name, then rename over."""
        if self.dry:
            return
        tmp = f".classroom-{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, safefs.NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            safefs.copy_fd(f.fd, fd, f.size, safefs.beat)
            os.fchmod(fd, (stat.S_IMODE(f.mode) & 0o755) | 0o600)
            os.utime(fd, ns=(f.atime_ns, f.mtime_ns))
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            st = os.fstat(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        finally:
            os.close(fd)
        self.records.append([rel, f.sha256, f.size, safefs.stat_key(st)])

    def backup_stamp(self) -> str:
        """This run's folder in .backup: TIMESTAMP, or TIMESTAMP.N when an earlier run made that.

        Two ``--force`` runs in the same second must not put the second backup over the first.
        """
        if self.backup_name is None:
            name, n = self.job["stamp"], 1
            while self.root_fd is not None:
                try:
                    os.stat(f".backup/{name}", dir_fd=self.root_fd, follow_symlinks=False)
                except OSError:
                    break
                n += 1
                name = f"{self.job['stamp']}.{n}"
            self.backup_name = name
        return self.backup_name

    def backup_where(self, rel: str) -> str:
        return f".backup/{self.backup_stamp()}/{_show(rel)}"

    def backup(self, dir_fd: int, rel: str, name: str) -> None:
        """Move the student's ``rel`` to FOLDER/.backup/STAMP/rel (a rename: nothing is read or copied)."""
        parts = [".backup", self.backup_stamp(), *rel.split("/")[:-1]]
        fd = self.root_fd
        key = ""
        for part in parts:
            key = f"{key}/{part}"
            if key not in self.backup_dirs:
                self.backup_dirs[key], _ = safefs.ensure_dir(
                    fd, part, mode=0o700, uid=self.uid, dev=self.dev, what=f".backup{key}"
                )
            fd = self.backup_dirs[key]
        os.rename(name, name, src_dir_fd=dir_fd, dst_dir_fd=fd)


def unchanged_by_stat(pw, folder: str, src: Source, rows: list) -> bool:
    """The repeat-run fast path: True if every file is exactly what was last sent and is current.

    Only metadata is looked at (folders opened with O_NOFOLLOW, owned by the
    student; files lstat'ed, never opened), so root may do it without a worker.
    A file's dev:ino:size:mtime:ctime equal to what it was when the course
    wrote it means it was not touched since. Any doubt: False, and the worker decides.
    """
    if not rows:
        return False
    sent = {os.fsdecode(bytes(path)): (sha, key) for path, sha, _size, key in rows}
    fds: dict[str, int] = {}
    try:
        fd = safefs.open_dir(None, pw.pw_dir, uid=pw.pw_uid)
        fds["~"] = fd
        dev = os.fstat(fd).st_dev
        for i, part in enumerate(folder.split("/")):
            fd = fds[f"~{i}"] = safefs.open_dir(fd, part, uid=pw.pw_uid, dev=dev)
        fds[""] = fd
        for rel, _mode in sorted(src.dirs, key=lambda d: d[0].split("/")):
            parent, _, name = rel.rpartition("/")
            fds[rel] = safefs.open_dir(fds[parent], name, uid=pw.pw_uid, dev=dev)
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
        for fd in set(fds.values()):  # the folder's fd is in there twice
            os.close(fd)


def send_to_home(job: dict) -> dict:
    return HomeSender(job).run()


# --- the command --------------------------------------------------------------------------------


def _outcome(actions: dict[str, list[str]]) -> str | None:
    for what in OUTCOME_ORDER:
        if actions.get(what):
            return what
    return None


def _detail(
    actions: dict[str, list[str]], skipped: list[str], limit: int = 5, names: bool = False
) -> str:
    """What was done to one student; ``names``: list the files of every action (a dry run)."""
    parts = []
    for what in ("copied", "restored", "updated", "overwritten", "conflict", "kept"):
        items = actions.get(what) or []
        if not items:
            continue
        label = {"conflict": "conflict", "kept": "conflict kept"}.get(what, what)
        if names or what in ("conflict", "kept", "overwritten") or len(items) <= 2:
            shown = ", ".join(items[:limit]) + (
                f", ... {len(items) - limit} more" if len(items) > limit else ""
            )
            parts.append(f"{len(items)} {label}: {shown}")
        else:
            parts.append(f"{len(items)} {label}")
    if skipped:
        shown = "; ".join(skipped[:limit]) + (
            f"; ... {len(skipped) - limit} more" if len(skipped) > limit else ""
        )
        parts.append(f"{len(skipped)} skipped: {shown}")
    return "; ".join(parts)


def account_for(course: Course, student) -> tuple[pwd.struct_passwd | None, str]:
    """The student's account if the course may act on it, else (None, why).

    A dry run without root cannot read the course state; there an existing
    account is taken as the course's (nothing is changed anyway).
    """
    from ..host import accounts

    if course.dry_run and not course.state_readable:
        try:
            return pwd.getpwnam(student.username), ""
        except KeyError:
            return None, "no account: run setup first"
    acc = accounts.inspect(course, student)
    if acc.kind != accounts.OK or acc.pw is None:
        return None, acc.why or "no account: run setup first"
    return acc.pw, ""


def send(course: Course, *, only=(), force=False, source=None, folder=None) -> int:
    """Send the material to each selected student (see the module docstring); return the exit status."""
    s = course.settings
    folder = (folder or s.material_folder).strip("/")
    if not safe_folder(folder):
        raise InvalidInput(
            f"--folder {folder!r}: must be a relative path inside the home, without '..'"
        )
    root = Path(source).resolve() if source else s.material_source
    if root is None:
        raise InvalidInput(
            f"{s.where('material', 'source')}: [material] source is not set (or give --source DIR)"
        )
    if not root.is_dir():
        where = "--source" if source else s.where("material", "source")
        raise InvalidInput(f"{where}: material source {root} is not a folder")
    course.state.ensure(SCHEMA_SQL)
    students = course.students(only)
    report = course.report("send")
    inspect_homes = is_root()
    if course.dry_run and not inspect_homes:
        click.echo("  (not root: the homes cannot be looked into; showing what would be sent)")
    src = scan_source(course, root)
    try:
        for line in src.skipped:
            report.note(f"  source: skipped {line}")
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
        sent = safefs.rows_by_user(
            course.state,
            "SELECT username, path, sha256, size, stat_key FROM sent WHERE folder = ?",
            (folder,),
        )
        tasks = []
        results_fast: list[str] = []
        for st in students:
            pw, why = account_for(course, st)
            if pw is None:
                report.failed(st.username, why)
                continue
            if course.dry_run and not inspect_homes:
                n = len(src.files)
                report.done(
                    st.username, "sent", f"{n} file(s) into {pw.pw_dir}/{folder}; not inspected"
                )
                continue
            rows = sent.pop(st.username, [])
            if unchanged_by_stat(pw, folder, src, rows):
                results_fast.append(st.username)
                continue
            tasks.append(
                (st.username, send_to_home, (_job(course, pw, folder, src, force, stamp, rows),))
            )
        results: dict[str, dict] = {}
        bar = _bar(len(tasks), "send")
        keep = [f.fd for f in src.files]
        for username, payload in safefs.fork_map(
            tasks, workers=safefs.workers_for(len(tasks)), keep_fds=keep, idle_timeout=600
        ):
            results[username] = payload
            if "ok" in payload and not course.dry_run:
                _record(course, username, folder, payload["ok"])
            if bar:
                bar.update(1)
        if bar:
            bar.render_finish()
        for username in results_fast:
            results[username] = {"ok": {"actions": {}, "skipped": [], "records": []}}
        for st in students:
            payload = results.get(st.username)
            if payload is None:
                continue
            if "error" in payload:
                report.failed(st.username, f"{payload['error']}")
                continue
            result = payload["ok"]
            outcome = _outcome(result["actions"])
            if course.dry_run:  # a dry run says exactly what would be done
                detail = _detail(result["actions"], result["skipped"], limit=20, names=True)
            else:
                detail = _detail(result["actions"], result["skipped"])
            if outcome:
                report.done(st.username, outcome, detail)
            else:
                report.unchanged(st.username, detail)
    finally:
        src.close()
    return report.finish()


def _job(course: Course, pw, folder: str, src: Source, force: bool, stamp: str, sent_rows: list):
    """The worker's input (``sent_rows``: what was sent to this student, raw from the state)."""
    return {
        "pw": pw,
        "folder": folder,
        "dirs": src.dirs,
        "files": src.files,
        "sent_rows": sent_rows,
        "force": force,
        "dry_run": course.dry_run,
        "stamp": stamp,
    }


def _record(course: Course, username: str, folder: str, result: dict) -> None:
    """What was written to this student, in the state, before it counts as done."""
    from ..host.state import now

    if not result["records"] and not _outcome(result["actions"]):
        return
    at = now()
    with course.state.transaction():
        course.state.conn.executemany(
            "INSERT OR REPLACE INTO sent (username, folder, path, sha256, size, stat_key, sent_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (username, folder, _enc(rel), sha, size, key, at)
                for rel, sha, size, key in result["records"]
            ],
        )
        outcome = _outcome(result["actions"])
        if outcome:
            counts = {k: len(v) for k, v in result["actions"].items() if v}
            course.state.record("send", username, outcome, {"folder": folder, **counts})


def _bar(length: int, label: str):
    if length < 2 or not sys.stderr.isatty():
        return None
    bar = click.progressbar(length=length, label=label, file=sys.stderr)
    bar.__enter__()
    return bar
