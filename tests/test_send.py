"""send: the table of SPEC §4, ownership and modes, options, exit codes."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from conftest import needs_root

from classroom.core import sendrules
from classroom.host import safefs


def own(path: Path, pw) -> None:
    os.lchown(path, pw.pw_uid, pw.pw_gid)


def sent_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


# --- pure ---------------------------------------------------------------------------------------


def test_beside_name():
    assert sendrules.beside_name("lesson.ipynb", 1) == "lesson.new.ipynb"
    assert sendrules.beside_name("lesson.ipynb", 3) == "lesson.new3.ipynb"
    assert sendrules.beside_name("Makefile", 1) == "Makefile.new"
    assert sendrules.beside_name(".bashrc", 1) == ".bashrc.new"


def test_patterns():
    ex = (".ipynb_checkpoints", "__pycache__", "*.pyc", ".git", "data/private")
    assert safefs.matches("a/.ipynb_checkpoints/x.ipynb", ex)
    assert safefs.matches("pkg/__pycache__", ex)
    assert safefs.matches("m.pyc", ex)
    assert safefs.matches("data/private/key", ex)
    assert not safefs.matches("lesson.ipynb", ex)
    assert not safefs.matches("other/data/private", ex)


def test_copy_hashing_caps(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 5000)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert safefs.file_sha256(fd, 4999) is None
        assert safefs.file_sha256(fd, 5000) is not None
    finally:
        os.close(fd)


def test_walk_never_follows(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("a")
    (root / "link").symlink_to("/etc")
    (root / "flink").symlink_to("/etc/hostname")
    os.mkfifo(root / "fifo")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.pyc").write_text("")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = {e.rel: e.problem for e in safefs.walk(fd, exclude=("__pycache__",))}
    finally:
        os.close(fd)
    assert found == {"sub/a.txt": None, "link": "a symlink", "flink": "a symlink", "fifo": "a FIFO"}


# --- root: real accounts --------------------------------------------------------------------------


@needs_root
def test_send_dry_run_then_copy_then_unchanged(ready_course):
    c = ready_course
    (c.base / "tutorial" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(c.base / "tutorial" / "run.sh", 0o777)
    (c.base / "tutorial" / "__pycache__").mkdir()
    (c.base / "tutorial" / "__pycache__" / "m.pyc").write_bytes(b"\0")
    old = time.time() - 86400 * 3
    os.utime(c.base / "tutorial" / "lesson.ipynb", (old, old))

    dry = c.run("send", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would be copied" in dry.stdout
    for line in (ln for ln in dry.stdout.splitlines() if ": would be copied" in ln):
        for name in ("lesson.ipynb", "data/numbers.csv", "run.sh"):  # exactly what, file by file
            assert name in line, line
    for u in c.usernames:
        assert not (c.home(u) / "tutorial").exists()

    r = c.run("send", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"send: {len(c.usernames)} copied, 0 unchanged, 0 failed" in r.stdout
    for u in c.usernames:
        pw = c.pw(u)
        folder = c.home(u) / "tutorial"
        assert sent_files(folder) == {"lesson.ipynb", "data/numbers.csv", "run.sh"}
        for p in [folder, *folder.rglob("*")]:
            st = p.lstat()
            assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid), p
            assert not st.st_mode & 0o022, p
        assert stat.S_IMODE((folder / "run.sh").stat().st_mode) == 0o755
        assert abs((folder / "lesson.ipynb").stat().st_mtime - old) < 1
        assert (folder / "data" / "numbers.csv").read_text() == "a,b\n1,2\n"

    again = c.run("send", "--yes")
    assert again.returncode == 0
    assert f"send: {len(c.usernames)} unchanged, 0 failed" in again.stdout
    status = c.run("status", "--json")
    assert '"last_send": null' not in status.stdout


@needs_root
def test_send_table(ready_course):
    """Restore, update, keep edits (conflict, new version beside), never touch student files, --force."""
    c = ready_course
    a, b = c.usernames
    assert c.run("send", "--yes").returncode == 0
    fa = c.home(a) / "tutorial"
    fb = c.home(b) / "tutorial"
    pa = c.pw(a)
    # a: edits the lesson, deletes the data, creates their own file and a file the next
    # version of the tutorial will also have.
    (fa / "lesson.ipynb").write_text("my answers")
    (fa / "data" / "numbers.csv").unlink()
    (fa / "mine.py").write_text("print('mine')")
    (fa / "extra.txt").write_text("student's own extra")
    for p in (fa / "lesson.ipynb", fa / "mine.py", fa / "extra.txt"):
        own(p, pa)
    # The teacher changes the lesson and adds extra.txt.
    (c.base / "tutorial" / "lesson.ipynb").write_text("lesson v2")
    (c.base / "tutorial" / "extra.txt").write_text("teacher's extra")

    dry = c.run("send", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert (fa / "lesson.ipynb").read_text() == "my answers"
    assert not (fa / "data" / "numbers.csv").exists()

    r = c.run("send", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    line_a = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(a))
    assert "conflict" in line_a and "lesson.ipynb" in line_a and "extra.txt" in line_a
    assert (fa / "lesson.ipynb").read_text() == "my answers"
    assert (fa / "lesson.new.ipynb").read_text() == "lesson v2"
    assert (fa / "extra.txt").read_text() == "student's own extra"
    assert (fa / "extra.new.txt").read_text() == "teacher's extra"
    assert (fa / "data" / "numbers.csv").read_text() == "a,b\n1,2\n"  # restored
    assert (fa / "mine.py").read_text() == "print('mine')"
    assert (fa / "lesson.new.ipynb").stat().st_uid == pa.pw_uid
    # b edited nothing: updated in place, no conflict files.
    assert (fb / "lesson.ipynb").read_text() == "lesson v2"
    assert not (fb / "lesson.new.ipynb").exists()
    assert "restored" in line_a

    again = c.run("send", "--yes")
    assert again.returncode == 0
    assert "send: 2 unchanged, 0 failed" in again.stdout, again.stdout
    assert "conflict kept" in again.stdout

    # The source changes again: the beside file (never edited) follows it.
    (c.base / "tutorial" / "lesson.ipynb").write_text("lesson v3")
    r = c.run("send", "--yes")
    assert r.returncode == 0
    assert (fa / "lesson.new.ipynb").read_text() == "lesson v3"
    assert (fa / "lesson.ipynb").read_text() == "my answers"

    # --force: the student's version goes to .backup/TIMESTAMP/, the new one in place.
    r = c.run("send", "--yes", "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (fa / "lesson.ipynb").read_text() == "lesson v3"
    assert (fa / "extra.txt").read_text() == "teacher's extra"
    backups = list((fa / ".backup").iterdir())
    assert len(backups) == 1
    assert (backups[0] / "lesson.ipynb").read_text() == "my answers"
    assert (backups[0] / "extra.txt").read_text() == "student's own extra"
    assert (fa / "mine.py").read_text() == "print('mine')"
    assert stat.S_IMODE((fa / ".backup").stat().st_mode) == 0o700
    again = c.run("send", "--yes", "--force")
    assert "send: 2 unchanged, 0 failed" in again.stdout, again.stdout


@needs_root
def test_send_source_and_folder_options(ready_course, tmp_path):
    c = ready_course
    other = tmp_path / "week2"
    other.mkdir()
    (other / "ex.py").write_text("x = 1\n")
    r = c.run(
        "send", "--yes", "--source", str(other), "--folder", "week2", "--only", c.usernames[0]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (c.home(c.usernames[0]) / "week2" / "ex.py").read_text() == "x = 1\n"
    assert not (c.home(c.usernames[1]) / "week2").exists()
    assert not (c.home(c.usernames[0]) / "tutorial").exists()

    bad = c.run("send", "--yes", "--folder", "../escape")
    assert bad.returncode == 2 and "--folder" in bad.stderr
    bad = c.run("send", "--yes", "--source", str(tmp_path / "nope"))
    assert bad.returncode == 2
    c.write_config(material={"source": str(tmp_path / "missing")})
    bad = c.run("send", "--yes")
    assert bad.returncode == 2 and "missing" in bad.stderr
    for u in c.usernames:
        assert not (c.home(u) / "tutorial").exists()


@needs_root
def test_send_partial_failure_exit_1(ready_course):
    """A student without an account fails; the others are done (exit 1)."""
    c = ready_course
    ghost = "tghost" + os.urandom(3).hex()
    c.write_roster([*[f"{u},S,N,{u}@x.org" for u in c.usernames], f"{ghost},S,N,g@x.org"])
    r = c.run("send", "--yes")
    assert r.returncode == 1, r.stdout + r.stderr
    assert ghost in r.stdout and "setup" in r.stdout
    assert "send: 2 copied, 0 unchanged, 1 failed" in r.stdout
    for u in c.usernames:
        assert (c.home(u) / "tutorial" / "lesson.ipynb").exists()


@needs_root
def test_send_dry_run_without_root(ready_course):
    """--dry-run works without root: it says what would be sent, and changes nothing."""
    import pwd
    import shutil
    import subprocess
    import sys
    import tempfile

    from conftest import NOTEBOOKS

    c = ready_course
    nobody = pwd.getpwnam("nobody")
    public = Path(tempfile.mkdtemp(prefix="classroom-cfg-", dir="/tmp"))
    try:
        os.chmod(public, 0o755)
        for p in (c.config, c.roster):
            shutil.copy(p, public / p.name)
        # The course's own state folder sits under pytest's root-only tmp; a teacher's is
        # /var/lib/classroom/NAME (a folder above it that nobody can enter is another matter).
        cfg = public / c.config.name
        cfg.write_text(cfg.read_text().replace(str(c.state_dir), str(public / "state")))
        shutil.copytree(c.base / "tutorial", public / "tutorial")
        for p in [public, *public.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)

        def demote():
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)

        proc = subprocess.run(
            [sys.executable, str(NOTEBOOKS), "send", str(public / c.config.name), "--dry-run"],
            capture_output=True,
            text=True,
            preexec_fn=demote,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(public)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "would be sent" in proc.stdout
    assert "Traceback" not in proc.stderr
    for u in c.usernames:
        assert not (c.home(u) / "tutorial").exists()


@needs_root
def test_send_force_twice_in_one_second_keeps_both_backups(ready_course, monkeypatch):
    """Two --force runs with the same TIMESTAMP: the second backup goes beside the first."""
    import datetime as dt
    import types

    from classroom.commands import course as course_mod
    from classroom.commands import send

    c = ready_course
    a = c.usernames[0]
    pa = c.pw(a)
    fixed = dt.datetime(2030, 1, 2, 3, 4, 5)
    monkeypatch.setattr(
        send, "dt", types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda: fixed))
    )

    def send_force():
        crs = course_mod.open_course(
            c.config, "send", changes=True, yes=True, only=(a,), quiet=True
        )
        try:
            return send.send(crs, only=(a,), force=True)
        finally:
            crs.close()

    assert send_force() == 0
    lesson = c.home(a) / "tutorial" / "lesson.ipynb"
    for version in ("first answers", "second answers"):
        lesson.write_text(version)
        os.chown(lesson, pa.pw_uid, pa.pw_gid)
        assert send_force() == 0
    backup = c.home(a) / "tutorial" / ".backup"
    kept = sorted((p / "lesson.ipynb").read_text() for p in backup.iterdir())
    assert kept == ["first answers", "second answers"]
    assert sorted(p.name for p in backup.iterdir()) == ["2030-01-02_030405", "2030-01-02_030405.2"]


@needs_root
def test_send_removes_what_a_cut_off_send_left(ready_course):
    """A temporary file of an interrupted send goes at the next send, even one with nothing to
    send (the fast path would not start a worker); a student's look-alike files stay."""
    c = ready_course
    a = c.usernames[0]
    pa = c.pw(a)
    assert c.run("send", "--yes", "--only", a).returncode == 0
    folder = c.home(a) / "tutorial"
    left = folder / "data" / ".classroom-0123456789ab.tmp"
    mine = folder / ".classroom-mine.tmp"
    for p in (left, mine):
        p.write_bytes(b"half a copy")
        own(p, pa)
    r = c.run("send", "--yes", "--only", a)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not left.exists(), "the temporary file of a cut-off send is still there"
    assert mine.read_bytes() == b"half a copy"
    again = c.run("send", "--yes", "--only", a)
    assert "send: 1 unchanged, 0 failed" in again.stdout, again.stdout


