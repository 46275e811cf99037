"""[limits] (SPEC §6.2, §6.11.9): per-student memory, CPU and tasks, and the supervisor that reaps.

Real accounts, real servers, real kernels, real cgroups where this host has them (cgroup
v1 here: memory, cpu, pids, freezer). cgroup v2 and systemd delegation cannot run on
this host: their path and value logic is tested against a fake cgroup root in a temp
folder (README, 'Limits', says what was not tested for real).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
import websocket
from conftest import answers, login, needs_root, status

from classroom.core.errors import InvalidInput
from classroom.core.settings import load
from classroom.host import forkserver, limits, system
from classroom.host.limits import Host, Limits

MB = 1 << 20
LIMITS = {"memory": "300M", "cpu": "0.5", "tasks": "64"}
MODES = pytest.mark.parametrize("mode", ["fork", "exec"])
HOST = limits.detect()
needs_cgroups = pytest.mark.skipif(
    HOST.kind == "none", reason=f"this host offers no cgroup controllers: {HOST.why}"
)


# --- settings ---------------------------------------------------------------------------


def config(tmp_path: Path, body: str) -> Path:
    (tmp_path / "r.csv").write_text("username\nalice\n")
    cfg = tmp_path / "c.cfg"
    cfg.write_text(f"[course]\nname = demo\nroster = r.csv\nstate_dir = {tmp_path / 'st'}\n{body}")
    return cfg


def test_limits_keys_are_read_and_default_to_no_limit(tmp_path):
    s = load(config(tmp_path, "[limits]\nmemory = 1.5G\ncpu = 0.5\ntasks = 64\n"))
    assert (s.memory_limit, s.cpu_limit, s.tasks_limit) == (3 * 512 * MB, 0.5, 64)
    assert Limits.of(s).describe() == "memory 1.5G, cpu 0.5, tasks 64"
    s = load(config(tmp_path, ""))
    assert (s.memory_limit, s.cpu_limit, s.tasks_limit) == (0, 0, 0)
    assert Limits.of(s).set() == [] and Limits.of(s).describe() == "none"


def test_limits_keys_are_checked(tmp_path):
    with pytest.raises(InvalidInput) as err:
        load(config(tmp_path, "[limits]\nmemory = lots\ncpu = -1\ntasks = 1.5\nmemroy = 1G\n"))
    text = "\n".join(err.value.problems)
    assert "[limits] memory: 'lots' is not a size" in text
    assert "[limits] cpu: -1 is not a number of CPUs" in text
    assert "[limits] tasks:" in text
    assert "unknown key 'memroy' in [limits] (did you mean 'memory'?)" in text


# --- detection, on fake hosts -------------------------------------------------------------

V1_MOUNTS = """\
tmpfs {root} tmpfs rw 0 0
cgroup {root}/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0
cgroup {root}/memory cgroup rw,memory 0 0
cgroup {root}/pids cgroup rw,pids 0 0
cgroup {root}/freezer cgroup rw,freezer 0 0
cgroup {root}/systemd cgroup rw,name=systemd 0 0
cgroup2 {root}/unified cgroup2 rw 0 0
"""


def fake_v2(tmp_path: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def fake_v1(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    for name in ("cpu,cpuacct", "memory", "pids", "freezer", "systemd", "unified"):
        (root / name).mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("\n")  # hybrid: all bound to v1
    return root


def test_v2_without_systemd_uses_the_root(tmp_path):
    root = fake_v2(tmp_path)
    host = limits.detect(root, f"cgroup2 {root} cgroup2 rw 0 0\n", "0::/\n", systemd=False)
    assert host.kind == "cgroup2" and host.base == root and not host.delegated
    assert host.controllers == ("memory", "cpu", "pids")
    assert host.enforces() == {"memory": "cgroup v2", "cpu": "cgroup v2", "tasks": "cgroup v2"}
    assert host.cannot(Limits(300 * MB, 0.5, 64)) == []
    assert host.summary() == f"cgroup v2 (memory, cpu, pids) at {root}/classroom/COURSE/USERNAME"


def test_v2_under_systemd_only_inside_our_delegated_unit(tmp_path):
    root = fake_v2(tmp_path)
    unit = root / "system.slice" / "classroom.service"
    unit.mkdir(parents=True)
    (unit / "cgroup.controllers").write_text("cpu memory pids\n")
    mounts = f"cgroup2 {root} cgroup2 rw 0 0\n"
    own = "0::/system.slice/classroom.service\n"
    host = limits.detect(root, mounts, own, systemd=True)
    assert host.kind == "none" and "Delegate=yes" in host.why  # never systemd's own tree
    assert host.enforces() == {"memory": None, "cpu": None, "tasks": "RLIMIT_NPROC"}
    os.setxattr(root / "system.slice", "user.delegate", b"1")  # an ancestor's is not ours
    assert limits.detect(root, mounts, own, systemd=True).kind == "none"
    os.setxattr(unit, "user.delegate", b"1")
    host = limits.detect(root, mounts, own, systemd=True)
    assert host.kind == "cgroup2" and host.base == unit and host.delegated
    # once launch has moved itself into the supervisor leaf, the unit is still found
    moved = limits.detect(root, mounts, own.strip() + "/supervisor\n", systemd=True)
    assert moved.base == unit


def test_hybrid_host_uses_v1_by_mount_options(tmp_path):
    root = fake_v1(tmp_path)
    host = limits.detect(root, V1_MOUNTS.format(root=root), "0::/\n", systemd=False)
    assert host.kind == "cgroup1"
    assert host.controllers == ("memory", "cpu", "cpuacct", "pids", "freezer")
    assert host.v1["cpu"] == host.v1["cpuacct"] == root / "cpu,cpuacct"
    assert host.enforces() == {"memory": "cgroup v1", "cpu": "cgroup v1", "tasks": "cgroup v1"}
    assert host.summary().startswith("cgroup v1 (memory, cpu, cpuacct, pids, freezer) at ")
    # systemd manages v1 hierarchies where it runs: not used
    assert limits.detect(root, V1_MOUNTS.format(root=root), "", systemd=True).kind == "none"


def test_no_cgroups_means_rlimit_for_tasks_and_a_warning_for_the_rest(tmp_path):
    host = limits.detect(tmp_path, "proc /proc proc rw 0 0\n", "", systemd=False)
    assert host.kind == "none" and host.why == "no cgroup controllers are mounted"
    assert host.summary().endswith("tasks by RLIMIT_NPROC per account")
    warnings = host.cannot(Limits(300 * MB, 0.5, 64))
    assert warnings[0].startswith("[limits] memory cannot be enforced on this host")
    assert warnings[1].startswith("[limits] cpu cannot be enforced on this host")
    assert "RLIMIT_NPROC" in warnings[2] and "not per server" in warnings[2]
    assert limits.prepare(host, "demo", "alice", Limits(tasks=64)) == {"procs": [], "nproc": 64}
    assert host.cannot(Limits()) == []  # nothing set: nothing to warn about


# --- making a student's cgroup, on fake roots ---------------------------------------------


def test_prepare_v2_writes_each_limit(tmp_path):
    root = fake_v2(tmp_path)
    host = limits.detect(root, f"cgroup2 {root} cgroup2 rw 0 0\n", "0::/\n", systemd=False)
    student = root / "classroom" / "demo" / "alice"
    student.mkdir(parents=True)
    (student / "memory.swap.max").write_text("max\n")  # present only with swap accounting
    placement = limits.prepare(host, "demo", "alice", Limits(300 * MB, 0.5, 64))
    assert placement == {"procs": [str(student / "cgroup.procs")], "nproc": 0}
    for folder in (root, root / "classroom", root / "classroom" / "demo"):
        assert (folder / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    read = {f.name: f.read_text() for f in student.iterdir()}
    assert read == {
        "memory.max": str(300 * MB),
        "memory.swap.max": "0",
        "memory.oom.group": "0",  # the OOM killer takes one task (a kernel), not the server too
        "cpu.max": "50000 100000",
        "pids.max": "64",
    }
    limits.prepare(host, "demo", "alice", Limits())  # again, unlimited: idempotent
    assert (student / "memory.max").read_text() == "max"
    assert (student / "cpu.max").read_text() == "max 100000"
    assert (student / "pids.max").read_text() == "max"
    assert (student / "memory.swap.max").read_text() == "max"


def test_prepare_v2_in_a_delegated_unit_moves_our_processes_to_a_leaf(tmp_path):
    root = fake_v2(tmp_path)
    unit = root / "system.slice" / "classroom.service"
    unit.mkdir(parents=True)
    (unit / "cgroup.controllers").write_text("cpu memory pids\n")
    (unit / "cgroup.subtree_control").write_text("")
    (unit / "cgroup.procs").write_text(f"{os.getpid()}\n")
    os.setxattr(unit, "user.delegate", b"1")
    own = "0::/system.slice/classroom.service\n"
    host = limits.detect(root, f"cgroup2 {root} cgroup2 rw 0 0\n", own, systemd=True)
    placement = limits.prepare(host, "demo", "alice", Limits(memory=300 * MB))
    assert (unit / "supervisor" / "cgroup.procs").read_text() == str(os.getpid())
    assert placement["procs"] == [str(unit / "classroom" / "demo" / "alice" / "cgroup.procs")]
    assert (unit / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert not (root / "classroom").exists()  # nothing outside the delegated unit
    assert (root / "cgroup.subtree_control").read_text() == ""


def test_prepare_v1_writes_each_limit(tmp_path):
    root = fake_v1(tmp_path)
    host = limits.detect(root, V1_MOUNTS.format(root=root), "0::/\n", systemd=False)
    memory = root / "memory" / "classroom" / "demo" / "alice"
    memory.mkdir(parents=True)
    (memory / "memory.memsw.limit_in_bytes").write_text("")  # with swap accounting
    placement = limits.prepare(host, "demo", "alice", Limits(300 * MB, 1.5, 64))
    tail = Path("classroom", "demo", "alice", "cgroup.procs")
    assert placement["procs"] == [
        str(root / c / tail) for c in ("memory", "cpu,cpuacct", "pids", "freezer")
    ]
    cpu = root / "cpu,cpuacct" / "classroom" / "demo" / "alice"
    assert (memory / "memory.limit_in_bytes").read_text() == str(300 * MB)
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(300 * MB)
    assert (cpu / "cpu.cfs_quota_us").read_text() == "150000"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (root / "pids" / "classroom" / "demo" / "alice" / "pids.max").read_text() == "64"
    limits.prepare(host, "demo", "alice", Limits())
    assert (memory / "memory.limit_in_bytes").read_text() == "-1"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "-1"


def test_cgroup_names_never_collide_with_the_kernels_files():
    assert limits.cgroup_name("tasks") == "_tasks"
    assert limits.cgroup_name("notify_on_release") == "_notify_on_release"
    assert limits.cgroup_name("_x") == "__x"
    assert limits.cgroup_name("alice") == "alice"


def test_enter_refuses_anything_but_a_cgroup_procs_file(tmp_path):
    with pytest.raises(PermissionError):
        limits.enter({"procs": [str(tmp_path / "cgroup.procs")]})
    with pytest.raises(PermissionError):
        limits.enter({"procs": [f"{limits.ROOT}/memory/../../../etc/cgroup.procs"]})
    with pytest.raises(PermissionError):
        limits.enter({"procs": [f"{limits.ROOT}/memory/tasks"]})


def test_memory_used_leaves_out_reclaimable_cache(tmp_path):
    root = fake_v1(tmp_path)
    folder = root / "memory" / "classroom" / "demo" / "alice"
    folder.mkdir(parents=True)
    (folder / "memory.usage_in_bytes").write_text(f"{200 * MB}\n")
    (folder / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {50 * MB}\n")
    mounts = V1_MOUNTS.format(root=root)
    assert limits.memory_used("demo", "alice", root, mounts) == 150 * MB
    assert limits.memory_used("demo", "bob", root, mounts) is None
    v2 = fake_v2(tmp_path / "b")
    folder = v2 / "system.slice" / "x.service" / "classroom" / "demo" / "alice"
    folder.mkdir(parents=True)  # found inside a delegated unit too
    (folder / "memory.current").write_text(f"{120 * MB}\n")
    (folder / "memory.stat").write_text(f"anon 5\ninactive_file {20 * MB}\n")
    assert limits.memory_used("demo", "alice", v2, f"cgroup2 {v2} cgroup2 rw 0 0\n") == 100 * MB


# --- real processes as real students --------------------------------------------------------

FORK_SLEEPS = """\
import subprocess, sys
procs, error = [], None
for _ in range({n}):
    try:
        procs.append(subprocess.Popen(["sleep", "60"]))
    except OSError as exc:
        error = exc.errno
        break
