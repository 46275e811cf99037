"""The fork server: pre-imported, root, holding nothing; children become the student first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    CLEAN_ENV,
    answers,
    free_port,
    log_writer_of,
    needs_root,
    proc_env,
    proc_fds,
    proc_status,
    server_rows,
    status,
)

from classroom.commands import launch
from classroom.commands.course import open_course
from classroom.core import launchplan
from classroom.core.settings import load
from classroom.host import forkserver, identity, processes

PROBE = """\
import ctypes, json, os, sys
pid = int(sys.argv[1])
seen = {}
try:
    os.kill(pid, 0)
    seen["signal"] = "allowed"
except PermissionError:
    seen["signal"] = "denied"
try:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.read(1)
    seen["read"] = "allowed"
except OSError:
    seen["read"] = "denied"
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH
    seen["ptrace"] = "allowed"
    libc.ptrace(17, pid, 0, 0)  # PTRACE_DETACH
else:
    seen["ptrace"] = "denied"
print(json.dumps(seen))
"""


def probe_as(pw, pid: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(pid)],
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=os.getgrouplist(pw.pw_name, pw.pw_gid),
        env={"HOME": pw.pw_dir, "PATH": "/usr/bin:/bin"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)


def wait_answers(port: int, pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and psutil.pid_exists(pid):
        if answers(port):
            return True
        time.sleep(0.2)
    return False


def pipe_inode(fileobj) -> str:
    return f"pipe:[{os.fstat(fileobj.fileno()).st_ino}]"


@needs_root
def test_fork_server_holds_nothing_and_its_children_are_the_students(ready_course, tmp_path):
    c = ready_course
    settings = load(c.config).replace(root="home")
    a, b = c.usernames
    pw = c.pw(a)
    log = tmp_path / "server.log"
    fork = forkserver.ForkServer.start("server", log_path=str(tmp_path / "fork.log"))
    server_pid = None
    try:
        fork.wait_ready(60)
        me = psutil.Process(fork.pid)
        assert me.uids().real == 0
        assert len(os.listdir(f"/proc/{fork.pid}/task")) == 1  # no thread to inherit
        assert os.getsid(fork.pid) == fork.pid  # not in launch's terminal session
        port = free_port()
        args = launchplan.server_args(settings, pw.pw_dir, port)
        server_pid = fork.spawn(a, pw.pw_uid, args, str(log))
        # the pid is only handed out once it is the student's (launch records uid with it)
        assert set(proc_status(server_pid)["Uid"].split()) == {str(pw.pw_uid)}
        assert wait_answers(port, server_pid), log.read_text()
        server = psutil.Process(server_pid)
        assert server.ppid() == fork.pid  # its child: the fork server supervises and reaps it

        st = proc_status(server_pid)
        assert set(st["Uid"].split()) == {str(pw.pw_uid)} and set(st["Gid"].split()) == {
            str(pw.pw_gid)
        }
        assert {int(g) for g in st["Groups"].split()} == set(os.getgrouplist(a, pw.pw_gid))
        assert st["Threads"] and os.getsid(server_pid) == server_pid
        assert os.readlink(f"/proc/{server_pid}/cwd") == pw.pw_dir
        fds = proc_fds(server_pid)
        # its output goes through a pipe to a root log writer: no descriptor of root's
        assert fds[0] == "/dev/null" and fds[1] == fds[2] and fds[1].startswith("pipe:")
        writer = log_writer_of(server_pid)
        assert writer is not None and proc_fds(writer)[1] == str(log)
        assert os.getsid(writer) == writer and os.readlink(f"/proc/{writer}/cwd") == "/"
        assert set(proc_fds(writer)) == {0, 1, 2} and proc_env(writer) == {}
        ours = {pipe_inode(fork.proc.stdin), pipe_inode(fork.proc.stdout)}
        assert not ours & set(fds.values()), (
            "the fork server's pipes leaked into a student's server"
        )
        assert (
            Path(pw.pw_dir) / f".local/share/jupyter/runtime/jpserver-{server_pid}.json"
        ).exists()

        # Neither student can signal, read or ptrace the (root) fork server.
        for who in (a, b):
            assert probe_as(c.pw(who), fork.pid) == {
                "signal": "denied",
                "read": "denied",
                "ptrace": "denied",
            }
        # Another student cannot touch a's server either.
        assert probe_as(c.pw(b), server_pid) == {
            "signal": "denied",
            "read": "denied",
            "ptrace": "denied",
        }

        # A child that cannot become the student is that request's error; the server goes on.
        with pytest.raises(ValueError, match="No such file or directory"):
            fork.spawn(b, c.pw(b).pw_uid, args, str(tmp_path / "no-such-dir" / "b.log"))

        # Killing the fork server does not kill the servers it started.
        os.kill(fork.pid, signal.SIGKILL)
        fork.proc.wait(10)
        time.sleep(0.5)
        assert server.is_running() and answers(port)
    finally:
        fork.close(timeout=2)
        if server_pid and psutil.pid_exists(server_pid):
            processes.stop_processes([psutil.Process(server_pid)], polite=3, term=2, kill=2)


def run_launch(c, capsys) -> tuple[int, str]:
    course = open_course(c.config, "launch", changes=True)
    try:
        code = launch.launch(course, portal=False)
    finally:
        course.close()
    out = capsys.readouterr()
    return code, out.out + out.err


@needs_root
def test_fork_server_that_cannot_start_falls_back_to_exec(ready_course, capsys, monkeypatch):
    c = ready_course
    c.write_config(launch={"app": "server", "start_mode": "fork"})
    real_start = forkserver.ForkServer.start

    def broken_start(app, **kw):
        return real_start(app, python="/bin/false")  # starts, then exits before "ready"

    monkeypatch.setattr(forkserver.ForkServer, "start", staticmethod(broken_start))
    try:
        code, out = run_launch(c, capsys)
        assert code == 0, out
        assert "fork server did not start" in out and "by exec instead" in out
        assert {r["mode"] for r in server_rows(c).values()} == {"exec"}
        assert all(row["server"] == "running" for row in status(c).values())
    finally:
        c.run("shutdown")


@needs_root
def test_fork_server_dying_midway_falls_back_to_exec(ready_course, capsys, monkeypatch):
    c = ready_course
    c.write_config(launch={"app": "server", "start_mode": "fork"})
    real_spawn = forkserver.ForkServer.spawn
    calls = []

    def dying_spawn(self, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            self.proc.kill()
            self.proc.wait()
        return real_spawn(self, *args, **kw)

    monkeypatch.setattr(forkserver.ForkServer, "spawn", dying_spawn)
    try:
        code, out = run_launch(c, capsys)
        assert code == 0, out
        assert "fork server stopped" in out and "by exec instead" in out
        assert sorted(r["mode"] for r in server_rows(c).values()) == ["exec", "fork"]
        assert all(row["server"] == "running" for row in status(c).values())
    finally:
        c.run("shutdown")


def test_student_env_matches_the_exec_path():
    import pwd

    pw = pwd.getpwuid(os.getuid())
    assert set(identity.student_env(pw)) == CLEAN_ENV
    assert identity.student_env(pw)["PATH"].startswith(os.path.dirname(sys.executable) + ":")


@needs_root
def test_work_done_as_the_student_sees_the_servers_environment():
    """as_user (send, retrieve, preparing a home) gives the student the environment their
    server has in either start mode: one definition, the same PATH (it used to differ)."""
    import pwd

    from classroom.host.workers import as_user

    pw = pwd.getpwnam("nobody")
    seen = as_user(pw, lambda: dict(os.environ))
    assert seen == identity.student_env(pw)