@needs_root
def test_send_force_removes_only_its_own_untouched_new_versions(ready_course):
    """--force replaces an edited file: the course's NAME.new.EXT beside it goes (it is now the
    file itself); one the student edited stays, and the state forgets what it removed."""
    c = ready_course
    a = c.usernames[0]
    pa = c.pw(a)
    src = c.base / "tutorial"
    (src / "notes.txt").write_text("notes v1\n")
    assert c.run("send", "--yes", "--only", a).returncode == 0
    fa = c.home(a) / "tutorial"
    for name in ("lesson.ipynb", "notes.txt"):
        (fa / name).write_text(f"my {name}\n")
        own(fa / name, pa)
    (src / "lesson.ipynb").write_text("lesson v2\n")
    (src / "notes.txt").write_text("notes v2\n")
    assert c.run("send", "--yes", "--only", a).returncode == 0
    assert (fa / "lesson.new.ipynb").read_text() == "lesson v2\n"
    (fa / "notes.new.txt").write_text("I wrote in the new version too\n")  # the student's now

    r = c.run("send", "--yes", "--force", "--only", a)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lesson.new.ipynb removed" in r.stdout, r.stdout
    assert not (fa / "lesson.new.ipynb").exists()
    assert (fa / "notes.new.txt").read_text() == "I wrote in the new version too\n"
    assert (fa / "lesson.ipynb").read_text() == "lesson v2\n"
    # the student later saves a file of that name: theirs, never taken for the course's
    (fa / "lesson.new.ipynb").write_text("lesson v2\n")
    own(fa / "lesson.new.ipynb", pa)
    (fa / "lesson.ipynb").write_text("edited again\n")
    own(fa / "lesson.ipynb", pa)
    (src / "lesson.ipynb").write_text("lesson v3\n")
    assert c.run("send", "--yes", "--only", a).returncode == 0
    assert (fa / "lesson.new.ipynb").read_text() == "lesson v2\n"
    assert (fa / "lesson.new2.ipynb").read_text() == "lesson v3\n"


@needs_root
def test_send_says_how_many_students_have_a_running_server(ready_course):
    """While servers run, send says how many, and what the students see and should click."""
    c = ready_course
    a, b = c.usernames
    assert c.run("send", "--yes").returncode == 0
    try:
        r = c.run("launch", "--yes", "--no-portal", "--only", a, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        (c.base / "tutorial" / "lesson.ipynb").write_text("lesson v2")
        r = c.run("send", "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 of these students have a running server (1 got a file changed in place)" in (
            r.stdout
        ), r.stdout
        assert '"File Changed"' in r.stdout and '"Revert"' in r.stdout, r.stdout
        r = c.run("send", "--yes", "--only", b)
        assert "running server" not in r.stdout, r.stdout
    finally:
        c.run("shutdown", "--yes", timeout=240)
