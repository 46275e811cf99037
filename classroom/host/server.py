"""A student's Jupyter server, with JupyterHub's Spawner contract, and the course's record.

``Server.start()`` starts it as the student and gives its address, ``poll()`` says
None while it runs (else how it ended), ``stop()`` escalates with named timeouts
(``processes.stop_processes``). The record keeps only what finds the process again:
pid, start time and uid (a pid is only ever signalled while all three still match),
and the port and URL that reach it (port 0: a Unix socket, proxy mode). Launch, shutdown, status, remove and the portal's
lookup all go through this object; the ``servers`` and ``ports`` tables are read and
written here only (under ``--dry-run``, not written at all).

Each server runs as the student (uid, gid and supplementary groups only), in its own
session, with the student's clean environment, no descriptor of root's and cwd the
home; its settings reach it as arguments that carry no secret.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import pwd
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

from ..core.addresses import https, probe_host, proxied, server_path, server_url
from ..core.errors import ClassroomError, StepFailed
from ..core.launchplan import exec_argv, server_args, socket_path
from ..core.settings import Settings
from . import hooks, limits, logwriter
from .forkserver import EXEC, ForkServer, ForkServerError
from .identity import launcher_argv, server_python, student_env
from .processes import find_process, stop_processes
from .serverlogs import log_dir, log_path, open_log
from .state import State, now
from .system import dry_run, spawn

log = logging.getLogger("classroom")

READY_POLL = 0.2  # seconds between readiness probes
EXEC_READY_TIMEOUT = 30  # seconds for a fork server that imports nothing to answer
STOPPED_EARLY = "the server stopped before it answered"

# exec-mode servers and log writers we started (reaped when they die)
_children: dict[int, subprocess.Popen] = {}


@dataclass
class Server:
    """One student's server: the least state that finds its process again, and its address."""

    username: str
    uid: int
    port: int = 0
    url: str = ""
    pid: int | None = None
    start_time: float | None = None
    mode: str = "exec"
    pw: pwd.struct_passwd | None = field(default=None, repr=False, compare=False)
    log_offset: int = field(default=0, repr=False, compare=False)  # where this start's log begins

    @classmethod
    def of(cls, pw: pwd.struct_passwd) -> Server:
        """A server to start for the account ``pw``."""
        return cls(pw.pw_name, pw.pw_uid, pw=pw)

    def place(self, settings: Settings, port: int) -> None:
        """Give it ``port`` (0 in proxy mode: a socket) and the address that goes with it;
        forget any old process."""
        if proxied(settings):
            port = 0
        self.port, self.url = port, server_url(settings, port, self.username)
        self.pid = self.start_time = None

    @property
    def on_socket(self) -> bool:
        """It listens on a Unix socket (started in proxy mode), not on a port."""
        return self.port == 0

    # --- the record ----------------------------------------------------------------------

    @classmethod
    def recorded(cls, state: State, username: str) -> Server | None:
        """The course's record of ``username``'s server, or None."""
        row = state.execute("SELECT * FROM servers WHERE username = ?", (username,)).fetchone()
        return None if row is None else cls._from_row(row)

    @classmethod
    def all_recorded(cls, state: State) -> list[Server]:
        return [cls._from_row(row) for row in state.execute("SELECT * FROM servers")]

    @classmethod
    def _from_row(cls, row: Any) -> Server:
        return cls(
            row["username"],
            row["uid"],
            port=row["port"],
            url=row["url"] or "",
            pid=row["pid"],
            start_time=row["start_time"],
            mode=row["mode"] or "exec",
        )

    def save(self, state: State) -> None:
        """Record it (it counts from now on: shutdown, status and the portal see it)."""
        if dry_run():
            return
        with state.transaction():
            state.execute(
                "INSERT OR REPLACE INTO servers "
                "(username, port, pid, start_time, uid, mode, url, started_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.username,
                    self.port,
                    self.pid,
                    self.start_time,
                    self.uid,
                    self.mode,
                    self.url,
                    now(),
                ),
            )

    def forget(self, state: State, command: str, action: str, detail: dict) -> None:
        """Drop the record (its port stays the student's), and journal why."""
        if dry_run():
            return
        with state.transaction():
            state.execute("DELETE FROM servers WHERE username = ?", (self.username,))
            state.record(command, self.username, action, detail)

    # --- the Spawner contract ------------------------------------------------------------

    def start(self, settings: Settings, forker: Forker | None = None) -> str:
        """Start it as the student, logging to its log; return its address.

        Through ``forker`` (the class's supervisor) while it works, else as a new program
        of ours. Inside the student's cgroup from its first instruction (``[limits]``).
        Raises ``OSError``, ``ValueError`` or ``psutil.Error`` when it could not be started.
        Not recorded yet: ``save`` it.
        """
        assert self.pw is not None, "a server is started for an account"
        args = server_args(settings, self.pw.pw_dir, self.port, self.username)
        self.pid, self.mode = None, "exec"
        placement = place(settings, self.username)
        where = "socket" if self.on_socket else f"port {self.port}"
        fd, self.log_offset = open_log(settings, self.username, f"launch: {where}")
        try:
            if forker is not None:
                log = str(log_path(settings, self.username))
                program = exec_argv(settings, args, server_python())
                started = forker.spawn(self.username, self.uid, args, log, placement, program)
                if started is not None:
                    self.pid, self.mode = started
            if self.pid is None:
                self.pid = self._exec(settings, args, fd, placement)
            if self.pid is not None:
                # gone already (its supervisor reaps at once): wait_ready says it stopped early
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.start_time = psutil.Process(self.pid).create_time()
        finally:
            os.close(fd)
        return self.url

    def _exec(
        self, settings: Settings, args: list[str], log_fd: int, placement: dict
    ) -> int | None:
        assert self.pw is not None
        with log_pipe(log_fd) as output:
            # Started as root through identity.py, which becomes the student and executes
            # the server: nothing here waits on a process the student could stop. It joins
            # the student's cgroup first, as root (``before`` runs before identity.py).
            proc = spawn(
                launcher_argv(self.pw, exec_argv(settings, args, server_python())),
                env=student_env(self.pw),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd="/",
                umask=0o077,
                before=(lambda: limits.enter(placement)) if any(placement.values()) else None,
            )
        if proc is None:  # dry run
            return None
        _children[proc.pid] = proc
        _wait_became(proc, self.pw)
        return proc.pid

    def process(self) -> psutil.Process | None:
        """Its process, if it still runs and is still the one recorded (pid, start time, uid)."""
        return find_process(self.pid, self.start_time, self.uid)

    def poll(self) -> int | None:
        """None while it runs; else its exit status (0 when it was not our child)."""
        if self.process() is not None:
            return None
        child = _children.get(self.pid or 0)
        code = child.poll() if child is not None else None
        return code if code is not None else 0

    def stop(self, **timeouts: float) -> bool:
        """Stop it and its kernels (SIGTERM, then SIGKILL); True once nothing of it is left."""
        return not stop_servers([self], **timeouts)

    def wait_ready(self, settings: Settings, timeout: float) -> str | None:
        """None once it answers HTTP on its port (or socket); else why not (it exited, or
        timed out)."""
        deadline = time.monotonic() + timeout
        path = server_path(self.username) + "api"
        if self.on_socket:
            sock = str(socket_path(settings, self.username))

            def ready(proc: psutil.Process) -> bool:
                return _answers_on_socket(sock, self.uid, path)

            where = "on its socket"
        else:
            host = probe_host(settings.ip)
            context = None
            if https(settings):
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # only asking "do you answer?" of our server

            def ready(proc: psutil.Process) -> bool:
                return _answers(host, self.port, context, path) and _listens(proc, self.port)

            where = f"on port {self.port}"
        while True:
            proc = self.process()
            if proc is None:
                return STOPPED_EARLY
            if ready(proc):
                return None
            if time.monotonic() >= deadline:
                return f"it did not answer {where} within {timeout:g} s"
            time.sleep(READY_POLL)


