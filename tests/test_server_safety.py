"""Issue 16 (servers' side), SPEC §6.11 rules 12-15: nothing of root's reaches a student's
server, no IPv6 squatting, no stall of launch by one student, no escape sequence of a
student's on the teacher's terminal, and a failed start quotes only its own log.

The student's side is played by the student's own ``~/.jupyter/jupyter_server_config.py``
(it runs as the student inside their server, in both start modes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import requests
from conftest import (
    NOTEBOOKS,
    PYTHON,
    control_chars,
    failed_line,
    login,
    needs_root,
    proc_env,
    roots_files,
    server_rows,
    status,
    stop_session,
)
from students import SQUAT, run_as_student, squatting, stopper, write_as

from classroom.core.addresses import listen_address
from classroom.core.text import printable
from classroom.host import logwriter
from classroom.host.ports import ipv6_available, port_free

MODES = pytest.mark.parametrize("mode", ["fork", "exec"])


def run_notebooks(
    course,
    *args: str,
    prefix: tuple[str, ...] = (),
    env: dict | None = None,
    timeout: float = 300,
):
    """``notebooks.py COMMAND CONFIG ...`` as a teacher runs it (optionally under ``prefix``);
    a traceback on its stderr fails the test."""
    full_env = {k: v for k, v in os.environ.items() if k != "NOTEBOOKS_CONFIG"}
    full_env.update(env or {})
    command, *rest = args
    r = subprocess.run(
        [*prefix, PYTHON, str(NOTEBOOKS), command, str(course.config), *rest],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    assert b"Traceback" not in r.stderr, text_of(r)
    return r


def run_code(code: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -c CODE ARGS`` as root in the project's folder (optionally under ``prefix``)."""
    return subprocess.run(
        [*prefix, PYTHON, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(NOTEBOOKS.parent),
        check=False,
    )


def text_of(result) -> str:
    return (result.stdout + result.stderr).decode("utf-8", "replace")


# --- rule 15: printable ---------------------------------------------------------------------


def test_printable_strips_escape_sequences_and_control_characters():
    attack = "\x1b]0;pwned\x07\x1b[2K\x1b[1A\x1b[32m started\x1b[0m"
    assert printable(attack) == " started"
    assert printable("csi\u009b31mred.txt") == "csired.txt"
    assert printable("two\nlines\rand\ttab\x7f") == "two?lines?and?tab?"
    assert printable("link \x1b]8;;http://x\x1b\\here\x1b]8;;\x1b\\ end") == "link here end"
    assert printable("evil\u202etxt.exe") == "evil?txt.exe"  # a bidirectional override
    assert printable(b"bytes \xff\x1b[1A") == "bytes \ufffd"
    assert printable("a lone ESC at the end\x1b") == "a lone ESC at the end"
    for text in (attack, "x\x1b[", "\x9d unterminated", "\x1bP dcs \x1b\\ after"):
        assert not control_chars(printable(text), allowed="\n")
    plain = "Élève: notebook_1 (copie) — ok ✓ 👩‍🎓"
    assert printable(plain) == plain


# --- rule 13: the log writer ------------------------------------------------------------------


def test_log_writer_keeps_at_most_the_limit_and_reads_to_the_end(tmp_path):
    """What a start writes beyond the limit is read (the server never blocks) and dropped."""
    log = tmp_path / "x.log"
    with open(log, "ab") as out:
        writer = subprocess.Popen(
            logwriter.argv(sys.executable, limit=100_000), stdin=subprocess.PIPE, stdout=out
        )
    assert writer.stdin is not None
    for _ in range(50):  # 5 MB: far more than a pipe holds, so a stalled reader would block
        writer.stdin.write(b"x" * 99_999 + b"\n")
    writer.stdin.close()
    assert writer.wait(30) == 0
    data = log.read_bytes()
    assert data.startswith(b"x" * 1000) and len(data) < 100_000 + 200
    assert data.rstrip().endswith(b"the rest was not logged]")


# --- rule 13: nothing of root's reaches the server: keyring, descriptors, environment -----------

ROOTS_PROBE = """\
import json, os, stat, subprocess
out = {{"keys": "", "env": dict(os.environ), "fds": {{}}}}
try:
    with open("/proc/keys") as f:
        out["keys"] += f.read()
except OSError as exc:
    out["keys"] += str(exc)
r = subprocess.run(["{keyctl}", "show", "@s"], capture_output=True, text=True, timeout=20)
out["keys"] += r.stdout + r.stderr
r = subprocess.run(["{keyctl}", "print", "%user:{desc}"], capture_output=True, text=True)
out["keys"] += r.stdout if r.returncode == 0 else ""  # (its error message names the key)
for fd in (1, 2):
    st = os.fstat(fd)
    out["fds"][fd] = {{"uid": st.st_uid, "regular": stat.S_ISREG(st.st_mode)}}
    try:  # what a hostile config did: truncate the log and fill it
        os.ftruncate(fd, 0)
        out["fds"][fd]["truncated"] = True
    except OSError:
        out["fds"][fd]["truncated"] = False
with open(os.path.join(os.path.expanduser("~"), "roots-probe.json"), "w") as f:
    json.dump(out, f)
"""


def a_kernel(port: int, base: str, password: str, server_pid: int, uid: int) -> psutil.Process:
    session = login(port, password, base)
    made = session.post(f"http://127.0.0.1:{port}{base}api/kernels", json={"name": "python3"})
    assert made.status_code == 201, made.text[:300]
    # an exec'd kernel is the server's child, a forked one (kernel_mode = fork) the course's
    # kernel server's: look among all the student's processes
    end = time.monotonic() + 60
    while time.monotonic() < end:
        for p in psutil.process_iter(["uids"]):
            with contextlib.suppress(psutil.Error):
                uids = p.info["uids"]
                mine = p.pid != server_pid and uids and uids.real == uid
                if mine and "ipykernel" in " ".join(p.cmdline()):
                    return p
        time.sleep(0.3)
    pytest.fail("no kernel process appeared")


@needs_root
@MODES
@pytest.mark.parametrize("kernel_mode", ["fork", "exec"])
def test_nothing_of_roots_reaches_the_server(make_course, mode, kernel_mode):
    """Launch from a teacher's session that holds a key, with a secret in root's environment:
    the student's config sees neither, and its stdout/stderr are no file of root's; nor are
    a kernel's, forked from the kernel server or started by Jupyter (the server's child)."""
    keyctl = shutil.which("keyctl")
    assert keyctl, "keyctl is missing: install Debian keyutils (scripts/install.sh --test)"
    course = make_course(1)
    assert course.run("setup", "--yes").returncode == 0
    course.write_config(launch={"app": "server", "start_mode": mode, "kernel_mode": kernel_mode})
    u = course.usernames[0]
    desc, secret = f"teacher-{uuid.uuid4().hex[:10]}", f"secret-{uuid.uuid4().hex}"
    write_as(
        course, u, ".jupyter/jupyter_server_config.py", ROOTS_PROBE.format(desc=desc, keyctl=keyctl)
    )
    add_then_run = 'keyctl add user "$1" "$2" @s >/dev/null || exit 99; shift 2; exec "$@"'
    prefix = (keyctl, "session", "-", "sh", "-c", add_then_run, "sh", desc, secret)
    env = {"KRB5CCNAME": f"FILE:/tmp/krb5cc_{secret}", "SSH_AUTH_SOCK": f"/tmp/{secret}"}
    try:
        r = run_notebooks(course, "launch", "--no-portal", prefix=prefix, env=env, timeout=120)
        assert r.returncode == 0, text_of(r)
        probe = json.loads((course.home(u) / "roots-probe.json").read_text())
        assert desc not in probe["keys"] and secret not in probe["keys"], (
            f"{mode} mode: the student's server sees the teacher's session keyring:\n"
            f"{probe['keys']}"
        )
        assert secret not in json.dumps(probe["env"]), f"root's environment: {probe['env']}"
        for fd, info in probe["fds"].items():
            assert not (info["regular"] and info["uid"] == 0), (
                f"{mode} mode: fd {fd} of the student's server is a root-owned file: {info}"
            )
            assert not info["truncated"], f"{mode} mode: the student truncated fd {fd}"
        log = course.state_dir / "logs" / f"{u}.log"
        assert "launch: port" in log.read_text(), "the student emptied root's log"

        row = status(course)[u]
        pid, port = row["pid"], row["port"]
        assert not roots_files(pid), f"the server holds root's files: {roots_files(pid)}"
        password = course.credentials()[u]["notebook_password"]
        kernel = a_kernel(port, f"/user/{u}/", password, pid, course.pw(u).pw_uid)
        assert not roots_files(kernel.pid), (
            f"{kernel_mode} kernel: it holds {roots_files(kernel.pid)}"
        )
        assert secret not in json.dumps(proc_env(kernel.pid))
    finally:
        course.run("shutdown")


KEYS_AS_STUDENT = """
import pwd, sys
from classroom.host.system import run
from classroom.host.workers import as_user
pw = pwd.getpwnam(sys.argv[1])
def keys():
    with open("/proc/keys") as f:
        return f.read()
print(as_user(pw, keys))
print(run(["cat", "/proc/keys"], user=pw).stdout)
"""


@needs_root
def test_helpers_that_become_a_student_get_a_keyring_of_their_own():
    """as_user (send's and retrieve's workers become the student the same way) and a
    command run as a student: neither sees the session keyring of the root that ran it."""
    keyctl = shutil.which("keyctl")
    assert keyctl, "keyctl is missing: install Debian keyutils (scripts/install.sh --test)"
    desc = f"teacher-{uuid.uuid4().hex[:10]}"
    add_then_run = 'keyctl add user "$1" x @s >/dev/null || exit 99; shift; exec "$@"'
    prefix = (keyctl, "session", "-", "sh", "-c", add_then_run, "sh", desc)
    r = run_code(KEYS_AS_STUDENT, "nobody", prefix=prefix)
    assert r.returncode == 0, r.stderr
    assert "keyring   _ses" in r.stdout, r.stdout  # the probe read /proc/keys
    assert desc not in r.stdout, f"a student's helper sees root's session keyring:\n{r.stdout}"


# --- rule 15 and issue 15.7: a failed start quotes its own log line, made printable -------------

# On both stdout and stderr, over two lines: OSC (retitle), CSI (erase, cursor up, colour),
# a C1 CSI; the tagged line on stderr is the last telling one, the one a failure quotes.
ESCAPES = "\\x1b]0;pwned\\x07\\x1b[2K\\x1b[1A started"
NOISY = """\
import os, sys
sys.stdout.write("\\x1b[31mError\\x1b[0m: {escapes}\\n{escapes}\\n")
sys.stdout.flush()
sys.stderr.write("\\x1b]0;pwned\\x07\\x1b[2K\\x1b[1A\\x1b[31mError\\x1b[0m: {tag} \\u009b2J\\n")
sys.stderr.write("{escapes}\\n")
sys.stderr.flush()
os._exit(1)
"""
SILENT = "import os\nos._exit(1)\n"


@needs_root
@MODES
def test_failed_start_quotes_only_this_start_and_no_escape_sequences(make_course, mode):
    course = make_course(1)
    assert course.run("setup", "--yes").returncode == 0
    course.write_config(launch={"app": "server", "start_mode": mode, "start_timeout": "30"})
    u = course.usernames[0]
    tag = uuid.uuid4().hex[:8]
    noisy = NOISY.format(tag=tag, escapes=ESCAPES)
    write_as(course, u, ".jupyter/jupyter_server_config.py", noisy)
    try:
        r = run_notebooks(course, "launch", "--no-portal", timeout=120)
        assert r.returncode == 1, text_of(r)
        assert failed_line(text_of(r), u), text_of(r)
        assert re.search(rf"{u}: .*its log says: Error: {tag}", text_of(r)), text_of(r)
        for name, data in (("stdout", r.stdout), ("stderr", r.stderr)):
            found = control_chars(data, allowed="\n")
            assert not found, f"launch's {name}: {found}: {data!r}"

        # the next start fails without a word: the earlier run's line is not its reason
        write_as(course, u, ".jupyter/jupyter_server_config.py", SILENT)
        again = run_notebooks(course, "launch", "--no-portal", timeout=120)
        assert again.returncode == 1, text_of(again)
        assert re.search(rf"{u}: .*stopped before it answered", text_of(again)), text_of(again)
        assert tag not in text_of(again), f"an earlier run's log line quoted:\n{text_of(again)}"
    finally:
        course.run("shutdown")


# --- rule 12: no IPv6 squatting where ip is a wildcard -------------------------------------------

needs_ipv6 = pytest.mark.skipif(not ipv6_available(), reason="this host has no IPv6")


def test_wildcard_ip_listens_on_both_stacks():
    for ip in ("0.0.0.0", "", "*", "::", "[::]"):
        assert listen_address(ip) == "", ip
    assert listen_address("[fd00::2]") == "fd00::2" and listen_address("10.1.2.3") == "10.1.2.3"


@needs_ipv6
def test_a_port_held_on_ipv6_only_is_not_free():
    with socket.socket(socket.AF_INET6) as held:
        held.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        held.bind(("::", 0))
        held.listen()
        port = held.getsockname()[1]
        for ip in ("0.0.0.0", "", "*", "::"):
            assert not port_free(ip, port), ip
        assert port_free("127.0.0.1", port)  # a specific IPv4 address is another matter
    assert port_free("0.0.0.0", port)


@needs_root
@needs_ipv6
@MODES
def test_wildcard_ip_holds_ipv6_too_for_portal_and_servers(ready_course, mode):
    course = ready_course
    course.write_config(launch={"app": "server", "ip": "0.0.0.0", "start_mode": mode})
    squatter, victim = course.usernames
    portal_port = int(course.sections["launch"]["portal_port"])
    launch = subprocess.Popen(
        [PYTHON, str(NOTEBOOKS), "launch", str(course.config), "--only", victim],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        end = time.monotonic() + 90
        while time.monotonic() < end:
            assert launch.poll() is None, "launch ended before its portal answered"
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://[::1]:{portal_port}/healthz", timeout=2).ok:
                    break
            time.sleep(0.3)
        else:
            pytest.fail("the portal does not answer on IPv6")
        healthz = requests.get(f"http://127.0.0.1:{portal_port}/healthz", timeout=5)
        assert healthz.status_code == 200, "the portal does not answer on IPv4"
        row = status(course)[victim]
        assert row["server"] == "running", row
        for host in ("[::1]", "127.0.0.1"):
            assert requests.get(f"http://{host}:{row['port']}/user/{victim}/api", timeout=5).ok
        ports = [portal_port, row["port"]]
        out = run_as_student(course, squatter, SQUAT, "try", *map(str, ports), timeout=60)
        assert json.loads(out) == {str(p): errno.EADDRINUSE for p in ports}, (
            f"a student bound [::] (IPv6 only) on the class's ports {ports}: {out!r}"
        )
    finally:
        stop_session(launch)
        course.run("shutdown")


@needs_root
@needs_ipv6
def test_a_port_squatted_on_ipv6_is_skipped_and_check_says_so(ready_course):
    course = ready_course
    course.write_config(launch={"app": "server", "ip": "0.0.0.0"})
    squatter = course.usernames[0]
    first = int(course.sections["launch"]["first_port"])
    portal_port = int(course.sections["launch"]["portal_port"])
    try:
        with squatting(course, squatter, first, portal_port) as held:
            assert held == {str(first): "bound", str(portal_port): "bound"}, held
            check = course.run("check", timeout=120)
            assert "IPv4 and IPv6" in check.stdout, check.stdout
            assert re.search(rf"port {portal_port} is in use", check.stdout), check.stdout
            assert re.search(rf"students' range \({first}\b", check.stdout), check.stdout

            r = course.run("launch", "--no-portal", timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            rows = status(course)
            assert all(row["server"] == "running" for row in rows.values()), rows
            assert first not in {row["port"] for row in rows.values()}, rows
    finally:
        course.run("shutdown")


def test_check_says_which_addresses_the_class_holds(tmp_path):
    from conftest import free_port, run_cli

    for ip, expected in (("0.0.0.0", "IPv4 and IPv6"), ("127.0.0.1", "IPv4 on 127.0.0.1 only")):
        cfg = tmp_path / f"{ip}.cfg"
        cfg.write_text(
            f"[course]\nname = demo\nroster = r.csv\nstate_dir = {tmp_path / 'st'}\n"
            f"[launch]\nip = {ip}\nportal_port = {free_port()}\nfirst_port = {free_port()}\n"
        )
        (tmp_path / "r.csv").write_text("username\nalice\n")
        r = run_cli("check", str(cfg), "--json")
        notes = json.loads(r.stdout)["notes"]
        assert any(expected in note for note in notes), notes


# --- rule 14: one student who stops their own helpers stalls no one else ------------------------


@needs_root
def test_launch_is_not_held_up_by_a_student_who_stops_the_preparation(ready_course):
    course = ready_course
    staller, other = course.usernames  # the staller comes first in the roster
    course.write_config(launch={"app": "server", "start_timeout": "20", "start_mode": "fork"})
    try:
        with stopper(course, staller):
            # before: each student was prepared in turn, with 600 s for each
            r = run_notebooks(
                course,
                "launch",
                "--no-portal",
                env={"CLASSROOM_STUDENT_DEADLINE": "5"},
                timeout=45,
            )
            out = r.stdout.decode("utf-8", "replace")
            assert r.returncode == 1, text_of(r)
            # Whichever of the staller's processes it stopped first (the helper that prepares
            # the home, or the fork server's child on its way to the server), the staller
            # fails alone: the other student's server starts, from the fork server.
            assert re.search(rf"^  {staller}: FAILED", out, re.M), out
            rows = status(course)
            assert rows[other]["server"] == "running", rows
            assert rows[staller]["server"] == "stopped", rows
            assert server_rows(course)[other]["mode"] == "fork", text_of(r)
            url = f"http://127.0.0.1:{rows[other]['port']}/user/{other}/api"
            assert requests.get(url, timeout=10).ok
    finally:
        course.run("shutdown")


STOPPED_CHILD = r"""
import json, os, pwd, signal, sys, time
from classroom.host import forkserver
forkserver.BECOME_TIMEOUT = 2
def stopped(app, pw, args, output, became):  # a child the student stopped once it was theirs
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
forkserver.become_server = stopped
pw = pwd.getpwnam(sys.argv[1])
request = {"username": pw.pw_name, "uid": pw.pw_uid, "argv": [], "log": sys.argv[2]}
try:
    forkserver.spawn("server", request)
except RuntimeError as exc:
    print(json.dumps({"error": str(exc)}))
"""


@needs_root
def test_fork_server_gives_up_on_a_child_the_student_stopped(ready_course, tmp_path):
    """The fork server waits for each child to say it is the student; a stopped child is
    that student's failure (and is killed), not a fork server that hangs for everyone."""
    u = ready_course.usernames[0]
    r = run_code(STOPPED_CHILD, u, str(tmp_path / "u.log"))
    assert r.returncode == 0, r.stderr
    assert "stopped before it became" in json.loads(r.stdout)["error"]
    uid = ready_course.pw(u).pw_uid
    end = time.monotonic() + 10
    while time.monotonic() < end:
        left = [
            p
            for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] and p.info["uids"].real == uid and p.info["status"] != "zombie"
        ]
        if not left:
            break
        time.sleep(0.1)
    assert not left, "the stopped child was left behind"
