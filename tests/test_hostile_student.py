"""Issue 16: what a hostile student found (SPEC §6.11 rule 11), tried as the student would.

Each test drives the tool through its command line as a teacher does, on a throw-away
course with real random accounts (see conftest), and acts as the student: code runs in a
child that has setuid() to the student's uid (never one of the host's real users).

A loop that forks and exits, and the ids a removed account had: test_accounts_hostile.py.
Rules 12-15 (IPv6 squatting, nothing of root's in a server, stalls, escape sequences) are
tried in test_server_safety.py and test_send_retrieve_attacks.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass

import pytest
from conftest import (
    NOTEBOOKS,
    PYTHON,
    control_chars,
    needs_root,
)
from students import (
    run_as_student,
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