print(len(procs), error, flush=True)
sys.stdin.read()  # until the test lets go
for p in procs:
    p.kill()
    p.wait()
"""


def as_student(pw, code: str, placement: dict, **kw) -> subprocess.Popen:
    """``python -c code`` as the student, joined to ``placement`` before it runs (the
    exec path's way: system.spawn's ``before``)."""
    proc = system.spawn(
        [sys.executable, "-c", code],
        env={"HOME": pw.pw_dir, "PATH": "/usr/bin:/bin"},
        user=pw,
        before=lambda: limits.enter(placement),
        cwd=pw.pw_dir,
        **kw,
    )
    assert proc is not None
    return proc


def alive_of(uid: int) -> list[int]:
    """Pids of the uid's processes that are not zombies."""
    found = []
    for p in psutil.process_iter(["uids", "status"]):
        if p.info["uids"] and p.info["uids"].real == uid and p.info["status"] != "zombie":
            found.append(p.pid)
    return found


def zombies_of(uid: int) -> list[tuple[int, int]]:
    """(pid, ppid) of the uid's zombies."""
    found = []
    for p in psutil.process_iter(["uids", "status", "ppid"]):
        if p.info["uids"] and p.info["uids"].real == uid and p.info["status"] == "zombie":
            found.append((p.pid, p.info["ppid"]))
    return found


