"""A term as a teacher lives it (issue 15, SPEC §6.10), through the command line only.

Dropped students, password resets on running servers, Ctrl-C at any moment,
late work, a `check` that predicts refusals, and messages in the teacher's
terms. Every test makes a throw-away course with real random accounts under a
temporary home base and state folder (conftest), and cleans up after itself,
also what a half-made account could leave behind (a group without its user).
"""

from __future__ import annotations

import contextlib
import csv
import grp
import hashlib
import html
import json
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.parse
from pathlib import Path

import psutil
import pytest
import requests
from conftest import (
    NOTEBOOKS,
    PYTHON,
    ROOT,
    TestCourse,
    crypt_ok,
    describe_group,
    group_exists,
    needs_root,
    random_name,
    run_as_nobody,
    run_cli,
    status,
    user_exists,
)
from students import find_hashed_password, write_as

pytestmark = needs_root

# How many times the interrupted-setup test presses Ctrl-C (SPEC §6.10; issue 15 asks 20).
INTERRUPTIONS = 20
INTERRUPTED_CLASS = 40


# --------------------------------------------------------------------------------------------
# helpers (kept here: this file is self-contained on top of conftest and students)
# --------------------------------------------------------------------------------------------


def out(r: subprocess.CompletedProcess) -> str:
    return r.stdout + r.stderr


