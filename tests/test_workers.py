"""The one worker protocol: fork_map (send, retrieve) and as_user (setup, launch)."""

from __future__ import annotations

import os
import pwd
import time

import pytest
from conftest import needs_root

from classroom.core.errors import StepFailed
from classroom.host import workers


def square(n: int) -> int:
    return n * n


def fail(message: str) -> None:
    raise ValueError(message)


def die() -> None:
    os._exit(3)


def hang(seconds: float) -> None:
    time.sleep(seconds)


def busy(seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        workers.beat()
        time.sleep(0.1)
    return "done"


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def run_all(tasks, **kw) -> dict:
    kw.setdefault("workers", 2)
    return dict(workers.fork_map(tasks, **kw))


def test_results_by_key():
    got = run_all([(str(n), square, (n,)) for n in range(5)])
    assert got == {str(n): {"ok": n * n} for n in range(5)}


def test_args_built_just_before_the_fork():
    got = run_all([("a", square, lambda: (7,))])
    assert got == {"a": {"ok": 49}}


def test_an_exception_is_its_message():
    got = run_all([("a", fail, ("no such folder",)), ("b", fail, ("",))])
    assert got == {"a": {"error": "no such folder"}, "b": {"error": "ValueError"}}


def test_a_worker_that_dies_without_a_word():
    (payload,) = run_all([("a", die, ())]).values()
    assert payload["error"].startswith("the worker process died")
    assert "status" in payload


def test_a_silent_worker_is_stopped_a_busy_one_is_not():
    got = run_all([("hung", hang, (30,)), ("busy", busy, (2.5,))], idle_timeout=1)
    assert got["hung"] == {"error": "no progress for 1 s: stopped", "timeout": 1}
    assert got["busy"] == {"ok": "done"}


def freeze() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGSTOP)  # what a student can do to their own worker


def test_a_worker_past_its_deadline_is_stopped_the_others_go_on():
    """A frozen worker, and one that trickles progress forever, each fail at the deadline."""
    tasks = [("frozen", freeze, ()), ("trickle", busy, (60,))]
    tasks += [(str(n), square, (n,)) for n in range(4)]
    got = run_all(tasks, idle_timeout=120, deadline=2, workers=2)
    stopped = {"error": "not done within 2 s: stopped (the others went on)", "timeout": 2}
    assert got["frozen"] == stopped and got["trickle"] == stopped
    assert {k: v for k, v in got.items() if k.isdigit()} == {
        str(n): {"ok": n * n} for n in range(4)
    }


def test_the_deadline_grows_with_the_data(monkeypatch):
    monkeypatch.setattr(workers, "STUDENT_DEADLINE", 5.0)
    assert workers.student_deadline() == 5.0
    assert workers.student_deadline(10 * workers.SLOWEST_RATE) == 15.0


def test_only_the_kept_descriptors_are_inherited():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    os.set_inheritable(r2, True)
    try:
        got = run_all([("kept", fd_open, (r1,)), ("other", fd_open, (r2,))], keep_fds=[r1])
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    assert got == {"kept": {"ok": True}, "other": {"ok": False}}


def whoami() -> dict:
    umask = os.umask(0)
    return {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "groups": os.getgroups(),
        "home": os.environ.get("HOME"),
        "sudo": os.environ.get("SUDO_USER"),
        "umask": umask,
        "cwd": os.getcwd(),
    }


@needs_root
def test_as_user_becomes_the_user():
    nobody = pwd.getpwnam("nobody")
    os.environ["SUDO_USER"] = "someone"  # nothing of root's environment reaches the student
    try:
        got = workers.as_user(nobody, whoami)
    finally:
        del os.environ["SUDO_USER"]
    assert (got["uid"], got["euid"]) == (nobody.pw_uid, nobody.pw_uid)
    assert 0 not in got["groups"]
    assert got["home"] == nobody.pw_dir and got["sudo"] is None
    assert (got["umask"], got["cwd"]) == (0o077, "/")


@needs_root
def test_as_user_failures():
    nobody = pwd.getpwnam("nobody")
    with pytest.raises(StepFailed, match=r"^as nobody: no such folder$"):
        workers.as_user(nobody, fail, "no such folder")
    with pytest.raises(StepFailed, match=r"^as nobody: gave up after 1 s"):
        workers.as_user(nobody, hang, 30, timeout=1)
    with pytest.raises(StepFailed, match=r"^as nobody: the helper process failed"):
        workers.as_user(nobody, die)
    with pytest.raises(StepFailed, match="refusing to act as root"):
        workers.as_user(pwd.getpwuid(0), whoami)
