"""retrieve: snapshots, hard links, latest, manifest, deadline, limits, owner."""

from __future__ import annotations

import csv
import os
import pwd
import stat
import time
from pathlib import Path

import pytest
from conftest import needs_root

from classroom.core import retrieverules
from classroom.core.errors import InvalidInput


def manifest(dest: Path) -> list[dict]:
    with open(dest / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def snapshots(dest: Path, user: str) -> list[str]:
    return sorted(p.name for p in (dest / user).iterdir() if p.name != "latest")


def du(path: Path) -> int:
    seen, total = set(), 0
    for p in [path, *path.rglob("*")]:
        st = p.lstat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def test_parse_deadline():
    d = retrieverules.parse_deadline("2024-05-01 12:30")
    assert (d.year, d.month, d.day, d.hour, d.minute) == (2024, 5, 1, 12, 30)
    with pytest.raises(InvalidInput):
        retrieverules.parse_deadline("tomorrow")


@needs_root
def test_retrieve_snapshots_links_manifest(ready_course):
    c = ready_course
    a, b = c.usernames
    assert c.run("send", "--yes").returncode == 0
    dest = c.base / "submissions"
    pa = c.pw(a)
    work = c.home(a) / "tutorial" / "answer.py"
    work.write_text("print(42)\n")
    os.chown(work, pa.pw_uid, pa.pw_gid)

    dry = c.run("retrieve", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would be collected" in dry.stdout
    assert not (dest / a).exists()

    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "retrieve: 2 collected, 0 unchanged, 0 failed" in r.stdout
    (first,) = snapshots(dest, a)
    assert os.readlink(dest / a / "latest") == first
    snap = dest / a / first
    assert (snap / "answer.py").read_text() == "print(42)\n"
    assert (snap / "data" / "numbers.csv").exists()
    for p in [dest / a, *snap.rglob("*")]:
        st = p.lstat()
        assert st.st_uid == 0  # the owner: the sudo caller, here root
        assert not st.st_mode & 0o022, p
    assert stat.S_IMODE((dest / a).stat().st_mode) == 0o700
    rows = manifest(dest)
    mine = {r["path"]: r for r in rows if r["username"] == a}
    assert set(mine) == {"answer.py", "lesson.ipynb", "data/numbers.csv"}
    assert all(r["status"] == "new" and r["snapshot"] == first for r in mine.values())
    import hashlib

    assert mine["answer.py"]["sha256"] == hashlib.sha256(b"print(42)\n").hexdigest()
    assert mine["answer.py"]["size"] == "10"

    again = c.run("retrieve", "--yes")
    assert again.returncode == 0
    assert "retrieve: 2 unchanged, 0 failed" in again.stdout, again.stdout
    assert snapshots(dest, a) == [first]
    assert len(manifest(dest)) == len(rows)

    # A touch without a change of content: still no new snapshot.
    os.utime(work)
    assert "retrieve: 2 unchanged" in c.run("retrieve", "--yes").stdout

    # A change: a new snapshot for a only; unchanged files are hard links.
    time.sleep(1.1)
    work.write_text("print(43)\n")
    before = du(dest)
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "retrieve: 1 collected, 1 unchanged, 0 failed" in r.stdout
    first_snap, second = snapshots(dest, a)
    assert first_snap == first
    assert os.readlink(dest / a / "latest") == second
    assert (dest / a / first / "answer.py").read_text() == "print(42)\n"
    assert (dest / a / second / "answer.py").read_text() == "print(43)\n"
    old_lesson = (dest / a / first / "lesson.ipynb").stat()
    new_lesson = (dest / a / second / "lesson.ipynb").stat()
    assert old_lesson.st_ino == new_lesson.st_ino
    assert du(dest) - before < 64 * 1024
    statuses = {r["path"]: r["status"] for r in manifest(dest) if r["snapshot"] == second}
    assert statuses == {
        "answer.py": "changed",
        "lesson.ipynb": "unchanged",
        "data/numbers.csv": "unchanged",
    }
    assert len(snapshots(dest, b)) == 1

    # A deleted file is a change too; the old snapshots keep it.
    work.unlink()
    r = c.run("retrieve", "--yes", "--only", a)
    assert "1 collected" in r.stdout and "1 deleted" in r.stdout
    assert not (dest / a / "latest" / "answer.py").exists()
    assert (dest / a / second / "answer.py").exists()
    status = c.run("status", "--json")
    assert '"last_retrieve": null' not in status.stdout


@needs_root
def test_retrieve_nothing_to_collect(ready_course):
    c = ready_course
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to collect" in r.stdout
    assert "retrieve: 2 unchanged, 0 failed" in r.stdout


@needs_root
def test_retrieve_deadline_limits_patterns(ready_course):
    c = ready_course
    a = c.usernames[0]
    pa = c.pw(a)
    c.write_config(
        retrieve={
            "max_file_size": "1K",
            "max_total_size": "3K",
            "include": "*.py, *.ipynb, *.csv",
            "exclude": "scratch",
        }
    )
    assert c.run("send", "--yes").returncode == 0
    folder = c.home(a) / "tutorial"
    files = {
        "early.py": b"e" * 100,
        "late.py": b"l" * 100,
        "big.py": b"b" * 2000,
        "notes.txt": b"not included",
        "scratch/tmp.py": b"excluded",
        "f1.py": b"1" * 1000,
        "f2.py": b"2" * 1000,
        "f3.py": b"3" * 1000,
    }
    for rel, data in files.items():
        p = folder / rel
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        os.chown(p.parent, pa.pw_uid, pa.pw_gid)
        os.chown(p, pa.pw_uid, pa.pw_gid)
    long_ago = time.mktime(time.strptime("2020-01-01 10:00", "%Y-%m-%d %H:%M"))
    for p in folder.rglob("*"):
        if p.name != "late.py":
            os.utime(p, (long_ago, long_ago))
    r = c.run("retrieve", "--yes", "--deadline", "2021-01-01 00:00", "--only", a)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 late: late.py" in r.stdout
    rows = {x["path"]: x for x in manifest(c.base / "submissions")}
    assert rows["late.py"]["late"] == "late" and rows["early.py"]["late"] == ""
    assert rows["big.py"]["status"].startswith("skipped: larger than max_file_size")
    assert "notes.txt" not in rows and "scratch/tmp.py" not in rows
    over = [p for p, x in rows.items() if "max_total_size" in x["status"]]
    assert over, rows
    snap = c.base / "submissions" / a / "latest"
    total = sum(p.stat().st_size for p in snap.rglob("*") if p.is_file())
    assert total <= 3 * 1024
    assert not (snap / "big.py").exists()

    bad = c.run("retrieve", "--yes", "--deadline", "next friday")
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr


@needs_root
def test_retrieve_owner(ready_course, tmp_path):
    c = ready_course
    nobody = pwd.getpwnam("nobody")
    c.write_config(retrieve={"owner": "nobody", "destination": str(tmp_path / "grading")})
    assert c.run("send", "--yes").returncode == 0
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    dest = tmp_path / "grading"
    for p in [dest / "manifest.csv", *(dest / c.usernames[0]).rglob("*")]:
        assert p.lstat().st_uid == nobody.pw_uid, p

    c.write_config(retrieve={"owner": c.usernames[0]})
    bad = c.run("retrieve", "--yes")
    assert bad.returncode == 2 and "student" in bad.stderr
    c.write_config(retrieve={"owner": "no-such-user-x"})
    assert c.run("retrieve", "--yes").returncode == 2

    # A destination other users can write is refused before any change.
    c.write_config(retrieve={"owner": "", "destination": str(tmp_path / "open")})
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    bad = c.run("retrieve", "--yes")
    assert bad.returncode == 2 and "written by other users" in bad.stderr
    assert list((tmp_path / "open").iterdir()) == []
    # So is one inside a folder a student can change (it could be swapped for a link).
    inside = c.home(c.usernames[0]) / "grading"
    c.write_config(retrieve={"destination": str(inside)})
    bad = c.run("retrieve", "--yes")
    assert bad.returncode == 2 and "above it" in bad.stderr
    assert not inside.exists()


@needs_root
def test_retrieve_new_skipped_file_is_recorded(ready_course):
    """A file that appears after a snapshot and cannot be collected (made 0000 by the student,
    or over max_file_size) still reaches the manifest as skipped with its reason, once."""
    c = ready_course
    a, b = c.usernames
    assert c.run("send", "--yes").returncode == 0
    dest = c.base / "submissions"
    assert c.run("retrieve", "--yes").returncode == 0
    (first,) = snapshots(dest, a)
    pa = c.pw(a)
    locked = c.home(a) / "tutorial" / "locked.py"
    locked.write_text("secret answers\n")
    os.chown(locked, pa.pw_uid, pa.pw_gid)
    os.chmod(locked, 0)
    huge = c.home(a) / "tutorial" / "huge.bin"
    with open(huge, "wb") as f:
        f.truncate(50 << 30)
    os.chown(huge, pa.pw_uid, pa.pw_gid)

    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(a))
    assert "locked.py" in line and "permission denied" in line and "huge.bin" in line
    assert "retrieve: 1 collected, 1 unchanged, 0 failed" in r.stdout, r.stdout
    _, second = snapshots(dest, a)
    assert os.readlink(dest / a / "latest") == second
    assert not (dest / a / second / "locked.py").exists()
    assert (dest / a / second / "lesson.ipynb").stat().st_ino == (
        (dest / a / first / "lesson.ipynb").stat().st_ino
    )
    rows = {r["path"]: r for r in manifest(dest) if r["snapshot"] == second}
    assert rows["locked.py"]["status"].startswith("skipped: ")
    assert "permission denied" in rows["locked.py"]["status"]
    assert rows["huge.bin"]["status"].startswith("skipped: ")
    assert "max_file_size" in rows["huge.bin"]["status"]
    assert rows["lesson.ipynb"]["status"] == "unchanged"

    n = len(manifest(dest))
    again = c.run("retrieve", "--yes")
    assert again.returncode == 0
    assert "retrieve: 2 unchanged, 0 failed" in again.stdout, again.stdout
    assert len(snapshots(dest, a)) == 2 and len(manifest(dest)) == n

    # The student makes it readable again: collected as new.
    os.chmod(locked, 0o644)
    r = c.run("retrieve", "--yes", "--only", a)
    assert "1 collected" in r.stdout, r.stdout
    assert (dest / a / "latest" / "locked.py").read_text() == "secret answers\n"


@needs_root
def test_retrieve_keeps_empty_folders(ready_course):
    """The snapshot is the student's folder: empty folders (sent or made) are in it too."""
    c = ready_course
    a = c.usernames[0]
    (c.base / "tutorial" / "results").mkdir()
    assert c.run("send", "--yes", "--only", a).returncode == 0
    pa = c.pw(a)
    for sub in ("notes", "notes/week 1", "plots"):
        p = c.home(a) / "tutorial" / sub
        p.mkdir()
        os.chown(p, pa.pw_uid, pa.pw_gid)
    r = c.run("retrieve", "--yes", "--only", a)
    assert r.returncode == 0, r.stdout + r.stderr
    latest = c.base / "submissions" / a / "latest"
    for sub in ("results", "notes", "notes/week 1", "plots", "data"):
        assert (latest / sub).is_dir(), sub
    home = c.home(a) / "tutorial"
    snap = latest.resolve()
    assert {str(p.relative_to(home)) for p in home.rglob("*")} == {
        str(p.relative_to(snap)) for p in snap.rglob("*")
    }


@needs_root
def test_retrieve_removes_what_a_cut_off_retrieve_left(ready_course):
    """A half-built snapshot of an interrupted retrieve goes at the next retrieve, even when the
    student changed nothing since (the fast path would start no worker)."""
    c = ready_course
    a = c.usernames[0]
    assert c.run("send", "--yes", "--only", a).returncode == 0
    assert c.run("retrieve", "--yes", "--only", a).returncode == 0
    dest = c.base / "submissions"
    partial = dest / a / ".partial-2030-01-01_000000-12345"
    partial.mkdir()
    (partial / "lesson.ipynb").write_text("half")
    (dest / a / ".latest-12345").symlink_to(partial.name)
    r = c.run("retrieve", "--yes", "--only", a)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "retrieve: 1 unchanged" in r.stdout, r.stdout
    assert sorted(p.name for p in (dest / a).iterdir() if p.name.startswith(".")) == []
