"""Issue 16: what a hostile student found (SPEC §6.11, rules 11-15), tried as the student would.

Each test drives the tool through its command line as a teacher does, on a throw-away
course with real random accounts (see conftest), and acts as the student: code runs in a
child that has setuid() to the student's uid (never one of the host's real users).

Deadlines: SPEC rule 14 gives each student's part of setup, send, launch and retrieve an
overall deadline but names no setting for it. The stall tests set it small through the
environment variable ``CLASSROOM_STUDENT_DEADLINE`` (seconds; proposed here, see
``DEADLINE_ENV``) and give the whole command a bound well below the defaults the tool
had (600 s for as_user, 300 s for the retrieve reader).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    NOTEBOOKS,
    PYTHON,
    control_chars,
    failed_line,
    needs_root,
    random_name,
    snapshots,
)
from students import (
    FLOOD,
    HOSTILE_NAMES,
    kill_uid,
    processes_of_uid,
    run_as_student,
    stopper,
    student_ids,
    write_as,
)

pytestmark = [pytest.mark.root, needs_root]

DEADLINE_ENV = "CLASSROOM_STUDENT_DEADLINE"  # proposed knob: each student's overall deadline (s)
MODES = pytest.mark.parametrize("mode", ["fork", "exec"])


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
    env: dict | None = None,
    prefix: tuple[str, ...] = (),
) -> Result:
    """``notebooks.py COMMAND CONFIG ARGS`` as a teacher runs it; fails the test if it is
    still running after ``bound`` seconds (and then kills it and what it started)."""
    full_env = {k: v for k, v in os.environ.items() if k != "NOTEBOOKS_CONFIG"}
    full_env.update(env or {})
    proc = subprocess.Popen(
        [*prefix, PYTHON, str(NOTEBOOKS), command, str(course.config), *args],
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


def shutdown_quietly(course) -> None:
    with contextlib.suppress(Exception):
        run_bounded(course, "shutdown", bound=120)


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


# --- 4. rule 14: retrieve is bounded whatever the home holds -----------------------------------


def manifest_rows(dest: Path, username: str) -> list[list[str]]:
    csv.field_size_limit(1 << 24)
    try:
        with open(dest / "manifest.csv", encoding="utf-8", errors="replace", newline="") as f:
            return [row for row in csv.reader(f) if row and row[0] == username]
    except FileNotFoundError:
        return []


def test_retrieve_flood_is_bounded_and_not_repeated(ready_course):
    course = ready_course
    flooder, other = course.usernames
    dest = course.base / "submissions"
    try:
        assert course.run("send").returncode == 0
        run_as_student(course, flooder, FLOOD, "12000", "10500", timeout=300)
        write_as(course, other, "tutorial/answer.py", "print(42)\n")

        r = run_bounded(course, "retrieve", bound=300)
        assert r.returncode == 0, r.text
        rows = manifest_rows(dest, flooder)
        assert 0 < len(rows) <= 10_001, (
            f"{len(rows)} manifest rows for one student in one retrieval (at most 10,000 and "
            "a summary row)"
        )
        (snap,) = snapshots(dest, flooder)
        folders = sum(len(d) for _, d, _ in os.walk(dest / flooder / snap))
        assert folders <= 10_000, f"{folders} folders in one snapshot (at most 10,000)"
        assert (dest / flooder / "latest" / "lesson.ipynb").read_text().endswith("# my answer\n")
        assert (dest / other / "latest" / "answer.py").read_text() == "print(42)\n"

        again = run_bounded(course, "retrieve", bound=300)
        assert again.returncode == 0, again.text
        assert snapshots(dest, flooder) == [snap], "the same skipped entries made a new snapshot"
        assert len(manifest_rows(dest, flooder)) == len(rows), "nothing changed, yet new rows"
    finally:
        shutil.rmtree(dest, ignore_errors=True)  # tens of MB before the fix


# --- 5, 6. rule 14: a student who stops their own helpers stalls no one else --------------------

MANY_FILES = r"""
import os, sys
base = os.path.join(os.path.expanduser("~"), "tutorial", "many")
os.makedirs(base, exist_ok=True)
for i in range(int(sys.argv[1])):
    with open(os.path.join(base, f"n{i:05d}.txt"), "w") as f:
        f.write(f"{i}\n")
