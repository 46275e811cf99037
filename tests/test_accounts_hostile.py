"""setup and remove against a host that is not as expected: leftovers, squatters, hostile homes."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, needs_root, random_name, remove_account, shadow_hash
from students import as_student, kill_uid, processes_of_uid

pytestmark = needs_root


def test_failed_useradd_leaves_no_claim_on_a_later_account(course):
    """A useradd that failed must not let setup adopt an account someone makes later."""
    u = course.usernames[0]
    subprocess.run(["groupadd", u], check=True)  # --user-group will fail for u
    try:
        r = course.run("setup")
        assert r.returncode == 1 and u in r.stdout
    finally:
        subprocess.run(["groupdel", u], check=True)
    subprocess.run(["useradd", "-N", "-m", "-d", str(course.home(u)), u], check=True)
    before = shadow_hash(u)
    r = course.run("setup")
    assert r.returncode == 1
    assert "did not create" in r.stdout
    assert shadow_hash(u) == before
    assert u not in grp.getgrnam(course.name).gr_mem
    assert course.run("remove", "--yes").returncode == 3
    assert pwd.getpwnam(u)


def test_existing_folder_is_never_made_a_home(course):
    u = course.usernames[0]
    squat = course.home(u)
    squat.mkdir()
    (squat / ".bashrc").write_text("echo planted\n")
    os.chown(squat, 65534, 65534)
    r = course.run("setup")
    assert r.returncode == 1
    assert "already exists" in r.stdout and u in r.stdout
    with pytest.raises(KeyError):
        pwd.getpwnam(u)
    assert os.stat(squat).st_uid == 65534 and (squat / ".bashrc").exists()
    assert course.usernames[1] in course.credentials()


def test_group_belonging_to_others_is_refused(course):
    other = random_name()
    course.extra_users.append(other)
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", other], check=True)
    course.write_config(course={"group": other})  # other's personal group
    r = course.run("setup")
    assert r.returncode == 2 and "choose another [course] group" in r.stderr
    with pytest.raises(KeyError):
        pwd.getpwnam(course.usernames[0])


def removes_the_group_too(course) -> None:
    """``remove`` succeeds and the course group is gone."""
    r = course.run("remove", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    with pytest.raises(KeyError):
        grp.getgrnam(course.name)


def test_group_made_by_a_cut_off_run_is_adopted_and_removed(course):
    course.state_dir.mkdir(mode=0o700)
    gid = 59000
    while True:
        try:
            grp.getgrgid(gid)
            gid -= 1
        except KeyError:
            break
    # What a setup killed right after groupadd leaves behind:
    r = course.run("setup", "--dry-run")
    assert r.returncode == 0
    subprocess.run(["groupadd", "--gid", str(gid), course.name], check=True)
    from classroom.host.state import State

    state = State.open(course.state_dir)
    with state.transaction():
        state.set_meta("group_creating", f"{course.name}:{gid}")
    state.close()
    r = course.run("setup")
    assert r.returncode == 0, r.stdout + r.stderr
    removes_the_group_too(course)


def test_failed_password_write_gives_a_new_password_next_time(ready_course):
    course = ready_course
    u = course.usernames[0]
    cfg = course.home(u) / ".jupyter" / "jupyter_server_config.json"
    cfg.unlink()
    cfg.mkdir()  # the student's "file" is a folder: the Jupyter password cannot be written
    r = course.run("setup", "--reset-passwords", "--only", u)
    assert r.returncode == 1 and "FAILED" in r.stdout
    cfg.rmdir()
    r = course.run("setup")
    assert r.returncode == 0
    assert f"{u}: updated (new password)" in r.stdout
    import crypt_r_check

    assert crypt_r_check.verify(course.credentials()[u]["password"], shadow_hash(u))
    assert "nothing to do" in course.run("setup").stdout


def test_fifo_in_place_of_the_jupyter_config_does_not_hang(ready_course):
    course = ready_course
    u = course.usernames[0]
    cfg = course.home(u) / ".jupyter" / "jupyter_server_config.json"
    cfg.unlink()
    os.mkfifo(cfg)
    os.chown(cfg, pwd.getpwnam(u).pw_uid, pwd.getpwnam(u).pw_gid)
    t = time.monotonic()
    r = course.run("setup", "--reset-passwords", "--only", u, timeout=50)
    assert time.monotonic() - t < 40
    assert r.returncode == 0, r.stdout + r.stderr
    assert stat.S_ISREG(os.lstat(cfg).st_mode)


def test_symlinked_jupyter_config_is_not_followed(ready_course, tmp_path):
    course = ready_course
    u = course.usernames[0]
    victim = tmp_path / "victim.json"
    victim.write_text('{"root": "file"}')
    cfg = course.home(u) / ".jupyter" / "jupyter_server_config.json"
    cfg.unlink()
    cfg.symlink_to(victim)
    r = course.run("setup", "--reset-passwords", "--only", u)
    assert r.returncode == 0, r.stdout + r.stderr
    assert victim.read_text() == '{"root": "file"}'
    assert not cfg.is_symlink()


def test_existing_state_dir_of_someone_else_is_refused(course, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    os.chown(theirs, 65534, 65534)
    course.write_config(course={"state_dir": str(theirs)})
    r = course.run("setup")
    assert r.returncode == 2 and "state_dir" in r.stderr
    assert os.stat(theirs).st_uid == 65534


def test_home_base_writable_by_others_is_refused(course):
    os.chmod(course.home_base, 0o777)
    r = course.run("setup")
    assert r.returncode == 2 and "home_base" in r.stderr
    assert not course.state_dir.exists()  # refused before anything was created
    with pytest.raises(KeyError):
        pwd.getpwnam(course.usernames[0])


def test_handout_copy_belongs_to_the_teacher(course, tmp_path):
    teacher = random_name()
    course.extra_users.append(teacher)
    subprocess.run(["useradd", "-N", "-M", "-d", "/nonexistent", teacher], check=True)
    out = tmp_path / "slips.html"
    r = course.run("setup", "--handout", str(out), env={"SUDO_USER": teacher})
    assert r.returncode == 0, r.stderr
    st = os.stat(out)
    assert st.st_uid == pwd.getpwnam(teacher).pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".slips")]
    r = course.run("setup", "--handout", str(tmp_path / "nope" / "x.html"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def _as_nobody(*args):
    nobody = pwd.getpwnam("nobody")
    return subprocess.run(
        [sys.executable, "notebooks.py", *args],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        check=False,
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        env={"HOME": "/tmp"},
    )


def _open_for_nobody(course):
    for p in [course.base, *course.base.parents]:
        if str(p).startswith("/tmp/pytest-of-root"):
            os.chmod(p, 0o755)
    os.chmod(course.base, 0o755)


def test_without_root_dry_run_and_status_see_course_accounts(ready_course):
    course = ready_course
    _open_for_nobody(course)
    r = _as_nobody("setup", str(course.config), "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout
    r = _as_nobody("remove", str(course.config), "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "would be removed" in r.stdout
    r = _as_nobody("status", str(course.config), "--json")
    assert r.returncode == 0, r.stderr
    import json

    assert {row["account"] for row in json.loads(r.stdout)} == {"ok"}
    r = _as_nobody("setup", str(course.config))
    assert r.returncode == 3 and "sudo" in r.stderr


def test_check_as_an_ordinary_user(course):
    _open_for_nobody(course)
    r = _as_nobody("check", str(course.config), "--json")
    assert r.returncode == 0, r.stdout + r.stderr


def test_removed_outside_the_course_drops_its_credentials(ready_course):
    course = ready_course
    u = course.usernames[0]
    subprocess.run(["userdel", "-r", u], check=True, capture_output=True)
    r = course.run("remove", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    text = (course.state_dir / "credentials.csv").read_text()
    assert u not in text and course.usernames[1] not in text
    db = sqlite3.connect(course.state_dir / "state.db")
    assert db.execute("SELECT count(*) FROM accounts").fetchone()[0] == 0


def test_dry_run_without_root_when_the_state_folder_cannot_be_reached(ready_course):
    """The state folder sits below a folder nobody else can enter (root's 0700 pytest folder)."""
    import shutil
    import tempfile

    course = ready_course
    public = tempfile.mkdtemp(prefix="classroom-public-", dir="/tmp")
    try:
        os.chmod(public, 0o755)
        for name in ("notebooks.cfg", "students.csv"):
            shutil.copy(course.base / name, public)
            os.chmod(os.path.join(public, name), 0o644)
        shutil.copytree(course.base / "tutorial", os.path.join(public, "tutorial"))
        r = _as_nobody("setup", os.path.join(public, "notebooks.cfg"), "--dry-run")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Error" not in r.stderr
    finally:
        shutil.rmtree(public)


def test_check_flags_unreachable_home_base_and_busy_ports(course, tmp_path):
    import json
    import socket

    hidden = tmp_path / "hidden"
    (hidden / "homes").mkdir(parents=True)
    os.chmod(hidden, 0o700)
    course.write_config(accounts={"home_base": str(hidden / "homes")})
    port = int(course.sections["launch"]["first_port"])
    with socket.socket() as held:
        held.bind(("0.0.0.0", port))
        held.listen()
        r = course.run("check", "--json")
    data = json.loads(r.stdout)
    assert r.returncode == 2 and not data["ok"]
    assert any("let other users through" in p for p in data["problems"])
    assert any(str(port) in w and "skip" in w for w in data["warnings"])


def test_gid_taken_between_choice_and_groupadd_is_retried(course, monkeypatch):
    from click.testing import CliRunner

    from classroom import cli
    from classroom.host import groups

    squatter = random_name("tg")
    subprocess.run(["groupadd", squatter], check=True)
    try:
        taken = grp.getgrnam(squatter).gr_gid
        real = groups.free_id
        calls = []

        def racy(used, low, high):
            calls.append(1)
            return taken if len(calls) == 1 else real(used, low, high)

        monkeypatch.setattr(groups, "free_id", racy)
        result = CliRunner().invoke(cli.cli, ["setup", str(course.config)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert grp.getgrnam(course.name).gr_gid != taken
    finally:
        subprocess.run(["groupdel", squatter], check=False)


@pytest.mark.parametrize(
    "made", ["the course group", "a student's own group", "a student's own group, an account"]
)
def test_a_gid_another_program_made_at_the_same_moment_is_given_up(course, monkeypatch, made):
    """Debian 12's useradd --user-group picks its group's gid before it holds the lock on
    /etc/group, so a group made at the same moment can get the same gid (two groups, one
    gid: the course group then has a stranger as a member, and remove keeps it). Here the
    other program makes its group right after ours, with ``groupadd -o``, the state that
    race leaves; setup must end with gids of its own."""
    from click.testing import CliRunner

    from classroom import cli
    from classroom.host import accounts, groups

    u0 = course.usernames[0]
    squatter = random_name("tq")
    module = groups if made == "the course group" else accounts
    tool, name = ("groupadd", course.name) if made == "the course group" else ("useradd", u0)
    real = module.run_account_tool
    done: list[int] = []

    def and_another_program(argv, **kw):
        result = real(argv, **kw)
        if argv[0] == tool and argv[-1] == name and not done:
            gid = grp.getgrnam(name).gr_gid
            subprocess.run(["groupadd", "-o", "--gid", str(gid), "--", squatter], check=True)
            if made.endswith("an account"):  # whose primary gid it is: userdel keeps ours
                subprocess.run(
                    ["useradd", "-N", "-M", "-d", "/nonexistent", "-g", squatter, "--", squatter],
                    check=True,
                )
            done.append(gid)
        return result

    monkeypatch.setattr(module, "run_account_tool", and_another_program)
    try:
        result = CliRunner().invoke(cli.cli, ["setup", str(course.config)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert done, f"no {tool} of {name}"
        assert grp.getgrnam(squatter).gr_gid == done[0]  # theirs, left alone
        for group in (course.name, *course.usernames):
            gid = grp.getgrnam(group).gr_gid
            sharing = [g.gr_name for g in grp.getgrall() if g.gr_gid == gid]
            assert sharing == [group], f"{group} shares its gid {gid} with {sharing}"
        assert grp.getgrnam(u0).gr_gid == pwd.getpwnam(u0).pw_gid
    finally:
        remove_account(squatter)
        subprocess.run(["groupdel", "--", squatter], check=False)


def test_a_process_started_after_remove_stopped_everything_is_killed_too(ready_course, monkeypatch):
    """A student who logs in again once remove has stopped their processes: userdel refuses
    (the account is in use); remove kills that process too and deletes the account."""
    from click.testing import CliRunner

    from classroom import cli
    from classroom.commands import remove as remove_command

    course = ready_course
    u = course.usernames[0]
    pw = course.pw(u)
    real_stop = remove_command.stop_everything
    late: list[subprocess.Popen] = []

    def stop_then_log_in(course_, present):
        real_stop(course_, present)
        late.append(
            subprocess.Popen(
                ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
                + ["sleep", "120"]
            )
        )
        time.sleep(0.2)  # running as the student by now

    monkeypatch.setattr(remove_command, "stop_everything", stop_then_log_in)
    try:
        result = CliRunner().invoke(
            cli.cli, ["remove", str(course.config), "--yes"], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        assert late and late[0].wait(10) == -9, "the late login survived remove"
        with pytest.raises(KeyError):
            pwd.getpwnam(u)
    finally:
        for p in late:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_remove_leaves_alone_a_uid_given_out_again_meanwhile(ready_course, monkeypatch):
    """Between userdel and remove's last sweep (processes, files in /tmp), another program
    (another course's setup) may give the freed uid to a new account: what that account
    runs and owns is not the removed student's, and stays."""
    from click.testing import CliRunner

    from classroom import cli
    from classroom.commands import remove as remove_command

    course = ready_course
    u = course.usernames[0]
    uid = course.pw(u).pw_uid
    newcomer = random_name("tn")
    course.extra_users.append(newcomer)
    real_delete = remove_command.delete_account
    held: dict = {}

    def delete_then_reuse(course_, account):
        real_delete(course_, account)
        if account.username != u:
            return
        subprocess.run(
            ["useradd", "-N", "-u", str(uid), "-M", "-d", "/nonexistent", newcomer], check=True
        )
        gid = pwd.getpwnam(newcomer).pw_gid
        held["proc"] = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "sleep", "120"]
        )
        held["file"] = Path("/tmp") / f".{newcomer}-file"
        held["file"].write_text("the newcomer's\n")
        os.chown(held["file"], uid, gid)

    monkeypatch.setattr(remove_command, "delete_account", delete_then_reuse)
    try:
        result = CliRunner().invoke(
            cli.cli, ["remove", str(course.config), "--yes"], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        assert "proc" in held, "the student was not deleted"
        assert held["proc"].poll() is None, "remove killed a process of the uid's new account"
        assert held["file"].exists(), "remove deleted a file of the uid's new account"
    finally:
        if "proc" in held:
            held["proc"].kill()
            held["proc"].wait()
        if "file" in held:
            held["file"].unlink(missing_ok=True)


# --- issue 16, item 1 (SPEC 6.11 rule 11): nothing of a removed student lives on -----------

# Forks and exits at once, for ever, in a session of its own: a scan of /proc never sees the
# live generation (it is a new pid each time). Each generation writes a byte to stdout, so
# the pipe shows whether any is left: EOF once none is.
FORK_LOOP = (
    "import os, time\n"
    "if os.fork():\n"
    "    os._exit(0)\n"
    "os.setsid()\n"
    "while True:\n"
    "    if os.fork():\n"
    "        os._exit(0)\n"
    "    os.write(1, b'.')\n"
    "    time.sleep(0.002)\n"
)


def still_writing(pipe, seconds: float) -> bool:
    """True if bytes still arrive on ``pipe`` after ``seconds``; False at EOF (no writer left)."""
    import select

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([pipe], [], [], 0.2)
        if ready and not os.read(pipe.fileno(), 1 << 16):
            return False
    return True


def test_remove_leaves_no_forking_loop_running(ready_course):
    """A loop that forks and exits at once (after setsid) dodges a scan-then-signal; remove
    must still leave no process of the student's uid."""
    u0, u1 = ready_course.usernames
    pw = pwd.getpwnam(u0)
    loop = as_student(ready_course, u0, FORK_LOOP, stdout=subprocess.PIPE)
    try:
        assert still_writing(loop.stdout, 1), "the student's loop did not run"
        loop.wait(timeout=30)  # the first generation exits at once; the loop goes on
        r = ready_course.run("remove", "--yes", timeout=180)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        with pytest.raises(KeyError):
            pwd.getpwnam(u0)
        assert not still_writing(loop.stdout, 10), f"the loop outlived remove: {out}"
        assert processes_of_uid(pw.pw_uid) == [], out
    finally:
        kill_uid(pw.pw_uid, pw.pw_gid)
        loop.stdout.close()


def test_a_new_account_never_gets_an_id_the_course_gave(course):
    """uid and gid of a removed account are never handed out again by the course."""
    u0, u1 = course.usernames
    r = course.run("setup", "--yes", "--only", u0)
    assert r.returncode == 0, r.stdout + r.stderr
    old = pwd.getpwnam(u0)
    course_gid = grp.getgrnam(course.name).gr_gid
    r = course.run("remove", "--yes", "--only", u0)
    assert r.returncode == 0, r.stdout + r.stderr
    r = course.run("setup", "--yes", "--only", u1)
    assert r.returncode == 0, r.stdout + r.stderr
    new = pwd.getpwnam(u1)
    given = {old.pw_uid, old.pw_gid, course_gid}
    assert new.pw_uid not in given and new.pw_gid not in given, (old, new, course_gid)
    assert new.pw_gid == new.pw_uid, "the account's own group does not have its id"


def test_a_gid_left_to_accounts_by_a_deleted_group_is_not_given_to_the_course(course):
    """A group deleted from under its accounts (groupdel --force) leaves them its gid: the
    course group made with that gid would take a stranger in, and remove would keep it."""
    from classroom.host.groups import choose_id
    from classroom.host.system import login_defs

    defs = login_defs()
    low, high = int(defs.get("GID_MIN", "1000")), int(defs.get("GID_MAX", "60000"))
    old_choice = choose_id({g.gr_gid for g in grp.getgrall()}, set(), low, high, 0)
    gone, stranger = random_name(), random_name()
    course.extra_users.append(stranger)
    subprocess.run(["groupadd", "--gid", str(old_choice), "--", gone], check=True)
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-g", gone, "--", stranger], check=True)
    subprocess.run(["groupdel", "--force", "--", gone], check=True)
    assert pwd.getpwnam(stranger).pw_gid == old_choice
    r = course.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    course_gid = grp.getgrnam(course.name).gr_gid
    assert course_gid != old_choice, "the course group took the gid of a stranger's deleted group"
    assert course_gid not in os.getgrouplist(stranger, pwd.getpwnam(stranger).pw_gid)
    for u in course.usernames:
        assert old_choice not in (pwd.getpwnam(u).pw_uid, pwd.getpwnam(u).pw_gid)
    removes_the_group_too(course)


def test_remove_says_who_keeps_the_course_group(ready_course):
    """A stranger added to the course group by hand keeps it: remove says so, not nothing."""
    course = ready_course
    stranger = random_name()
    course.extra_users.append(stranger)
    subprocess.run(
        ["useradd", "-M", "-d", "/nonexistent", "-G", course.name, "--", stranger], check=True
    )
    r = course.run("remove", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"group {course.name} kept: {stranger} still in it" in r.stdout + r.stderr, r.stdout
    assert stranger in grp.getgrnam(course.name).gr_mem


def twin_of_the_course_group(course) -> str:
    """A stranger whose own group has the course group's gid (what the useradd race, lost
    by another program, leaves); the stranger's name."""
    gid = grp.getgrnam(course.name).gr_gid
    stranger = random_name()
    course.extra_users.append(stranger)
    subprocess.run(["groupadd", "-o", "--gid", str(gid), "--", stranger], check=True)
    subprocess.run(
        ["useradd", "-M", "-d", "/nonexistent", "-g", stranger, "--", stranger], check=True
    )
    return stranger


def test_remove_deletes_a_course_group_a_strangers_own_group_shares_a_gid_with(ready_course):
    """The useradd race, lost by another program: a stranger's own group got the course
    group's gid. The stranger is not the course's member: remove deletes the course group
    and leaves the stranger's own group as it is."""
    course = ready_course
    gid, stranger = grp.getgrnam(course.name).gr_gid, twin_of_the_course_group(course)
    removes_the_group_too(course)
    assert grp.getgrnam(stranger).gr_gid == pwd.getpwnam(stranger).pw_gid == gid


def test_check_warns_of_a_stranger_sharing_the_course_groups_gid(ready_course):
    """The useradd race lost after setup looked: check says who shares the gid."""
    course = ready_course
    gid, stranger = grp.getgrnam(course.name).gr_gid, twin_of_the_course_group(course)
    try:
        r = course.run("check")
        expected = f"group {course.name} (gid {gid}) shares its gid with {stranger}: they have"
        assert expected in r.stdout, r.stdout + r.stderr
    finally:
        remove_account(stranger)
        subprocess.run(["groupdel", "--", stranger], check=False)


def test_remove_keeps_a_course_group_someone_replaced_and_says_so(ready_course):
    """A group of the course's name made by someone else since setup is not the course's
    to delete: remove keeps it and says why."""
    course = ready_course
    made = grp.getgrnam(course.name).gr_gid
    used = {g.gr_gid for g in grp.getgrall()} | {p.pw_gid for p in pwd.getpwall()}
    other = next(gid for gid in range(50000, 59000) if gid not in used and gid != made)
    subprocess.run(["groupdel", "--", course.name], check=True)
    subprocess.run(["groupadd", "--gid", str(other), "--", course.name], check=True)
    now = grp.getgrnam(course.name).gr_gid
    assert now != made
    r = course.run("remove", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"group {course.name} kept: its gid is {now}, not the {made}" in r.stdout, r.stdout
    assert grp.getgrnam(course.name).gr_gid == now


def test_ids_go_above_the_highest_given_then_below_never_given_ones():
    from classroom.host.groups import choose_id

    used, given = {1000, 1005}, {1002, 1003, 1004}
    assert choose_id(used, given, 1000, 1010, 0) == 1006  # above everything, as useradd
    used |= set(range(1006, 1011))  # the top of the range is full: the lowest never given
    assert choose_id(used, given, 1000, 1010, 0) == 1001
    for attempt in range(1, 5):  # spread out after a collision, never onto a given id
        assert choose_id(used, given, 1000, 1100, attempt) not in used | given


def test_remove_deletes_what_the_student_left_in_shared_tmp(ready_course, tmp_path):
    u0, u1 = ready_course.usernames
    pw, other = pwd.getpwnam(u0), pwd.getpwnam(u1)
    tag = random_name("left-")
    target = tmp_path / "root-owned-target"
    target.write_text("root's\n")
    shared = Path("/tmp") / f"{tag}-shared"  # someone else's folder others may write in
    made = {
        "file": Path("/tmp") / f"{tag}-file",
        "dir": Path("/var/tmp") / f"{tag}-dir",
        "shm": Path("/dev/shm") / f"{tag}-shm",
        "link": Path("/tmp") / f"{tag}-link",
        "deep": shared / "mine.txt",
    }
    theirs = Path("/tmp") / f"{tag}-classmate"
    try:
        shared.mkdir(mode=0o777)
        os.chmod(shared, 0o1777)
        made["file"].write_text("x")
        made["dir"].mkdir()
        (made["dir"] / "inner").write_text("y")
        os.symlink(made["dir"] / "inner", made["dir"] / "back-link")
        made["shm"].write_bytes(b"z")
        os.symlink(target, made["link"])
        made["deep"].write_text("w")
        for path in [*made.values(), made["dir"] / "inner", made["dir"] / "back-link"]:
            os.lchown(path, pw.pw_uid, pw.pw_gid)
        theirs.write_text("v")
        os.chown(theirs, other.pw_uid, other.pw_gid)
        r = ready_course.run("remove", "--yes", "--only", u0)
        assert r.returncode == 0, r.stdout + r.stderr
        for what, path in made.items():
            assert not os.path.lexists(path), f"remove left the student's {what}: {path}"
        assert target.read_text() == "root's\n", "a link was followed"
        assert shared.is_dir(), "a folder that is not the student's was deleted"
        assert theirs.exists(), "a classmate's file was deleted"
    finally:
        for path in [theirs, *made.values(), shared]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def test_half_made_account_is_completed_with_its_skeleton(course):
    """An account a cut-off run left without its skeleton and password is completed."""
    skel = course.base / "skel"
    (skel / ".config").mkdir(parents=True)
    (skel / "WELCOME.txt").write_text("welcome\n")
    (skel / ".config" / "course.ini").write_text("[x]\n")
    course.write_config(accounts={"skeleton": str(skel)})
    u0, _ = course.usernames
    r = course.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    home = course.home(u0)
    (home / "WELCOME.txt").unlink()
    shutil.rmtree(home / ".config")
    with sqlite3.connect(course.state_dir / "state.db") as db:  # as a run cut off mid-useradd
        db.execute(
            "UPDATE accounts SET status = 'creating', password_set = 0 WHERE username = ?", (u0,)
        )
    r = course.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "adopted" in r.stdout and "skeleton" in r.stdout, r.stdout
    pw = pwd.getpwnam(u0)
    for name in ("WELCOME.txt", ".config/course.ini"):
        assert (home / name).is_file() and (home / name).stat().st_uid == pw.pw_uid, name
    assert (home / "WELCOME.txt").read_text() == "welcome\n"
