"""Kernels (SPEC 6.3): ``kernel_mode = fork`` forks each student's kernels from the course's
kernel server; real accounts, real servers, kernels driven through the server's REST API and
websocket as JupyterLab does."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from conftest import login, needs_root, proc_env, proc_fds, status
from students import as_student, hashed_password, memory_contains, write_as

from classroom.core import launchplan
from classroom.core.errors import InvalidInput
from classroom.core.launchplan import provisioners_installed
from classroom.core.settings import load
from classroom.host import kernels as kernel_server

websocket = pytest.importorskip("websocket")  # websocket-client, the test extra

PYTHON = sys.executable


# --- pure tests (no root) ----------------------------------------------------------------


def settings_with(tmp_path: Path, **launch: str):
    cfg = tmp_path / "c.cfg"
    lines = ["[course]", "name = demo", "roster = r.csv", "[launch]"]
    lines += [f"{k} = {v}" for k, v in launch.items()]
    cfg.write_text("\n".join(lines) + "\n")
    (tmp_path / "r.csv").write_text("username\nalice\n")
    return load(cfg)


def test_kernel_settings_and_server_args(tmp_path):
    s = settings_with(tmp_path)
    assert s.kernel_mode == "fork"
    assert s.preload == ("numpy", "pandas", "matplotlib.pyplot")
    args = launchplan.server_args(s, "/home/alice", 8123)
    assert "--KernelProvisionerFactory.default_provisioner_name=classroom-fork" in args
    assert "--ForkProvisioner.kernel_server=/run/classroom/demo/kernels/kernels.sock" in args
    assert "--KernelManager.transport_encryption=auto" in args  # in either mode
    exec_mode = settings_with(tmp_path, kernel_mode="exec", preload="numpy")
    assert exec_mode.preload == ("numpy",)
    exec_args = launchplan.server_args(exec_mode, "/h", 1)
    assert "--KernelProvisionerFactory.default_provisioner_name=classroom-exec" in exec_args
    assert not any("ForkProvisioner" in a for a in exec_args)
    assert "--KernelManager.transport_encryption=auto" in exec_args
    with pytest.raises(InvalidInput, match="'os; rm' is not a Python module name"):
        settings_with(tmp_path, preload="numpy, os; rm")
    with pytest.raises(InvalidInput, match="must be one of fork, exec"):
        settings_with(tmp_path, kernel_mode="spawn")


def test_the_provisioner_is_registered():
    """The students' servers find it by its entry point (the installed package)."""
    assert provisioners_installed()
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    from classroom.host.provisioner import ForkProvisioner, OwnPortsProvisioner

    found = KernelProvisionerFactory.instance().provisioners
    assert found["classroom-fork"].load() is ForkProvisioner
    assert found["classroom-exec"].load() is OwnPortsProvisioner


def test_an_exec_kernel_whose_ports_were_taken_meanwhile_still_starts(tmp_path, monkeypatch):
    """Jupyter picks free ports, lets them go, and the kernel binds them a second later:
    in a room starting at once a classmate's kernel takes them first (here a socket of the
    test's). The exec provisioner's IPython kernel binds ports of its own instead."""
    import asyncio
    import socket

    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import LocalProvisioner
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    from classroom.host.provisioner import PORT_NAMES

    taken: list[socket.socket] = []
    ports_taken: list[int] = []
    pre_launch = LocalProvisioner.pre_launch

    async def take_the_ports(self, **kwargs):
        answer = await pre_launch(self, **kwargs)  # the connection file is written now
        for name in PORT_NAMES:
            s = socket.socket()
            s.bind(("127.0.0.1", getattr(self.parent, name)))
            s.listen()
            taken.append(s)
            ports_taken.append(s.getsockname()[1])
        return answer

    monkeypatch.setattr(LocalProvisioner, "pre_launch", take_the_ports)
    monkeypatch.setattr(
        KernelProvisionerFactory.instance(), "default_provisioner_name", launchplan.EXEC_PROVISIONER
    )

    async def run_a_cell() -> dict:
        km = AsyncKernelManager(connection_file=str(tmp_path / "kernel.json"))
        await km.start_kernel(cwd=str(tmp_path))
        try:
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=60)
            reply = await kc.execute_interactive("print(6 * 7)", timeout=30, store_history=False)
            kc.stop_channels()
            return {"status": reply["content"]["status"], "ports": km.get_connection_info()}
        finally:
            await km.shutdown_kernel(now=True)

    try:
        result = asyncio.run(asyncio.wait_for(run_a_cell(), 90))
    finally:
        for s in taken:
            s.close()
    assert len(taken) == len(PORT_NAMES)
    assert result["status"] == "ok"
    squatted = set(ports_taken)
    assert not squatted & {result["ports"][name] for name in PORT_NAMES}


