"""shutdown: servers and their kernels stopped; only the processes the course recorded."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import psutil
from conftest import free_port, login, needs_root, server_pids_gone, status

from classroom.host import processes

IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


def as_student(pw, argv, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=[],
        env={"HOME": pw.pw_dir, "PATH": "/usr/bin:/bin"},
        cwd=pw.pw_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **kw,
    )


def test_escalates_to_sigkill_for_a_process_ignoring_sigterm():
    proc = subprocess.Popen([sys.executable, "-c", IGNORE_TERM])
    try:
        time.sleep(0.3)  # let it install its handler
        started = time.monotonic()
        left = processes.stop_processes([psutil.Process(proc.pid)], polite=0.5, term=0.5, kill=2)
        assert left == []
        assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == "zombie"
        # it outlived SIGTERM twice (0.5 s each), then SIGKILL ended it
        assert 1.0 <= time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()


RENAMED = (
    "import ctypes, time; ctypes.CDLL(None).prctl(15, b'jupy' + b'ter-lab', 0, 0, 0); "
    "print('ok', flush=True); time.sleep(60)"
)


def test_all_jupyter_knows_a_forked_server_by_its_name():
    """A forked server's command line is the fork server's; its process name is the app's."""
    proc = subprocess.Popen([sys.executable, "-c", RENAMED], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ok"
        found = {p.pid for p in processes.other_jupyter(os.getuid(), set())}
        assert proc.pid in found
        assert proc.pid not in {p.pid for p in processes.other_jupyter(os.getuid(), {proc.pid})}
    finally:
        proc.kill()
        proc.wait()


@needs_root
def test_shutdown_stops_the_kernels_too(ready_course):
    c = ready_course
    # exec'd kernels: the server's children (forked ones: tests/test_kernels.py)
    c.write_config(launch={"app": "server", "start_mode": "exec", "kernel_mode": "exec"})
    a = c.usernames[0]
    try:
        r = c.run("launch", "--no-portal", "--only", a)
        assert r.returncode == 0, r.stdout + r.stderr
        st = status(c)[a]
        session = login(st["port"], c.credentials()[a]["notebook_password"], f"/user/{a}/")
        k = session.post(f"http://127.0.0.1:{st['port']}/user/{a}/api/kernels", json={}, timeout=30)
        assert k.status_code == 201, k.text
        server = psutil.Process(st["pid"])
        deadline = time.monotonic() + 20
        kernels = []
        while not kernels and time.monotonic() < deadline:
            kernels = [
                p for p in server.children(recursive=True) if "ipykernel" in " ".join(p.cmdline())
            ]
            time.sleep(0.2)
        assert kernels, "no kernel process found"
        assert os.getsid(kernels[0].pid) != st["pid"]  # kernels have sessions of their own
        down = c.run("shutdown")
        assert down.returncode == 0, down.stdout + down.stderr
        assert f"{a}: stopped" in down.stdout
        assert server_pids_gone([st["pid"], *(k.pid for k in kernels)])
    finally:
        c.run("shutdown")


@needs_root
def test_never_signals_a_pid_that_is_not_the_recorded_process(ready_course):
    c = ready_course
    a, b = c.usernames
    pw = c.pw(a)
    theirs = as_student(pw, ["sleep", "60"])
    roots = subprocess.Popen(["sleep", "60"])
    try:
        start_theirs = psutil.Process(theirs.pid).create_time()
        start_roots = psutil.Process(roots.pid).create_time()
        with sqlite3.connect(c.state_dir / "state.db") as db:
            insert = "INSERT INTO servers (username, port, pid, start_time, uid, mode) VALUES (?, ?, ?, ?, ?, 'exec')"
            # a's record: same pid and uid, another start time (the pid was reused)
            db.execute(insert, (a, free_port(), theirs.pid, start_theirs - 100, pw.pw_uid))
            # b's record: right pid and start time, but the process is root's, not b's
            db.execute(insert, (b, free_port(), roots.pid, start_roots, c.pw(b).pw_uid))
        st = status(c)
        assert st[a]["server"] == "died" and st[b]["server"] == "died"
        r = c.run("shutdown")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "already stopped; record cleared" in r.stdout
        time.sleep(0.3)
        assert theirs.poll() is None and roots.poll() is None  # neither was signalled
        assert all(row["server"] == "stopped" for row in status(c).values())
    finally:
        for p in (theirs, roots):
            p.kill()
            p.wait()


@needs_root
def test_all_jupyter_also_stops_what_the_course_did_not_start(ready_course):
    c = ready_course
    a = c.usernames[0]
    pw = c.pw(a)
    by_hand = as_student(
        pw,
        [
            sys.executable,
            "-m",
            "jupyter_server",
            f"--port={free_port()}",
            "--ServerApp.ip=127.0.0.1",
            "--no-browser",
        ],
    )
    try:
        r = c.run("shutdown")
        assert r.returncode == 0 and "0 failed" in r.stdout
        assert by_hand.poll() is None  # not the course's: left alone
        dry = c.run("shutdown", "--all-jupyter", "--dry-run")
        assert "1 other Jupyter process" in dry.stdout and by_hand.poll() is None
        r = c.run("shutdown", "--all-jupyter")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"{a}: stopped (1 other Jupyter process(es))" in r.stdout
        assert by_hand.wait(10) is not None
    finally:
        if by_hand.poll() is None:
            by_hand.kill()
            by_hand.wait()


@needs_root
def test_status_says_died_when_a_server_was_killed(ready_course):
    c = ready_course
    c.write_config(launch={"app": "server", "start_mode": "fork"})
    a = c.usernames[0]
    try:
        assert c.run("launch", "--no-portal", "--only", a).returncode == 0
        pid = status(c)[a]["pid"]
        os.kill(pid, signal.SIGKILL)
        assert server_pids_gone([pid])
        assert status(c)[a]["server"] == "died"
        r = c.run("launch", "--no-portal", "--only", a)  # a died server is started again
        assert r.returncode == 0 and f"{a}: started" in r.stdout, r.stdout + r.stderr
        assert status(c)[a]["server"] == "running"
    finally:
        c.run("shutdown")
