"""launch: real Jupyter servers as real students, in both start modes (exec and fork).

The helpers the server tests share (HTTP login, process inspection) are in conftest.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import (
    CLEAN_ENV,
    answers,
    log_writer_of,
    login,
    needs_root,
    proc_env,
    proc_fds,
    proc_status,
    server_pids_gone,
    server_rows,
    status,
)
from students import hashed_password, memory_contains, write_as

from classroom.commands import launch
from classroom.core import launchplan
from classroom.core.settings import Settings, load
from classroom.host import identity, server
from classroom.host.identity import server_python
from classroom.host.ports import port_free

MODES = pytest.mark.parametrize("mode", ["exec", "fork"])


# --- helpers ------------------------------------------------------------------------------


def alive_processes_of(uid: int) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["uids", "status"]):
        if (
            p.info["uids"]
            and p.info["uids"].real == uid
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(p)
    return found


# --- pure tests (no root) ----------------------------------------------------------------


def settings(tmp_path: Path, **launch: str) -> Settings:
    cfg = tmp_path / "c.cfg"
    lines = [
        "[course]",
        "name = demo",
        "roster = r.csv",
        f"state_dir = {tmp_path / 'st'}",
        "[launch]",
    ]
    lines += [f"{k} = {v}" for k, v in launch.items()]
    cfg.write_text("\n".join(lines) + "\n")
    (tmp_path / "r.csv").write_text("username\nalice\n")
    return load(cfg)


def test_choose_port_keeps_previous_and_skips_taken():
    free = {8001, 8003, 8004, 9000}.__contains__
    assert launchplan.choose_port(9000, set(), 8001, free) == 9000
    assert launchplan.choose_port(9000, {9000}, 8001, free) == 8001
    assert launchplan.choose_port(8002, set(), 8001, free) == 8001  # 8002 is in use
    assert launchplan.choose_port(None, {8001}, 8001, free) == 8003


def test_port_free_sees_a_socket_someone_holds():
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        assert not port_free("0.0.0.0", port)
        assert not port_free("127.0.0.1", port)
    assert port_free("0.0.0.0", port)


def test_server_args_carry_no_secret_and_map_settings(tmp_path):
    s = settings(tmp_path, idle_timeout="600", root="folder", app="notebook")
    args = launchplan.server_args(s, "/home/alice", 8123)
    text = " ".join(args)
    assert "--ServerApp.port=8123" in args and "--ServerApp.port_retries=0" in args
    assert "--ServerApp.root_dir=/home/alice/tutorial" in args
    assert "--IdentityProvider.token=" in args
    assert "--PasswordIdentityProvider.password_required=True" in args
    assert "--ServerApp.base_url=/user/alice/" in args
    # JupyterLab's news and update checks: off, from root's overrides, not the home
    assert "--JupyterNotebookApp.app_settings_dir=/run/classroom/demo/lab-settings" in args
    assert "--MappingKernelManager.cull_idle_timeout=600" in args
    assert "--ServerApp.shutdown_no_activity_timeout=600" in args
    assert "hashed_password" not in text and "argon2" not in text and "password=" not in text
    assert launchplan.exec_argv(s, args, server_python())[1:3] == ["-m", "notebook"]
    home = launchplan.server_args(settings(tmp_path, root="home"), "/home/alice", 1)
    assert "--ServerApp.root_dir=/home/alice" in home
    assert not any("cull" in a for a in home)


def test_ports_go_in_roster_order_and_previous_ports_are_kept(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from classroom.host.state import State

    s = settings(tmp_path, first_port="8001", portal_port="8000")
    state = State.peek(tmp_path / "no-state")
    # zed had 8005 last time; amy had 8000, which is the portal's port now
    state.execute("INSERT INTO ports (username, port) VALUES ('zed', 8005), ('amy', 8000)")
    monkeypatch.setattr(launch, "port_free", lambda ip, port: port != 8002)  # someone holds 8002
    pw = pwd.getpwnam("root")
    starts = [server.Server(name, pw.pw_uid, pw=pw) for name in ("zed", "bob", "amy", "cat")]
    launch.assign(SimpleNamespace(settings=s, state=state), starts)
    assert [st.port for st in starts] == [8005, 8001, 8003, 8004]
    assert all(st.url.endswith(f":{st.port}/user/{st.username}/") for st in starts)


def test_dry_run_changes_nothing_without_root(tmp_path):
    s = settings(tmp_path)
    assert server.running_servers(s) == {}


def test_dry_run_starts_and_stops_nothing(tmp_path):
    """The chokepoints decide: under --dry-run spawn starts nothing, stop signals nothing."""
    from classroom.host import processes, system

    marker = tmp_path / "started"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    system.set_dry_run(True)
    try:
        assert system.spawn(["touch", str(marker)], env={}) is None
        assert processes.stop_processes([psutil.Process(sleeper.pid)]) == []
        assert sleeper.poll() is None
    finally:
        system.set_dry_run(False)
        sleeper.kill()
        sleeper.wait()
    assert not marker.exists()


# --- real servers ------------------------------------------------------------------------

CONFIG_PY = """\
import json, os
with open(os.path.join(os.path.expanduser("~"), "config-was-read"), "w") as f:
    json.dump({"uid": os.getuid(), "env": dict(os.environ), "cwd": os.getcwd()}, f)