@needs_root
def test_rlimit_nproc_stops_a_fork_loop_at_tasks(ready_course):
    """Where no cgroup can be made: RLIMIT_NPROC, set as root before the student runs."""
    c = ready_course
    pw = c.pw(c.usernames[0])
    placement = limits.prepare(Host("none", why="test"), c.name, pw.pw_name, Limits(tasks=10))
    assert placement == {"procs": [], "nproc": 10}
    proc = as_student(
        pw,
        FORK_SLEEPS.format(n=200),
        placement,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        started, error = proc.stdout.readline().split()
        assert int(started) == 9 and error == str(errno.EAGAIN)  # 10 with python itself
        assert len(alive_of(pw.pw_uid)) == 10
    finally:
        proc.communicate("", timeout=60)


FORK_LOOP = """\
import os, time
end = time.monotonic() + 60  # bounded: never left running for long, whatever happens
while time.monotonic() < end:
    try:
        if os.fork():
            os._exit(0)  # the parent goes, the child carries on: no pid stays the same
    except OSError:
        time.sleep(0.001)
os._exit(0)
"""


@needs_root
@needs_cgroups
def test_kill_all_ends_a_process_that_forks_and_exits_in_a_loop(ready_course, tmp_path):
    """The loop runs as the student under the class's supervisor (an exec-only fork
    server), which joins it to the cgroup and reaps what it leaves behind, as in class."""
    c = ready_course
    a, b = c.usernames
    pw = c.pw(a)
    placement = limits.prepare(HOST, c.name, a, Limits(tasks=64))
    other = limits.prepare(HOST, c.name, b, Limits())
    course_dirs = {f.parent for f in limits.locate(c.name, a)}
    supervisor = forkserver.ForkServer.start("exec")
    try:
        supervisor.wait_ready(30)

        def start(user, code, where):
            argv = [sys.executable, "-c", code]
            log = str(tmp_path / f"{user}.log")
            return supervisor.spawn(user, c.pw(user).pw_uid, [], log, placement=where, program=argv)

        bystander = start(b, "import time; time.sleep(120)", other)
        start(a, FORK_LOOP, placement)
        folders = limits.locate(c.name, a)
        assert folders and all(f.name == a for f in folders)
        deadline = time.monotonic() + 10
        while len(limits.members(folders)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert limits.members(folders), "the loop is not running in the cgroup"
        assert limits.kill_all(c.name, a)
        assert not limits.members(folders)
        time.sleep(0.5)
        assert alive_of(pw.pw_uid) == []  # nothing of the loop escaped the cgroup
        assert psutil.Process(bystander).is_running()  # another student's: untouched
        assert limits.release(c.name, a)
        assert limits.locate(c.name, a) == []
        assert limits.locate(c.name, b)  # the course's cgroup stays while b's is there
        assert limits.release(c.name, b)
        assert course_dirs and not any(d.exists() for d in course_dirs)  # the last one took it
        supervisor.close()
        deadline = time.monotonic() + 10
        while zombies_of(pw.pw_uid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert zombies_of(pw.pw_uid) == []  # the supervisor reaped every one
        supervisor.proc.wait(10)  # and ended with nothing left to supervise
    finally:
        limits.release(c.name, a)
        limits.release(c.name, b)
        supervisor.close()
        if supervisor.proc.poll() is None:
            supervisor.proc.kill()


# --- a class: real servers, real kernels -----------------------------------------------------


class Kernel:
    """A kernel of a student's server, started through its REST API and driven over its
    websocket, as JupyterLab does."""

    def __init__(self, port: int, session: requests.Session, username: str):
        self.port = port
        base = f"http://127.0.0.1:{port}/user/{username}"  # every server's base URL
        r = session.post(f"{base}/api/kernels", json={}, timeout=60)
        assert r.status_code == 201, r.text
        self.id = r.json()["id"]
        cookie = "; ".join(f"{k.name}={k.value}" for k in session.cookies)
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/user/{username}/api/kernels/{self.id}/channels",
            header=[f"Cookie: {cookie}"],
            timeout=120,
        )

    def execute(self, code: str) -> tuple[str, str]:
        """('ok' | 'error', output), or ('died', output) when the kernel went away meanwhile."""
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "username": "",
            "session": uuid.uuid4().hex,
            "msg_type": "execute_request",
            "version": "5.3",
        }
        content = {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        message = {"header": header, "parent_header": {}, "metadata": {}, "content": content}
        self.ws.send(json.dumps({**message, "channel": "shell", "buffers": []}))
        out: list[str] = []
        result = idle = None
        while result is None or idle is None:  # shell and iopub arrive in either order
            reply = json.loads(self.ws.recv())
            kind, body = reply["msg_type"], reply["content"]
            if kind == "status" and body.get("execution_state") in ("restarting", "dead"):
                return "died", "".join(out)
            if reply.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if kind == "stream":
                out.append(body["text"])
            elif kind == "error":
                out.append(f"{body['ename']}: {body['evalue']}")
            elif kind == "execute_reply":
                result = body["status"]
            elif kind == "status" and body.get("execution_state") == "idle":
                idle = True
        return result, "".join(out)

    def close(self):
        with contextlib.suppress(Exception):
            self.ws.close()


def cgroup_of(pid: int) -> dict[str, str]:
    """{controller: path} of a process (v1 lines by controller, v2's as '')."""
    found = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") or [""]:
            found[name] = path
    return found


def student_folders(course, username: str) -> dict[str, Path]:
    """{controller or 'v2': the student's cgroup folder} on this host."""
    tail = Path("classroom", course.name, username)
    if HOST.kind == "cgroup2":
        return {"v2": HOST.base / tail}
    return {c: HOST.v1[c] / tail for c in HOST.controllers}


def read(folders: dict[str, Path], controller: str, name: str) -> str:
    return (folders.get(controller, folders.get("v2")) / name).read_text().strip()


def oom_kills(folders: dict[str, Path]) -> int:
    text = read(folders, "memory", "memory.events" if "v2" in folders else "memory.oom_control")
    return int(re.search(r"^oom_kill (\d+)$", text, re.M).group(1))


def cpu_seconds(folders: dict[str, Path]) -> float:
    if "v2" in folders:
        usage = re.search(r"^usage_usec (\d+)$", read(folders, "v2", "cpu.stat"), re.M)
        return int(usage.group(1)) / 1e6
    return int(read(folders, "cpuacct", "cpuacct.usage")) / 1e9


def portal_up(course, running: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    url = f"http://127.0.0.1:{course.sections['launch']['portal_port']}/healthz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException, ValueError):
            if requests.get(url, timeout=2).json()["running"] == running:
                return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.3)
    pytest.fail(f"the portal did not come up with {running} servers")


def kernel_pids(server_pid: int) -> set[int]:
    return {
        p.pid
        for p in psutil.Process(server_pid).children(recursive=True)
        if "ipykernel" in " ".join(p.cmdline())
    }


def launch_with_portal(course) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).parent.parent / "notebooks.py"),
            "launch",
            str(course.config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@needs_root
@needs_cgroups
@MODES
def test_one_student_cannot_starve_the_class(ready_course, mode):
    """memory, tasks and cpu hold for a whole student (server and kernels), in both start
    modes; the student's server, the other student and the portal go on; shutdown leaves
    no process, zombie or cgroup of theirs."""
    c = ready_course
    a, b = c.usernames
    # kernels as Jupyter starts them (children of the server): forked kernels join the same
    # cgroup through the kernel server, tested in test_kernels.py
    c.write_config(
        launch={"app": "server", "start_mode": mode, "kernel_mode": "exec"}, limits=LIMITS
    )
    creds = c.credentials()
    uids = [c.pw(u).pw_uid for u in c.usernames]
    kernels: list[Kernel] = []
    proc = launch_with_portal(c)
    try:
        portal_up(c, 2, proc)
        st = status(c)
        ports = {u: st[u]["port"] for u in c.usernames}
        folders = {u: student_folders(c, u) for u in c.usernames}
        for u in c.usernames:
            # the server runs in the student's cgroup, in every controller, from the start
            where = cgroup_of(st[u]["pid"])
            for controller in folders[u]:
                assert where["" if controller == "v2" else controller] == f"/classroom/{c.name}/{u}"
            # the limits read back from the kernel's own files
            assert read(
                folders[u],
                "memory",
                "memory.max" if HOST.kind == "cgroup2" else "memory.limit_in_bytes",
            ) == str(300 * MB)
            if HOST.kind == "cgroup1":
                assert read(folders[u], "cpu", "cpu.cfs_quota_us") == "50000"
                assert read(folders[u], "cpu", "cpu.cfs_period_us") == "100000"
            else:
                assert read(folders[u], "cpu", "cpu.max") == "50000 100000"
            assert read(folders[u], "pids", "pids.max") == "64"
            assert isinstance(st[u]["memory"], int) and 0 < st[u]["memory"] < 300 * MB

        table = c.run("status")
        assert re.search(r"\bmemory\b", table.stdout.splitlines()[0]), table.stdout
        assert "limits per student: memory 300M, cpu 0.5, tasks 64" in table.stdout

        sessions = {
            u: login(ports[u], creds[u]["notebook_password"], f"/user/{u}/") for u in c.usernames
        }
        ka, kb = Kernel(ports[a], sessions[a], a), Kernel(ports[b], sessions[b], b)
        kernels += [ka, kb]
        state, out = ka.execute("print(open('/proc/self/cgroup').read())")
        assert state == "ok" and f"/classroom/{c.name}/{a}" in out  # the kernel is inside too
        assert kernel_pids(st[a]["pid"]) and kernel_pids(st[b]["pid"])

        # memory: a's kernel takes 600 MB -> that kernel is killed, nothing else
        before_a, before_b = kernel_pids(st[a]["pid"]), kernel_pids(st[b]["pid"])
        kills = oom_kills(folders[a])
        state, _ = ka.execute("x = b'x' * (600 << 20)\nprint('still here')")
        assert state == "died"
        assert oom_kills(folders[a]) > kills
        assert not before_a & kernel_pids(st[a]["pid"])  # the kernel that grew is gone
        assert psutil.Process(st[a]["pid"]).is_running() and answers(ports[a])
        assert before_b <= kernel_pids(st[b]["pid"]) and oom_kills(folders[b]) == 0
        assert kb.execute("print(6 * 7)") == ("ok", "42\n")
        portal_up(c, 2, proc, timeout=10)

        # tasks: b's kernel tries 200 processes -> stops near 64, a can still start kernels
        state, out = kb.execute(
            "import subprocess\nprocs, error = [], None\n"
            "for _ in range(200):\n"
            "    try:\n        procs.append(subprocess.Popen(['sleep', '120']))\n"
            "    except OSError as exc:\n        error = exc.errno\n        break\n"
            "print(len(procs), error)"
        )
        started, error = out.split()
        assert state == "ok" and 0 < int(started) < 64 and error == str(errno.EAGAIN), out
        assert int(read(folders[b], "pids", "pids.current")) <= 64
        ka2 = Kernel(ports[a], sessions[a], a)
        kernels.append(ka2)
        assert ka2.execute("print('a is fine')") == ("ok", "a is fine\n")
        assert kb.execute("for p in procs: p.kill(); p.wait()")[0] == "ok"

        # cpu: a busy loop in a's kernel gets about half a CPU (the cgroup's own counter)
        used, wall = cpu_seconds(folders[a]), time.monotonic()
        state, _ = ka2.execute("import time\nend = time.time() + 3\nwhile time.time() < end: pass")
        share = (cpu_seconds(folders[a]) - used) / (time.monotonic() - wall)
        print(f"cpu share of a's busy loop with cpu = 0.5: {share:.2f}")
        assert state == "ok" and share < 0.75

        proc.send_signal(signal.SIGINT)  # the portal stops, the servers stay
        proc.communicate(timeout=30)
        for k in kernels:
            k.close()
        kernels.clear()
        everything = (
            {st[u]["pid"] for u in c.usernames}
            | kernel_pids(st[a]["pid"])
            | kernel_pids(st[b]["pid"])
        )
        down = c.run("shutdown")
        assert down.returncode == 0 and "shutdown: 2 stopped" in down.stdout, (
            down.stdout + down.stderr
        )
        for u in c.usernames:
            assert not any(f.exists() for f in folders[u].values())
        for course_dir in {f.parent for u in c.usernames for f in folders[u].values()}:
            assert not course_dir.exists(), f"{course_dir} left behind"
        deadline = time.monotonic() + 10
        while any(zombies_of(uid) or alive_of(uid) for uid in uids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for uid in uids:
            assert alive_of(uid) == [] and zombies_of(uid) == []
        assert not any(psutil.pid_exists(p) for p in everything)
    finally:
        for k in kernels:
            k.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        c.run("shutdown")


@needs_root
@MODES
def test_the_supervisor_reaps_and_adopts_after_launch_has_exited(ready_course, mode):
    """Whatever PID 1 is: a server that dies is reaped, and its kernel is adopted by the
    class's supervisor (a subreaper), not left to PID 1."""
    c = ready_course
    a = c.usernames[0]
    c.write_config(launch={"app": "server", "start_mode": mode, "kernel_mode": "exec"})
    uid = c.pw(a).pw_uid
    kernel = None
    try:
        r = c.run("launch", "--no-portal", "--only", a)
        assert r.returncode == 0, r.stdout + r.stderr
        st = status(c)[a]
        supervisor = psutil.Process(st["pid"]).ppid()
        sup = psutil.Process(supervisor)
        assert sup.uids().real == 0 and "forkserver.py" in " ".join(sup.cmdline())
        session = login(st["port"], c.credentials()[a]["notebook_password"], f"/user/{a}/")
        kernel = Kernel(st["port"], session, a)
        assert kernel.execute("print(1)")[0] == "ok"
        orphans = kernel_pids(st["pid"])
        assert orphans
        kernel.close()
        os.kill(st["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{st['pid']}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{st['pid']}").exists(), "the dead server was left a zombie"
        for pid in orphans:  # adopted by the supervisor, not by PID 1
            assert psutil.Process(pid).ppid() == supervisor
        assert status(c)[a]["server"] == "died"
        r = c.run("shutdown", "--all-jupyter")
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.monotonic() + 10
        while (alive_of(uid) or zombies_of(uid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive_of(uid) == [] and zombies_of(uid) == []
        # with nothing left to supervise, the supervisor ends too
        deadline = time.monotonic() + 10
        while sup.is_running() and sup.status() != "zombie" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not sup.is_running() or sup.status() == "zombie"
    finally:
        if kernel is not None:
            kernel.close()
        c.run("shutdown", "--all-jupyter")


@needs_root
@needs_cgroups
def test_a_dead_servers_orphans_are_killed_with_its_cgroup_at_shutdown(ready_course):
    """A kernel whose server died stays in the student's cgroup; shutdown empties it."""
    c = ready_course
    a = c.usernames[0]
    c.write_config(
        launch={"app": "server", "start_mode": "fork", "kernel_mode": "exec"},
        limits={"tasks": "64"},
    )
    uid = c.pw(a).pw_uid
    try:
        assert c.run("launch", "--no-portal", "--only", a).returncode == 0
        st = status(c)[a]
        session = login(st["port"], c.credentials()[a]["notebook_password"], f"/user/{a}/")
        kernel = Kernel(st["port"], session, a)
        assert kernel.execute("print(1)")[0] == "ok"
        kernel.close()
        orphans = kernel_pids(st["pid"])
        os.kill(st["pid"], signal.SIGKILL)
        r = c.run("shutdown")  # no --all-jupyter: the cgroup alone finds the kernel
        assert r.returncode == 0 and f"{a}: stopped" in r.stdout, r.stdout + r.stderr
        assert not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in orphans
        )
        assert limits.locate(c.name, a) == []
        deadline = time.monotonic() + 10
        while zombies_of(uid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive_of(uid) == [] and zombies_of(uid) == []
    finally:
        c.run("shutdown", "--all-jupyter")


def test_check_says_which_mechanism_applies(tmp_path):
    cfg = config(tmp_path, "[limits]\nmemory = 300M\ncpu = 0.5\ntasks = 64\n")
    r = subprocess.run(
        [sys.executable, str(Path(__file__).parent.parent / "notebooks.py"), "check", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert f"limits: {HOST.summary()}; set: memory 300M, cpu 0.5, tasks 64" in r.stdout, r.stdout
    for warning in HOST.cannot(Limits(300 * MB, 0.5, 64)):
        assert warning in r.stdout
    if HOST.kind == "cgroup1":  # this host
        assert "limits: cgroup v1 (memory, cpu" in r.stdout and "cannot be enforced" not in r.stdout
    r = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent.parent / "notebooks.py"),
            "check",
            str(cfg),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(r.stdout)["limits"]
    assert report["enforced_by"] == HOST.enforces() and report["mechanism"] == HOST.summary()


def test_memory_without_a_cgroup_is_the_server_trees_unique_memory():
    from classroom.host.processes import tree_memory

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        mine = tree_memory(os.getpid())
        assert mine is not None and mine > 0
        dead = subprocess.Popen(["true"])
        dead.wait()
        assert tree_memory(dead.pid) is None
    finally:
        child.kill()
        child.wait()


@needs_root
@needs_cgroups
def test_remove_releases_the_students_cgroup(ready_course):
    """remove kills the student, deletes the account and removes their cgroup; another
    student's stays."""
    c = ready_course
    a, b = c.usernames
    c.write_config(limits={"tasks": "64"})
    placement = limits.prepare(HOST, c.name, a, Limits(tasks=64))
    limits.prepare(HOST, c.name, b, Limits(tasks=64))
    try:
        proc = as_student(c.pw(a), "import time; time.sleep(120)", placement)
        assert limits.members(limits.locate(c.name, a)) == {proc.pid}
        r = c.run("remove", "--yes", "--only", a)
        assert r.returncode == 0, r.stdout + r.stderr
        proc.wait(10)
        assert limits.locate(c.name, a) == []
        assert limits.locate(c.name, b)
    finally:
        limits.release(c.name, a)
        limits.release(c.name, b)
