"""The shared class folder (SPEC §6.5): setup makes it and the links, send --shared fills it,
retrieve leaves it, remove archives and deletes it only when the course made it."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess

import pytest
from conftest import random_name


def as_user(username: str, *argv: str) -> subprocess.CompletedProcess:
    """``argv`` run as ``username`` (uid, gid and groups), as a person logged in would."""
    pw = pwd.getpwnam(username)
    return subprocess.run(
        list(argv),
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=os.getgrouplist(username, pw.pw_gid),
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def staffed(course):
    """The course, with its staff group and one assistant in it (cleaned up afterwards)."""
    staff = f"{course.name}-staff"
    subprocess.run(["groupadd", staff], check=True)
    assistant = random_name()
    course.extra_users.append(assistant)
    subprocess.run(
        ["useradd", "-N", "-M", "-d", "/nonexistent", "-G", staff, assistant], check=True
    )
    try:
        yield course, staff, assistant
    finally:
        subprocess.run(["groupdel", staff], capture_output=True, check=False)


def test_shared_folder_setup_send_retrieve_remove(staffed, public_folder):
    c, staff, assistant = staffed
    a, b = c.usernames
    folder = public_folder / "intro-data"
    c.write_config(shared={"folder": str(folder)})

    dry = c.run("setup", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"shared folder {folder} would be created" in dry.stdout
    assert not folder.exists()

    r = c.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"shared folder {folder} created" in r.stdout
    st = folder.lstat()
    assert (st.st_uid, st.st_gid) == (0, grp.getgrnam(staff).gr_gid)
    assert stat.S_IMODE(st.st_mode) == 0o2770
    acl = subprocess.run(["getfacl", "--omit-header", str(folder)], capture_output=True, text=True)
    assert f"group:{c.name}:r-x" in acl.stdout and f"default:group:{c.name}:r-x" in acl.stdout
    for u in (a, b):
        link = c.home(u) / "shared"
        assert link.is_symlink() and os.readlink(link) == str(folder)
        assert link.lstat().st_uid == c.pw(u).pw_uid  # made as the student

    again = c.run("setup", "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "setup: 2 unchanged, 0 failed (nothing to do)" in again.stdout, again.stdout
    assert "shared folder" not in again.stdout

    # send --shared: once into the folder, not into the homes.
    dry = c.run("send", "--shared", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert not (folder / "lesson.ipynb").exists()
    r = c.run("send", "--shared", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "send: 1 copied, 0 unchanged, 0 failed" in r.stdout, r.stdout
    assert (folder / "data" / "numbers.csv").read_text() == "a,b\n1,2\n"
    assert not (c.home(a) / "tutorial").exists()
    for p in folder.rglob("*"):
        assert (p.lstat().st_uid, p.lstat().st_gid) == (0, grp.getgrnam(staff).gr_gid), p

    # Students read it through their link, and cannot write it; the assistant writes it;
    # anyone else cannot even look.
    seen = as_user(a, "cat", str(c.home(a) / "shared" / "data" / "numbers.csv"))
    assert seen.returncode == 0 and seen.stdout == "a,b\n1,2\n", seen.stderr
    assert as_user(a, "touch", str(folder / "mine.txt")).returncode != 0
    assert as_user(a, "touch", str(folder / "lesson.ipynb")).returncode != 0
    wrote = as_user(assistant, "sh", "-c", f"echo hints > {folder}/hints.txt")
    assert wrote.returncode == 0, wrote.stderr
    assert as_user(assistant, "mkdir", str(folder / "week2")).returncode == 0
    assert as_user(a, "cat", str(folder / "hints.txt")).stdout == "hints\n"
    assert as_user(assistant, "touch", str(folder / "data" / "more.csv")).returncode == 0
    assert as_user("nobody", "ls", str(folder)).returncode != 0

    again = c.run("send", "--shared", "--yes")
    assert "send: 1 unchanged, 0 failed" in again.stdout, again.stdout
    assert (folder / "hints.txt").read_text() == "hints\n"
    bad = c.run("send", "--shared", "--yes", "--only", a)
    assert bad.returncode == 2, bad.stdout + bad.stderr

    # retrieve never collects it: a link to it in HOME/FOLDER is skipped as a link.
    assert c.run("send", "--yes").returncode == 0
    inside = c.home(a) / "tutorial" / "shared"
    inside.symlink_to(folder)
    os.lchown(inside, c.pw(a).pw_uid, c.pw(a).pw_gid)
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    dest = c.base / "submissions"
    manifest = (dest / "manifest.csv").read_text()
    assert "hints.txt" not in manifest and "skipped: a symlink" in manifest
    assert not any(p.name == "hints.txt" for p in dest.rglob("*"))

    # remove: the folder the course made is archived like a home, then deleted.
    r = c.run("remove", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not folder.exists()
    archives = list((c.state_dir / "archive").glob(f"{c.name}-shared-*.tar.gz"))
    assert len(archives) == 1, list((c.state_dir / "archive").iterdir())
    listing = subprocess.run(["tar", "-tzf", str(archives[0])], capture_output=True, text=True)
    assert "intro-data/hints.txt" in listing.stdout


def test_shared_folder_the_course_did_not_make_is_kept(course, public_folder):
    """...and a shared folder added to a running course links the existing homes, leaving
    alone a student's own file of the link's name."""
    c = course
    a, b = c.usernames
    assert c.run("setup", "--yes").returncode == 0
    (c.home(b) / "data").write_text("my own notes")
    folder = public_folder / "datasets"
    folder.mkdir()
    (folder / "big.csv").write_text("1,2\n")
    c.write_config(shared={"folder": str(folder), "link": "data"})
    dry = c.run("setup", "--dry-run")
    assert f"{a}: would be updated (link ~/data)" in dry.stdout, dry.stdout
    assert not (c.home(a) / "data").exists() and stat.S_IMODE(folder.stat().st_mode) == 0o755
    r = c.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{a}: updated (link ~/data)" in r.stdout, r.stdout
    assert f"{b}: ~/data is not the link to {folder}: left as it is" in r.stdout
    assert f"shared folder {folder} set: mode, access list (root write," in r.stdout
    assert stat.S_IMODE(folder.stat().st_mode) == 0o2770  # brought in line, not created
    assert folder.stat().st_gid == 0  # no staff group yet: root's group
    assert os.readlink(c.home(a) / "data") == str(folder)
    assert (c.home(b) / "data").read_text() == "my own notes"
    r = c.run("remove", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kept: the course did not make it" in r.stdout
    assert (folder / "big.csv").read_text() == "1,2\n"


def test_shared_folder_in_a_bad_place_is_refused(course, public_folder):
    c = course
    pupil = random_name()
    c.extra_users.append(pupil)
    elsewhere = public_folder / "homes" / pupil  # a user's home outside home_base
    subprocess.run(["useradd", "-N", "-M", "-d", str(elsewhere), pupil], check=True)
    open_parent = public_folder / "open"
    open_parent.mkdir(mode=0o777)
    os.chmod(open_parent, 0o777)
    taken = public_folder / "taken"
    taken.mkdir()
    os.chown(taken, pwd.getpwnam("nobody").pw_uid, -1)
    cases = {
        str(c.home_base / "shared"): "home_base",
        str(c.home_base): "home_base",
        str(elsewhere / "data"): f"in the home of {pupil}",
        str(open_parent / "data"): "not root's alone",
        str(taken): "is not a folder of root's",
    }
    for where, why in cases.items():
        c.write_config(shared={"folder": where})
        r = c.run("setup", "--yes")
        assert r.returncode == 2, (where, r.stdout + r.stderr)
        assert why in r.stderr, (where, r.stderr)
        with pytest.raises(KeyError):
            grp.getgrnam(c.name)  # nothing was made
    assert list(open_parent.iterdir()) == [] and list(taken.iterdir()) == []
    c.write_config(shared={"folder": str(open_parent / "data")})
    checked = c.run("check", "--json")
    assert checked.returncode == 2 and "not root's alone" in checked.stdout, checked.stdout

    c.write_config(shared={"folder": ""})
    r = c.run("send", "--shared", "--yes")
    assert r.returncode == 2 and "[shared] folder is not set" in r.stderr
    c.write_config(shared={"folder": str(public_folder / "data"), "link": "tutorial"})
    r = c.run("setup", "--yes")
    assert r.returncode == 2 and "[material] folder" in r.stderr
