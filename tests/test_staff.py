"""Teaching assistants (SPEC §6.4): the staff group, the sudoers file, read access to what retrieve
collected, and setup refusing a config others could change. Real accounts, real sudo."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_name

from classroom.core.errors import StepFailed
from classroom.host import sudoers

NOTEBOOKS = "/usr/local/bin/notebooks"

needs_sudo = pytest.mark.skipif(
    not shutil.which("visudo") or not os.path.exists(NOTEBOOKS),
    reason="needs Debian's sudo and the installed console script (scripts/install.sh)",
)


def as_user(username: str, *argv: str) -> subprocess.CompletedProcess:
    """``argv`` run as ``username`` with its groups, as a person logged in would."""
    return subprocess.run(
        ["/usr/sbin/runuser", "-u", username, "--", *argv],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def sudo(username: str, *args: str) -> subprocess.CompletedProcess:
    """``sudo -n notebooks ARGS`` as ``username`` (never asks for a password)."""
    return as_user(username, "sudo", "-n", NOTEBOOKS, *args)


def refused_by_sudo(r: subprocess.CompletedProcess) -> bool:
    """sudo said no: no rule allows it (-n: it would ask a password), or a negated one forbids it."""
    said = r.stderr
    return r.returncode == 1 and ("a password is required" in said or "is not allowed" in said)


def with_roles(c, roles: dict[str, str]) -> None:
    """Rewrite the roster with a role column (``roles``: username -> role; others: student)."""
    rows = [
        f"{u},Surname{i},Name{i},{u}@example.org,{roles.get(u, 'student')}"
        for i, u in enumerate(c.usernames)
    ]
    c.roster.write_text("username,surname,name,email,role\n" + "\n".join(rows) + "\n")


def staff_members(c) -> set[str]:
    return set(grp.getgrnam(f"{c.name}-staff").gr_mem)


@needs_sudo
def test_assistant_sudo_retrieved_work_and_remove(course, public_folder):
    c = course
    student, other = c.usernames
    assistant = random_name()
    c.usernames.append(assistant)  # cleaned up with the course
    with_roles(c, {assistant: "assistant"})
    dest = public_folder / "submissions"
    c.write_config(retrieve={"destination": str(dest)})
    target = sudoers.path_for(c.name)

    dry = c.run("setup", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"staff group {c.name}-staff would be created" in dry.stdout
    assert f"{target} would be written" in dry.stdout
    with pytest.raises(KeyError):
        grp.getgrnam(f"{c.name}-staff")
    assert not target.exists()

    r = c.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert staff_members(c) == {assistant}
    assert assistant in grp.getgrnam(c.name).gr_mem  # an account like the students'
    assert assistant in c.credentials()
    st = target.lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o440)
    assert str(c.config.resolve()) in target.read_text()
    assert subprocess.run(["visudo", "-c", "-f", str(target)], capture_output=True).returncode == 0
    assert not list(sudoers.SUDOERS_D.glob(f".{target.name}.*"))  # no temporary file left

    again = c.run("setup", "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 unchanged, 0 failed (nothing to do)" in again.stdout, again.stdout

    # What sudo lets the assistant do: this course's commands, with this config only.
    r = sudo(assistant, "status", str(c.config))
    assert r.returncode == 0, (
        r.stdout + r.stderr,
        as_user(assistant, "id"),
        target.read_text(),
        as_user(assistant, "sudo", "-n", "-l"),
    )
    assert student in r.stdout
    assert sudo(assistant, "status", str(c.config), "--json").returncode == 0
    other_cfg = c.base / "other.cfg"
    other_cfg.write_text(c.config.read_text())
    assert refused_by_sudo(sudo(assistant, "status", str(other_cfg)))
    assert refused_by_sudo(sudo(assistant, "setup", str(c.config)))
    assert refused_by_sudo(sudo(assistant, "remove", str(c.config), "--yes"))
    assert refused_by_sudo(sudo(assistant, "export", str(c.config), "--to", "jupyterhub", "/tmp/x"))
    assert refused_by_sudo(sudo(assistant, "send", str(c.config), "--source", "/root"))
    assert refused_by_sudo(sudo(assistant, "send", str(c.config), "--yes", "--source=/etc"))
    # sudo's '*' lets a second config through: the tool takes one CONFIG and refuses the rest
    r = sudo(assistant, "status", str(c.config), str(other_cfg))
    assert r.returncode == 2 and "unexpected extra argument" in r.stderr, r.stdout + r.stderr
    # Students get none of it.
    assert refused_by_sudo(sudo(student, "status", str(c.config)))

    # The assistant reads what retrieve collected; a student does not.
    assert c.run("send", "--yes").returncode == 0
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    lesson = dest / student / "latest" / "lesson.ipynb"
    read = as_user(assistant, "cat", str(lesson))
    assert read.returncode == 0 and '"cells"' in read.stdout, read.stderr
    assert as_user(assistant, "cat", str(dest / "manifest.csv")).returncode == 0
    assert as_user(other, "cat", str(lesson)).returncode != 0
    assert as_user(other, "ls", str(dest)).returncode != 0
    assert as_user(assistant, "touch", str(dest / student / "x")).returncode != 0  # read only
    # A later snapshot is readable too (it inherits the access), as is a new student's folder.
    (c.home(other) / "tutorial" / "late.txt").write_text("late\n")
    os.chown(c.home(other) / "tutorial" / "late.txt", c.pw(other).pw_uid, c.pw(other).pw_gid)
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert as_user(assistant, "cat", str(dest / other / "latest" / "late.txt")).stdout == "late\n"
    # The assistant retrieves (as sudo runs it: root, SUDO_USER the assistant; this checkout's
    # code, not the installed one): the snapshots stay the destination owner's.
    (c.home(student) / "tutorial" / "more.txt").write_text("more\n")
    r = c.run("retrieve", env={"SUDO_USER": assistant})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (dest / student).stat().st_uid == 0
    assert (dest / student / "latest" / "more.txt").stat().st_uid == 0

    r = c.run("remove", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not target.exists()
    with pytest.raises(KeyError):
        grp.getgrnam(f"{c.name}-staff")


@needs_sudo
def test_student_becomes_assistant_and_back(course):
    c = course
    a, b = c.usernames
    target = sudoers.path_for(c.name)
    assert c.run("setup", "--yes").returncode == 0
    assert not target.exists()  # no assistant: no staff group, no sudoers file
    with pytest.raises(KeyError):
        grp.getgrnam(f"{c.name}-staff")

    with_roles(c, {a: "assistant"})
    r = c.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{a}: updated (added to {c.name}-staff)" in r.stdout, r.stdout
    assert staff_members(c) == {a} and target.exists()
    assert sudo(a, "status", str(c.config)).returncode == 0

    with_roles(c, {b: "assistant"})
    r = c.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert staff_members(c) == {b}
    assert refused_by_sudo(sudo(a, "status", str(c.config)))

    with_roles(c, {})
    r = c.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not target.exists()
    with pytest.raises(KeyError):
        grp.getgrnam(f"{c.name}-staff")


@pytest.mark.parametrize("what", ["config", "roster", "material"])
def test_setup_refuses_what_others_can_change(course, what):
    c = course
    with_roles(c, {c.usernames[0]: "assistant"})
    path = {"config": c.config, "roster": c.roster, "material": c.base / "tutorial"}[what]
    os.chmod(path, 0o777 if path.is_dir() else 0o666)
    r = c.run("setup", "--yes")
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(path) in r.stdout + r.stderr and "writable by" in r.stdout + r.stderr
    for u in c.usernames:
        with pytest.raises(KeyError):
            pwd.getpwnam(u)
    assert not sudoers.path_for(c.name).exists()
    assert not c.state_dir.exists()
    r = c.run("check")
    assert r.returncode == 2 and str(path) in r.stdout, r.stdout + r.stderr


def test_setup_refuses_a_config_another_user_owns(course):
    c = course
    os.chown(c.config, 65534, 65534)  # nobody's
    r = c.run("setup", "--yes")
    assert r.returncode == 2 and "not root" in r.stdout + r.stderr, r.stdout + r.stderr
    assert not c.state_dir.exists()


def test_an_assistant_listed_twice_is_refused(course):
    c = course
    a, b = c.usernames
    c.roster.write_text(
        "username,surname,name,email,role\n"
        f"{a},S,N,{a}@example.org,assistant\n{b},S,N,{b}@example.org,student\n"
        f"{a},S,N,{a}@example.org,student\n"
    )
    r = c.run("setup", "--yes")
    assert r.returncode == 2, r.stdout + r.stderr
    assert a in r.stdout + r.stderr
    for u in (a, b):
        with pytest.raises(KeyError):
            pwd.getpwnam(u)
    assert not sudoers.path_for(c.name).exists()


def test_a_group_the_course_did_not_make_is_refused(course):
    c = course
    with_roles(c, {c.usernames[0]: "assistant"})
    subprocess.run(["groupadd", f"{c.name}-staff"], check=True)
    try:
        r = c.run("setup", "--yes")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "the course did not create it" in r.stdout + r.stderr
        assert not sudoers.path_for(c.name).exists()
    finally:
        subprocess.run(["groupdel", f"{c.name}-staff"], check=False)


def test_render_refuses_a_path_sudoers_would_read_as_a_pattern():
    for bad in ("/srv/a course/n.cfg", "/srv/c*/n.cfg", "/srv/a,b/n.cfg", "/srv/a:b/n.cfg"):
        with pytest.raises(Exception, match="sudoers"):
            sudoers.render("x-staff", Path(bad))


@needs_sudo
def test_a_file_visudo_refuses_is_never_installed():
    if os.geteuid() != 0:
        pytest.skip("needs root: writes /etc/sudoers.d")
    name = random_name("test-")
    with pytest.raises(StepFailed, match="visudo"):
        sudoers.install(name, "%nogroup ALL=(root) NOPASSWD: not a command\n")
    assert not sudoers.path_for(name).exists()
    assert not list(sudoers.SUDOERS_D.glob(f".classroom-{name}.*"))


def test_install_packages_cannot_move_the_tools_own_dependencies():
    """A package for the students that wants another tornado is refused, not installed."""
    import tornado

    script = Path(__file__).resolve().parent.parent / "scripts" / "install-packages.sh"
    r = subprocess.run(
        ["sh", str(script), "--dry-run", "tornado<6"],
        env={**os.environ, "CLASSROOM_VENV": str(Path(sys.executable).parent.parent)},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert r.returncode != 0, r.stdout + r.stderr
    assert "conflict" in (r.stdout + r.stderr).lower()
    assert tornado.version_info[0] >= 6
