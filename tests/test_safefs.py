"""safefs: the one way into HOME/FOLDER, the one atomic write, and what a dry run changes (nothing)."""

from __future__ import annotations

import os
import stat
import types

import pytest

from classroom.host import safefs, system


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def dry(monkeypatch):
    monkeypatch.setattr(system, "_dry_run", True)


def account(home):
    return types.SimpleNamespace(pw_dir=str(home), pw_uid=os.getuid())


def test_open_home_folder(home):
    (home / "a" / "b").mkdir(parents=True)
    with safefs.open_home_folder(account(home), "a/b") as folder:
        assert folder.fd is not None
        assert os.fstat(folder.fd).st_ino == (home / "a" / "b").stat().st_ino
        fds = list(folder.fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed


def test_open_home_folder_refuses(home, tmp_path):
    (home / "file").write_text("")
    (home / "link").symlink_to(tmp_path)
    (home / "fifo-dir").mkdir()
    os.mkfifo(home / "fifo-dir" / "pipe")
    with pytest.raises(safefs.Missing, match=r"^no folder ~/nope$"):
        safefs.open_home_folder(account(home), "nope/x")
    with pytest.raises(safefs.NotAFolder, match=r"^~/file is a file, not a folder$"):
        safefs.open_home_folder(account(home), "file")
    with pytest.raises(safefs.NotAFolder, match=r"^~/link is a symlink, not a folder$"):
        safefs.open_home_folder(account(home), "link")
    with pytest.raises(safefs.NotAFolder, match="a FIFO"):
        safefs.open_home_folder(account(home), "fifo-dir/pipe")
    with pytest.raises(safefs.NoHome):
        safefs.open_home_folder(account(home / "gone"), "x")
    other = types.SimpleNamespace(pw_dir=str(home), pw_uid=os.getuid() + 1)
    with pytest.raises(safefs.NoHome, match="not to the student"):
        safefs.open_home_folder(other, "x")


def test_open_home_folder_makes_what_is_missing(home):
    with safefs.open_home_folder(account(home), "a/b", make=0o750) as folder:
        assert folder.fd is not None
    assert stat.S_IMODE((home / "a" / "b").stat().st_mode) == 0o750


def test_replace_file_whole_or_not_at_all(home):
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (home / "f").write_text("old")
        st = safefs.replace_file(
            fd, "f", lambda out: os.write(out, b"new"), mode=0o640, times_ns=(10**9, 2 * 10**9)
        )
        assert st is not None and (home / "f").read_text() == "new"
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == 2 * 10**9

        def broken(out: int) -> None:
            os.write(out, b"half")
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            safefs.replace_file(fd, "f", broken, mode=0o640)
        assert (home / "f").read_text() == "new"
        assert sorted(p.name for p in home.iterdir()) == ["f"]  # no temporary file left
    finally:
        os.close(fd)


def test_a_dry_run_changes_nothing(home, dry):
    (home / "f").write_text("old")
    (home / "exists").mkdir()
    (home / "to").mkdir()
    before = sorted(str(p) for p in home.rglob("*"))
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    to = os.open(home / "to", os.O_RDONLY | os.O_DIRECTORY)
    try:
        uid = os.getuid()
        assert safefs.ensure_dir(fd, "new", mode=0o755, uid=uid, dev=None, what="new") is None
        made = safefs.ensure_dir(fd, "exists", mode=0o755, uid=uid, dev=None, what="exists")
        assert made is not None  # an existing folder is opened: a dry run still looks inside
        os.close(made)
        assert safefs.replace_file(fd, "f", lambda out: os.write(out, b"new"), mode=0o644) is None
        safefs.move(fd, "f", to)
        with safefs.open_home_folder(account(home), "x/y", make=0o755) as folder:
            assert folder.fd is None  # would be made
    finally:
        os.close(fd)
        os.close(to)
    assert sorted(str(p) for p in home.rglob("*")) == before
    assert (home / "f").read_text() == "old"


def test_leftovers_are_only_the_tools_own_temporary_files(home, tmp_path):
    (home / ".classroom-0123456789ab.tmp").write_text("half a copy")
    (home / ".classroom-notmine.tmp").write_text("a student's")
    (home / ".classroom-ba9876543210.tmp").mkdir()  # a folder of that name: not the tool's
    (home / ".classroom-aaaaaaaaaaaa.tmp").symlink_to(tmp_path / "victim")
    (tmp_path / "victim").write_text("kept")
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert safefs.leftovers(fd) == [".classroom-0123456789ab.tmp"]
        assert safefs.remove_leftovers(fd) == 1
        assert safefs.leftovers(fd) == []
    finally:
        os.close(fd)
    assert sorted(p.name for p in home.iterdir()) == [
        ".classroom-aaaaaaaaaaaa.tmp",
        ".classroom-ba9876543210.tmp",
        ".classroom-notmine.tmp",
    ]
    assert (tmp_path / "victim").read_text() == "kept"


def test_a_dry_run_removes_no_leftover(home, dry):
    (home / ".classroom-0123456789ab.tmp").write_text("half a copy")
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert safefs.remove_leftovers(fd) == 0
    finally:
        os.close(fd)
    assert (home / ".classroom-0123456789ab.tmp").exists()