# --- a student's server, driven as JupyterLab drives it ----------------------------------


class Lab:
    """One student's server: sessions (a kernel each), code run over the websocket."""

    def __init__(self, course, username: str):
        self.course = course
        self.username = username
        self.port = status(course)[username]["port"]
        self.path = f"/user/{username}/"  # every server's base URL
        self.base = f"http://127.0.0.1:{self.port}{self.path.rstrip('/')}"
        password = course.credentials()[username]["notebook_password"]
        self.http = login(self.port, password, self.path)

    def open(self, notebook: str) -> dict:
        """A session for ``notebook`` (a path under the server's root): its kernel."""
        r = self.http.post(
            f"{self.base}/api/sessions",
            json={"path": notebook, "type": "notebook", "name": "", "kernel": {"name": "python3"}},
            timeout=90,
        )
        assert r.status_code == 201, r.text
        return r.json()["kernel"]

    def connect(self, kernel_id: str) -> KernelSocket:
        return KernelSocket(self, kernel_id)

    def post(self, path: str) -> requests.Response:
        return self.http.post(f"{self.base}{path}", timeout=60)


class KernelSocket:
    def __init__(self, lab: Lab, kernel_id: str):
        self.session = uuid.uuid4().hex
        cookies = "; ".join(f"{k}={v}" for k, v in lab.http.cookies.items())
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{lab.port}{lab.path}api/kernels/{kernel_id}/channels"
            f"?session_id={self.session}",
            cookie=cookies,
            timeout=60,
        )

    def send(self, code: str) -> str:
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        return self.message("shell", "execute_request", content)

    def message(self, channel: str, msg_type: str, content: dict) -> str:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "username": "test",
            "session": self.session,
            "msg_type": msg_type,
            "version": "5.3",
        }
        message = {
            "header": header,
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": channel,
            "buffers": [],
        }
        self.ws.send(json.dumps(message))
        return msg_id

    def reply(self, msg_id: str, msg_type: str, timeout: float = 60) -> dict:
        """The content of the ``msg_type`` answer to ``msg_id``."""
        deadline = time.monotonic() + timeout
        while True:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self.ws.recv())
            parent = message.get("parent_header", {}).get("msg_id")
            if parent == msg_id and message["msg_type"] == msg_type:
                return message["content"]

    def replies(self, msg_id: str, timeout: float = 120) -> dict:
        """Everything the kernel said about ``msg_id`` until it was idle again."""
        out = {"stdout": "", "stderr": "", "reply": None, "error": None, "displays": []}
        idle = False
        deadline = time.monotonic() + timeout
        while not (idle and out["reply"] is not None):
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self.ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                out[content["name"]] += content["text"]
            elif kind == "error":
                out["error"] = content
            elif kind == "display_data":
                out["displays"].append(content)
            elif kind == "execute_reply":
                out["reply"] = content
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        return out

    def run(self, code: str, timeout: float = 120) -> dict:
        return self.replies(self.send(code), timeout)

    def value(self, expression_code: str) -> object:
        """Run code whose last line prints one JSON document; that document."""
        out = self.run(expression_code)
        assert out["error"] is None, out["error"] and "\n".join(out["error"]["traceback"])
        return json.loads(out["stdout"].strip().splitlines()[-1])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


