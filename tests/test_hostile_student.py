"""Issue 16: what a hostile student found (SPEC §6.11 rule 11), tried as the student would.

Each test drives the tool through its command line as a teacher does, on a throw-away
course with real random accounts (see conftest), and acts as the student: code runs in a
child that has setuid() to the student's uid (never one of the host's real users).

Rules 12-15 (IPv6 squatting, nothing of root's in a server, stalls, escape sequences) are
tried in test_server_safety.py and test_send_retrieve_attacks.py.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass

import pytest
from conftest import (
    NOTEBOOKS,
    PYTHON,
    control_chars,
    needs_root,
    random_name,
)
from students import (
    kill_uid,
    processes_of_uid,
    run_as_student,
    student_ids,
)

pytestmark = [pytest.mark.root, needs_root]


# --- helpers: the teacher's commands, each with a bound ---------------------------------------


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return (self.stdout + self.stderr).decode("utf-8", "replace")


def run_bounded(
    course,
    command: str,
    *args: str,
    bound: float,
) -> Result:
    """``notebooks.py COMMAND CONFIG ARGS`` as a teacher runs it; fails the test if it is
    still running after ``bound`` seconds (and then kills it and what it started)."""
    full_env = {k: v for k, v in os.environ.items() if k != "NOTEBOOKS_CONFIG"}
    proc = subprocess.Popen(
        [PYTHON, str(NOTEBOOKS), command, str(course.config), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            out, err = proc.communicate(timeout=10)
        pytest.fail(
            f"`{command}` still ran after {bound:g} s: one student held up the whole class\n"
            f"{(out or b'').decode(errors='replace')}{(err or b'').decode(errors='replace')}"
        )
    result = Result(proc.returncode, out, err)
    assert b"Traceback" not in err, result.text
    return result


# --- 1. rule 11: remove leaves nothing of the student running, and no uid to inherit -----------

REAPER = r"""
import ctypes, os, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
uid, gid, groups, home, code = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
pid = os.fork()
if pid == 0:
    os.setgroups([int(g) for g in groups.split(",")]); os.setgid(gid); os.setuid(uid)
    os.chdir(home)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)  # nothing of the test's (its pipes) is held by the loop
    os.execve(sys.executable, [sys.executable, "-c", code], {"HOME": home, "PATH": "/usr/bin:/bin"})
print("ready", flush=True)
while True:  # the loop's orphans come here: reap them, so they never pile up as zombies
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.05)
"""

FORK_LOOP = r"""
import os, time
os.setsid()
while True:
    if os.fork():
        os._exit(0)
    time.sleep(0.01)  # each generation lives long enough for a scan of /proc to see it
"""


@contextlib.contextmanager
def forking_loop(course, username: str):
    """As the student: a process that forks and exits in a loop (after setsid).

    Its orphans are reparented to a reaper of the test's (a child subreaper) rather than to
    this host's PID 1, so that they are reaped at once and no zombies pile up.
    """
    uid, gid, groups = student_ids(course, username)
    errors = course.base / "reaper.err"
    with open(errors, "wb") as err:
        reaper = subprocess.Popen(
            [
                PYTHON,
                "-c",
                REAPER,
                str(uid),
                str(gid),
                ",".join(map(str, groups)),
                str(course.home(username)),
                FORK_LOOP,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    try:
        assert reaper.stdout is not None and reaper.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 20  # a busy host is slow to start Python
        while not processes_of_uid(uid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_of_uid(uid), f"the forking loop did not start: {errors.read_text()}"
        yield
    finally:
        try:
            kill_uid(uid, gid)
        finally:
            reaper.kill()
            reaper.wait()


def test_forking_loop_does_not_outlive_remove(ready_course):
    course = ready_course
    u = course.usernames[0]
    uid, gid, _ = student_ids(course, u)
    with forking_loop(course, u):
        r = run_bounded(course, "remove", "--yes", bound=120)
        assert r.returncode == 0, r.text
        with pytest.raises(KeyError):
            pwd.getpwnam(u)
        # a leftover keeps forking: watch for a few seconds
        end = time.monotonic() + 3
        while time.monotonic() < end:
            left = processes_of_uid(uid)
            assert not left, f"still running with the removed student's uid {uid}: {left}"
            time.sleep(0.1)


def test_new_account_never_gets_a_removed_uid_or_gid(ready_course):
    course = ready_course
    old = {u: course.pw(u) for u in course.usernames}
    old_uids = {pw.pw_uid for pw in old.values()}
    old_gids = {pw.pw_gid for pw in old.values()}
    r = run_bounded(course, "remove", "--yes", bound=120)
    assert r.returncode == 0, r.text
    newcomers = [random_name() for _ in old]
    course.extra_users += newcomers
    course.write_roster([f"{u},Late{i},New{i},{u}@example.org" for i, u in enumerate(newcomers)])
    r = run_bounded(course, "setup", "--yes", bound=120)
    assert r.returncode == 0, r.text
    for u in newcomers:
        pw = pwd.getpwnam(u)
        assert pw.pw_uid not in old_uids, f"{u} got uid {pw.pw_uid}, which a removed student had"
        assert pw.pw_gid not in old_gids, f"{u} got gid {pw.pw_gid}, which a removed student had"


SCATTER = r"""
import os, sys
tag = sys.argv[1]
made = []
for folder in ("/tmp", "/var/tmp", "/dev/shm"):
    path = os.path.join(folder, f".{tag}-file")
    with open(path, "w") as f:
        f.write("left behind\n")
    made.append(path)
sub = os.path.join("/tmp", f"{tag}-dir")
os.mkdir(sub)
with open(os.path.join(sub, "inner"), "w") as f:
    f.write("left behind\n")
made.append(sub)
print("\n".join(made))
"""


def test_remove_deletes_what_the_student_owns_in_tmp(ready_course):
    course = ready_course
    u = course.usernames[0]
    tag = "x" + uuid.uuid4().hex[:12]  # names that do not give away whose they are
    made = run_as_student(course, u, SCATTER, tag).split()
    try:
        assert all(os.path.lexists(p) for p in made)
        r = run_bounded(course, "remove", "--yes", bound=120)
        assert r.returncode == 0, r.text
        left = [p for p in made if os.path.lexists(p)]
        assert not left, f"the removed student's files are still there: {left}"
        assert list((course.state_dir / "archive").glob(f"{u}-*.tar.gz")), "not archived first"
    finally:
        for p in made:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)


# --- rule 15: the helper that the escape-sequence tests rely on -------------------------------

ESCAPES = "\x1b]0;pwned\x07\x1b[2K\x1b[1A started"


def test_helpers_see_control_characters():
    """The rule 15 checks (test_server_safety, test_send_retrieve_attacks) can fail:
    control_chars finds what a terminal would act on."""
    assert control_chars(ESCAPES.encode()) == ["U+0007", "U+001B"]
    assert control_chars("csi\u009b ě".encode()) == ["U+009B"]
    assert control_chars(b"  alice: collected \\x1b]0;pwned\\x07\tok\n") == []