"""


def test_retrieve_is_not_stalled_by_a_student_who_stops_the_reader(ready_course):
    course = ready_course
    staller, other = course.usernames
    assert course.run("send").returncode == 0
    run_as_student(course, staller, MANY_FILES, "5000")  # a reader that takes a while
    write_as(course, other, "tutorial/answer.py", "print(42)\n")
    with stopper(course, staller, pulse=2.0):
        r = run_bounded(course, "retrieve", env={DEADLINE_ENV: "5"}, bound=45)
    assert r.returncode == 1, r.text
    assert failed_line(r.text, staller), r.text
    assert re.search(rf"^\s*{other}: collected", r.text, re.M), r.text
    dest = course.base / "submissions"
    assert (dest / other / "latest" / "answer.py").read_text() == "print(42)\n"


def test_send_is_not_stalled_by_a_student_who_stops_the_worker(ready_course):
    course = ready_course
    staller, other = course.usernames
    many = course.base / "tutorial" / "many"
    many.mkdir()
    for i in range(3000):  # a worker that takes a while
        (many / f"n{i:05d}.txt").write_text(f"{i}\n")
    with stopper(course, staller):
        r = run_bounded(course, "send", env={DEADLINE_ENV: "5"}, bound=45)
    assert r.returncode == 1, r.text
    assert failed_line(r.text, staller), r.text
    assert (course.home(other) / "tutorial" / "many" / "n02999.txt").exists()


# --- 8. rule 15: nothing of a student's reaches the teacher's terminal raw --------------------

ESCAPES = "\x1b]0;pwned\x07\x1b[2K\x1b[1A started"


MAKE_NAMES = r"""
import json, os, sys
base = os.path.join(os.path.expanduser("~"), "tutorial")
for name in json.loads(sys.argv[1]):
    with open(os.path.join(base, name), "w") as f:
        f.write("x\n")
    os.symlink("/etc/passwd", os.path.join(base, "link-" + name))  # skipped, and named
"""


def test_retrieve_shows_students_file_names_without_control_characters(ready_course):
    course = ready_course
    u = course.usernames[0]
    assert course.run("send").returncode == 0
    run_as_student(course, u, MAKE_NAMES, json.dumps(HOSTILE_NAMES))
    # --deadline in the past: every new file is late, and late files are listed by name
    r = run_bounded(course, "retrieve", "--deadline", "2000-01-01 00:00", bound=120)
    assert r.returncode == 0, r.text
    assert re.search(rf"^\s*{u}: collected", r.text, re.M), r.text
    assert "late" in r.text and "skipped" in r.text, r.text
    for name, data in (("stdout", r.stdout), ("stderr", r.stderr)):
        assert not control_chars(data), f"retrieve's {name}: {control_chars(data)}: {data!r}"


def test_send_shows_file_names_without_control_characters(ready_course):
    course = ready_course
    u = course.usernames[0]
    for name in HOSTILE_NAMES:
        (course.base / "tutorial" / name).write_text("v1\n")
    r = run_bounded(course, "send", bound=120)
    assert r.returncode == 0, r.text
    # the student edits them; the teacher changes them: conflicts, listed by name
    for name in HOSTILE_NAMES:
        write_as(course, u, f"tutorial/{name}", "mine\n")
        (course.base / "tutorial" / name).write_text("v2\n")
    r2 = run_bounded(course, "send", bound=120)
    assert r2.returncode in (0, 1), r2.text
    for run, result in (("first", r), ("second", r2)):
        for name, data in (("stdout", result.stdout), ("stderr", result.stderr)):
            assert not control_chars(data), (
                f"send's {name} ({run} run): {control_chars(data)}: {data!r}"
            )


def test_helpers_see_control_characters():
    """The checks above can fail: control_chars finds what a terminal would act on."""
    assert control_chars(ESCAPES.encode()) == ["U+0007", "U+001B"]
    assert control_chars("csi\u009b ě".encode()) == ["U+009B"]
    assert control_chars(b"  alice: collected \\x1b]0;pwned\\x07\tok\n") == []
