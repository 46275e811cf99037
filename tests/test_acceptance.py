"""Black-box acceptance tests, written from the contract only (SPEC.md, README.rst, config/notebooks.cfg).

Everything here drives ``notebooks.py`` (or the ``notebooks`` console script) as a
subprocess, as a teacher would, and inspects the host the way a careful
sysadmin would: /etc/passwd, /etc/group, /etc/shadow, file modes and owners,
processes, ports, HTTP.
"""

from __future__ import annotations

import contextlib
import csv
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import (
    NOTEBOOKS,
    PYTHON,
    TestCourse,
    answers,
    crypt_ok,
    describe_group,
    group_exists,
    login,
    random_name,
    remove_account,
    run_as_nobody,
    run_cli,
    status,
    user_exists,
)
from students import hashed_password, write_as

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acceptance tests run as root")

LOOKALIKES = set("0O1lI5S2Z8B")
CHANGING = ["setup", "send", "launch", "shutdown", "retrieve", "remove"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def out(r: subprocess.CompletedProcess) -> str:
    return r.stdout + r.stderr


def lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stdout.splitlines() if line.strip()]


def summary(r: subprocess.CompletedProcess) -> str:
    """The summary line, e.g. ``setup: 28 created, 2 unchanged, 0 failed`` (details may follow it)."""
    found = [
        line.strip()
        for line in lines(r)
        if re.match(r"^[a-z]+( \([^)]*\))?: .*\b\d+ failed\b", line)
    ]
    assert len(found) == 1, f"not exactly one summary line: {out(r)!r}"
    return found[0]


def lines_naming(r: subprocess.CompletedProcess, username: str) -> list[str]:
    return [
        line
        for line in r.stdout.splitlines()
        if re.search(rf"(?<![\w-]){re.escape(username)}(?![\w-])", line)
    ]


def shadow_entry(username: str) -> str | None:
    for line in Path("/etc/shadow").read_text().splitlines():
        parts = line.split(":")
        if parts[0] == username:
            return parts[1]
    return None


def login_defs(key: str) -> str | None:
    for line in Path("/etc/login.defs").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == key:
            return parts[1]
    return None


def passwd_check(hashed: str, password: str) -> bool:
    from jupyter_server.auth import passwd_check as check

    return check(hashed, password)