c.ServerApp.custom_display_url = "http://marker-from-student-config.invalid/"
"""


@needs_root
@MODES
def test_launch_runs_each_student_as_the_student(ready_course, mode):
    c = ready_course
    c.write_config(launch={"start_mode": mode})
    a, b = c.usernames
    write_as(c, b, ".jupyter/jupyter_server_config.py", CONFIG_PY)
    creds = c.credentials()

    dry = c.run("launch", "--dry-run", "--no-portal")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would be started" in dry.stdout
    assert all(row["server"] == "stopped" for row in status(c).values())

    try:
        r = c.run("launch", "--no-portal")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "launch: 2 started, 0 unchanged, 0 failed" in r.stdout
        st = status(c)
        rows = server_rows(c)
        ports = {u: st[u]["port"] for u in c.usernames}
        assert len(set(ports.values())) == 2
        for u in c.usernames:
            pw = c.pw(u)
            pid = st[u]["pid"]
            assert st[u]["server"] == "running" and st[u]["url"].endswith(f":{ports[u]}/user/{u}/")
            assert rows[u]["mode"] == mode and rows[u]["uid"] == pw.pw_uid
            # identity: the student's uid, gid and groups only
            ps = proc_status(pid)
            assert set(ps["Uid"].split()) == {str(pw.pw_uid)}
            assert set(ps["Gid"].split()) == {str(pw.pw_gid)}
            assert {int(g) for g in ps["Groups"].split()} == set(os.getgrouplist(u, pw.pw_gid))
            assert os.getsid(pid) == pid  # its own session
            # in fork mode too: /proc/PID/environ (ps e) shows the student's clean environment
            assert set(proc_env(pid)) == CLEAN_ENV and proc_env(pid)["HOME"] == pw.pw_dir
            assert proc_env(pid) == identity.student_env(pw)  # one environment, both modes
            assert psutil.Process(pid).environ()["USER"] == u
            assert os.readlink(f"/proc/{pid}/cwd") == pw.pw_dir
            fds = proc_fds(pid)
            assert fds[0] == "/dev/null"
            # its output goes through a pipe to a root log writer (rule 13): the student
            # holds no descriptor of root's log, in either mode
            assert fds[1] == fds[2] and fds[1].startswith("pipe:")
            writer = log_writer_of(pid)
            assert writer is not None
            assert proc_fds(writer)[1] == str(c.state_dir / "logs" / f"{u}.log")
            assert not [t for n, t in fds.items() if n > 2 and t.startswith(str(c.state_dir))]
            # never a password or hash in argv
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert creds[u]["notebook_password"] not in cmdline and "argon2" not in cmdline
            # the log is the teacher's
            logst = os.stat(c.state_dir / "logs" / f"{u}.log")
            assert logst.st_uid == 0 and stat.S_IMODE(logst.st_mode) == 0o600
            # the student's runtime dir, and the password works (and is needed)
            runtime = Path(pw.pw_dir) / ".local/share/jupyter/runtime" / f"jpserver-{pid}.json"
            assert runtime.exists() and runtime.stat().st_uid == pw.pw_uid
            assert (
                requests.get(
                    f"http://127.0.0.1:{ports[u]}/user/{u}/api/contents", timeout=5
                ).status_code
                == 403
            )
            session = login(ports[u], creds[u]["notebook_password"], f"/user/{u}/")
            assert (
                session.get(
                    f"http://127.0.0.1:{ports[u]}/user/{u}/api/contents", timeout=5
                ).status_code
                == 200
            )
            # no other student's password or hash in its memory (its own hash is: the scan works)
            other = b if u == a else a
            needles = [
                creds[other]["password"].encode(),
                creds[other]["notebook_password"].encode(),
                hashed_password(c.home(other))[1].encode(),
                hashed_password(c.home(u))[1].encode(),
            ]
            found = memory_contains(pid, needles)
            assert found == {hashed_password(c.home(u))[1].encode()}, (
                f"{u}'s server holds {other}'s secrets"
            )
        # the student's own ~/.jupyter/jupyter_server_config.py ran, as the student
        marker = json.loads((c.home(b) / "config-was-read").read_text())
        assert marker["uid"] == c.pw(b).pw_uid and marker["cwd"] == c.pw(b).pw_dir
        assert set(marker["env"]) == CLEAN_ENV and marker["env"]["HOME"] == c.pw(b).pw_dir
        assert (
            "marker-from-student-config.invalid" in (c.state_dir / "logs" / f"{b}.log").read_text()
        )

        again = c.run("launch", "--no-portal")
        assert again.returncode == 0 and "2 unchanged" in again.stdout, again.stdout
        assert {u: r["pid"] for u, r in status(c).items()} == {u: st[u]["pid"] for u in c.usernames}

        down = c.run("shutdown")
        assert down.returncode == 0, down.stdout + down.stderr
        assert "shutdown: 2 stopped" in down.stdout
        assert server_pids_gone([st[u]["pid"] for u in c.usernames])
        assert all(row["server"] == "stopped" for row in status(c).values())
        assert "2 unchanged" in c.run("shutdown").stdout

        # Ports are stable across launches; a port someone else holds is skipped.
        with socket.socket() as held:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.bind(("0.0.0.0", ports[a]))
            held.listen()
            r = c.run("launch", "--no-portal")
            assert r.returncode == 0, r.stdout + r.stderr
            st2 = status(c)
            assert st2[b]["port"] == ports[b]
            assert st2[a]["port"] not in (ports[a], ports[b]) and st2[a]["server"] == "running"
    finally:
        c.run("shutdown")


@needs_root
@MODES
def test_one_students_failure_does_not_stop_the_others(make_course, mode):
    c = make_course(3)
    assert c.run("setup").returncode == 0
    # no kernel server importing numpy and pandas beside three starts: this test is about
    # the servers (15 s each: a busy 2-core host starts Python slowly)
    c.write_config(
        launch={"start_mode": mode, "app": "server", "start_timeout": "15", "kernel_mode": "exec"}
    )
    broken, slow, fine = c.usernames
    write_as(
        c, broken, ".jupyter/jupyter_server_config.py", "raise SystemExit('broken on purpose')\n"
    )
    write_as(c, slow, ".jupyter/jupyter_server_config.py", "import time\ntime.sleep(60)\n")
    try:
        r = c.run("launch", "--no-portal")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "launch: 1 started, 0 unchanged, 2 failed" in r.stdout
        out = r.stdout + r.stderr
        assert re.search(rf"{broken}: .*(broken on purpose|stopped before it answered)", out), out
        assert re.search(rf"{slow}: .*did not answer on port \d+ within 15 s", out), out
        assert f"{c.state_dir / 'logs' / broken}.log" in out
        st = status(c)
        assert st[fine]["server"] == "running" and answers(st[fine]["port"])
        assert st[broken]["server"] == "stopped" and st[slow]["server"] == "stopped"
        # the slow one was stopped, not left behind
        uid = c.pw(slow).pw_uid
        deadline = time.monotonic() + 5
        while (left := alive_processes_of(uid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, [p.cmdline() for p in left]
    finally:
        c.run("shutdown")


@needs_root
def test_launch_needs_an_account(course):
    r = course.run("launch", "--no-portal")
    assert r.returncode == 1
    assert "has no account yet: run setup first" in r.stdout


@needs_root
def test_portal_runs_without_the_lock_and_stop_on_exit_stops_the_servers(ready_course):
    c = ready_course
    try:
        import classroom.host.portal  # noqa: F401
    except ImportError:
        pytest.skip("the portal is not built yet")
    c.write_config(launch={"app": "server"})
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).parent.parent / "notebooks.py"),
            "launch",
            str(c.config),
            "--stop-on-exit",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        portal = f"http://127.0.0.1:{c.sections['launch']['portal_port']}/healthz"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(portal, timeout=2).json()["running"] == 2:
                    break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("the portal did not come up with 2 servers")
        # the lock is free while the portal runs: shutdown works for one student
        r = c.run("shutdown", "--only", c.usernames[0])
        assert r.returncode == 0, r.stdout + r.stderr
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "Stopping the servers" in out
        assert all(row["server"] == "stopped" for row in status(c).values())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        c.run("shutdown")


@needs_root
def test_portal_reaps_a_dead_server_and_ctrl_c_leaves_the_others_running(ready_course):
    c = ready_course
    a, b = c.usernames
    c.write_config(launch={"app": "server", "start_mode": "exec"})
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).parent.parent / "notebooks.py"),
            "launch",
            str(c.config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        portal = f"http://127.0.0.1:{c.sections['launch']['portal_port']}/healthz"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(portal, timeout=2).json()["running"] == 2:
                    break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
        else:
            pytest.fail("the portal did not come up with 2 servers")
        st = status(c)
        os.kill(st[a]["pid"], 9)  # an exec-mode server is launch's child: launch must reap it
        assert server_pids_gone([st[a]["pid"]])
        deadline = time.monotonic() + 5  # no request to the portal meanwhile
        while Path(f"/proc/{st[a]['pid']}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{st[a]['pid']}").exists(), "a zombie of launch"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "Portal stopped." in out
        st2 = status(c)
        assert st2[a]["server"] == "died"
        assert st2[b]["server"] == "running" and answers(st2[b]["port"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        c.run("shutdown")


TAKE_PORT_HOOK = """\
#!{python}
# pre_spawn: the first time, someone else takes the student's port just before the server starts
import os, socket, sys, time
marker = os.path.join({folder!r}, "took-" + sys.argv[1])
if sys.argv[1] == {target!r} and not os.path.exists(marker):
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(os.environ["NB_PORT"])))
        s.listen()
        os.write(w, b"x")
        time.sleep(60)
        os._exit(0)
    os.read(r, 1)
    with open(marker, "w") as f:
        f.write(os.environ["NB_PORT"])