PROBE = """
import json, os, sys
before = sorted(m for m in ("numpy", "pandas", "matplotlib.pyplot") if m in sys.modules)
import numpy, random, multiprocessing, matplotlib, pandas
def leaks(marker):
    # where module state holds the marker (the kernel server HOME): computed as root
    import types
    found, seen = [], set()
    def walk(obj, where, depth):
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, (str, bytes)):
            text = obj if isinstance(obj, str) else obj.decode("latin-1")
            if marker in text:
                found.append(where)
        elif isinstance(obj, os.PathLike):
            walk(os.fspath(obj), where, depth)
        elif isinstance(obj, dict):
            for k, v in list(obj.items()):
                walk(v, f"{where}[{k!r}]", depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for i, v in enumerate(list(obj)):
                walk(v, f"{where}[{i}]", depth + 1)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    walk(cell.cell_contents, f"{where}.<closure>", depth + 1)
                except ValueError:
                    pass
        elif not isinstance(obj, types.ModuleType):
            try:
                attributes = dict(vars(obj))
            except TypeError:
                return
            for k, v in attributes.items():
                walk(v, f"{where}.{k}", depth + 1)
    for name, module in list(sys.modules.items()):
        if module is None or name == "__main__":
            continue
        for k, v in list(vars(module).items()):
            walk(v, f"{name}.{k}", 0)
    return found
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "cwd": os.getcwd(),
    "env": dict(os.environ), "preloaded": before,
    "configdir": matplotlib.get_configdir(), "cachedir": matplotlib.get_cachedir(),
    "linewidth": matplotlib.rcParams["lines.linewidth"], "backend": matplotlib.get_backend(),
    "styles": sorted(__import__("matplotlib.style").style.available),
    "numpy": numpy.random.rand(), "random": random.random(),
    "authkey": multiprocessing.current_process().authkey.hex(),
    "startup": globals().get("STARTUP_RAN_AS"),
    "max_rows": pandas.get_option("display.max_rows"),
    "sys_path": sys.path, "threads": len(os.listdir("/proc/self/task")),
    "leaks": leaks(bytes.fromhex(MARKER_HEX).decode()),
    "dumpable": __import__("ctypes").CDLL(None).prctl(3, 0, 0, 0, 0),
    "umask": int([l for l in open("/proc/self/status") if l.startswith("Umask")][0].split()[1], 8),
}))
"""

STARTUP = "import os\nSTARTUP_RAN_AS = os.getuid()\n"
MATPLOTLIBRC = "lines.linewidth: 7\n"
STYLE = "lines.linewidth: 3\n"


def probe(ks: KernelSocket, marker: str) -> dict:
    # the marker never appears as such in the cell (the cell's text is module state too)
    return ks.value(f"MARKER_HEX = {marker.encode().hex()!r}\n" + PROBE)


def connection_key(course, username: str, kernel_id: str) -> bytes:
    runtime = course.home(username) / ".local/share/jupyter/runtime"
    return json.loads((runtime / f"kernel-{kernel_id}.json").read_text())["key"].encode()


def connection_ports(course, username: str, kernel_id: str) -> set[int]:
    runtime = course.home(username) / ".local/share/jupyter/runtime"
    info = json.loads((runtime / f"kernel-{kernel_id}.json").read_text())
    return {info[f"{name}_port"] for name in ("shell", "iopub", "stdin", "control", "hb")}


def listening(pid: int) -> set[int]:
    return {
        conn.laddr.port
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }


def recorded_kernel_server(course) -> psutil.Process:
    from classroom.host.state import State

    state = State.peek(course.state_dir)
    try:
        server = kernel_server.KernelServer.recorded(state)
    finally:
        state.close()
    assert server is not None and server.process() is not None
    return server.process()


def gone(pid: int, timeout: float = 10, zombie_ok: bool = False) -> bool:
    """``pid`` has ended and (unless ``zombie_ok``: init's to reap) was reaped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = psutil.Process(pid).status()
            if zombie_ok and state == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def alive_processes_of(uid: int, timeout: float = 10) -> list[str]:
    """The command lines of ``uid``'s processes still running after ``timeout`` (zombies are
    init's to reap: a forked server is nobody's child)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for p in psutil.process_iter(["uids", "status", "cmdline"]):
            uids, state = p.info["uids"], p.info["status"]
            if uids and uids.real == uid and state != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.info["cmdline"] or []))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def debug(pid):
    try:
        p = psutil.Process(pid)
        return p.status(), p.ppid(), p.cmdline()
    except psutil.Error as exc:
        return repr(exc)


