"""setup, remove, status, check against real accounts (root), through the CLI as a teacher runs it."""

from __future__ import annotations

import csv
import grp
import json
import os
import pwd
import signal
import stat
import subprocess
import tarfile
import time

import pytest
from conftest import needs_root, random_name, remove_account, shadow_hash

pytestmark = needs_root


def test_setup_dry_run_then_real_then_unchanged(course):
    dry = course.run("setup", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would be created" in dry.stdout and "useradd" in dry.stdout
    for u in course.usernames:
        with pytest.raises(KeyError):
            pwd.getpwnam(u)
    assert not course.state_dir.exists()

    real = course.run("setup")
    assert real.returncode == 0, real.stdout + real.stderr
    assert "setup: 2 created, 0 unchanged, 0 failed" in real.stdout
    group = grp.getgrnam(course.name)
    creds = course.credentials()
    for i, u in enumerate(course.usernames):
        pw = pwd.getpwnam(u)
        assert pw.pw_dir == str(course.home(u))
        assert pw.pw_gecos == f"Name{i} Surname{i}"
        assert u in group.gr_mem
        st = os.stat(course.home(u))
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == pw.pw_uid
        password = creds[u]["password"]
        assert len(password) == 12 and creds[u]["notebook_password"] == password
        assert shadow_hash(u).startswith("$6$")  # ENCRYPT_METHOD SHA512 of login.defs
        import crypt_r_check  # noqa: F401  (helper module below)

        assert crypt_r_check.verify(password, shadow_hash(u))
        cfg = course.home(u) / ".jupyter" / "jupyter_server_config.json"
        st = os.stat(cfg)
        assert st.st_uid == pw.pw_uid and stat.S_IMODE(st.st_mode) == 0o600
        hashed = json.loads(cfg.read_text())["IdentityProvider"]["hashed_password"]
        from jupyter_server.auth.security import passwd_check

        assert passwd_check(hashed, password)
    for name in ("credentials.csv", "handout.html", "state.db"):
        st = os.stat(course.state_dir / name)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert stat.S_IMODE(os.stat(course.state_dir).st_mode) == 0o700
    handout = (course.state_dir / "handout.html").read_text()
    for u in course.usernames:
        assert u in handout and creds[u]["password"] in handout
    log = (course.state_dir / "classroom.log").read_text()
    assert "useradd" in log and "chpasswd" in log
    for u in course.usernames:
        assert creds[u]["password"] not in log
        assert creds[u]["password"] not in real.stdout + real.stderr

    again = course.run("setup")
    assert again.returncode == 0
    assert "setup: 2 unchanged, 0 failed (nothing to do)" in again.stdout
    assert course.credentials() == creds


def test_passwords_never_in_argv_or_environment(course, monkeypatch):
    """Every process setup starts goes through subprocess: record each argv and environment."""
    import subprocess as sp

    from click.testing import CliRunner

    from classroom import cli

    calls = []
    real_popen_init = sp.Popen.__init__

    def spy(self, args, *a, **kw):
        calls.append(
            (list(args) if not isinstance(args, str) else [args], dict(kw.get("env") or {}))
        )
        return real_popen_init(self, args, *a, **kw)

    monkeypatch.setattr(sp.Popen, "__init__", spy)
    result = CliRunner().invoke(cli.cli, ["setup", str(course.config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    commands = [argv[0] for argv, _ in calls]
    assert "useradd" in commands and "chpasswd" in commands
    secrets_ = [
        v
        for row in course.credentials().values()
        for v in (row["password"], row["notebook_password"])
    ]
    hashes = [
        (course.home(u) / ".jupyter" / "jupyter_server_config.json").read_text()
        for u in course.usernames
    ]
    for argv, env in calls:
        text = " ".join(argv) + " " + " ".join(f"{k}={v}" for k, v in env.items())
        for secret in secrets_:
            assert secret not in text
        assert "argon2" not in text and "$6$" not in text
    assert all("argon2" in h for h in hashes)


def test_reset_passwords_and_separate_notebook_password(course):
    course.write_config(accounts={"notebook_password": "separate", "password_length": "16"})
    assert course.run("setup").returncode == 0
    before = course.credentials()
    u = course.usernames[0]
    assert before[u]["password"] != before[u]["notebook_password"]
    assert len(before[u]["password"]) == 16
    old_shadow = shadow_hash(u)
    r = course.run("setup", "--reset-passwords", "--only", u)
    assert r.returncode == 0, r.stderr
    after = course.credentials()
    assert after[u]["password"] != before[u]["password"]
    assert shadow_hash(u) != old_shadow
    other = course.usernames[1]
    assert after[other] == before[other]


def test_existing_course_account_is_brought_in_line(ready_course):
    course = ready_course
    u = course.usernames[0]
    os.chmod(course.home(u), 0o755)
    subprocess.run(["gpasswd", "-d", u, course.name], check=True, capture_output=True)
    r = course.run("setup")
    assert r.returncode == 0
    assert f"{u}: updated" in r.stdout
    assert stat.S_IMODE(os.stat(course.home(u)).st_mode) == 0o700
    assert u in grp.getgrnam(course.name).gr_mem


def test_system_and_foreign_accounts_fail_and_are_untouched(course):
    foreign = random_name()
    course.extra_users.append(foreign)
    subprocess.run(["useradd", "-N", "-M", "-d", "/nonexistent", foreign], check=True)
    course.write_roster([f"{course.usernames[0]},A,B,", "daemon,D,E,", f"{foreign},F,G,"])
    daemon_before = pwd.getpwnam("daemon")
    r = course.run("setup")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "daemon" in r.stdout and "system account" in r.stdout
    assert foreign in r.stdout and "did not create" in r.stdout
    assert "setup: 1 created, 0 unchanged, 2 failed" in r.stdout
    assert pwd.getpwnam("daemon") == daemon_before
    assert course.name not in [g.gr_name for g in grp.getgrall() if "daemon" in g.gr_mem]
    assert foreign not in grp.getgrnam(course.name).gr_mem
    # remove refuses before any change when a foreign account is selected
    r = course.run("remove", "--yes")
    assert r.returncode == 3
    assert pwd.getpwnam(course.usernames[0])
    # ... and works when only the course's own student is selected
    r = course.run("remove", "--yes", "--only", course.usernames[0])
    assert r.returncode == 0, r.stdout + r.stderr
    with pytest.raises(KeyError):
        pwd.getpwnam(course.usernames[0])
    assert pwd.getpwnam(foreign)


def test_account_recreated_outside_the_course_is_foreign(ready_course):
    course = ready_course
    u = course.usernames[0]
    remove_account(u)
    subprocess.run(["useradd", "-N", "-M", "-d", "/nonexistent", "-u", "59999", u], check=True)
    r = course.run("remove", "--yes")
    assert r.returncode == 3
    assert "never touched" in r.stderr
    assert pwd.getpwnam(u).pw_uid == 59999


def test_remove_dry_run_declined_then_real(ready_course):
    course = ready_course
    u0, u1 = course.usernames
    (course.home(u0) / "work.txt").write_text("my work")
    dry = course.run("remove", "--dry-run")
    assert dry.returncode == 0 and "would be removed" in dry.stdout
    declined = course.run("remove", input="n\n")
    assert declined.returncode == 3
    assert pwd.getpwnam(u0) and course.home(u0).exists()
    # a process the student still runs is stopped first
    sleeper = subprocess.Popen(["sleep", "300"], user=u0, start_new_session=True)
    try:
        r = course.run("remove", input="y\n")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "remove: 2 removed, 0 unchanged, 0 failed" in r.stdout
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
    for u in course.usernames:
        with pytest.raises(KeyError):
            pwd.getpwnam(u)
        assert not course.home(u).exists()
    archives = sorted((course.state_dir / "archive").iterdir())
    assert len(archives) == 2
    mine = next(a for a in archives if a.name.startswith(u0 + "-"))
    assert stat.S_IMODE(mine.stat().st_mode) == 0o600
    with tarfile.open(mine) as tar:
        assert tar.extractfile(f"{u0}/work.txt").read() == b"my work"
    with pytest.raises(KeyError):
        grp.getgrnam(course.name)
    creds = (course.state_dir / "credentials.csv").read_text()
    assert u0 not in creds
    again = course.run("remove", "--yes")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_archive_failure_keeps_the_account(ready_course):
    course = ready_course
    u = course.usernames[0]
    course.write_config(remove={"archive_dir": "/proc/classroom-cannot-write"})
    r = course.run("remove", "--yes")
    assert r.returncode == 1
    assert "archive failed, account kept" in r.stdout
    assert pwd.getpwnam(u) and course.home(u).is_dir()
    # with a usable archive folder the same command finishes the job
    course.write_config(remove={"archive_dir": str(course.base / "archives")})
    r = course.run("remove", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list((course.base / "archives").glob(f"{u}-*.tar.gz"))) == 1


def test_status_json_and_table(ready_course):
    course = ready_course
    ghost = random_name()
    course.write_roster([f"{u},S,N," for u in course.usernames] + [f"{ghost},S,N,", "daemon,,,"])
    r = course.run("status", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["username"]: row for row in json.loads(r.stdout)}
    assert rows[course.usernames[0]]["account"] == "ok"
    assert rows[ghost]["account"] == "missing"
    assert rows["daemon"]["account"] == "foreign"
    for row in rows.values():
        assert row["server"] == "stopped" and row["port"] is None and row["pid"] is None
        assert set(row) >= {"username", "account", "server", "port", "pid", "url"}
    table = course.run("status")
    assert table.returncode == 0 and "foreign" in table.stdout and "missing" in table.stdout


def test_bad_roster_changes_nothing(course):
    course.write_roster(
        [f"{course.usernames[0]},,,", f"{course.usernames[0].upper()},,,", "Bad Name,,,"]
    )
    r = course.run("setup")
    assert r.returncode == 2
    assert "line 3" in r.stderr and "line 4" in r.stderr
    assert not course.state_dir.exists()
    with pytest.raises(KeyError):
        pwd.getpwnam(course.usernames[0])


def test_typo_in_config_and_missing_roster(course):
    text = course.config.read_text().replace("password_length", "pasword_length")
    course.config.write_text(text)
    r = course.run("setup")
    assert r.returncode == 2 and "did you mean 'password_length'" in r.stderr
    course.write_config()
    course.write_config(course={"roster": "nope.csv"})
    course.config.write_text(course.config.read_text().replace("pasword_length", "password_length"))
    r = course.run("setup")
    assert r.returncode == 2 and "nope.csv" in r.stderr and "not found" in r.stderr


def test_state_dir_not_usable(course):
    blocker = course.base / "afile"
    blocker.write_text("x")
    course.write_config(course={"state_dir": str(blocker / "state")})
    r = course.run("setup")
    assert r.returncode == 2 and "state_dir" in r.stderr
    with pytest.raises(KeyError):
        pwd.getpwnam(course.usernames[0])


def test_only_must_be_in_roster(course):
    r = course.run("setup", "--only", "zzz")
    assert r.returncode == 2 and "not in the roster" in r.stderr


def test_second_command_is_locked_out(course):
    course.state_dir.mkdir(mode=0o700)
    import fcntl

    fd = os.open(course.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"'setup' (pid 1, since now)\n")
    try:
        r = course.run("setup")
        assert r.returncode == 3
        assert "locked by 'setup'" in r.stderr
        with pytest.raises(KeyError):
            pwd.getpwnam(course.usernames[0])
    finally:
        os.close(fd)


def test_two_setups_at_once(make_course):
    course = make_course(6)
    procs = [
        subprocess.Popen(
            [__import__("sys").executable, "notebooks.py", "setup", str(course.config)],
            cwd=str(__import__("conftest").ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(120), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    # Either the second waited out the first (0, 0) or was refused (0, 3); never a half-made class.
    assert codes in ([0, 0], [0, 3]), results
    if codes == [0, 3]:
        assert any("locked" in r[2] for r in results)
    for u in course.usernames:
        assert pwd.getpwnam(u)
    assert len(course.credentials()) == 6


def test_setup_killed_halfway_then_rerun(make_course):
    course = make_course(12)
    proc = subprocess.Popen(
        [__import__("sys").executable, "notebooks.py", "setup", str(course.config)],
        cwd=str(__import__("conftest").ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        made = sum(1 for u in course.usernames if course.home(u).exists())
        if made >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    made = [u for u in course.usernames if course.home(u).exists()]
    assert 0 < len(made) < 12, "setup finished before it could be killed"
    r = course.run("setup")
    assert r.returncode == 0, r.stdout + r.stderr
    creds = course.credentials()
    for u in course.usernames:
        pw = pwd.getpwnam(u)
        import crypt_r_check

        assert crypt_r_check.verify(creds[u]["password"], shadow_hash(u)), u
        assert stat.S_IMODE(os.stat(pw.pw_dir).st_mode) == 0o700
    again = course.run("setup")
    assert "nothing to do" in again.stdout


def test_setup_waits_for_a_useradd_that_a_killed_run_left_running(make_course, tmp_path):
    """setup killed outright leaves its useradd running (account tools are never killed
    half-way); the next setup waits for it instead of racing it ("user already exists")."""
    course = make_course(2)
    orphan_tool = tmp_path / "useradd"  # a process named useradd, for the student, for 8 s
    orphan_tool.write_text('#!/bin/sh\nsleep "$1"\n')
    orphan_tool.chmod(0o755)
    orphan = subprocess.Popen([str(orphan_tool), "8", course.usernames[1]])
    try:
        r = course.run("setup")
        finished = orphan.poll()
    finally:
        orphan.kill()
        orphan.wait()
    assert r.returncode == 0, r.stdout + r.stderr
    assert finished is not None, "setup went on while a useradd for that student still ran"


def test_credentials_csv_header(ready_course):
    with open(ready_course.state_dir / "credentials.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["username", "name", "email", "password", "notebook_password"]


def test_remove_warns_about_work_not_retrieved(ready_course):
    course = ready_course
    u0, u1 = course.usernames
    assert course.run("send", "--yes").returncode == 0
    answer = course.home(u0) / "tutorial" / "answer.py"
    answer.write_text("print(42)\n")
    os.chown(answer, *(lambda p: (p.pw_uid, p.pw_gid))(pwd.getpwnam(u0)))
    r = course.run("remove", input="n\n")
    assert r.returncode == 3
    warned = [line for line in r.stderr.splitlines() if "retrieve" in line]
    assert warned and u0 in warned[0] and "never retrieved" in warned[0], r.stderr
    assert course.run("retrieve", "--yes").returncode == 0
    r = course.run("remove", input="n\n")
    assert "retrieve" not in r.stderr, r.stderr  # everything is collected now
    later = time.time() + 120
    os.utime(answer, (later, later))  # the student works on after the retrieve
    r = course.run("remove", input="n\n")
    warned = [line for line in r.stderr.splitlines() if "retrieve" in line]
    assert warned and u0 in warned[0] and u1 not in warned[0], r.stderr
    assert all(pwd.getpwnam(u) for u in course.usernames)


def test_setup_stopped_by_sigterm_says_what_it_did(make_course):
    """SIGTERM lets the account in progress finish, then setup names who was done and who
    was not (exit 130); the next run completes the rest."""
    course = make_course(10)
    proc = subprocess.Popen(
        [__import__("sys").executable, "notebooks.py", "setup", str(course.config), "--yes"],
        cwd=str(__import__("conftest").ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if sum(1 for u in course.usernames if course.home(u).exists()) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    made = [u for u in course.usernames if course.home(u).exists()]
    assert 0 < len(made) < 10, "setup finished before it could be stopped"
    assert proc.returncode == 130, out + err
    assert "stopped by SIGTERM" in err and "nothing was changed" not in err, err
    for u in made:
        assert u in err, (u, err)
    for u in set(course.usernames) - set(made):
        assert u in err.split("not done")[1], (u, err)
    r = course.run("setup", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(course.credentials()) == set(course.usernames)