"""


@needs_root
def test_a_port_taken_while_the_server_starts_is_replaced(ready_course, tmp_path):
    """Two courses launching at once may pick the same free port: the loser moves on."""
    import psutil

    c = ready_course
    a, b = c.usernames
    hook = tmp_path / "take-port"
    hook.write_text(TAKE_PORT_HOOK.format(python=sys.executable, folder=str(tmp_path), target=a))
    hook.chmod(0o755)
    c.write_config(launch={"app": "server"}, hooks={"pre_spawn": str(hook)})
    try:
        r = c.run("launch", "--no-portal")
        assert r.returncode == 0, r.stdout + r.stderr
        taken = int((tmp_path / f"took-{a}").read_text())
        assert f"{a}: port {taken} was taken while it started; trying" in r.stdout
        st = status(c)
        assert st[a]["server"] == "running" and st[a]["port"] != taken
        assert st[a]["port"] != st[b]["port"] and answers(st[a]["port"])
        assert st[a]["url"].endswith(f":{st[a]['port']}/user/{a}/")
    finally:
        for p in psutil.process_iter(["cmdline"]):
            if str(hook) in " ".join(p.info["cmdline"] or []):
                p.kill()
        c.run("shutdown")


@needs_root
@pytest.mark.parametrize("app", ["lab", "notebook"])
def test_lab_news_and_update_checks_are_off_without_touching_the_home(ready_course, app):
    c = ready_course
    u = c.usernames[0]
    c.write_config(launch={"app": app, "start_mode": "exec"})
    notification = "@jupyterlab/apputils-extension:notification"
    try:
        r = c.run("launch", "--no-portal", "--only", u)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "any student can collect a classmate's login cookie" in r.stderr
        port = status(c)[u]["port"]
        session = login(port, c.credentials()[u]["notebook_password"], f"/user/{u}/")
        page = session.get(f"http://127.0.0.1:{port}/user/{u}/{app if app == 'lab' else 'tree'}")
        config = json.loads(
            re.search(r'id="jupyter-config-data"[^>]*>(.*?)</script>', page.text, re.S).group(1)
        )
        settings_url = config["settingsUrl"].strip("/")  # under the base URL
        got = session.get(
            f"http://127.0.0.1:{port}/user/{u}/{settings_url}/{notification}", timeout=10
        )
        assert got.status_code == 200, got.text[:300]
        # the overrides are the defaults the page starts from
        defaults = {k: v.get("default") for k, v in got.json()["schema"]["properties"].items()}
        assert defaults["fetchNews"] == "false" and defaults["checkForUpdates"] is False
        overrides = Path(f"/run/classroom/{c.name}/lab-settings/overrides.json")
        st = os.stat(overrides)
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644
        assert not list(c.home(u).rglob("overrides.json"))
    finally:
        c.run("shutdown")