def launched(course, **launch: str):
    course.write_config(launch={"app": "server", **launch})
    r = course.run("launch", "--no-portal")
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@needs_root
def test_forked_kernels_are_the_students_own(make_course):
    c = make_course(2)
    assert c.run("setup").returncode == 0
    a, b = c.usernames
    for u in c.usernames:
        write_as(c, u, ".ipython/profile_default/startup/00-mark.py", STARTUP)
        write_as(c, u, "tutorial/week1/lesson.ipynb", "")
    write_as(c, a, ".config/matplotlib/matplotlibrc", MATPLOTLIBRC)
    write_as(c, a, ".config/matplotlib/stylelib/mine.mplstyle", STYLE)
    try:
        r = launched(c, kernel_mode="fork")
        ks = recorded_kernel_server(c)
        assert ks.uids().real == 0 and len(os.listdir(f"/proc/{ks.pid}/task")) == 1
        marker = str(kernel_server.home(load(c.config)))
        labs = {u: Lab(c, u) for u in c.usernames}
        a1 = labs[a].open("week1/lesson.ipynb")
        a2 = labs[a].open("week1/other.ipynb")
        b1 = labs[b].open("week1/lesson.ipynb")
        sockets = {k["id"]: labs[u].connect(k["id"]) for u, k in ((a, a1), (a, a2), (b, b1))}
        seen = {kid: probe(s, marker) for kid, s in sockets.items()}
        for u, k in ((a, a1), (a, a2), (b, b1)):
            pw = c.pw(u)
            got = seen[k["id"]]
            # forked by the course's kernel server, as the student, before any of their code
            assert got["ppid"] == ks.pid and got["sid"] == got["pid"]
            assert got["uid"] == got["euid"] == pw.pw_uid and got["gid"] == pw.pw_gid
            assert set(got["groups"]) == set(os.getgrouplist(u, pw.pw_gid))
            assert got["startup"] == pw.pw_uid  # their ~/.ipython startup file ran, as them
            assert got["preloaded"] == ["matplotlib.pyplot", "numpy", "pandas"]
            assert got["cwd"] == str(c.home(u) / "tutorial" / "week1")  # the notebook's folder
            env = got["env"]
            assert env["HOME"] == pw.pw_dir and env["USER"] == u
            assert not {k for k in env if k.startswith(("OPENBLAS", "OMP_", "MKL", "CLASSROOM"))}
            assert all(marker not in v and "/root" not in v for v in env.values())
            assert got["configdir"] == str(c.home(u) / ".config/matplotlib")
            assert got["cachedir"] == str(c.home(u) / ".cache/matplotlib")
            assert got["backend"] == "module://matplotlib_inline.backend_inline"
            assert got["leaks"] == [], got["leaks"]  # nothing computed from the server's HOME
            assert got["max_rows"] == 60 and got["umask"] == 0o077
            assert got["dumpable"] == 0  # became the student without exec: nobody may ptrace it
            # over [limits] memory the OOM killer prefers the kernel to the server
            assert Path(f"/proc/{got['pid']}/oom_score_adj").read_text().strip() == "300"
            assert Path(f"/proc/{status(c)[u]['pid']}/oom_score_adj").read_text().strip() == "0"
            assert got["sys_path"][3] == "" and "/classroom/host" not in " ".join(got["sys_path"])
            # seen from outside: a kernel's command line, environment and descriptors
            cmdline = Path(f"/proc/{got['pid']}/cmdline").read_bytes().split(b"\0")
            assert cmdline[1:3] == [b"-m", b"ipykernel_launcher"]
            shown = proc_env(got["pid"])  # as for an exec'd kernel: what it started with
            assert shown.items() <= env.items() and shown["JPY_PARENT_PID"] == str(ks.pid)
            assert shown["HOME"] == pw.pw_dir and "JPY_SESSION_NAME" in shown
            fds = proc_fds(got["pid"])
            assert fds[0] == "/dev/null"
            # the server's output, as for an exec'd kernel: the pipe to the root log writer
            # (never root's log file itself; ipykernel moves 1 and 2 to capture them)
            server_fds = proc_fds(status(c)[u]["pid"])
            server_out = {server_fds[1], server_fds[2]}
            assert server_out <= set(fds.values()), (server_out, fds)
            assert not [t for t in fds.values() if str(c.state_dir) in t]
            assert not [t for t in fds.values() if "kernels.sock" in t]
        assert seen[a1["id"]]["linewidth"] == 7.0  # a's own matplotlibrc
        assert "mine" in seen[a1["id"]]["styles"] and "mine" not in seen[b1["id"]]["styles"]
        assert seen[b1["id"]]["linewidth"] != 7.0
        # no state shared between kernels: random numbers, multiprocessing's authkey
        for key in ("numpy", "random", "authkey"):
            assert len({seen[k][key] for k in seen}) == 3, key
        # No kernel holds another student's secrets (its own key: the scan works).
        creds = c.credentials()
        key_a, key_b = connection_key(c, a, a1["id"]), connection_key(c, b, b1["id"])
        needles = [
            key_a,
            key_b,
            creds[b]["password"].encode(),
            creds[b]["notebook_password"].encode(),
            hashed_password(c.home(b))[1].encode(),
        ]
        found = memory_contains(seen[a1["id"]]["pid"], needles)
        assert found == {key_a}, found
        found = memory_contains(seen[b1["id"]]["pid"], [key_a, key_b])
        assert found == {key_b}, found
        assert not memory_contains(ks.pid, [key_a, key_b])

        # the debugger (preloaded too) answers
        initialize = {
            "type": "request",
            "seq": 1,
            "command": "initialize",
            "arguments": {"clientID": "test", "adapterID": "python", "pathFormat": "path"},
        }
        sa = sockets[a1["id"]]
        answer = sa.reply(sa.message("control", "debug_request", initialize), "debug_reply")
        assert answer.get("success") is True, answer

        # inline plots
        plot = sockets[a1["id"]].run(
            "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()"
        )
        assert plot["error"] is None and any("image/png" in d["data"] for d in plot["displays"])

        # interrupt
        sa = sockets[a1["id"]]
        msg = sa.send("import time\ntime.sleep(100)")
        time.sleep(1.5)
        assert labs[a].post(f"/api/kernels/{a1['id']}/interrupt").status_code == 204
        out = sa.replies(msg, timeout=30)
        assert out["error"] and out["error"]["ename"] == "KeyboardInterrupt"
        assert sa.value("x = 1\nprint(x)") == 1

        # A new kernel listens on ports of its own choosing, written in its connection file;
        # restart: a fresh kernel, forked again, on the same ports, so the browser's open
        # websocket goes on working (as JupyterLab's does)
        old = seen[a1["id"]]["pid"]
        ports = connection_ports(c, a, a1["id"])
        assert ports <= listening(old)
        assert labs[a].post(f"/api/kernels/{a1['id']}/restart").status_code == 200
        assert gone(old), debug(old)
        again = probe(sa, marker)
        assert again["pid"] != old and again["ppid"] == ks.pid and again["uid"] == c.pw(a).pw_uid
        assert connection_ports(c, a, a1["id"]) == ports and ports <= listening(again["pid"])
        out = sa.run("print(x)")
        assert out["error"] and out["error"]["ename"] == "NameError"

        # shutdown of one kernel: nothing of it is left
        pid2 = seen[a2["id"]]["pid"]
        sockets[a2["id"]].close()
        r = labs[a].http.delete(f"{labs[a].base}/api/kernels/{a2['id']}", timeout=60)
        assert r.status_code == 204
        assert gone(pid2)

        # a kernel does not outlive its server
        pid_b = seen[b1["id"]]["pid"]
        os.kill(status(c)[b]["pid"], signal.SIGKILL)
        assert gone(pid_b)

        down = c.run("shutdown")
        assert down.returncode == 0, down.stdout + down.stderr
        assert "the kernel server stopped" in down.stdout
        assert gone(again["pid"]) and gone(ks.pid, zombie_ok=True)  # launch started it
        assert not Path(launchplan.kernel_socket(load(c.config))).parent.exists()
        for u in c.usernames:
            assert not alive_processes_of(c.pw(u).pw_uid)
    finally:
        for s in locals().get("sockets", {}).values():
            s.close()
        c.run("shutdown")