def run_in(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "NOTEBOOKS_CONFIG"}
    full_env.update(env or {})
    r = subprocess.run(
        [PYTHON, str(NOTEBOOKS), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=str(cwd),
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert "Traceback" not in out(r), out(r)
    return r


def line_mentioned(text: str, n: int) -> bool:
    return re.search(rf"(line\s*{n}\b|:{n}\b)", text, re.IGNORECASE) is not None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def student_password(c: TestCourse, username: str) -> str:
    row = c.credentials()[username]
    return row["notebook_password"] or row["password"]


@contextlib.contextmanager
def world_readable_course(n: int = 2):
    """A course whose files everyone can read (for commands run as a non-root user)."""
    base = Path(tempfile.mkdtemp(prefix="classroom-acc-", dir="/tmp"))
    os.chmod(base, 0o755)
    c = TestCourse(base, n=n)
    for p in base.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    try:
        yield c
    finally:
        c.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def foreign_account(system: bool = False):
    """An account the course did not create (random test name)."""
    name = random_name()
    cmd = ["useradd", "-N", "--no-create-home", "--shell", "/bin/sh"]
    if system:
        cmd.append("--system")
    subprocess.run([*cmd, "--", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        if system:
            subprocess.run(["userdel", "--", name], capture_output=True, check=False)
            subprocess.run(["groupdel", "--", name], capture_output=True, check=False)
        else:
            remove_account(name)


def student_process(username: str, *argv: str) -> subprocess.Popen:
    """A process running as the student (reaped at once when it dies, so no zombie lingers)."""
    p = subprocess.Popen(
        ["setpriv", f"--reuid={username}", f"--regid={username}", "--init-groups", "--", *argv],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    threading.Thread(target=p.wait, daemon=True).start()
    return p


def roster_rows(c: TestCourse, extra: list[str] = ()) -> list[str]:
    return [f"{u},Surname{i},Name{i},{u}@example.org" for i, u in enumerate(c.usernames)] + list(
        extra
    )


# --------------------------------------------------------------------------------------------
# §1 command line
# --------------------------------------------------------------------------------------------


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0, out(r)
    assert re.search(r"\d+\.\d+", out(r))


def test_console_script_on_path(course):
    exe = shutil.which("notebooks")
    assert exe, "the console script `notebooks` is not on PATH"
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, out(r)
    r = subprocess.run(
        [exe, "check", str(course.config)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, out(r)
    assert "Traceback" not in out(r)


def test_config_from_environment_variable(course):
    r = run_in(Path("/"), "check", env={"NOTEBOOKS_CONFIG": str(course.config)})
    assert r.returncode == 0, out(r)


def test_config_from_current_folder(course):
    assert course.config.name == "notebooks.cfg"
    r = run_in(course.base, "check")
    assert r.returncode == 0, out(r)


def test_config_argument_beats_environment_and_environment_beats_cwd(course, tmp_path):
    bad = tmp_path / "bad.cfg"
    bad.write_text("[course]\nname = Not A Valid Name!\n")
    r = run_in(Path("/"), "check", str(course.config), env={"NOTEBOOKS_CONFIG": str(bad)})
    assert r.returncode == 0, out(r)
    # in the course folder (which has a good ./notebooks.cfg), the environment variable wins
    r = run_in(course.base, "check", env={"NOTEBOOKS_CONFIG": str(bad)})
    assert r.returncode == 2, out(r)


def test_no_config_anywhere_is_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_in(empty, "check")
    assert r.returncode == 2, out(r)
    assert "notebooks.cfg" in out(r)
    r = run_in(empty, "setup", "--yes")
    assert r.returncode == 2, out(r)


def test_missing_config_file_no_traceback(tmp_path):
    r = run_cli("setup", str(tmp_path / "nope.cfg"), "--yes")
    assert r.returncode == 2, out(r)
    assert "Traceback" not in out(r)
    assert "nope.cfg" in out(r)


@pytest.mark.parametrize("command", CHANGING)
def test_changing_commands_take_dry_run_only_yes(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0, out(r)
    for option in ("--dry-run", "--only", "--yes"):
        assert option in r.stdout, f"{command} --help does not list {option}"


@pytest.mark.parametrize("command", ["status", "check"])
def test_status_and_check_take_json(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0
    assert "--json" in r.stdout


def test_bad_usage_is_exit_2(course):
    r = course.run("setup", "--no-such-option")
    assert r.returncode == 2, out(r)
    r = run_cli("no-such-command", str(course.config))
    assert r.returncode == 2, out(r)
    assert not group_exists(course.name)


def test_only_must_be_in_roster(course):
    r = course.run("setup", "--yes", "--only", "tnotinroster")
    assert r.returncode == 2, out(r)
    assert "tnotinroster" in out(r)
    assert not group_exists(course.name)
    assert not any(user_exists(u) for u in course.usernames)


def test_setup_only_selects_students(make_course):
    c = make_course(3)
    u0, u1, u2 = c.usernames
    r = c.run("setup", "--yes", "--only", u0, "--only", u2)
    assert r.returncode == 0, out(r)
    assert user_exists(u0) and user_exists(u2) and not user_exists(u1)
    assert summary(r) == "setup: 2 created, 0 unchanged, 0 failed"
    assert set(c.credentials()) == {u0, u2}
    r = c.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    assert user_exists(u1)
    assert re.match(r"^setup: 1 created, 2 unchanged, 0 failed", summary(r)), summary(r)
    assert lines_naming(r, u1) and not lines_naming(r, u0) and not lines_naming(r, u2)


def test_setup_dry_run_changes_nothing(course):
    r = course.run("setup", "--dry-run")
    assert r.returncode == 0, out(r)
    for u in course.usernames:
        assert lines_naming(r, u), f"dry run does not say what it would do to {u}"
        assert not user_exists(u)
    assert not group_exists(course.name)
    assert not (course.state_dir / "credentials.csv").exists()
    assert not course.state_dir.exists(), "a dry run created the state folder"
    assert "would" in out(r).lower()


def test_dry_run_works_without_root():
    with world_readable_course() as c:
        r = run_as_nobody("setup", str(c.config), "--dry-run")
        assert r.returncode == 0, out(r)
        for u in c.usernames:
            assert lines_naming(r, u)
            assert not user_exists(u)
        assert not group_exists(c.name)


def test_not_root_is_exit_3_with_sudo_hint():
    with world_readable_course() as c:
        r = run_as_nobody("setup", str(c.config), "--yes")
        assert r.returncode == 3, out(r)
        assert "sudo" in out(r).lower()
        assert not group_exists(c.name)
        assert not any(user_exists(u) for u in c.usernames)


def test_other_changing_commands_dry_run(ready_course):
    c = ready_course
    u0 = c.usernames[0]
    for command in ("send", "retrieve", "launch", "shutdown", "remove"):
        r = c.run(command, "--dry-run")
        assert r.returncode == 0, (command, out(r))
    for u in c.usernames:
        assert user_exists(u)
        assert not (c.home(u) / "tutorial" / "lesson.ipynb").exists()
    assert not (c.base / "submissions" / u0).exists()
    st = status(c)
    assert all(row["server"] == "stopped" for row in st.values()), st
    assert group_exists(c.name)


def test_quiet_prints_only_summary(course):
    r = run_cli("-q", "setup", str(course.config), "--yes")
    assert r.returncode == 0, out(r)
    assert lines(r) == ["setup: 2 created, 0 unchanged, 0 failed"], r.stdout


# --------------------------------------------------------------------------------------------
# §2 config
# --------------------------------------------------------------------------------------------


def _line_of(path: Path, needle: str) -> int:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


def test_unknown_key_did_you_mean_with_line(course):
    course.write_config(accounts={"home_mod": "0700"})
    n = _line_of(course.config, "home_mod =")
    for command in ("check", "setup"):
        args = ("--yes",) if command == "setup" else ()
        r = course.run(command, *args)
        assert r.returncode == 2, out(r)
        text = out(r)
        assert "home_mod" in text
        assert "home_mode" in text.replace("home_mod ", ""), text  # the suggestion
        assert line_mentioned(text, n), text
        assert "notebooks.cfg" in text
    assert not group_exists(course.name)
    assert not (course.state_dir / "credentials.csv").exists()


def test_unknown_section_did_you_mean_with_line(course):
    course.write_config(acounts={"shell": "/bin/bash"})
    n = _line_of(course.config, "[acounts]")
    r = course.run("setup", "--yes")
    assert r.returncode == 2, out(r)
    assert "acounts" in out(r)
    assert re.search(r"\baccounts\b", out(r)), out(r)
    assert line_mentioned(out(r), n), out(r)
    assert not group_exists(course.name)


def test_every_config_problem_listed_at_once(course):
    course.write_config(accounts={"home_mod": "0700"}, materiel={"x": "1"})
    r = course.run("check")
    assert r.returncode == 2
    assert "home_mod" in out(r) and "materiel" in out(r), out(r)


@pytest.mark.parametrize(
    "section,values",
    [
        ("course", {"name": "Intro_Python"}),
        ("accounts", {"password_length": "7"}),
        ("accounts", {"home_mode": "0755"}),
        ("accounts", {"notebook_password": "maybe"}),
        ("launch", {"app": "classic"}),
        ("launch", {"root": "nowhere"}),
        ("launch", {"server_address": "http://evil.example/x"}),
        ("retrieve", {"max_file_size": "lots"}),
        ("launch", {"start_mode": "spawn"}),
    ],
)
def test_invalid_values_are_exit_2(course, section, values):
    course.write_config(**{section: values})
    r = course.run("setup", "--yes")
    assert r.returncode == 2, out(r)
    assert list(values)[0] in out(r), out(r)
    assert not any(user_exists(u) for u in course.usernames)


def test_name_is_required(course):
    course.sections["course"]["name"] = None
    course.write_config()
    r = course.run("check")
    assert r.returncode == 2, out(r)
    assert "name" in out(r)


def test_relative_paths_are_relative_to_config_folder(course):
    course.write_config(course={"state_dir": "mystate"}, retrieve={"destination": "grading"})
    r = run_in(Path("/"), "setup", str(course.config), "--yes")
    assert r.returncode == 0, out(r)
    assert (course.base / "mystate" / "credentials.csv").is_file()
    course.state_dir = course.base / "mystate"
    r = run_in(Path("/"), "send", str(course.config), "--yes")
    assert r.returncode == 0, out(r)
    r = run_in(Path("/"), "retrieve", str(course.config), "--yes")
    assert r.returncode == 0, out(r)
    assert (course.base / "grading" / course.usernames[0] / "latest").exists()
    assert not Path("/grading").exists()


def test_defaults(course):
    """group = course name, state_dir = /var/lib/classroom/NAME, shell, home mode, password length."""
    course.sections["course"]["state_dir"] = None
    course.sections["course"].pop("group", None)
    course.sections["accounts"].pop("password_length", None)
    course.write_config()
    default_state = Path("/var/lib/classroom") / course.name
    assert not default_state.exists()
    try:
        r = course.run("setup", "--yes")
        assert r.returncode == 0, out(r)
        assert default_state.is_dir()
        st = default_state.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
        course.state_dir = default_state
        creds = course.credentials()
        assert group_exists(course.name)
        for u in course.usernames:
            pw = pwd.getpwnam(u)
            assert pw.pw_shell == "/bin/bash"
            assert pw.pw_dir == str(course.home(u))
            assert stat.S_IMODE(os.stat(pw.pw_dir).st_mode) == 0o700
            assert u in grp.getgrnam(course.name).gr_mem
            assert len(creds[u]["password"]) == 12
        r = course.run("remove", "--yes")
        assert r.returncode == 0, out(r)
    finally:
        shutil.rmtree(default_state, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# §3 roster
# --------------------------------------------------------------------------------------------


def test_roster_bom_header_case_order_blank_rows(course):
    u0, u1 = course.usernames
    text = (
        "\ufeff  EMAIL , SurName,UserName , Name ,Extra Column\r\n"
        f"{u0}@example.org,Lovelace,{u0},Ada,whatever\r\n"
        "\r\n"
        ",,,,\r\n"
        f"{u1}@example.org,Hopper,{u1},Grace,\r\n"
        "\r\n"
    )
    course.roster.write_bytes(text.encode("utf-8"))
    r = course.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    assert summary(r) == "setup: 2 created, 0 unchanged, 0 failed"
    assert "Ada" in pwd.getpwnam(u0).pw_gecos and "Lovelace" in pwd.getpwnam(u0).pw_gecos
    assert "Grace" in pwd.getpwnam(u1).pw_gecos and "Hopper" in pwd.getpwnam(u1).pw_gecos
    creds = course.credentials()
    assert creds[u0]["email"] == f"{u0}@example.org"
    assert "Ada" in creds[u0]["name"]


def test_original_tool_roster_with_passwords(course):
    u0, u1 = course.usernames
    course.roster.write_text(
        "username,surname,name,email,port,sys-pass,nb-pass\n"
        f"{u0},Lovelace,Ada,{u0}@example.org,9001,SysSecretAda77,NbSecretAda77\n"
        f"{u1},Hopper,Grace,{u1}@example.org,9002,SysSecretGrace77,NbSecretGrace77\n"
    )
    before = course.roster.read_bytes()
    r = course.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    assert "password" in out(r).lower(), "no warning about the passwords in the roster"
    assert "warn" in out(r).lower(), out(r)
    assert course.roster.read_bytes() == before, "the roster was rewritten"
    creds = course.credentials()
    old = {u0: ("SysSecretAda77", "NbSecretAda77"), u1: ("SysSecretGrace77", "NbSecretGrace77")}
    for u in course.usernames:
        h = shadow_entry(u)
        assert not crypt_ok(old[u][0], h), "the roster's sys-pass was used"
        assert crypt_ok(creds[u]["password"], h)
        assert creds[u]["password"] not in old[u]
        _, jh = hashed_password(course.home(u))
        assert not passwd_check(jh, old[u][1]), "the roster's nb-pass was used"
    # the old passwords are written nowhere under the state folder
    for f in course.state_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for pair in old.values():
                for p in pair:
                    assert p.encode() not in data, f"{p} written to {f}"
    assert "SysSecret" not in r.stdout and "NbSecret" not in r.stdout


def test_roster_duplicates_any_case(course):
    u0, u1 = course.usernames
    course.write_roster(
        [f"{u0},A,B,a@x.org", f"{u1},C,D,c@x.org", f"{u0},E,F,e@x.org", f"{u1.upper()},G,H,g@x.org"]
    )
    r = course.run("setup", "--yes")
    assert r.returncode == 2, out(r)
    assert line_mentioned(out(r), 4), out(r)
    assert line_mentioned(out(r), 5), out(r)
    assert "duplicate" in out(r).lower()
    assert not group_exists(course.name)
    assert not any(user_exists(u) for u in course.usernames)


def test_roster_every_invalid_name_with_line_numbers(course):
    u0, u1 = course.usernames
    bad = ["1abc", "has space", "-dash", "a" * 33, "UPPER", "semi;colon", "root:x"]
    rows = [f"{u0},A,B,a@x.org", ""]  # line 2, blank line 3
    rows += [f"{b},S,N,e@x.org" for b in bad]  # lines 4..10
    rows += ["", f"{u1},C,D,c@x.org"]
    course.write_roster(rows)
    r = course.run("setup", "--yes")
    assert r.returncode == 2, out(r)
    for i in range(len(bad)):
        assert line_mentioned(out(r), 4 + i), (4 + i, out(r))
    assert "students.csv" in out(r)
    assert not group_exists(course.name)
    assert not any(user_exists(u) for u in course.usernames)
    r = course.run("check")
    assert r.returncode == 2


def test_roster_without_username_column(course):
    course.roster.write_text("user,name\nabc,Ada\n")
    r = course.run("setup", "--yes")
    assert r.returncode == 2, out(r)
    assert "username" in out(r)
    assert not group_exists(course.name)


def test_roster_warnings_do_not_block_check_json(course):
    course.roster.write_text(
        "username,surname,name,email,port,sys-pass,nb-pass\n"
        f"{course.usernames[0]},L,A,a@x.org,9001,Secret1234x,Secret1234y\n"
    )
    r = course.run("check", "--json")
    assert r.returncode == 0, out(r)
    data = json.loads(r.stdout)
    assert data["ok"] is True
    assert data["warnings"], data
    assert "Secret1234x" not in r.stdout


# --------------------------------------------------------------------------------------------
# §4 setup (one course, set up once, inspected by many tests)
# --------------------------------------------------------------------------------------------


class CmdlineWatcher(threading.Thread):
    """Collects every process's argv and environment while a command runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: set[bytes] = set()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                for what in ("cmdline", "environ"):
                    with contextlib.suppress(OSError), open(f"/proc/{pid}/{what}", "rb") as f:
                        self.seen.add(f.read())
            time.sleep(0.002)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    base = tmp_path_factory.mktemp("shared")
    c = TestCourse(base, n=2)
    profile = base / "profile"
    (profile / "startup").mkdir(parents=True)
    (profile / "ipython_config.py").write_text("c = get_config()  # teacher's\n")
    (profile / "startup" / "00-hello.py").write_text("HELLO_FROM_TEACHER = 1\n")
    (profile / "notes.txt").write_text("not a profile file\n")
    skel = base / "skel"
    skel.mkdir()
    (skel / "WELCOME.txt").write_text("welcome\n")
    c.write_config(accounts={"profile": str(profile), "skeleton": str(skel)})
    handout = base / "copies" / "slips.html"
    handout.parent.mkdir()
    watcher = CmdlineWatcher()
    watcher.start()
    try:
        r = c.run("setup", "--yes", "--handout", str(handout))
    finally:
        watcher.stop.set()
        watcher.join()
    c.setup_result = r
    c.handout_copy = handout
    c.watched = watcher.seen
    try:
        yield c
    finally:
        c.cleanup()


def test_setup_output_and_exit(shared):
    r = shared.setup_result
    assert r.returncode == 0, out(r)
    assert summary(r) == "setup: 2 created, 0 unchanged, 0 failed"
    for u in shared.usernames:
        assert len(lines_naming(r, u)) == 1, r.stdout


def test_setup_group_and_membership(shared):
    g = grp.getgrnam(shared.name)
    for u in shared.usernames:
        pw = pwd.getpwnam(u)
        assert u in g.gr_mem or pw.pw_gid == g.gr_gid


def test_setup_gecos_shell_home(shared):
    for i, u in enumerate(shared.usernames):
        pw = pwd.getpwnam(u)
        assert f"Name{i}" in pw.pw_gecos and f"Surname{i}" in pw.pw_gecos, pw.pw_gecos
        assert pw.pw_dir == str(shared.home(u))
        assert pw.pw_shell == "/bin/bash"
        assert login_defs("UID_MIN") is None or int(login_defs("UID_MIN")) <= pw.pw_uid <= int(
            login_defs("UID_MAX")
        )
        st = os.stat(pw.pw_dir)
        assert st.st_uid == pw.pw_uid
        assert stat.S_IMODE(st.st_mode) == 0o700


def test_setup_unix_password_follows_login_defs(shared):
    method = (login_defs("ENCRYPT_METHOD") or "DES").upper()
    prefix = {"SHA512": "$6$", "SHA256": "$5$", "YESCRYPT": "$y$", "MD5": "$1$", "BCRYPT": "$2"}[
        method
    ]
    rounds = login_defs("SHA_CRYPT_MIN_ROUNDS")
    creds = shared.credentials()
    for u in shared.usernames:
        h = shadow_entry(u)
        assert h and h.startswith(prefix), (method, h[:4] if h else h)
        if method.startswith("SHA") and rounds and int(rounds) != 5000:
            assert "rounds=" in h
        assert crypt_ok(creds[u]["password"], h)
        assert not crypt_ok(creds[u]["password"] + "x", h)


def test_setup_passwords_generated(shared):
    creds = shared.credentials()
    pws = [creds[u]["password"] for u in shared.usernames]
    assert len(set(pws)) == len(pws)
    for p in pws:
        assert len(p) == 12
        assert not (set(p) & LOOKALIKES), p


def test_setup_jupyter_password(shared):
    creds = shared.credentials()
    for u in shared.usernames:
        f, h = hashed_password(shared.home(u))
        st = f.stat()
        pw = pwd.getpwnam(u)
        assert st.st_uid == pw.pw_uid, f
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        nbpass = creds[u]["notebook_password"] or creds[u]["password"]
        assert passwd_check(h, nbpass)
        assert not passwd_check(h, nbpass + "x")
        # notebook_password = same (the default): the Unix password opens Jupyter
        assert passwd_check(h, creds[u]["password"])


def test_setup_credentials_csv(shared):
    f = shared.state_dir / "credentials.csv"
    st = f.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    text = f.read_text(encoding="utf-8")
    assert text.splitlines()[0].lstrip("\ufeff") == "username,name,email,password,notebook_password"
    rows = list(csv.DictReader(text.lstrip("\ufeff").splitlines()))
    assert sorted(r["username"] for r in rows) == sorted(shared.usernames)  # one row per student
    for row in rows:
        i = shared.usernames.index(row["username"])
        assert f"Name{i}" in row["name"]
        assert row["email"] == f"{row['username']}@example.org"


def test_setup_state_dir_root_only(shared):
    st = shared.state_dir.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700


def test_setup_handout(shared):
    creds = shared.credentials()
    portal_port = shared.sections["launch"]["portal_port"]
    for f in (shared.state_dir / "handout.html", shared.handout_copy):
        assert f.is_file(), f
        html = f.read_text(encoding="utf-8")
        for i, u in enumerate(shared.usernames):
            assert html.count(u) >= 1
            assert creds[u]["password"] in html
            assert f"Name{i}" in html
        assert portal_port in html, "no portal address on the slips"
    st = (shared.state_dir / "handout.html").stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    # the teacher's copy holds passwords too: it must not be readable by others
    assert not stat.S_IMODE(shared.handout_copy.stat().st_mode) & 0o077


def test_setup_handout_one_slip_per_student(shared):
    html = (shared.state_dir / "handout.html").read_text(encoding="utf-8")
    creds = shared.credentials()
    for u in shared.usernames:
        assert html.count(creds[u]["password"]) == 1, "a password printed more than once"
    # the slips look alike: whatever element wraps a slip appears once per student
    blocks = re.findall(r"<(\w+)[^>]*class=\"[^\"]*slip[^\"]*\"", html)
    if blocks:
        assert len(blocks) == len(shared.usernames), blocks


def test_setup_profile_and_skeleton(shared):
    for u in shared.usernames:
        home = shared.home(u)
        prof = home / ".ipython" / "profile_default"
        assert (prof / "ipython_config.py").read_text() == "c = get_config()  # teacher's\n"
        assert (prof / "startup" / "00-hello.py").is_file()
        assert not (prof / "notes.txt").exists()
        assert (prof / "ipython_config.py").stat().st_uid == pwd.getpwnam(u).pw_uid
        assert (home / "WELCOME.txt").read_text() == "welcome\n"


def test_setup_no_password_in_argv_environment_or_logs(shared):
    creds = shared.credentials()
    secrets_ = set()
    for u in shared.usernames:
        secrets_.add(creds[u]["password"].encode())
        secrets_.add(shadow_entry(u).encode())
        secrets_.add(hashed_password(shared.home(u))[1].encode())
    assert any(b"useradd" in blob for blob in shared.watched), (
        "the watcher saw nothing (test broken)"
    )
    for blob in shared.watched:
        for s in secrets_:
            assert s not in blob, "a password or hash in some process's argv/environment"
    for f in shared.state_dir.rglob("*"):
        if f.is_file() and f.name not in ("credentials.csv", "handout.html"):
            data = f.read_bytes()
            for s in secrets_:
                assert s not in data, f"a password or hash in {f}"
            if f.suffix == ".log" or "log" in f.name:
                st = f.stat()
                assert st.st_uid == 0 and not stat.S_IMODE(st.st_mode) & 0o077


def test_setup_rerun_changes_nothing(shared):
    creds = (shared.state_dir / "credentials.csv").read_bytes()
    hashes = {u: shadow_entry(u) for u in shared.usernames}
    r = shared.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    assert "nothing to do" in summary(r), summary(r)
    assert re.match(r"^setup: (0 created, )?2 unchanged, 0 failed", summary(r)), summary(r)
    for u in shared.usernames:
        assert not lines_naming(r, u), "an unchanged student got a line"
        assert shadow_entry(u) == hashes[u]
    assert (shared.state_dir / "credentials.csv").read_bytes() == creds


def test_status_json_after_setup(shared):
    st = status(shared)
    assert sorted(st) == sorted(shared.usernames)
    for i, u in enumerate(shared.usernames):
        row = st[u]
        for key in ("username", "account", "server", "port", "pid", "url"):
            assert key in row, key
        assert row["account"] == "ok"
        assert row["server"] == "stopped"
        assert row["port"] is None and row["pid"] is None and row["url"] is None
    r = shared.run("status")
    assert r.returncode == 0
    for u in shared.usernames:
        assert u in r.stdout


def test_check_json_and_no_root(shared):
    r = shared.run("check", "--json")
    assert r.returncode == 0, out(r)
    data = json.loads(r.stdout)
    for key in ("ok", "problems", "warnings", "students"):
        assert key in data
    assert data["ok"] is True and data["problems"] == []


# --------------------------------------------------------------------------------------------
# §4 setup: other cases
# --------------------------------------------------------------------------------------------


def test_setup_brings_existing_accounts_in_line(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    h0 = shadow_entry(u0)
    os.chmod(c.home(u0), 0o755)
    subprocess.run(["gpasswd", "-d", u1, c.name], check=True, capture_output=True)
    r = c.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    assert stat.S_IMODE(os.stat(c.home(u0)).st_mode) == 0o700
    assert u1 in grp.getgrnam(c.name).gr_mem
    assert shadow_entry(u0) == h0, "setup changed a password without --reset-passwords"
    assert lines_naming(r, u0) and lines_naming(r, u1)


def test_setup_reset_passwords_updates_rows_in_place(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    before = c.credentials()
    order = [
        row.split(",")[0] for row in (c.state_dir / "credentials.csv").read_text().splitlines()
    ]
    r = c.run("setup", "--yes", "--only", u0, "--reset-passwords")
    assert r.returncode == 0, out(r)
    after = c.credentials()
    assert [
        row.split(",")[0] for row in (c.state_dir / "credentials.csv").read_text().splitlines()
    ] == order
    assert after[u0]["password"] != before[u0]["password"]
    assert after[u1] == before[u1]
    assert crypt_ok(after[u0]["password"], shadow_entry(u0))
    assert not crypt_ok(before[u0]["password"], shadow_entry(u0))
    assert crypt_ok(after[u1]["password"], shadow_entry(u1))
    _, h = hashed_password(c.home(u0))
    assert passwd_check(h, after[u0]["notebook_password"] or after[u0]["password"])
    assert not passwd_check(h, before[u0]["password"])
    assert after[u0]["password"] in (c.state_dir / "handout.html").read_text()
    st = (c.state_dir / "credentials.csv").stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600


def test_setup_separate_notebook_password(course):
    course.write_config(accounts={"notebook_password": "separate"})
    r = course.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    creds = course.credentials()
    for u in course.usernames:
        row = creds[u]
        assert row["notebook_password"] and row["notebook_password"] != row["password"]
        _, h = hashed_password(course.home(u))
        assert passwd_check(h, row["notebook_password"])
        assert not passwd_check(h, row["password"])
        assert crypt_ok(row["password"], shadow_entry(u))


def test_setup_foreign_account_fails_that_student_only(course):
    with foreign_account() as foreign:
        before_pw = pwd.getpwnam(foreign)
        before_shadow = shadow_entry(foreign)
        course.write_roster(roster_rows(course, [f"{foreign},Other,Person,o@x.org"]))
        r = course.run("setup", "--yes")
        assert r.returncode == 1, out(r)
        assert re.match(r"^setup: 2 created, 0 unchanged, 1 failed", summary(r)), summary(r)
        assert foreign in summary(r) or any(
            foreign in line
            for line in r.stdout.splitlines()
            if "fail" in line.lower() or "not" in line.lower()
        ), out(r)
        assert all(user_exists(u) for u in course.usernames)
        assert pwd.getpwnam(foreign) == before_pw
        assert shadow_entry(foreign) == before_shadow
        assert foreign not in grp.getgrnam(course.name).gr_mem
        assert foreign not in course.credentials()


def test_setup_system_account_is_never_touched(course):
    with foreign_account(system=True) as sysacct:
        assert pwd.getpwnam(sysacct).pw_uid < int(login_defs("UID_MIN") or 1000)
        before_shadow = shadow_entry(sysacct)
        course.write_roster(roster_rows(course, [f"{sysacct},Sys,Tem,s@x.org"]))
        r = course.run("setup", "--yes")
        assert r.returncode == 1, out(r)
        assert lines_naming(r, sysacct), out(r)
        assert shadow_entry(sysacct) == before_shadow
        assert sysacct not in grp.getgrnam(course.name).gr_mem


# --------------------------------------------------------------------------------------------
# §4 send
# --------------------------------------------------------------------------------------------


def test_send_copies_owned_by_student(ready_course):
    c = ready_course
    r = c.run("send", "--yes")
    assert r.returncode == 0, out(r)
    assert re.match(r"^send: .*\b0 failed", summary(r)), summary(r)
    for u in c.usernames:
        assert len(lines_naming(r, u)) == 1
        pw = pwd.getpwnam(u)
        for rel in ("lesson.ipynb", "data/numbers.csv"):
            f = c.home(u) / "tutorial" / rel
            assert f.read_bytes() == (c.base / "tutorial" / rel).read_bytes()
            st = f.stat()
            assert st.st_uid == pw.pw_uid
            assert not stat.S_IMODE(st.st_mode) & 0o022
        assert (c.home(u) / "tutorial").stat().st_uid == pw.pw_uid
    r = c.run("send", "--yes")
    assert r.returncode == 0
    assert "nothing to do" in summary(r)
    for u in c.usernames:
        assert not lines_naming(r, u)


def test_send_restore_update_conflict(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    assert c.run("send", "--yes").returncode == 0
    src = c.base / "tutorial"
    t0 = c.home(u0) / "tutorial"
    t1 = c.home(u1) / "tutorial"
    # u0 deletes a file; u1 edits lesson.ipynb and creates own files
    (t0 / "data" / "numbers.csv").unlink()
    write_as(c, u1, t1 / "lesson.ipynb", "MY EDIT\n")
    write_as(c, u1, t1 / "mine.py", "print('mine')\n")
    write_as(c, u1, t1 / "extra.txt", "student's own extra\n")
    # the source changes: lesson.ipynb updated, a new file extra.txt
    (src / "lesson.ipynb").write_text(
        '{"cells": [], "metadata": {"v": 2}, "nbformat": 4, "nbformat_minor": 5}\n'
    )
    (src / "extra.txt").write_text("teacher's extra\n")
    r = c.run("send", "--yes")
    assert r.returncode == 0, out(r)
    # u0: restored and updated
    assert (t0 / "data" / "numbers.csv").read_bytes() == (src / "data" / "numbers.csv").read_bytes()
    assert (t0 / "lesson.ipynb").read_bytes() == (src / "lesson.ipynb").read_bytes()
    assert (t0 / "extra.txt").read_bytes() == (src / "extra.txt").read_bytes()
    assert "restored" in "\n".join(lines_naming(r, u0))
    assert "updated" in "\n".join(lines_naming(r, u0))
    # u1: edits kept; new versions beside them as NAME.new.EXT; conflicts listed
    assert (t1 / "lesson.ipynb").read_text() == "MY EDIT\n"
    assert (t1 / "lesson.new.ipynb").read_bytes() == (src / "lesson.ipynb").read_bytes()
    assert (t1 / "extra.txt").read_text() == "student's own extra\n"
    assert (t1 / "extra.new.txt").read_bytes() == (src / "extra.txt").read_bytes()
    assert (t1 / "mine.py").read_text() == "print('mine')\n"
    assert (t1 / "lesson.new.ipynb").stat().st_uid == pwd.getpwnam(u1).pw_uid
    u1_lines = "\n".join(lines_naming(r, u1))
    assert "conflict" in u1_lines.lower(), u1_lines
    assert "lesson" in out(r)
    # a later change of the source updates the untouched beside file, keeps the edit
    (src / "lesson.ipynb").write_text(
        '{"cells": [], "metadata": {"v": 3}, "nbformat": 4, "nbformat_minor": 5}\n'
    )
    r = c.run("send", "--yes")
    assert r.returncode == 0, out(r)
    assert (t1 / "lesson.ipynb").read_text() == "MY EDIT\n"
    assert (t1 / "lesson.new.ipynb").read_bytes() == (src / "lesson.ipynb").read_bytes()
    assert (t1 / "mine.py").read_text() == "print('mine')\n"
    # the student edits the beside file too: the next version goes to NAME.new2.EXT
    write_as(c, u1, t1 / "lesson.new.ipynb", "I EDITED THE NEW ONE\n")
    (src / "lesson.ipynb").write_text(
        '{"cells": [], "metadata": {"v": 4}, "nbformat": 4, "nbformat_minor": 5}\n'
    )
    r = c.run("send", "--yes")
    assert r.returncode == 0, out(r)
    assert (t1 / "lesson.ipynb").read_text() == "MY EDIT\n"
    assert (t1 / "lesson.new.ipynb").read_text() == "I EDITED THE NEW ONE\n"
    assert (t1 / "lesson.new2.ipynb").read_bytes() == (src / "lesson.ipynb").read_bytes()


def test_send_force_backs_up(ready_course):
    c = ready_course
    u0 = c.usernames[0]
    assert c.run("send", "--yes").returncode == 0
    t0 = c.home(u0) / "tutorial"
    write_as(c, u0, t0 / "lesson.ipynb", "STUDENT VERSION\n")
    write_as(c, u0, t0 / "notes.txt", "my notes\n")
    src = c.base / "tutorial"
    (src / "lesson.ipynb").write_text(
        '{"cells": [], "metadata": {"v": 9}, "nbformat": 4, "nbformat_minor": 5}\n'
    )
    r = c.run("send", "--yes", "--force")
    assert r.returncode == 0, out(r)
    assert (t0 / "lesson.ipynb").read_bytes() == (src / "lesson.ipynb").read_bytes()
    backups = list((t0 / ".backup").glob("*/lesson.ipynb"))
    assert len(backups) == 1, list((t0 / ".backup").rglob("*"))
    assert backups[0].read_text() == "STUDENT VERSION\n"
    assert re.match(r"^\d", backups[0].parent.name), backups[0].parent.name
    assert (t0 / "notes.txt").read_text() == "my notes\n"
    assert not (t0 / "lesson.new.ipynb").exists()


def test_send_source_folder_override_only_and_dry_run(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    other = c.base / "other"
    other.mkdir()
    (other / "sheet.txt").write_text("exercise sheet\n")
    (other / "junk.pyc").write_bytes(b"\0\0")
    r = c.run("send", "--yes", "--source", str(other), "--folder", "week2", "--dry-run")
    assert r.returncode == 0, out(r)
    assert not (c.home(u0) / "week2").exists()
    r = c.run("send", "--yes", "--source", str(other), "--folder", "week2", "--only", u1)
    assert r.returncode == 0, out(r)
    assert (c.home(u1) / "week2" / "sheet.txt").read_text() == "exercise sheet\n"
    assert not (c.home(u1) / "week2" / "junk.pyc").exists(), "[material] exclude ignored"
    assert not (c.home(u1) / "tutorial").exists()
    assert not (c.home(u0) / "week2").exists()
    assert lines_naming(r, u1) and not lines_naming(r, u0)


def test_send_never_follows_student_symlink(ready_course, tmp_path):
    c = ready_course
    u0, u1 = c.usernames
    victim = Path(tempfile.mkdtemp(prefix="victim-", dir="/tmp"))
    try:
        os.chmod(
            victim, 0o777
        )  # even a folder the student could write: nothing may land there as root
        os.symlink(victim, c.home(u0) / "tutorial")
        os.lchown(c.home(u0) / "tutorial", pwd.getpwnam(u0).pw_uid, pwd.getpwnam(u0).pw_gid)
        r = c.run("send", "--yes")
        assert r.returncode in (0, 1), out(r)
        for f in victim.rglob("*"):
            assert f.lstat().st_uid != 0, f"send wrote {f} as root through the student's symlink"
        assert (c.home(u1) / "tutorial" / "lesson.ipynb").is_file()
    finally:
        shutil.rmtree(victim, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# §4 retrieve
# --------------------------------------------------------------------------------------------


def snapshots(dest: Path, u: str) -> list[Path]:
    return sorted(
        p for p in (dest / u).iterdir() if p.name != "latest" and not p.name.startswith(".")
    )


def manifest(dest: Path) -> list[dict]:
    with open(dest / "manifest.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_retrieve_snapshots_latest_hardlinks_manifest(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    assert c.run("send", "--yes").returncode == 0
    dest = c.base / "submissions"
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, out(r)
    assert re.match(r"^retrieve: .*\b0 failed", summary(r)), summary(r)
    for u in c.usernames:
        snaps = snapshots(dest, u)
        assert len(snaps) == 1, snaps
        latest = dest / u / "latest"
        assert latest.is_symlink()
        assert latest.resolve() == snaps[0].resolve()
        f = snaps[0] / "lesson.ipynb"
        assert f.read_bytes() == (c.home(u) / "tutorial" / "lesson.ipynb").read_bytes()
        assert (snaps[0] / "data" / "numbers.csv").is_file()
        st = f.stat()
        assert st.st_uid == 0  # owner default: the sudo caller, else root
        assert not stat.S_IMODE(st.st_mode) & 0o222, "retrieved files are not read-only"
    header = (dest / "manifest.csv").read_text().splitlines()[0].split(",")
    for col in ("username", "snapshot", "path", "size", "mtime", "sha256", "status", "late"):
        assert col in header, header
    rows = manifest(dest)
    first = [row for row in rows if row["username"] == u0]
    assert {row["path"] for row in first} >= {"lesson.ipynb", "data/numbers.csv"}
    for row in first:
        data = (c.home(u0) / "tutorial" / row["path"]).read_bytes()
        assert row["status"] == "new"
        assert int(row["size"]) == len(data)
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["snapshot"] == snapshots(dest, u0)[0].name
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d)?.*([+-]\d\d:?\d\d|Z)$", row["mtime"]), (
            row["mtime"]
        )

    # nothing changed: no new snapshot
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0
    assert "nothing to do" in summary(r)
    assert len(snapshots(dest, u0)) == 1

    # u0 edits one file: a new snapshot, unchanged files are hard links
    old = snapshots(dest, u0)[0]
    write_as(c, u0, c.home(u0) / "tutorial" / "lesson.ipynb", "EDITED\n")
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, out(r)
    assert lines_naming(r, u0) and not lines_naming(r, u1)
    snaps = snapshots(dest, u0)
    assert len(snaps) == 2
    new = [s for s in snaps if s != old][0]
    assert (dest / u0 / "latest").resolve() == new.resolve()
    assert (new / "lesson.ipynb").read_text() == "EDITED\n"
    assert (old / "lesson.ipynb").read_bytes() != b"EDITED\n"
    assert (new / "data" / "numbers.csv").stat().st_ino == (
        old / "data" / "numbers.csv"
    ).stat().st_ino
    assert (new / "lesson.ipynb").stat().st_ino != (old / "lesson.ipynb").stat().st_ino
    assert len(snapshots(dest, u1)) == 1
    rows = [row for row in manifest(dest) if row["username"] == u0 and row["snapshot"] == new.name]
    status_by_path = {row["path"]: row["status"] for row in rows}
    assert status_by_path.get("lesson.ipynb") == "changed", status_by_path
    assert status_by_path.get("data/numbers.csv") == "unchanged", status_by_path


def test_retrieve_deadline_marks_late_and_size_limit(ready_course):
    c = ready_course
    u0 = c.usernames[0]
    c.write_config(retrieve={"max_file_size": "1K"})
    assert c.run("send", "--yes").returncode == 0
    t0 = c.home(u0) / "tutorial"
    write_as(c, u0, t0 / "big.bin", b"x" * 4096)
    os.utime(t0 / "data" / "numbers.csv", (1577836800, 1577836800))  # 2020-01-01
    # SPEC 6.10: late means the student changed it after the deadline (now), not a new mtime
    write_as(c, u0, t0 / "lesson.ipynb", (t0 / "lesson.ipynb").read_bytes() + b"\n")
    r = c.run("retrieve", "--yes", "--only", u0, "--deadline", "2021-06-01 12:00")
    assert r.returncode == 0, out(r)
    dest = c.base / "submissions"
    rows = {row["path"]: row for row in manifest(dest) if row["username"] == u0}
    assert rows["lesson.ipynb"]["late"] == "late", rows["lesson.ipynb"]
    assert rows["data/numbers.csv"]["late"] == "", rows["data/numbers.csv"]
    assert rows["big.bin"]["status"].startswith("skipped"), rows["big.bin"]
    assert not (dest / u0 / "latest" / "big.bin").exists()
    assert not (dest / c.usernames[1]).exists()


def test_retrieve_bad_deadline_is_exit_2(ready_course):
    r = ready_course.run("retrieve", "--yes", "--deadline", "next tuesday")
    assert r.returncode == 2, out(r)
    assert not (ready_course.base / "submissions").exists()


def test_retrieve_no_folder_is_not_a_failure_and_owner(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    c.write_config(retrieve={"owner": "nobody"})
    write_as(c, u0, c.home(u0) / "tutorial" / "work.py", "x = 1\n")
    r = c.run("retrieve", "--yes")
    assert r.returncode == 0, out(r)
    f = c.base / "submissions" / u0 / "latest" / "work.py"
    assert f.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert not (c.base / "submissions" / u1 / "latest").exists()


def test_retrieve_never_follows_symlinks(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    assert c.run("send", "--yes").returncode == 0
    write_as(c, u1, c.home(u1) / "tutorial" / "private.txt", "u1 secret work\n")
    t0 = c.home(u0) / "tutorial"
    uid, gid = pwd.getpwnam(u0).pw_uid, pwd.getpwnam(u0).pw_gid
    for name, target in (
        ("shadow", "/etc/shadow"),
        ("other", str(c.home(u1) / "tutorial")),
        ("root", "/"),
    ):
        os.symlink(target, t0 / name)
        os.lchown(t0 / name, uid, gid)
    r = c.run("retrieve", "--yes", "--only", u0)
    assert r.returncode in (0, 1), out(r)
    shadow = Path("/etc/shadow").read_bytes()
    for f in (c.base / "submissions").rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            assert data != shadow and b"root:" not in data, f
            assert b"u1 secret work" not in data, f
    rows = {row["path"]: row for row in manifest(c.base / "submissions") if row["username"] == u0}
    assert rows.get("shadow", {}).get("status", "").startswith("skipped"), rows.get("shadow")


# --------------------------------------------------------------------------------------------
# §4 remove
# --------------------------------------------------------------------------------------------


def test_remove_prompt_declined_is_exit_3(ready_course):
    c = ready_course
    for answer in ("n\n", ""):
        r = c.run("remove", input=answer)
        assert r.returncode == 3, out(r)
        for u in c.usernames:
            assert u in out(r), "the prompt does not list the students"
            assert user_exists(u) and c.home(u).is_dir()
    assert group_exists(c.name)
    assert (
        not list((c.state_dir / "archive").glob("*.tar.gz"))
        if (c.state_dir / "archive").exists()
        else True
    )


def test_remove_archives_kills_deletes(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    assert c.run("send", "--yes").returncode == 0
    write_as(c, u0, c.home(u0) / "tutorial" / "homework.py", "answer = 42\n")
    uids = {u: pwd.getpwnam(u).pw_uid for u in c.usernames}
    sleeper = student_process(u0, "sleep", "600")
    try:
        time.sleep(0.3)
        assert psutil.Process(sleeper.pid).uids().real == uids[u0]
        r = c.run("remove", input="y\n")
        assert r.returncode == 0, out(r)
        assert summary(r) == "remove: 2 removed, 0 unchanged, 0 failed", summary(r)
        with contextlib.suppress(subprocess.TimeoutExpired):
            sleeper.wait(timeout=10)
        assert sleeper.poll() is not None, "remove left the student's process running"
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    for u in c.usernames:
        assert not user_exists(u)
        assert not c.home(u).exists()
        assert not any(p.uids().real == uids[u] for p in psutil.process_iter() if _alive(p))
        archives = list((c.state_dir / "archive").glob(f"{u}-*.tar.gz"))
        assert len(archives) == 1, list((c.state_dir / "archive").iterdir())
        st = archives[0].stat()
        assert st.st_uid == 0 and not stat.S_IMODE(st.st_mode) & 0o077
        with tarfile.open(archives[0]) as tf:
            names = tf.getnames()
        assert any(n.endswith("tutorial/lesson.ipynb") for n in names), names
        if u == u0:
            assert any(n.endswith("tutorial/homework.py") for n in names), names
    assert not group_exists(c.name), f"{describe_group(c.name)}; remove said: {out(r)}"
    st = status(c)
    assert all(row["account"] == "missing" for row in st.values())
    r = c.run("remove", "--yes")
    assert r.returncode == 0, out(r)
    assert re.match(r"^remove: (0 removed, )?2 unchanged, 0 failed", summary(r)), summary(r)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_remove_only_keeps_group_until_empty(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    r = c.run("remove", "--yes", "--only", u0)
    assert r.returncode == 0, out(r)
    assert not user_exists(u0) and user_exists(u1)
    assert group_exists(c.name)
    st = status(c)
    assert st[u0]["account"] == "missing" and st[u1]["account"] == "ok"
    r = c.run("remove", "--yes")
    assert r.returncode == 0, out(r)
    assert not user_exists(u1)
    assert not group_exists(c.name)


def test_remove_refuses_foreign_account(ready_course):
    c = ready_course
    with foreign_account() as foreign:
        c.write_roster(roster_rows(c, [f"{foreign},Other,Person,o@x.org"]))
        st = status(c)
        assert st[foreign]["account"] == "foreign"
        r = c.run("remove", "--yes")
        assert r.returncode == 3, out(r)
        assert foreign in out(r)
        assert user_exists(foreign)
        for u in c.usernames:
            assert user_exists(u) and c.home(u).is_dir()
        assert not (c.state_dir / "archive").exists() or not list(
            (c.state_dir / "archive").iterdir()
        )
        r = c.run("remove", "--yes", "--only", foreign)
        assert r.returncode == 3, out(r)
        assert user_exists(foreign)


def test_status_missing_before_setup(course):
    st = status(course)
    assert set(st) == set(course.usernames)
    for row in st.values():
        assert row["account"] == "missing" and row["server"] == "stopped"


# --------------------------------------------------------------------------------------------
# §4 check
# --------------------------------------------------------------------------------------------


def test_check_changes_nothing_and_reports_problems(course):
    r = course.run("check")
    assert r.returncode == 0, out(r)
    assert not course.state_dir.exists(), "check created the state folder"
    assert not group_exists(course.name)
    shutil.rmtree(course.base / "tutorial")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(course.sections["launch"]["portal_port"])))
        s.listen()
        r = course.run("check", "--json")
        assert r.returncode == 2, out(r)
        data = json.loads(r.stdout)
        assert data["ok"] is False
        assert "tutorial" in json.dumps(data["problems"]), data
        # a port in use may be a running portal of this very course: a warning is enough
        findings = json.dumps(data["problems"] + data["warnings"])
        assert course.sections["launch"]["portal_port"] in findings, data


def test_check_without_root():
    with world_readable_course() as c:
        r = run_as_nobody("check", str(c.config))
        assert r.returncode == 0, out(r)
        r = run_as_nobody("check", str(c.config), "--json")
        assert r.returncode == 0, out(r)
        assert json.loads(r.stdout)["students"] == 2
        c.write_roster(["1bad,A,B,c"])
        r = run_as_nobody("check", str(c.config))
        assert r.returncode == 2, out(r)
        assert line_mentioned(out(r), 2)


def test_status_without_root_shows_accounts():
    with world_readable_course() as c:
        r = c.run("setup", "--yes")
        assert r.returncode == 0, out(r)
        r = run_as_nobody("status", str(c.config), "--json")
        assert r.returncode == 0, out(r)
        rows = json.loads(r.stdout)
        assert sorted(row["username"] for row in rows) == sorted(c.usernames)
        assert all(row["account"] == "ok" for row in rows), rows
        r = run_as_nobody("remove", str(c.config), "--dry-run")
        assert r.returncode == 0, out(r)
        assert all(user_exists(u) for u in c.usernames)


# --------------------------------------------------------------------------------------------
# §4 launch, status, shutdown, hooks, portal
# --------------------------------------------------------------------------------------------


def _shutdown(c: TestCourse) -> None:
    with contextlib.suppress(Exception):
        c.run("shutdown", "--yes", timeout=120, check_traceback=False)


def test_launch_status_shutdown_with_hooks(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    log = c.base / "hooks.log"
    pre = c.base / "pre.sh"
    pre.write_text(f'#!/bin/sh\necho "pre $1 $NB_USER $NB_HOME $NB_PORT $NB_COURSE" >> {log}\n')
    post = c.base / "post.sh"
    post.write_text(f'#!/bin/sh\necho "post $1 $NB_USER $NB_HOME $NB_PORT $NB_COURSE" >> {log}\n')
    os.chmod(pre, 0o755)
    os.chmod(post, 0o755)
    c.write_config(hooks={"pre_spawn": str(pre), "post_stop": str(post)}, launch={"app": "server"})
    assert c.run("send", "--yes").returncode == 0
    try:
        r = c.run(
            "launch", "--yes", "--no-portal", env={"ACCEPTANCE_MARKER": "leak-me"}, timeout=180
        )
        assert r.returncode == 0, out(r)
        assert re.match(r"^launch: ", summary(r)), summary(r)
        st = status(c)
        creds = c.credentials()
        for u in c.usernames:
            row = st[u]
            assert row["server"] == "running", row
            assert isinstance(row["port"], int) and isinstance(row["pid"], int), row
            assert isinstance(row["url"], str) and str(row["port"]) in row["url"], row
            assert str(row["port"]) in r.stdout, "launch did not print the student's address"
            p = psutil.Process(row["pid"])
            pw = pwd.getpwnam(u)
            assert p.uids().real == pw.pw_uid and p.uids().effective == pw.pw_uid
            assert p.gids().real == pw.pw_gid
            allowed = {g.gr_gid for g in grp.getgrall() if u in g.gr_mem} | {pw.pw_gid}
            groups = (
                Path(f"/proc/{p.pid}/status")
                .read_text()
                .split("Groups:")[1]
                .splitlines()[0]
                .split()
            )
            assert {int(g) for g in groups} <= allowed, groups
            env = Path(f"/proc/{p.pid}/environ").read_bytes()
            assert b"ACCEPTANCE_MARKER" not in env, "the server inherited root's environment"
            assert os.getsid(p.pid) != os.getsid(0)
            for fd in Path(f"/proc/{p.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    assert not target.startswith(str(c.state_dir)) or target.endswith(".log"), (
                        target
                    )
            assert answers(row["port"])
            # the handed-out password opens the student's own server
            login(row["port"], creds[u]["notebook_password"] or creds[u]["password"], f"/user/{u}/")
        assert st[u0]["port"] != st[u1]["port"]
        hook_lines = log.read_text().splitlines()
        for u in c.usernames:
            line = next(x for x in hook_lines if x.startswith(f"pre {u} "))
            _, arg, nb_user, nb_home, nb_port, nb_course = line.split()
            assert arg == nb_user == u
            assert nb_home == str(c.home(u))
            assert nb_port == str(st[u]["port"])
            assert nb_course == c.name

        # a kernel, so shutdown has to stop it too
        s = login(
            st[u0]["port"], creds[u0]["notebook_password"] or creds[u0]["password"], f"/user/{u0}/"
        )
        k = s.post(f"http://127.0.0.1:{st[u0]['port']}/user/{u0}/api/kernels", json={}, timeout=60)
        assert k.status_code in (200, 201), k.text
        time.sleep(2)
        server = psutil.Process(st[u0]["pid"])
        # the server and every process of the student's: an exec'd kernel is the server's
        # child, a forked one (kernel_mode = fork) the course's kernel server's
        uid = pwd.getpwnam(u0).pw_uid
        family = [server] + [
            q
            for q in psutil.process_iter(["uids"])
            if q.info["uids"] and q.info["uids"].real == uid and q.pid != server.pid
        ]
        assert len(family) >= 2, "no kernel process started"

        # launching again leaves running servers alone
        r = c.run("launch", "--yes", "--no-portal", timeout=180)
        assert r.returncode == 0, out(r)
        st2 = status(c)
        assert {u: st2[u]["pid"] for u in c.usernames} == {u: st[u]["pid"] for u in c.usernames}
        assert re.search(r"\b2 unchanged\b", summary(r)), summary(r)

        r = c.run("shutdown", "--yes", timeout=120)
        assert r.returncode == 0, out(r)
        assert re.match(r"^shutdown: ", summary(r)), summary(r)
        for u in c.usernames:
            assert lines_naming(r, u)
        time.sleep(0.5)
        for p in family:
            assert not _alive(p), f"{p.pid} ({p.name()}) still runs after shutdown"
        for u in c.usernames:
            assert not psutil.pid_exists(st[u]["pid"]) or not _alive(psutil.Process(st[u]["pid"]))
            assert port_free(st[u]["port"])
        st3 = status(c)
        assert all(row["server"] == "stopped" and row["pid"] is None for row in st3.values()), st3
        post_lines = [x for x in log.read_text().splitlines() if x.startswith("post ")]
        assert {x.split()[1] for x in post_lines} == set(c.usernames)
        r = c.run("shutdown", "--yes")
        assert r.returncode == 0
        assert "nothing to do" in summary(r), summary(r)
    finally:
        _shutdown(c)


def test_launch_prespawn_failure_and_module_hook(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    log = c.base / "module-hook.log"
    (c.base / "acc_hooks.py").write_text(
        "def pre(spawner):\n"
        f"    if spawner.user.name == {u1!r}:\n"
        "        raise RuntimeError('no server for you today')\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(f'{spawner.user.name} {spawner.home} {spawner.port}\\n')\n"
    )
    c.write_config(
        hooks={"pre_spawn": "acc_hooks:pre"},
        launch={"app": "server", "server_address": "class.example.org"},
    )
    try:
        r = c.run("launch", "--yes", "--no-portal", timeout=180)
        assert r.returncode == 1, out(r)
        assert re.search(r"\b1 failed\b", summary(r)), summary(r)
        assert any(
            u1 in line and "no server for you today" in line for line in out(r).splitlines()
        ), "the failure is not named with its reason"
        st = status(c)
        assert st[u0]["server"] == "running" and st[u1]["server"] == "stopped", st
        name, home, port = log.read_text().split()
        assert name == u0 and home == str(c.home(u0)) and port == str(st[u0]["port"])
        assert "class.example.org" in st[u0]["url"], st[u0]["url"]
        assert f"class.example.org:{st[u0]['port']}" in r.stdout, r.stdout
    finally:
        _shutdown(c)


def test_portal(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    portal_port = int(c.sections["launch"]["portal_port"])
    c.write_config(launch={"app": "server", "title": "Acceptance Course Title"})
    proc = subprocess.Popen(
        [PYTHON, str(NOTEBOOKS), "launch", str(c.config), "--yes", "--only", u0],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{portal_port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise AssertionError("portal never answered")
        h = requests.get(f"{base}/healthz", timeout=5)
        assert h.json()["status"] == "ok" and h.json()["running"] == 1, h.text
        page = requests.get(f"{base}/", timeout=5)
        assert page.status_code == 200
        assert "Acceptance Course Title" in page.text
        assert u0 not in page.text and u1 not in page.text, "the portal lists the students"
        assert "<form" in page.text.lower()
        st = status(c)
        port = st[u0]["port"]
        r = requests.get(f"{base}/user/{u0}", timeout=5, allow_redirects=False)
        assert r.status_code in (301, 302, 303, 307), r.status_code
        assert f":{port}" in r.headers["Location"], r.headers["Location"]
        r = requests.get(
            f"{base}/user/{u0}",
            timeout=5,
            allow_redirects=False,
            headers={"Host": "classroom.example.org:9999"},
        )
        assert r.headers["Location"].startswith(
            ("http://classroom.example.org:", "https://classroom.example.org:")
        ), r.headers
        # the form
        m = re.search(r"<form[^>]*action=\"([^\"]*)\"[^>]*>", page.text, re.I)
        method = re.search(r"<form[^>]*method=\"(\w+)\"", page.text, re.I)
        field = re.search(r"<input[^>]*name=\"(\w+)\"", page.text, re.I)
        assert field, page.text
        action = (m.group(1) if m else "/") or "/"
        verb = method.group(1).lower() if method else "get"
        url = requests.compat.urljoin(base + "/", action)
        if verb == "post":
            r = requests.post(
                url, data={field.group(1): f"  {u0.upper()} "}, timeout=5, allow_redirects=False
            )
        else:
            r = requests.get(
                url, params={field.group(1): f"  {u0.upper()} "}, timeout=5, allow_redirects=False
            )
        if r.status_code in (301, 302, 303, 307) and f":{port}" not in r.headers["Location"]:
            r = requests.get(
                requests.compat.urljoin(url, r.headers["Location"]),
                timeout=5,
                allow_redirects=False,
            )
        assert r.status_code in (302, 303, 307), (r.status_code, r.text[:200])
        assert f":{port}" in r.headers["Location"]
        # a stopped server and an unknown user: friendly 404, never a redirect
        for who in (u1, "tnobodyhere", "..%2f..%2fetc", "//evil.com"):
            r = requests.get(f"{base}/user/{who}", timeout=5, allow_redirects=False)
            assert r.status_code == 404, (who, r.status_code, r.headers.get("Location"))
            assert "Location" not in r.headers
        # SIGTERM stops the portal and leaves the servers running
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        st = status(c)
        assert st[u0]["server"] == "running"
        assert answers(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _shutdown(c)


def test_lock_second_command_exits_3_and_names_holder(ready_course):
    c = ready_course
    started = c.base / "hook-started"
    slow = c.base / "slow.sh"
    slow.write_text(f"#!/bin/sh\ntouch {started}\nsleep 8\nexit 1\n")
    os.chmod(slow, 0o755)
    c.write_config(hooks={"pre_spawn": str(slow)})
    before = (c.state_dir / "credentials.csv").read_bytes()
    proc = subprocess.Popen(
        [
            PYTHON,
            str(NOTEBOOKS),
            "launch",
            str(c.config),
            "--yes",
            "--no-portal",
            "--only",
            c.usernames[0],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not started.exists():
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        for command in ("setup", "shutdown", "remove"):
            args = ("--yes", "--reset-passwords") if command == "setup" else ("--yes",)
            r = c.run(command, *args, timeout=30)
            assert r.returncode == 3, (command, out(r))
            assert "launch" in out(r), out(r)
            assert str(proc.pid) in out(r), out(r)
        assert (c.state_dir / "credentials.csv").read_bytes() == before
        assert all(user_exists(u) for u in c.usernames)
        proc.wait(timeout=60)
        assert proc.returncode == 1, proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _shutdown(c)


# --------------------------------------------------------------------------------------------
# more promises: --only everywhere, refusals, ports, died, --stop-on-exit, --all-jupyter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", CHANGING)
def test_only_not_in_roster_is_exit_2_for_every_command(course, command):
    r = course.run(command, "--yes", "--only", "tnotinroster", timeout=60)
    assert r.returncode == 2, out(r)
    assert "tnotinroster" in out(r)
    assert not group_exists(course.name)


def test_gecos_is_sanitised(course):
    u0, u1 = course.usernames
    course.write_roster(
        [f"{u0},Lovelace: Countess,Ada, Augusta,a@x.org", f"{u1},Hopper,Grace,g@x.org"]
    )
    course.roster.write_text(
        "username,surname,name,email\n"
        f'{u0},"Lovelace: Countess","Ada, Augusta",a@x.org\n'
        f"{u1},Hopper,Grace,g@x.org\n"
    )
    r = course.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    gecos = pwd.getpwnam(u0).pw_gecos
    assert ":" not in gecos and "," not in gecos, gecos
    assert "Ada" in gecos and "Lovelace" in gecos
    assert pwd.getpwnam(u1).pw_shell == "/bin/bash"  # /etc/passwd still parses


def test_setup_password_length(course):
    course.write_config(accounts={"password_length": "16"})
    assert course.run("setup", "--yes").returncode == 0
    for row in course.credentials().values():
        assert len(row["password"]) == 16


def test_setup_refuses_existing_home_path(course):
    u0, u1 = course.usernames
    squat = course.home(u0)
    squat.mkdir()
    (squat / ".bashrc").write_text("echo planted\n")
    os.chown(squat, 65534, 65534)
    r = course.run("setup", "--yes")
    assert r.returncode == 1, out(r)
    assert lines_naming(r, u0)
    assert (
        not user_exists(u0) or pwd.getpwnam(u0).pw_dir != str(squat) or squat.stat().st_uid == 65534
    )
    assert squat.stat().st_uid == 65534 and (squat / ".bashrc").read_text() == "echo planted\n"
    assert user_exists(u1)


def test_setup_refuses_unsafe_home_base_and_state_dir(course):
    os.chmod(course.home_base, 0o777)
    r = course.run("setup", "--yes")
    assert r.returncode == 2, out(r)
    assert str(course.home_base) in out(r)
    assert not any(user_exists(u) for u in course.usernames)
    os.chmod(course.home_base, 0o755)
    other_state = course.base / "other-state"
    other_state.mkdir()
    (other_state / "something").write_text("x")
    os.chmod(other_state, 0o755)
    course.write_config(course={"state_dir": str(other_state)})
    r = course.run("setup", "--yes")
    assert r.returncode == 2, out(r)
    assert not any(user_exists(u) for u in course.usernames)
    assert not group_exists(course.name)


def test_send_keeps_source_mtimes_and_skips_source_symlinks(ready_course):
    c = ready_course
    src = c.base / "tutorial"
    os.utime(src / "lesson.ipynb", (1600000000, 1600000000))
    os.symlink("/etc/shadow", src / "link-to-shadow")
    r = c.run("send", "--yes")
    assert r.returncode in (0, 1), out(r)
    assert "link-to-shadow" in out(r), "the skipped symlink is not reported"
    for u in c.usernames:
        t = c.home(u) / "tutorial"
        assert int((t / "lesson.ipynb").stat().st_mtime) == 1600000000
        assert not (t / "link-to-shadow").exists() and not (t / "link-to-shadow").is_symlink()


def test_retrieve_folder_modes_and_sudo_caller_owner(ready_course):
    c = ready_course
    u0 = c.usernames[0]
    assert c.run("send", "--yes").returncode == 0
    r = c.run("retrieve", "--yes", env={"SUDO_USER": "nobody"})
    assert r.returncode == 0, out(r)
    dest = c.base / "submissions"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert stat.S_IMODE((dest / u0).stat().st_mode) == 0o700
    f = dest / u0 / "latest" / "lesson.ipynb"
    assert f.stat().st_uid == pwd.getpwnam("nobody").pw_uid


def test_remove_keeps_account_when_archive_fails(ready_course):
    c = ready_course
    blocker = c.base / "not-a-folder"
    blocker.write_text("x")
    c.write_config(remove={"archive_dir": str(blocker / "archive")})
    r = c.run("remove", "--yes")
    assert r.returncode != 0, out(r)
    for u in c.usernames:
        assert user_exists(u) and c.home(u).is_dir()


def test_shutdown_all_jupyter(ready_course):
    c = ready_course
    u0 = c.usernames[0]
    stray = student_process(u0, "bash", "-c", "exec -a jupyter-notebook sleep 600")
    try:
        time.sleep(0.3)
        assert "jupyter" in " ".join(psutil.Process(stray.pid).cmdline())
        r = c.run("shutdown", "--yes")
        assert r.returncode == 0, out(r)
        time.sleep(0.2)
        assert stray.poll() is None, (
            "shutdown without --all-jupyter stopped a process the course did not start"
        )
        r = c.run("shutdown", "--yes", "--all-jupyter")
        assert r.returncode == 0, out(r)
        with contextlib.suppress(subprocess.TimeoutExpired):
            stray.wait(timeout=20)
        assert stray.poll() is not None, "--all-jupyter left the student's jupyter process running"
    finally:
        if stray.poll() is None:
            stray.kill()


def test_ports_died_stop_on_exit(ready_course):
    c = ready_course
    u0, u1 = c.usernames
    first = int(c.sections["launch"]["first_port"])
    portal_port = int(c.sections["launch"]["portal_port"])
    c.write_config(launch={"app": "server"}, hooks={"post_stop": str(c.base / "failing-post.sh")})
    (c.base / "failing-post.sh").write_text("#!/bin/sh\necho post-hook-broke >&2\nexit 7\n")
    os.chmod(c.base / "failing-post.sh", 0o755)
    squatter = socket.socket()
    squatter.bind(("0.0.0.0", first))
    squatter.listen()
    proc = None
    try:
        r = c.run("launch", "--yes", "--no-portal", "--only", u0, timeout=180)
        assert r.returncode == 0, out(r)
        st = status(c)
        port = st[u0]["port"]
        assert port != first, "a port in use was handed out"
        assert port != portal_port
        # the server dies: status says so, and the next launch starts it again on the same port
        os.kill(st[u0]["pid"], signal.SIGKILL)
        deadline = time.time() + 10
        while (
            psutil.pid_exists(st[u0]["pid"])
            and _alive(psutil.Process(st[u0]["pid"]))
            and time.time() < deadline
        ):
            time.sleep(0.1)
        time.sleep(0.5)
        assert status(c)[u0]["server"] == "died"
        # with the portal and --stop-on-exit: SIGTERM stops the servers too
        proc = subprocess.Popen(
            [
                PYTHON,
                str(NOTEBOOKS),
                "launch",
                str(c.config),
                "--yes",
                "--only",
                u0,
                "--stop-on-exit",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            with contextlib.suppress(requests.RequestException):
                h = requests.get(f"http://127.0.0.1:{portal_port}/healthz", timeout=2)
                if h.status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise AssertionError("portal never answered")
        assert u0 not in h.text, "healthz names students"
        st2 = status(c)
        assert st2[u0]["server"] == "running" and st2[u0]["port"] == port, (port, st2[u0])
        r404 = requests.get(
            f"http://127.0.0.1:{portal_port}/user/{u1}", timeout=5, allow_redirects=False
        )
        assert r404.status_code == 404 and "<form" in r404.text.lower()
        pid = st2[u0]["pid"]
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        assert str(portal_port) in stdout + stderr, "launch did not print the portal's address"
        assert not psutil.pid_exists(pid) or not _alive(psutil.Process(pid)), (
            "--stop-on-exit left the server"
        )
        assert status(c)[u0]["server"] == "stopped"
        assert (
            "post" in (stdout + stderr).lower()
            and "7" in stdout + stderr
            or "post-hook-broke" in stdout + stderr
        ), "a failing post_stop hook is not reported"
    finally:
        squatter.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        _shutdown(c)


def test_roster_semicolons_load_and_empty_is_refused(course):
    u0, u1 = course.usernames
    course.roster.write_text(f"username;name\n{u0};Ada\n{u1};Grace\n")  # SPEC 6.6: detected
    r = course.run("setup", "--dry-run")
    assert r.returncode == 0, out(r)
    assert u0 in out(r) and u1 in out(r)
    course.roster.write_text("")
    r = course.run("setup", "--yes")
    assert r.returncode == 2, out(r)
    assert "students.csv" in out(r)
    assert not any(user_exists(u) for u in course.usernames)


def test_retrieve_refuses_unsafe_destination_and_student_owner(ready_course):
    c = ready_course
    u0 = c.usernames[0]
    shared_dir = c.base / "public"
    shared_dir.mkdir()
    os.chmod(shared_dir, 0o777)
    c.write_config(retrieve={"destination": str(shared_dir / "subs")})
    r = c.run("retrieve", "--yes")
    assert r.returncode == 2, out(r)
    assert not (shared_dir / "subs").exists()
    c.write_config(retrieve={"destination": "submissions", "owner": u0})
    r = c.run("retrieve", "--yes")
    assert r.returncode == 2, out(r)
    c.write_config(retrieve={"owner": "tnosuchuser"})
    r = c.run("retrieve", "--yes")
    assert r.returncode == 2, out(r)
    assert not (c.base / "submissions").exists()


def test_notebooks_py_with_system_python():
    r = subprocess.run(
        ["/usr/bin/python3", str(NOTEBOOKS), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, out(r)