def naming(text: str, username: str) -> list[str]:
    """The lines of ``text`` that name ``username`` as a word."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(username)}(?![\w-])")
    return [line for line in text.splitlines() if pattern.search(line)]


def shadow() -> dict[str, str]:
    entries = {}
    for line in Path("/etc/shadow").read_text().splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            entries[parts[0]] = parts[1]
    return entries


def http_answers(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=3, allow_redirects=False)
    except requests.RequestException:
        return False
    return True


def wait_until(predicate, seconds: float, step: float = 0.2) -> bool:
    """Poll ``predicate`` for up to ``seconds`` (a robustness bound, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


def server_path(row: dict) -> str:
    """The base path of a student's server, from its status URL ('/' or '/user/NAME/')."""
    path = urllib.parse.urlsplit(row.get("url") or "").path or "/"
    return path if path.endswith("/") else path + "/"


def login_works(row: dict, password: str) -> bool:
    """True if ``password`` logs in to the student's server (GET /login, POST with _xsrf)."""
    base = f"http://127.0.0.1:{row['port']}{server_path(row)}"
    s = requests.Session()
    try:
        s.get(base + "login", timeout=10)
        xsrf = s.cookies.get("_xsrf", "")
        r = s.post(
            base + "login",
            data={"password": password, "_xsrf": xsrf},
            timeout=10,
            allow_redirects=False,
        )
    except requests.RequestException:
        return False
    return r.status_code in (302, 303) and "/login" not in r.headers.get("Location", "")


def jupyter_password(row: dict) -> str:
    """What a student types into their server's login form (notebook_password = same or separate)."""
    return row.get("notebook_password") or row["password"]


def start_cli(*args: str) -> subprocess.Popen:
    """``notebooks.py ARGS`` in its own session, as in a teacher's terminal (Ctrl-C = killpg)."""
    env = {k: v for k, v in os.environ.items() if k != "NOTEBOOKS_CONFIG"}
    return subprocess.Popen(
        [PYTHON, str(NOTEBOOKS), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def ctrl_c(proc: subprocess.Popen) -> None:
    """What Ctrl-C does: SIGINT to every process of the terminal's foreground group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"notebooks.py did not exit within {timeout}s after the signal")


def quiet_shutdown(c: TestCourse) -> None:
    with contextlib.suppress(Exception):
        c.run("shutdown", "--yes", timeout=120, check_traceback=False)


def manifest(dest: Path) -> list[dict]:
    with open(dest / "manifest.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def roster_rows(usernames: list[str]) -> list[str]:
    return [f"{u},Surname{i},Name{i},{u}@example.org" for i, u in enumerate(usernames)]


def wait_portal(proc: subprocess.Popen, port: int) -> None:
    def up() -> bool:
        assert proc.poll() is None, "launch exited before the portal answered"
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    assert wait_until(up, 180, 0.3), "the portal never answered"


@pytest.fixture
def term(make_course):
    """``term(n)``: a course of n students; on teardown also stops its servers and deletes what
    a half-made account of the course can leave behind (a group named after a student without
    the student)."""
    yield make_course
    for c in make_course.made:
        quiet_shutdown(c)
        c.cleanup()
        for name in [*c.usernames, *c.extra_users]:
            if group_exists(name) and not user_exists(name):
                subprocess.run(["groupdel", "--", name], capture_output=True, check=False)


@contextlib.contextmanager
def foreign_account(group: str | None = None):
    """An account the course did not create (random test name), optionally in ``group``."""
    name = random_name()
    cmd = ["useradd", "-N", "--no-create-home", "--shell", "/bin/sh"]
    if group:
        cmd += ["--gid", group]
    subprocess.run([*cmd, "--", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", "-f", "--", name], capture_output=True, check=False)
        if group_exists(name):
            subprocess.run(["groupdel", "--", name], capture_output=True, check=False)


# --------------------------------------------------------------------------------------------
# 1. a dropped student is still the course's
# --------------------------------------------------------------------------------------------


def drop_from_roster(c: TestCourse, *dropped: str) -> None:
    """The teacher deletes these students' rows from the roster mid-term."""
    c.write_roster(roster_rows([u for u in c.usernames if u not in dropped]))


def test_dropped_students_are_listed_and_warned_about(term):
    c = term(3)
    u0, u1, u2 = c.usernames
    r = c.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    drop_from_roster(c, u1, u2)

    st = status(c)
    for u in (u1, u2):
        assert u in st, f"status forgot the dropped student {u}: {sorted(st)}"
        assert st[u]["in_roster"] is False, st[u]
        assert st[u]["account"] == "ok", st[u]
    assert st[u0]["in_roster"] is True, st[u0]

    # setup and check warn about them, and say what to run
    r = c.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    for u in (u1, u2):
        said = naming(out(r), u)
        assert said, f"setup does not warn about the dropped student {u}: {out(r)}"
        assert any("remove" in line for line in said), said
        assert user_exists(u) and c.home(u).is_dir()
    r = c.run("check")
    assert r.returncode == 0, out(r)
    for u in (u1, u2):
        said = naming(out(r), u)
        assert said, f"check does not warn about the dropped student {u}: {out(r)}"
        assert any("remove" in line for line in said), said
    r = c.run("check", "--json")
    assert r.returncode == 0, out(r)
    warned = json.dumps(json.loads(r.stdout)["warnings"])
    assert u1 in warned and u2 in warned, warned


def test_shutdown_stops_a_dropped_student_server(term):
    c = term(3)
    u0, u1, u2 = c.usernames
    r = c.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    try:
        r = c.run("launch", "--yes", "--no-portal", timeout=240)
        assert r.returncode == 0, out(r)
        st = status(c)
        ports = {u: st[u]["port"] for u in c.usernames}
        pids = {u: st[u]["pid"] for u in c.usernames}
        assert all(http_answers(ports[u]) for u in c.usernames), ports
        drop_from_roster(c, u2)

        # shutdown without --only stops every server the course started
        r = c.run("shutdown", "--yes", timeout=180)
        assert r.returncode == 0, out(r)
        for u in c.usernames:
            assert wait_until(lambda u=u: not http_answers(ports[u]), 10), (
                f"{u}'s server (port {ports[u]}) still answers after shutdown: {out(r)}"
            )
            assert not psutil.pid_exists(pids[u]) or (
                psutil.Process(pids[u]).status() == psutil.STATUS_ZOMBIE
            )
        st = status(c)
        assert st.get(u2, {}).get("server") == "stopped", st.get(u2)
    finally:
        quiet_shutdown(c)


def test_remove_takes_dropped_students_too(term):
    c = term(3)
    u0, u1, u2 = c.usernames
    r = c.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    drop_from_roster(c, u1, u2)

    # remove asks first, naming the dropped students; 'n' changes nothing
    r = c.run("remove", input="n\n")
    assert r.returncode == 3, out(r)
    for u in (u1, u2):
        assert naming(out(r), u), f"the prompt does not name the dropped student {u}: {out(r)}"
    assert all(user_exists(u) and c.home(u).is_dir() for u in c.usernames)
    assert group_exists(c.name)

    # --only accepts a name the course created, though the roster no longer has it
    r = c.run("remove", "--yes", "--only", u1)
    assert r.returncode == 0, out(r)
    assert not user_exists(u1) and not c.home(u1).exists()
    assert user_exists(u0) and user_exists(u2)

    # remove without --only removes every account the course created
    r = c.run("remove", "--yes")
    assert r.returncode == 0, out(r)
    for u in c.usernames:
        assert not user_exists(u), f"remove left {u}: {out(r)}"
        assert not c.home(u).exists()
        assert not group_exists(u)
    assert not group_exists(c.name), f"remove left the course group: {out(r)}"
    assert len(list((c.state_dir / "archive").glob("*.tar.gz"))) == 3


# --------------------------------------------------------------------------------------------
# 2. a reset password works at once, also on a running server
# --------------------------------------------------------------------------------------------


def test_reset_password_reaches_the_running_server(term, tmp_path):
    c = term(2)
    u0, u1 = c.usernames
    c.write_config(accounts={"notebook_password": "same"})
    r = c.run("setup", "--yes")
    assert r.returncode == 0, out(r)
    try:
        r = c.run("launch", "--yes", "--no-portal", timeout=240)
        assert r.returncode == 0, out(r)
        old = c.credentials()
        st = status(c)
        assert login_works(st[u0], jupyter_password(old[u0])), "the setup password does not log in"

        slips = tmp_path / "slips.html"
        r = c.run(
            "setup",
            "--yes",
            "--only",
            u0,
            "--reset-passwords",
            "--handout",
            str(slips),
            timeout=240,
        )
        assert r.returncode == 0, out(r)
        new = c.credentials()
        old_pw, new_pw = jupyter_password(old[u0]), jupyter_password(new[u0])
        assert new_pw != old_pw
        assert new[u1] == old[u1], "a student not selected got a new password"

        # with --only the new password is shown on the terminal (and no one else's)
        assert new_pw in out(r), f"the new password is not shown: {out(r)}"
        assert new[u1]["password"] not in out(r)

        # --handout PATH holds only the selected student's slip
        text = html.unescape(slips.read_text(encoding="utf-8"))
        assert u0 in text and new_pw in text
        assert u1 not in text and new[u1]["password"] not in text

        # the running server takes the new password, and no longer the old one
        st = status(c)
        assert st[u0]["server"] == "running", st[u0]
        assert wait_until(lambda: login_works(status(c)[u0], new_pw), 60, 1), (
            "the new password does not log in to the student's running server"
        )
        row = status(c)[u0]
        assert not login_works(row, old_pw), "the old password still logs in"
        # the other student's server is untouched
        assert login_works(st[u1], jupyter_password(old[u1]))
    finally:
        quiet_shutdown(c)


# --------------------------------------------------------------------------------------------
# 3. Ctrl-C during setup tells the truth; the next run completes every half-made account
# --------------------------------------------------------------------------------------------


def assert_every_account_whole(c: TestCourse, skeleton: list[str], why: str) -> None:
    creds = c.credentials()
    hashes = shadow()
    members = set(grp.getgrnam(c.name).gr_mem)
    gids: dict[str, int] = {}
    uids: dict[str, int] = {}
    for u in c.usernames:
        assert user_exists(u), f"{why}: {u} has no account"
        pw = pwd.getpwnam(u)
        assert group_exists(u), f"{why}: {u} has no group of its own"
        own = grp.getgrnam(u)
        assert pw.pw_gid == own.gr_gid, (
            f"{why}: {u}'s gid {pw.pw_gid} is not its own group's ({own.gr_gid}); "
            f"it is {grp.getgrgid(pw.pw_gid).gr_name}'s"
        )
        assert u in members, f"{why}: {u} is not in the course group {c.name}"
        home = Path(pw.pw_dir)
        assert home == c.home(u), (home, c.home(u))
        hst = os.lstat(home)
        assert stat.S_ISDIR(hst.st_mode), f"{why}: {home} is not a folder"
        assert hst.st_uid == pw.pw_uid, f"{why}: {home} is not {u}'s"
        assert stat.S_IMODE(hst.st_mode) == 0o700, f"{why}: {home} mode {hst.st_mode:o}"
        for name in skeleton:
            f = home / name
            assert f.is_file(), f"{why}: {u}'s home lacks the skeleton file {name}"
            assert f.stat().st_uid == pw.pw_uid, f"{why}: {f} is not {u}'s"
        assert find_hashed_password(home), f"{why}: {u} has no Jupyter password"
        assert u in creds and creds[u]["password"], f"{why}: {u} has no row in credentials.csv"
        assert crypt_ok(creds[u]["password"], hashes.get(u, "")), (
            f"{why}: {u}'s Unix password is not the one in credentials.csv"
        )
        gids[u], uids[u] = pw.pw_gid, pw.pw_uid
    assert len(set(gids.values())) == len(gids), f"{why}: students share a gid: {gids}"
    assert len(set(uids.values())) == len(uids), f"{why}: students share a uid: {uids}"


def assert_everything_removed(c: TestCourse, why: str) -> None:
    for u in c.usernames:
        assert not user_exists(u), f"{why}: {u} is left"
        assert not group_exists(u), f"{why}: {u}'s own group is left"
        assert not c.home(u).exists(), f"{why}: {u}'s home is left"
    assert not group_exists(c.name), f"{why}: the course group is left: {describe_group(c.name)}"


@pytest.mark.timeout(1800)  # 20 rounds of 40 accounts: about a minute on a quiet host
def test_setup_interrupted_at_random_moments(term):
    """Ctrl-C at a random moment, then setup again, INTERRUPTIONS times; remove after each."""
    c = term(INTERRUPTED_CLASS)
    skel = c.base / "skel"
    (skel / ".config").mkdir(parents=True)
    (skel / "WELCOME.txt").write_text("welcome to the course\n")
    (skel / ".config" / "course.ini").write_text("[x]\n")
    skeleton = ["WELCOME.txt", ".config/course.ini"]
    c.write_config(accounts={"skeleton": str(skel)})
    seed = secrets.randbits(32)
    rnd = random.Random(seed)

    # Calibrate the random moments: from when notebooks.py is running its own code to the
    # end of a whole setup of the class on this host.
    t = time.monotonic()
    assert run_cli("--version").returncode == 0
    start_up = time.monotonic() - t
    t = time.monotonic()
    r = c.run("setup", "--yes")
    whole = time.monotonic() - t
    assert r.returncode == 0, out(r)
    assert_every_account_whole(c, skeleton, "uninterrupted setup")
    r = c.run("remove", "--yes")
    assert r.returncode == 0, out(r)
    assert_everything_removed(c, f"remove after the uninterrupted setup said {out(r)}")

    cut_midway = 0
    for i in range(INTERRUPTIONS):
        delay = rnd.uniform(start_up, whole)
        why = f"seed {seed}, interruption {i} after {delay:.3f}s"
        proc = start_cli("setup", str(c.config), "--yes")
        time.sleep(delay)
        ctrl_c(proc)
        stdout, stderr = finish(proc)
        text = stdout + stderr
        assert "Traceback" not in text, f"{why}: {text}"
        made = [u for u in c.usernames if user_exists(u)]
        if proc.returncode != 0:
            if made:
                assert "nothing was changed" not in text.lower(), (
                    f"{why}: {len(made)} accounts were made, yet: {text}"
                )
                named = [u for u in made if naming(text, u)]
                assert named or re.search(rf"\b{len(made)}\b", text), (
                    f"{why}: the interrupted setup does not say what it did "
                    f"({len(made)} accounts made): {text}"
                )
            if 0 < len(made) < len(c.usernames):
                cut_midway += 1
                missing = [u for u in c.usernames if u not in made]
                assert any(naming(text, u) for u in missing) or re.search(
                    rf"\b{len(missing)}\b", text
                ), f"{why}: the interrupted setup does not say what it did not do: {text}"

        r = c.run("setup", "--yes")
        assert r.returncode == 0, f"{why}: the re-run failed: {out(r)}"
        assert_every_account_whole(c, skeleton, f"{why}, after the re-run")
        r = c.run("remove", "--yes")
        assert r.returncode == 0, f"{why}: remove failed: {out(r)}"
        assert_everything_removed(c, f"{why}, after remove, which said {out(r)}")
    assert cut_midway >= 1, (
        f"seed {seed}: no interruption fell while accounts were being made (setup took "
        f"{whole:.2f}s): the test did not test what it claims"
    )


# --------------------------------------------------------------------------------------------
# 4. send interrupted mid-copy leaves no temporary file once it has run again
# --------------------------------------------------------------------------------------------


def temporaries(home: Path) -> list[Path]:
    return [
        Path(folder) / name
        for folder, dirs, files in os.walk(home)
        for name in [*dirs, *files]
        if name.startswith(".classroom-")
    ]


def test_send_interrupted_mid_copy_leaves_no_temporary_file(term):
    c = term(1)
    (u0,) = c.usernames
    assert c.run("setup", "--yes").returncode == 0
    big = c.base / "tutorial" / "big.bin"
    digest = hashlib.sha256()
    with open(big, "wb") as f:
        for _ in range(200):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    home = c.home(u0)

    proc = start_cli("send", str(c.config), "--yes")
    caught: list[Path] = []
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not caught:
            caught = temporaries(home)
            if not caught:
                time.sleep(0.002)
        ctrl_c(proc)
        stdout, stderr = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert caught, "send finished before it could be interrupted mid-copy (no temporary seen)"
    assert "Traceback" not in stdout + stderr, stdout + stderr

    r = c.run("send", "--yes", timeout=300)
    assert r.returncode == 0, out(r)
    assert temporaries(home) == [], f"temporary files left in {home}: {temporaries(home)}"
    folder = home / "tutorial"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["big.bin", "data/numbers.csv", "lesson.ipynb"], files
    got = hashlib.sha256()
    with open(folder / "big.bin", "rb") as f:
        while chunk := f.read(1 << 20):
            got.update(chunk)
    assert got.hexdigest() == digest.hexdigest()


# --------------------------------------------------------------------------------------------
# 5. late means the student's work
# --------------------------------------------------------------------------------------------


def test_late_is_judged_by_content_not_mtime(term):
    c = term(1)
    (u0,) = c.usernames
    assert c.run("setup", "--yes").returncode == 0
    assert c.run("send", "--yes").returncode == 0
    t0 = c.home(u0) / "tutorial"
    # identical to what send handed out, with a new mtime (`touch`): not late
    os.utime(t0 / "lesson.ipynb", None)
    # edited by the student after the deadline, or new: late
    write_as(c, u0, t0 / "data" / "numbers.csv", "a,b\n1,3\n")
    write_as(c, u0, t0 / "answer.py", "print(42)\n")
    r = c.run("retrieve", "--yes", "--deadline", "2020-06-01 12:00")
    assert r.returncode == 0, out(r)
    rows = {row["path"]: row for row in manifest(c.base / "submissions") if row["username"] == u0}
    assert rows["lesson.ipynb"]["late"] == "", rows["lesson.ipynb"]
    assert rows["data/numbers.csv"]["late"] == "late", rows["data/numbers.csv"]
    assert rows["answer.py"]["late"] == "late", rows["answer.py"]


def test_deadline_date_alone_means_the_end_of_that_day(term):
    c = term(1)
    (u0,) = c.usernames
    assert c.run("setup", "--yes").returncode == 0
    assert c.run("send", "--yes").returncode == 0
    t0 = c.home(u0) / "tutorial"
    write_as(c, u0, t0 / "in-time.py", "print('in time')\n")
    evening = time.mktime(time.strptime("2020-01-01 18:00", "%Y-%m-%d %H:%M"))
    os.utime(t0 / "in-time.py", (evening, evening))
    write_as(c, u0, t0 / "next-day.py", "print('too late')\n")
    morning = time.mktime(time.strptime("2020-01-02 08:00", "%Y-%m-%d %H:%M"))
    os.utime(t0 / "next-day.py", (morning, morning))
    r = c.run("retrieve", "--yes", "--deadline", "2020-01-01")
    assert r.returncode == 0, out(r)
    rows = {row["path"]: row for row in manifest(c.base / "submissions") if row["username"] == u0}
    assert rows["in-time.py"]["late"] == "", rows["in-time.py"]
    assert rows["next-day.py"]["late"] == "late", rows["next-day.py"]
    assert rows["lesson.ipynb"]["late"] == "", rows["lesson.ipynb"]


# --------------------------------------------------------------------------------------------
# 6. check predicts refusals
# --------------------------------------------------------------------------------------------


def _home_base_0777(c, stack):
    os.chmod(c.home_base, 0o777)
    return ["setup", "--yes"], str(c.home_base)


def _state_dir_of_someone_else(c, stack):
    other = c.base / "someone-elses-state"
    other.mkdir()
    (other / "their-file").write_text("x")
    os.chown(other, 65534, 65534)
    os.chmod(other, 0o700)
    c.write_config(course={"state_dir": str(other)})
    return ["setup", "--yes"], str(other)


def _course_group_of_someone_else(c, stack):
    subprocess.run(["groupadd", "--", c.name], check=True, capture_output=True)
    stack.enter_context(foreign_account(group=c.name))
    return ["setup", "--yes"], c.name


def _config_writable_by_others(c, stack):
    os.chmod(c.config, 0o666)
    return ["setup", "--yes"], str(c.config)


def _hook_writable_by_others(c, stack):
    hook = c.base / "pre-spawn.sh"
    hook.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(hook, 0o777)
    c.write_config(hooks={"pre_spawn": str(hook)})
    return ["setup", "--yes"], str(hook)


def _source_missing(c, stack):
    shutil.rmtree(c.base / "tutorial")
    return ["send", "--yes"], str(c.base / "tutorial")


def _destination_writable_by_others(c, stack):
    dest = c.base / "public-submissions"
    dest.mkdir()
    os.chmod(dest, 0o777)
    c.write_config(retrieve={"destination": str(dest)})
    return ["retrieve", "--yes"], str(dest)


def _destination_under_a_folder_writable_by_others(c, stack):
    public = c.base / "public"
    public.mkdir()
    os.chmod(public, 0o777)
    c.write_config(retrieve={"destination": str(public / "submissions")})
    return ["retrieve", "--yes"], str(public)


def _retrieve_owner_is_a_student(c, stack):
    c.write_config(retrieve={"owner": c.usernames[0]})
    return ["retrieve", "--yes"], c.usernames[0]


def _retrieve_owner_missing(c, stack):
    c.write_config(retrieve={"owner": "tnosuchowner"})
    return ["retrieve", "--yes"], "tnosuchowner"


def _portal_port_taken(c, stack):
    port = int(c.sections["launch"]["portal_port"])
    listener = stack.enter_context(socket.socket())
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen()
    return ["launch", "--yes"], str(port)  # launch cannot run its portal: it must not succeed


def _roster_names_a_foreign_account(c, stack):
    foreign = stack.enter_context(foreign_account())
    c.extra_users.append(foreign)
    c.write_roster([*roster_rows(c.usernames), f"{foreign},Other,Person,o@x.org"])
    return ["remove", "--yes"], foreign


REFUSALS = {
    "home_base 0777 (setup)": (_home_base_0777, False),
    "state_dir of someone else (setup)": (_state_dir_of_someone_else, False),
    "course group of someone else (setup)": (_course_group_of_someone_else, False),
    "config writable by others (setup)": (_config_writable_by_others, False),
    "hook writable by others (setup)": (_hook_writable_by_others, False),
    "material source missing (send)": (_source_missing, True),
    "destination writable by others (retrieve)": (_destination_writable_by_others, True),
    "destination under a public folder (retrieve)": (
        _destination_under_a_folder_writable_by_others,
        True,
    ),
    "retrieve owner is a student (retrieve)": (_retrieve_owner_is_a_student, True),
    "retrieve owner missing (retrieve)": (_retrieve_owner_missing, True),
    "portal port in use (launch)": (_portal_port_taken, True),
    "foreign account in the roster (remove)": (_roster_names_a_foreign_account, True),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_check_predicts_each_refusal(term, case):
    make_refusal, needs_accounts = REFUSALS[case]
    c = term(2)
    if needs_accounts:
        r = c.run("setup", "--yes")
        assert r.returncode == 0, out(r)
    with contextlib.ExitStack() as stack:
        command, named = make_refusal(c, stack)
        try:
            # the premise: the command refuses before changing anything
            r = c.run(*command, timeout=180)
            if command == ["launch", "--yes"]:
                assert r.returncode != 0, f"{command} did not fail: {out(r)}"
            else:
                assert r.returncode in (2, 3), f"{command} did not refuse: {out(r)}"
            if command[0] == "setup":
                assert not any(user_exists(u) for u in c.usernames), out(r)
            # check says so: exit 2, the problem named
            r = c.run("check")
            assert r.returncode == 2, f"check did not predict the refusal of {command}: {out(r)}"
            assert named in out(r), out(r)
            r = c.run("check", "--json")
            assert r.returncode == 2, out(r)
            data = json.loads(r.stdout)
            assert data["ok"] is False
            assert named in json.dumps(data["problems"]), data
        finally:
            quiet_shutdown(c)


def test_check_is_quiet_about_the_course_own_servers(term):
    c = term(2)
    assert c.run("setup", "--yes").returncode == 0
    try:
        r = c.run("launch", "--yes", "--no-portal", timeout=240)
        assert r.returncode == 0, out(r)
        ports = [row["port"] for row in status(c).values()]
        assert all(isinstance(p, int) for p in ports), ports
        r = c.run("check", "--json")
        assert r.returncode == 0, out(r)
        data = json.loads(r.stdout)
        findings = json.dumps(data["problems"] + data["warnings"])
        for port in ports:
            assert not re.search(rf"\b{port}\b", findings), (
                f"check warns about port {port}, held by the course's own server: {findings}"
            )
    finally:
        quiet_shutdown(c)


# --------------------------------------------------------------------------------------------
# 7. a failed launch quotes only what this start wrote
# --------------------------------------------------------------------------------------------


def test_failed_launch_does_not_quote_an_earlier_log(term):
    c = term(1)
    (u0,) = c.usernames
    assert c.run("setup", "--yes").returncode == 0
    # the student's server dies at once, silently (its own config ends the process)
    write_as(
        c, u0, c.home(u0) / ".jupyter" / "jupyter_server_config.py", "import os\nos._exit(3)\n"
    )
    # an earlier run's log, with a telling but stale line
    logs = c.state_dir / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    log = logs / f"{u0}.log"
    log.write_text(
        "\n===== 2020-01-01T09:00:00+00:00 launch: port 9\n"
        "[E 2020-01-01 09:00:01.000 ServerApp] OLD-MISLEADING-ERROR: "
        "[Errno 98] Address already in use\n"
    )
    os.chmod(log, 0o600)
    try:
        r = c.run("launch", "--yes", "--no-portal", timeout=240)
        assert r.returncode == 1, out(r)
        assert naming(out(r), u0), out(r)
        assert "OLD-MISLEADING-ERROR" not in out(r), (
            f"launch quotes a line an earlier run wrote: {out(r)}"
        )
        assert "Address already in use" not in out(r), out(r)
    finally:
        quiet_shutdown(c)


# --------------------------------------------------------------------------------------------
# 8. messages in the teacher's terms
# --------------------------------------------------------------------------------------------


def test_start_timeout_with_a_unit_says_what_to_write(term):
    c = term(2)
    c.write_config(launch={"start_timeout": "60s"})
    for command in (["check"], ["setup", "--yes"]):
        r = c.run(*command)
        assert r.returncode == 2, out(r)
        text = out(r).replace(str(c.base), "CONFIG-FOLDER")
        assert "start_timeout" in text and "60s" in text, text
        assert re.search(r"(?<![\w'.])60(?![\w'.])", text), f"no '60' to write instead: {text}"
        for internal in ("could not convert", "float", "ValueError", "invalid literal"):
            assert internal not in text, f"{internal!r} is Python's text, not the teacher's: {text}"
    assert not any(user_exists(u) for u in c.usernames)


def test_email_as_username_hints_at_the_column(term):
    c = term(2)
    u0, _ = c.usernames
    c.write_roster([f"{u0},Lovelace,Ada,{u0}@example.org", "ada@example.org,Byron,Ada,a@x.org"])
    for command in (["check"], ["setup", "--yes"]):
        r = c.run(*command)
        assert r.returncode == 2, out(r)
        text = out(r)
        assert "ada@example.org" in text, text
        assert re.search(r"line\s*3\b|:3\b", text), text
        assert "roster_columns" in text, f"no hint how to map the username column: {text}"
    assert not user_exists(u0)


def test_not_root_suggests_the_console_script(term):
    c = term(2)
    for p in [c.base, *c.base.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    with contextlib.suppress(OSError):
        for parent in c.base.parents:
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
    r = run_as_nobody("setup", str(c.config), "--yes")  # (no traceback, it checks)
    assert r.returncode == 3, out(r)
    assert re.search(r"sudo notebooks(?!\.py)\b", out(r)), out(r)
    assert "sudo notebooks.py" not in out(r), out(r)
    assert not any(user_exists(u) for u in c.usernames)


def test_quiet_and_verbose_after_the_command(term):
    c = term(2)
    r = c.run("setup", "--yes", "-q")
    assert r.returncode == 0, out(r)
    assert [line for line in r.stdout.splitlines() if line.strip()] == [
        "setup: 2 created, 0 unchanged, 0 failed"
    ], r.stdout
    for flag in ("-q", "--quiet", "-v", "--verbose"):
        r = c.run("status", flag)
        assert r.returncode == 0, (flag, out(r))
        r = c.run("check", flag)
        assert r.returncode == 0, (flag, out(r))


def test_only_has_a_did_you_mean(term):
    c = term(2)
    u0, _ = c.usernames
    typo = u0[:-1] + ("0" if u0[-1] != "0" else "1")
    r = c.run("setup", "--yes", "--only", typo)
    assert r.returncode == 2, out(r)
    assert typo in out(r) and u0 in out(r), f"no did-you-mean for {typo} ({u0}): {out(r)}"
    assert not any(user_exists(u) for u in c.usernames)


def test_only_is_case_insensitive(term):
    c = term(2)
    u0, u1 = c.usernames
    r = c.run("setup", "--yes", "--only", u0.upper())
    assert r.returncode == 0, out(r)
    assert user_exists(u0) and not user_exists(u1)
    r = c.run("status", "--json", "--only", u0.upper())
    assert r.returncode == 0, out(r)
    assert [row["username"] for row in json.loads(r.stdout)] == [u0]


def test_sizes_in_messages_are_human(term):
    c = term(1)
    (u0,) = c.usernames
    c.write_config(retrieve={"max_file_size": "20M"})
    assert c.run("setup", "--yes").returncode == 0
    big = c.home(u0) / "tutorial" / "video.bin"
    write_as(c, u0, big, b"")
    os.truncate(big, 25 << 20)
    r = c.run("retrieve", "--yes")
    assert r.returncode in (0, 1), out(r)
    text = out(r)
    assert "video.bin" in text, f"the skipped file is not named: {text}"
    assert re.search(r"\b20(\.0)? ?Mi?B\b", text), f"the limit is not in human units: {text}"
    for raw in (str(20 << 20), str(25 << 20), "20000000", "25000000"):
        assert raw not in text, f"a raw byte count in a message: {text}"


def test_max_file_size_zero_is_refused(term):
    c = term(2)
    c.write_config(retrieve={"max_file_size": "0"})
    for command in (["check"], ["setup", "--yes"]):
        r = c.run(*command)
        assert r.returncode == 2, out(r)
        assert "max_file_size" in out(r), out(r)
    assert not any(user_exists(u) for u in c.usernames)


def test_sample_lesson_has_a_kernelspec():
    nb = json.loads((ROOT / "samples" / "tutorial" / "lesson1.ipynb").read_text(encoding="utf-8"))
    spec = nb.get("metadata", {}).get("kernelspec")
    assert spec, "the sample lesson has no kernelspec: every student gets 'Select Kernel'"
    assert spec.get("name") == "python3", spec
    assert spec.get("display_name"), spec
    assert spec.get("language") == "python", spec


def test_send_force_leaves_no_stale_new_file(term):
    c = term(1)
    (u0,) = c.usernames
    assert c.run("setup", "--yes").returncode == 0
    assert c.run("send", "--yes").returncode == 0
    t0 = c.home(u0) / "tutorial"
    src = c.base / "tutorial" / "lesson.ipynb"
    write_as(c, u0, t0 / "lesson.ipynb", "STUDENT VERSION\n")
    src.write_text('{"cells": [], "metadata": {"v": 2}, "nbformat": 4, "nbformat_minor": 5}\n')
    r = c.run("send", "--yes")
    assert r.returncode in (0, 1), out(r)
    assert (t0 / "lesson.new.ipynb").read_bytes() == src.read_bytes(), "no conflict copy made"

    r = c.run("send", "--yes", "--force")
    assert r.returncode == 0, out(r)
    assert (t0 / "lesson.ipynb").read_bytes() == src.read_bytes()
    backups = list((t0 / ".backup").glob("*/lesson.ipynb"))
    assert [b.read_text() for b in backups] == ["STUDENT VERSION\n"], backups
    assert not (t0 / "lesson.new.ipynb").exists(), "send --force left the stale lesson.new.ipynb"


def test_sighup_stops_the_portal_and_leaves_the_servers(term):
    c = term(1)
    (u0,) = c.usernames
    assert c.run("setup", "--yes").returncode == 0
    portal_port = int(c.sections["launch"]["portal_port"])
    output = c.base / "launch.out"
    env = {k: v for k, v in os.environ.items() if k != "NOTEBOOKS_CONFIG"}
    env["PYTHONUNBUFFERED"] = "1"  # what it printed before the signal is in the file by then
    with open(output, "w") as sink:
        proc = subprocess.Popen(
            [PYTHON, str(NOTEBOOKS), "launch", str(c.config), "--yes"],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        wait_portal(proc, portal_port)
        row = status(c)[u0]
        assert row["server"] == "running", row
        before = output.read_text()
        # the teacher's SSH session closes
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait(timeout=60)
        text = output.read_text()
        assert proc.returncode >= 0, f"SIGHUP killed launch without a word: {text}"
        assert "Traceback" not in text, text
        said = text[len(before) :]
        assert re.search(r"portal", said, re.IGNORECASE) and re.search(
            r"stop|clos|end|hang", said, re.IGNORECASE
        ), f"no message that the portal stopped, after SIGHUP: {said!r}"
        assert not http_answers(portal_port), "the portal still answers"
        row = status(c)[u0]
        assert row["server"] == "running", row
        assert http_answers(row["port"]), "the student's server stopped with the portal"
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        quiet_shutdown(c)