ASK = """
import json, os, socket, sys
spec = json.loads(sys.argv[2])
fd = os.memfd_create("spec")
os.write(fd, json.dumps(spec).encode())
os.lseek(fd, 0, 0)
conn = socket.socket(socket.AF_UNIX)
try:
    conn.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": exc.strerror}))
    sys.exit()
try:
    socket.send_fds(conn, [sys.argv[3].encode()], [fd, 1, 2])
except OSError:
    pass  # refused before it was asked: the answer is there to read
conn.settimeout(60)
print(conn.recv(4096).decode().splitlines()[0], flush=True)
sys.stdin.read()  # the kernel lives while we keep the connection
"""


def ask(
    course, pw, spec: dict, request: str = "classroom-kernel 1\n"
) -> tuple[dict, subprocess.Popen]:
    """As ``pw`` (None: root), ask the course's kernel server for a kernel; its first answer."""
    who = (
        {}
        if pw is None
        else {
            "user": pw.pw_uid,
            "group": pw.pw_gid,
            "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid),
        }
    )
    proc = subprocess.Popen(
        [
            PYTHON,
            "-c",
            ASK,
            str(launchplan.kernel_socket(load(course.config))),
            json.dumps(spec),
            request,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
        **who,
    )
    return json.loads(proc.stdout.readline()), proc


@needs_root
def test_nobody_gets_a_kernel_as_anyone_else(make_course):
    c = make_course(2)
    assert c.run("setup").returncode == 0
    a, b = c.usernames
    pa, pb = c.pw(a), c.pw(b)
    outsider = "t" + uuid.uuid4().hex[:8]
    c.extra_users.append(outsider)
    subprocess.run(["useradd", "-N", "-m", "-d", str(c.home_base / outsider), outsider], check=True)
    po = c.pw(outsider)
    procs = []
    try:
        launched(c, kernel_mode="fork")
        ks = recorded_kernel_server(c)
        folder = launchplan.kernel_socket(load(c.config)).parent
        st = folder.stat()
        assert (
            (st.st_uid, st.st_mode & 0o777) == (0, 0o750)
            and st.st_gid == c.pw(a).pw_gid
            or (st.st_gid == __import__("grp").getgrnam(c.name).gr_gid)
        )
        argv = [PYTHON, "-m", "ipykernel_launcher", "-f", f"{pa.pw_dir}/probe-kernel.json"]
        # a asks for a kernel while claiming to be b: the kernel is a's all the same
        as_b = {
            "argv": argv,
            "env": {"HOME": pb.pw_dir, "USER": b},
            "cwd": pa.pw_dir,
            "umask": 0o077,
        }
        answer, proc = ask(c, pa, as_b)
        procs.append(proc)
        assert "pid" in answer, answer
        kernel = answer["pid"]
        assert psutil.Process(kernel).uids().real == pa.pw_uid
        assert psutil.Process(kernel).ppid() == ks.pid
        proc.stdin.close()  # the connection goes, so does the kernel
        assert gone(kernel)
        # nor into b's folder: the kernel is a before it looks at the request
        answer, proc = ask(c, pa, {**as_b, "cwd": pb.pw_dir})
        procs.append(proc)
        assert answer == {
            "error": "the kernel cannot enter the notebook's folder (Permission denied)"
        }
        # root gets no kernel; a user outside the course cannot even reach the socket
        answer, proc = ask(c, None, as_b)
        procs.append(proc)
        assert answer == {"error": "no kernels for root"}
        answer, proc = ask(c, po, as_b)
        procs.append(proc)
        assert answer == {"connect": "Permission denied"}
        # anything but the request is refused
        answer, proc = ask(c, pa, as_b, request="GET / HTTP/1.0\n")
        procs.append(proc)
        assert "error" in answer
        log = (c.state_dir / "logs" / "kernelserver.log").read_text()
        assert f"kernel {kernel} for {a}" in log and b not in log
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait()
        c.run("shutdown")


EAVESDROP = """
import json, sys, time, zmq
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect(f"tcp://127.0.0.1:{sys.argv[1]}")
print("listening", flush=True)
got, end = [], time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    if sub.poll(100):
        got.append(b"".join(sub.recv_multipart()).hex())
print(json.dumps(got), flush=True)
"""


@needs_root
@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_a_classmate_cannot_listen_to_a_kernel(make_course, mode):
    """Kernels listen on 127.0.0.1: a classmate who finds a kernel's IOPub port (``ss``
    shows it) and subscribes must read neither its code nor its output (CurveZMQ)."""
    c = make_course(2)
    assert c.run("setup").returncode == 0
    a, b = c.usernames
    try:
        launched(c, kernel_mode=mode)
        lab = Lab(c, a)
        kernel = lab.open("lesson.ipynb")
        ks = lab.connect(kernel["id"])
        assert ks.run("print(1)")["stdout"] == "1\n"  # the kernel is up and talks to its server
        runtime = c.home(a) / ".local/share/jupyter/runtime"
        info = json.loads((runtime / f"kernel-{kernel['id']}.json").read_text())
        assert info.get("curve_publickey"), "the kernel was started without transport encryption"
        spy = as_student(
            c, b, EAVESDROP, str(info["iopub_port"]), "8", stdout=subprocess.PIPE, text=True
        )
        try:
            assert spy.stdout.readline().strip() == "listening"
            marker = uuid.uuid4().hex
            for _ in range(5):
                out = ks.run(f"print({marker!r}[::-1] + 'x')")
                assert out["stdout"] == marker[::-1] + "x\n", out
                time.sleep(0.5)
            seen = json.loads(spy.communicate(timeout=60)[0])
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        assert seen == [], f"{b} read {len(seen)} messages of {a}'s kernel"
        ks.close()
    finally:
        c.run("shutdown")


LOWER_LIMITS = """\
import os, resource
os.nice(5)
resource.setrlimit(resource.RLIMIT_NOFILE, (512, 1024))
resource.setrlimit(resource.RLIMIT_NPROC, (300, 400))
"""


@needs_root
def test_missing_preload_module_and_kernels_that_cannot_be_forked(make_course):
    c = make_course(1)
    assert c.run("setup").returncode == 0
    (a,) = c.usernames
    pw = c.pw(a)
    write_as(c, a, "tutorial/lesson.ipynb", "")
    # a kernel spec of the student's own: this Python, with a variable only a new Python applies
    spec = {
        "argv": [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mine",
        "language": "python",
        "env": {"PYTHONDONTWRITEBYTECODE": "1"},
    }
    write_as(c, a, ".local/share/jupyter/kernels/mine/kernel.json", json.dumps(spec))
    write_as(c, a, ".jupyter/jupyter_server_config.py", LOWER_LIMITS)
    sockets = []
    try:
        r = launched(c, kernel_mode="fork", preload="numpy, no_such_module_xyz")
        ks = recorded_kernel_server(c)
        log = (c.state_dir / "logs" / "kernelserver.log").read_text()
        assert "warning: preload: no_such_module_xyz is not installed, skipped" in log
        lab = Lab(c, a)
        server_pid = status(c)[a]["pid"]
        forked = lab.connect(lab.open("lesson.ipynb")["id"])
        sockets.append(forked)
        got = forked.value(
            "import os, sys, json\n"
            "print(json.dumps([os.getppid(), 'numpy' in sys.modules, 'pandas' in sys.modules]))"
        )
        assert got == [ks.pid, True, False]
        # the server's limits and priority (its config lowered them) hold for its forked
        # kernels, as they would for exec'd ones
        limited = lab.connect(lab.open("limited.ipynb")["id"])
        sockets.append(limited)
        got = limited.value(
            "import os, json, resource\n"
            "print(json.dumps([os.getppid(), os.getpriority(os.PRIO_PROCESS, 0),"
            " resource.getrlimit(resource.RLIMIT_NOFILE), resource.getrlimit(resource.RLIMIT_NPROC),"
            " open('/proc/self/cgroup').read()]))"
        )
        server_cgroups = Path(f"/proc/{server_pid}/cgroup").read_text()
        assert got == [ks.pid, 5, [512, 1024], [300, 400], server_cgroups]
        # another kernel spec: started by exec, as Jupyter does, and the log says why
        r = lab.http.post(
            f"{lab.base}/api/sessions",
            json={"path": "other.ipynb", "type": "notebook", "kernel": {"name": "mine"}},
            timeout=90,
        )
        assert r.status_code == 201, r.text
        mine = lab.connect(r.json()["kernel"]["id"])
        sockets.append(mine)
        got = mine.value("import os, json\nprint(json.dumps([os.getppid(), os.getuid()]))")
        assert got == [server_pid, pw.pw_uid]
        server_log = (c.state_dir / "logs" / f"{a}.log").read_text()
        assert "started by exec: its environment sets PYTHONDONTWRITEBYTECODE" in server_log
        # no kernel server (it died): kernels start by exec; the forked ones ended with it
        forked_pid = forked.value("import os\nprint(os.getpid())")
        os.kill(ks.pid, signal.SIGKILL)
        assert gone(forked_pid, timeout=15, zombie_ok=True), debug(forked_pid)
        third = lab.connect(lab.open("third.ipynb")["id"])
        sockets.append(third)
        assert third.value("import os\nprint(os.getppid())") == server_pid
        server_log = (c.state_dir / "logs" / f"{a}.log").read_text()
        assert "started by exec: the kernel server did not fork it" in server_log
        # launch again: a new kernel server, and kernels are forked again
        r = c.run("launch", "--no-portal")
        assert r.returncode == 0, r.stdout + r.stderr
        ks2 = recorded_kernel_server(c)
        assert ks2.pid != ks.pid
        fourth = lab.connect(lab.open("fourth.ipynb")["id"])
        sockets.append(fourth)
        assert fourth.value("import os\nprint(os.getppid())") == ks2.pid
    finally:
        for s in sockets:
            s.close()
        c.run("shutdown")


@needs_root
def test_exec_mode_is_jupyters_own(make_course):
    c = make_course(1)
    assert c.run("setup").returncode == 0
    (a,) = c.usernames
    write_as(c, a, "tutorial/lesson.ipynb", "")
    ks = None
    try:
        launched(c, kernel_mode="exec")
        server_pid = status(c)[a]["pid"]
        assert not launchplan.kernel_socket(load(c.config)).exists()
        lab = Lab(c, a)
        ks = lab.connect(lab.open("lesson.ipynb")["id"])
        assert ks.value("import os\nprint(os.getppid())") == server_pid
        server_log = (c.state_dir / "logs" / f"{a}.log").read_text()
        assert "listens on ports it chose" in server_log  # the exec provisioner's
        assert "forked" not in server_log
    finally:
        if ks is not None:
            ks.close()
        c.run("shutdown")


@needs_root
@pytest.mark.browser
def test_the_sample_notebook_runs_in_jupyterlab_on_forked_kernels(make_course):
    """JupyterLab in chromium: open the sample notebook and run all cells (kernel_mode = fork)."""
    from chromium import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, KERNEL_IDLE, screenshot_on_failure

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    c = make_course(1)
    assert c.run("setup").returncode == 0
    (a,) = c.usernames
    samples = Path(__file__).resolve().parent.parent / "samples" / "tutorial"
    write_as(c, a, "tutorial/lesson1.ipynb", (samples / "lesson1.ipynb").read_text())
    write_as(c, a, "tutorial/data/planets.csv", (samples / "data" / "planets.csv").read_text())
    try:
        launched(c, kernel_mode="fork", app="lab")
        ks = recorded_kernel_server(c)
        port = status(c)[a]["port"]
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.set_default_timeout(120_000)
            try:
                base = f"/user/{a}/"
                page.goto(f"http://127.0.0.1:{port}{base}login?next={base}lab/tree/lesson1.ipynb")
                page.fill("input[type=password]", c.credentials()[a]["notebook_password"])
                page.locator("#login_submit, button[type=submit]").first.click()
                # the sample names its kernel (python3): JupyterLab asks nothing
                page.wait_for_function(KERNEL_IDLE)
                page.get_by_role("menuitem", name="Run", exact=True).click()
                page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
                page.wait_for_function(
                    "() => { const out = [...document.querySelectorAll('.jp-OutputArea-output')]"
                    ".map(e => e.innerText.trim()); return out.includes('42') && out.includes('8'); }"
                )
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "kernels-fork-lesson1.png"))
            except Exception:
                screenshot_on_failure(page, "kernels-fork-failure.png")
                raise
            finally:
                browser.close()
        kernels = [k for k in ks.children() if k.uids().real == c.pw(a).pw_uid]
        assert len(kernels) == 1  # the notebook's kernel was forked by the kernel server
        server_log = (c.state_dir / "logs" / f"{a}.log").read_text()
        assert "forked by the kernel server" in server_log and "started by exec" not in server_log
    finally:
        c.run("shutdown")