def _wait_became(proc: subprocess.Popen, pw: pwd.struct_passwd, timeout: float = 30) -> None:
    """Until the launcher is ``pw`` (or has ended): a pid is only recorded with its uid.

    Until then it is root's, which no student can stop; ``timeout`` is for a host too
    busy to start Python. Raises ``OSError`` (the launcher killed) when it runs out.
    """
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(proc.pid).uids().real == pw.pw_uid:
                return
        if time.monotonic() >= deadline:
            proc.kill()
            raise OSError(f"it did not become {pw.pw_name} within {timeout:g} s")
        time.sleep(0.005)


@contextlib.contextmanager
def log_pipe(log_fd: int) -> Iterator[int | None]:
    """The write end of a pipe that a new log writer (root's) copies into ``log_fd``;
    closed here once the server has it. None under ``--dry-run`` (nothing is started)."""
    if dry_run():
        yield None
        return
    read_end, write_end = os.pipe()
    try:
        writer = spawn(
            logwriter.argv(server_python()),
            env={},
            stdin=read_end,
            stdout=log_fd,
            stderr=subprocess.DEVNULL,
            cwd="/",
        )
        if writer is not None:
            _children[writer.pid] = writer  # reaped with the servers
        os.close(read_end)
        read_end = -1
        yield write_end
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def _answers(host: str, port: int, context: ssl.SSLContext | None, path: str = "/api") -> bool:
    try:
        if context is not None:
            conn = http.client.HTTPSConnection(host, port, timeout=2, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("GET", path)
            conn.getresponse().read()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False
    return True


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class _SocketConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket whose listener must run as ``uid`` (root follows the
    student's links: the peer's uid, not the path, says whose server it is)."""

    def __init__(self, path: str, uid: int, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path, self.uid = path, uid

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
            if peer_uid(sock) != self.uid:
                raise ConnectionRefusedError(f"{self.path} is not served by uid {self.uid}")
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def socket_connection(path: str, uid: int, timeout: float) -> http.client.HTTPConnection:
    """An HTTP connection to the server on the Unix socket ``path`` (proxy mode); it
    refuses to talk to a listener that is not ``uid``."""
    return _SocketConnection(path, uid, timeout)


def _answers_on_socket(path: str, uid: int, url_path: str) -> bool:
    conn = socket_connection(path, uid, timeout=2)
    try:
        conn.request("GET", url_path)
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    return True


def _listens(proc: psutil.Process, port: int) -> bool:
    with contextlib.suppress(psutil.Error):
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return True
    return False


def stop_servers(
    servers: Iterable[Server], extra: Iterable[psutil.Process] = (), **timeouts: float
) -> set[int]:
    """Stop ``servers`` (those still running) and ``extra`` together, one grace period
    for all; the pids that survived SIGKILL (normally none)."""
    procs = [proc for server in servers if (proc := server.process()) is not None]
    return {p.pid for p in stop_processes(procs, extra, **timeouts)}


def reap_children() -> None:
    """Collect the exec-mode servers of ours that have exited (no zombie while the portal runs)."""
    for pid, proc in list(_children.items()):
        with contextlib.suppress(OSError):
            if proc.poll() is not None:
                del _children[pid]


class Forker:
    """The class's supervisor while it works: a fork server that forks (``start_mode =
    fork``) or starts programs (``exec``, or when the forking one failed) and stays the
    parent and reaper of the servers. Once none works, ``spawn`` answers None (the server
    is then started as a program of ours), and ``note`` tells the teacher why, once."""

    def __init__(self, settings: Settings, note: Callable[[str], None]):
        self.note = note
        self.log = str(log_dir(settings) / "forkserver.log")
        self.fork: ForkServer | None = None
        app = settings.app if settings.start_mode == "fork" else EXEC
        try:  # it imports in the background while launch prepares the homes
            self.fork = ForkServer.start(app, python=server_python(), log_path=self.log)
        except ForkServerError as exc:
            self._fall_back(app, f"could not start ({exc})")

    def wait_ready(self, timeout: float) -> None:
        if self.fork is None:
            return
        try:
            self.fork.wait_ready(timeout)
        except ForkServerError as exc:
            app = self.fork.app
            self.close(timeout=1)
            self._fall_back(app, f"did not start ({exc})")

    def spawn(
        self,
        username: str,
        uid: int,
        args: list[str],
        log: str,
        placement: dict,
        program: list[str],
    ) -> tuple[int, str] | None:
        """(pid, mode) of the server started; None when no supervisor works (any more).
        ``ValueError``: this one request failed."""
        if self.fork is None:
            return None
        app = self.fork.app
        try:
            pid = self.fork.spawn(
                username,
                uid,
                args,
                log,
                placement=placement,
                program=program if app == EXEC else None,
            )
        except ForkServerError as exc:
            self.close(timeout=1)
            self._fall_back(app, f"stopped ({exc})", rest=True)
            return self.spawn(username, uid, args, log, placement, program)
        return pid, "exec" if app == EXEC else "fork"

    def _fall_back(self, failed: str, why: str, rest: bool = False) -> None:
        """The supervisor of app ``failed`` is gone: after a forking one, one that only
        starts programs; after that one, none (servers are then launch's children)."""
        self.fork = None
        if failed == EXEC:
            self.note(f"the supervisor {why}: the servers are started as launch's children")
            return
        self.note(
            f"the fork server {why}: starting {'the rest' if rest else 'each server'} by exec instead"
        )
        fork = None
        try:
            fork = ForkServer.start(EXEC, python=server_python(), log_path=self.log)
            fork.wait_ready(EXEC_READY_TIMEOUT)
        except ForkServerError as exc:
            if fork is not None:
                fork.close(timeout=1)
            self.note(
                f"the supervisor could not start either ({exc}): the servers are launch's children"
            )
            return
        self.fork = fork

    def close(self, timeout: float = 5) -> None:
        """No more requests; the supervisor stays until the servers it started have ended."""
        if self.fork is not None:
            self.fork.close(timeout=timeout)
            _children[self.fork.pid] = self.fork.proc  # reaped by whoever runs reap_children
            self.fork = None


def place(settings: Settings, username: str) -> dict:
    """Make the student's cgroup and limit it (``[limits]``); the placement its first process
    enters. Raises ``OSError`` when limits are set and cannot be applied; without limits a
    cgroup that cannot be made is only logged (it would serve for accounting)."""
    wanted = limits.Limits.of(settings)
    host = limits.detect()
    try:
        return limits.prepare(host, settings.name, username, wanted)
    except OSError as exc:
        if wanted.set():
            raise OSError(exc.errno, f"cannot apply [limits] ({host.summary()}): {exc}") from None
        log.debug("no cgroup for %s: %s", username, exc)
        return {}


# --- ports: a student keeps theirs from one launch to the next -----------------------------


def previous_ports(state: State) -> dict[str, int]:
    return {r["username"]: r["port"] for r in state.execute("SELECT * FROM ports")}


def reserved_ports(state: State, settings: Settings) -> set[int]:
    """Ports no new server may take: every student's, every recorded server's, the portal's."""
    reserved = set(previous_ports(state).values()) | {settings.portal_port}
    return reserved | {r["port"] for r in state.execute("SELECT port FROM servers")}


def remember_ports(state: State, servers: Iterable[Server]) -> None:
    if dry_run():
        return
    with state.transaction():
        for server in servers:
            if server.on_socket:
                continue  # proxy mode: the port the student had stays theirs
            state.execute(
                "INSERT OR REPLACE INTO ports (username, port) VALUES (?, ?)",
                (server.username, server.port),
            )


# --- what status, remove and the portal ask ------------------------------------------------


def _status(server: Server | None) -> dict:
    if server is None:
        return {"server": "stopped", "port": None, "pid": None, "url": None}
    port = server.port or None  # 0: a socket (proxy mode), reached through the portal
    if server.poll() is not None:
        return {"server": "died", "port": port, "pid": server.pid, "url": None}
    return {"server": "running", "port": port, "pid": server.pid, "url": server.url}


def server_status(course: Any, username: str) -> dict:
    """{'server': running|stopped|died, 'port', 'pid', 'url'} from the state and the process table."""
    return _status(Server.recorded(course.state, username))


def running_servers(settings: Any) -> dict[str, dict]:
    """{username: {'port', 'url', 'uid'}} of the servers running now (port 0: on a socket);
    a fresh read-only look at the state."""
    state = State.peek(settings.state_dir)
    try:
        servers = Server.all_recorded(state)
    finally:
        state.close()
    return {
        s.username: {"port": s.port, "url": s.url, "uid": s.uid}
        for s in servers
        if s.poll() is None
    }


def forget_server(course: Any, username: str, stop: bool = True) -> None:
    """Stop a student's recorded server (if any; its post_stop hook runs) and forget it,
    its port too."""
    server = Server.recorded(course.state, username)
    if server is not None and stop and server.process() is not None:
        server.stop()
        with contextlib.suppress(ClassroomError, StepFailed, KeyError):
            post = hooks.configured(course.settings, "post_stop")
            home = pwd.getpwnam(username).pw_dir
            hooks.run_for(course.settings, post, username, home, server.port)
    with course.state.transaction():
        course.state.execute("DELETE FROM servers WHERE username = ?", (username,))
        course.state.execute("DELETE FROM ports WHERE username = ?", (username,))
        if server is not None:
            course.state.record("shutdown", username, "server forgotten", {"port": server.port})
