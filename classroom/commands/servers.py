"""Students' Jupyter servers: launch, shutdown and status.

Each student's server runs as the student (uid, gid and supplementary groups
only), in its own session, with a clean environment, no descriptor of root's
and cwd the home. Its settings reach it as arguments that carry no secret; the
password hash stays in the student's own ``~/.jupyter`` (written by setup).

The state keeps only what is needed to find a server again, as JupyterHub's
Spawner does: port, pid, the process's start time and uid. A pid is only ever
signalled while all three still match.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import pwd
import shlex
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import psutil

from ..core.addresses import probe_host, server_url
from ..core.errors import ClassroomError, InvalidInput, Refused, StepFailed
from ..core.settings import Settings
from ..host import hooks
from ..host.ports import port_free
from ..host.processes import find_process, other_jupyter, server_tree, stop_processes
from ..host.server import (
    forget,
    run_hook,
    running_servers,
    server_row,
    server_status,
)
from ..host.state import now
from ..host.system import spawn
from ..host.workers import as_user
from .course import Course, Report

log = logging.getLogger("classroom")

# Stopping a server, as JupyterHub's Spawner escalates (named timeouts, seconds):
READY_POLL = 0.2  # seconds between readiness probes
PORT_RETRIES = 2  # times a server whose port someone took meanwhile is tried on another
STOPPED_EARLY = "the server stopped before it answered"

APP_MODULES = {"lab": "jupyterlab", "notebook": "notebook", "server": "jupyter_server"}
TLS_DIR = ".jupyter/classroom-tls"


# --- pure helpers -----------------------------------------------------------------------------


def server_python() -> str:
    """The Python the servers run with: the tool's own environment (readable by students)."""
    return sys.executable


def server_env(pw: pwd.struct_passwd) -> dict[str, str]:
    """HOME, USER, LOGNAME, SHELL, PATH, LANG: nothing of root's (one definition for both modes)."""
    from ..host.forkserver import student_env

    return student_env(pw)


def root_dir(settings: Settings, home: str) -> str:
    """Where the server opens: HOME/FOLDER (``root = folder``) or HOME."""
    if settings.root == "home":
        return home
    return str(Path(home) / settings.material_folder)


def tls_paths(settings: Settings, home: str) -> tuple[str, str] | None:
    """The student's copies of the certificate and key, when HTTPS is on."""
    if not (settings.certfile and settings.keyfile):
        return None
    folder = Path(home) / TLS_DIR
    return str(folder / "cert.pem"), str(folder / "key.pem")


def server_args(settings: Settings, home: str, port: int) -> list[str]:
    """The server's command-line settings. No secret: the password hash stays in ~/.jupyter."""
    args = [
        f"--ServerApp.ip={settings.ip}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root_dir(settings, home)}",
        "--ServerApp.open_browser=False",
        # A password is set (setup); no token. Refuse to run at all without a password.
        "--IdentityProvider.token=",
        "--PasswordIdentityProvider.password_required=True",
        "--PasswordIdentityProvider.allow_password_change=False",
    ]
    tls = tls_paths(settings, home)
    if tls:
        args += [f"--ServerApp.certfile={tls[0]}", f"--ServerApp.keyfile={tls[1]}"]
    if settings.idle_timeout > 0:
        t = settings.idle_timeout
        interval = max(1, min(300, t // 4))
        args += [
            f"--MappingKernelManager.cull_idle_timeout={t}",
            f"--MappingKernelManager.cull_interval={interval}",
            "--MappingKernelManager.cull_connected=True",
            f"--TerminalManager.cull_inactive_timeout={t}",
            f"--TerminalManager.cull_interval={interval}",
            f"--ServerApp.shutdown_no_activity_timeout={t}",
        ]
    return args


def exec_argv(settings: Settings, args: list[str]) -> list[str]:
    return [server_python(), "-m", APP_MODULES[settings.app], *args]


def choose_port(
    wanted: int | None, reserved: set[int], first: int, is_free: Callable[[int], bool]
) -> int:
    """The student's previous port if it is free, else the first free one from ``first`` up."""
    if wanted and wanted not in reserved and is_free(wanted):
        return wanted
    port = max(first, 1024)
    while port <= 65535:
        if port not in reserved and is_free(port):
            return port
        port += 1
    raise StepFailed(f"no free port from {first} upward: set [launch] first_port lower")


# --- processes --------------------------------------------------------------------------------


# --- state ------------------------------------------------------------------------------------


# --- logs -------------------------------------------------------------------------------------


def log_dir(settings: Settings) -> Path:
    return settings.state_dir / "logs"


def log_path(settings: Settings, username: str) -> Path:
    return log_dir(settings) / f"{username}.log"


def ensure_log_dir(settings: Settings) -> None:
    folder = log_dir(settings)
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)


def open_log(settings: Settings, username: str, header: str) -> int:
    """The student's server log (root's, 0600), opened for appending, with a header line."""
    fd = os.open(
        log_path(settings, username),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    os.write(fd, f"\n===== {now()} {header}\n".encode())
    return fd


def log_tail(settings: Settings, username: str) -> str:
    """The last telling line of a student's server log (for a failure message)."""
    try:
        with open(log_path(settings, username), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("=====")]
    for line in reversed(lines):
        if any(w in line for w in ("Error", "error", "CRITICAL", "refused", "cannot", "denied")):
            return line[-300:]
    return lines[-1][-300:] if lines else ""


# --- launch -----------------------------------------------------------------------------------


@dataclass
class Start:
    """One student's server to start."""

    username: str
    pw: pwd.struct_passwd
    port: int = 0
    args: list[str] = field(default_factory=list)
    pid: int | None = None
    start_time: float | None = None
    mode: str = "exec"
    url: str = ""


def _spawn_exec(course: Course, start: Start, log_fd: int) -> int:
    """Start the server as a new program, as the student."""
    pw = start.pw
    argv = exec_argv(course.settings, start.args)
    proc = spawn(
        argv,
        env=server_env(pw),
        user=pw,
        stdin=subprocess.DEVNULL,
        stdout=log_fd,
        stderr=log_fd,
        cwd=pw.pw_dir,
        umask=0o077,
    )
    _children[proc.pid] = proc
    return proc.pid


_children: dict[int, subprocess.Popen] = {}  # exec-mode servers we started (reaped when they die)


def reap_children() -> None:
    """Collect the exec-mode servers of ours that have exited (no zombie while the portal runs)."""
    for pid, proc in list(_children.items()):
        with contextlib.suppress(OSError):
            if proc.poll() is not None:
                del _children[pid]


def _listens(proc: psutil.Process, port: int) -> bool:
    with contextlib.suppress(psutil.Error):
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return True
    return False


def wait_ready(settings: Settings, start: Start, timeout: float) -> str | None:
    """None once the server answers HTTP on its port; else why not (it exited, or timed out)."""
    deadline = time.monotonic() + timeout
    host = probe_host(settings.ip)
    context = None
    if settings.certfile:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # only asking "do you answer?" of our own server
    while True:
        proc = find_process(start.pid, start.start_time, start.pw.pw_uid)
        if proc is None:
            return STOPPED_EARLY
        try:
            if context is not None:
                conn = http.client.HTTPSConnection(host, start.port, timeout=2, context=context)
            else:
                conn = http.client.HTTPConnection(host, start.port, timeout=2)
            try:
                conn.request("GET", "/api")
                conn.getresponse().read()
            finally:
                conn.close()
            if _listens(proc, start.port):
                return None
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() >= deadline:
            return f"it did not answer on port {start.port} within {timeout:g} s"
        time.sleep(READY_POLL)


def _ensure_folder(path: str) -> bool:
    """As the student: create the server's root folder if it is missing."""
    if os.path.isdir(path):
        return False
    os.makedirs(path, mode=0o700, exist_ok=True)
    return True


def _write_tls(home: str, cert: bytes, key: bytes) -> None:
    """As the student: their own copies of the certificate and key (0600), for their server."""
    folder = Path(home) / TLS_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in (("cert.pem", cert), ("key.pem", key)):
        path = folder / name
        tmp = folder / f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)


def _remove_tls(home: str) -> bool:
    """As the student: delete the course's copies of the certificate and key (HTTPS is off)."""
    folder = Path(home) / TLS_DIR
    if folder.is_symlink() or not folder.is_dir():
        return False
    for name in ("cert.pem", "key.pem", ".cert.pem.tmp", ".key.pem.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
    return True


def _assign_ports(course: Course, starts: list[Start]) -> None:
    """Each student keeps their previous port while it is free; the others get new ones."""
    s = course.settings
    previous = {r["username"]: r["port"] for r in course.state.execute("SELECT * FROM ports")}
    reserved = set(previous.values()) | {s.portal_port}
    reserved |= {r["port"] for r in course.state.execute("SELECT port FROM servers")}
    # In roster order (``starts`` is), so the roster's first student gets first_port.
    for st in starts:  # first: previous ports, so nobody takes another student's
        wanted = previous.get(st.username)
        if wanted and wanted != s.portal_port and port_free(s.ip, wanted):
            st.port = wanted
    for st in starts:
        if not st.port:
            st.port = choose_port(None, reserved, s.first_port, lambda p: port_free(s.ip, p))
            reserved.add(st.port)
        st.args = server_args(s, st.pw.pw_dir, st.port)
        st.url = server_url(s, st.port)


def _selected(course: Course, only: tuple[str, ...], report: Report) -> list[tuple]:
    """(student, pw) of every selected student whose account is the course's; others failed."""
    from ..host import accounts

    chosen = []
    for student in course.students(only):
        acc = accounts.inspect(course, student)
        if acc.kind == accounts.FOREIGN:
            report.failed(student.username, acc.why)
        elif acc.kind == accounts.MISSING:
            report.failed(student.username, "has no account yet: run setup first")
        else:
            chosen.append((student, acc.pw))
    return chosen


def launch(course: Course, *, only=(), portal=True, stop_on_exit=False) -> int:
    """Start every selected student's server (in parallel), then run the portal until stopped."""
    s = course.settings
    report = course.report("launch")
    base = s.config_file.parent
    try:
        pre_spawn = hooks.parse(s.pre_spawn, base)
    except hooks.HookFailed as exc:
        raise InvalidInput(f"{s.where('hooks', 'pre_spawn')}: {exc}") from None

    starts: list[Start] = []
    for student, pw in _selected(course, only, report):
        status = server_status(course, student.username)
        if status["server"] == "running":
            report.unchanged(student.username, f"already running: {status['url']}")
            continue
        row = course.state.account(student.username)
        if row is not None and not row["password_set"]:
            report.failed(student.username, "has no Jupyter password yet: run setup again first")
            continue
        starts.append(Start(student.username, pw, mode=s.start_mode))
    try:
        _assign_ports(course, starts)
    except StepFailed as exc:
        for st in starts:
            report.failed(st.username, str(exc))
        starts = []

    if course.dry_run:
        if course.state.unreadable:
            report.note(
                "note: the course state is root-only, so servers already running cannot be "
                "seen and ports are guessed; run the dry run with sudo for the exact plan"
            )
        for st in starts:
            steps = [f"port {st.port}", f"{st.mode} mode"]
            if pre_spawn:
                steps.insert(0, f"pre_spawn hook {pre_spawn}")
            report.done(
                st.username, "started", "; ".join(steps) + f": {shlex.join(exec_argv(s, st.args))}"
            )
        return report.finish()

    code = _start_all(course, report, starts, pre_spawn)
    _print_addresses(course, report)
    if portal:
        code = max(code, _run_portal(course))
    if stop_on_exit:
        if course.lock is not None and course.lock.fd is None:
            try:
                course.lock.acquire()
            except Refused as exc:
                click.echo(f"The servers were left running: {exc.message}", err=True)
                return max(code, exc.exit_code)
        click.echo("Stopping the servers (--stop-on-exit)...")
        code = max(code, shutdown(course, only=only))
    return code


def _start_all(course: Course, report: Report, starts: list[Start], pre_spawn) -> int:
    s = course.settings
    if not starts:
        return report.finish()
    ensure_log_dir(s)
    fork = None
    if s.start_mode == "fork":
        from ..host.forkserver import ForkServer, ForkServerError

        try:
            fork = ForkServer.start(
                s.app, python=server_python(), log_path=str(log_dir(s) / "forkserver.log")
            )
        except ForkServerError as exc:
            report.note(
                f"the fork server could not start ({exc}): starting each server by exec instead"
            )
    with course.state.transaction():
        for st in starts:
            course.state.execute(
                "INSERT OR REPLACE INTO ports (username, port) VALUES (?, ?)",
                (st.username, st.port),
            )

    # As the student (before any thread exists here): the root folder, and TLS copies if any.
    tls = None
    if s.certfile and s.keyfile:
        try:
            tls = (s.certfile.read_bytes(), s.keyfile.read_bytes())
        except OSError as exc:
            for st in starts:
                report.failed(
                    st.username, f"cannot read {exc.filename}: {exc.strerror} (check [launch])"
                )
            starts = []
        else:
            report.note(
                "HTTPS: each student's server gets its own copy of the certificate and private key "
                "(it runs as the student); see README, 'Security'"
            )
    ready: list[Start] = []
    for st in starts:
        try:
            if s.root == "folder":
                as_user(st.pw, _ensure_folder, root_dir(s, st.pw.pw_dir))
            if tls:
                as_user(st.pw, _write_tls, st.pw.pw_dir, *tls)
            else:  # HTTPS was on before: the student no longer needs the private key
                as_user(st.pw, _remove_tls, st.pw.pw_dir)
            ready.append(st)
        except StepFailed as exc:
            report.failed(st.username, f"preparing the home failed: {exc}")

    ready = _pre_spawn(course, report, pre_spawn, ready)

    # Start them all (recorded before they count), then wait for them together.
    if fork is not None:
        try:
            fork.wait_ready(s.start_timeout)
        except ForkServerError as exc:
            report.note(
                f"the fork server did not start ({exc}): starting each server by exec instead"
            )
            fork.close(timeout=1)
            fork = None
    try:
        spawned, fork = _spawn_all(course, report, ready, fork)
        for attempt in range(PORT_RETRIES + 1):
            retry = _wait_all(course, report, spawned, retry_ports=attempt < PORT_RETRIES)
            if not retry:
                break
            retry = _pre_spawn(course, report, pre_spawn, _new_ports(course, report, retry))
            spawned, fork = _spawn_all(course, report, retry, fork)
    finally:
        if fork is not None:
            fork.close()
    _post_stop_failed_starts(course, report, ready)
    return report.finish()


def _post_stop_failed_starts(course: Course, report: Report, hooked: list[Start]) -> None:
    """Run post_stop for students whose pre_spawn ran but whose server did not start.

    JupyterHub does the same, so a hook pair that sets something up and tears it
    down stays balanced.
    """
    s = course.settings
    failed = [st for st in hooked if st.username in report.failures]
    if not s.post_stop or not s.pre_spawn or not failed:
        return
    try:
        post = hooks.parse(s.post_stop, s.config_file.parent)
    except (StepFailed, ValueError):
        return
    for st in failed:
        error = _try(lambda st=st: run_hook(course, post, st.username, st.pw.pw_dir, st.port))
        if error:
            report.note(f"  {st.username}: post_stop after the failed start: {error}")


def _pre_spawn(course: Course, report: Report, pre_spawn, ready: list[Start]) -> list[Start]:
    """Run the pre_spawn hooks in parallel; those whose hook failed are not started."""
    if not pre_spawn or not ready:
        return ready
    with ThreadPoolExecutor(max_workers=min(16, len(ready))) as pool:
        outcomes = list(
            pool.map(
                lambda st: _try(
                    lambda: run_hook(course, pre_spawn, st.username, st.pw.pw_dir, st.port)
                ),
                ready,
            )
        )
    kept = []
    for st, error in zip(ready, outcomes, strict=True):
        if error:
            report.failed(st.username, f"pre_spawn {error}; not started")
        else:
            kept.append(st)
    return kept


def _spawn_all(course: Course, report: Report, ready: list[Start], fork):
    """Start each server (fork server, else exec) and record it; (the started, the fork server)."""
    from ..host.forkserver import ForkServerError

    s = course.settings
    spawned: list[Start] = []
    for st in ready:
        fd = open_log(s, st.username, f"launch: port {st.port}")
        try:
            if fork is not None:
                try:
                    st.pid = fork.spawn(
                        st.username, st.pw.pw_uid, st.args, str(log_path(s, st.username))
                    )
                    st.mode = "fork"
                except ForkServerError as exc:
                    report.note(
                        f"the fork server stopped ({exc}): starting the rest by exec instead"
                    )
                    fork.close(timeout=1)
                    fork = None
            if st.pid is None:
                st.pid = _spawn_exec(course, st, fd)
                st.mode = "exec"
            st.start_time = psutil.Process(st.pid).create_time()
        except (OSError, ValueError, psutil.Error) as exc:
            report.failed(st.username, f"the server could not be started: {exc}")
            continue
        finally:
            os.close(fd)
        with course.state.transaction():
            course.state.execute(
                "INSERT OR REPLACE INTO servers (username, port, pid, start_time, uid, mode, url, started_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (st.username, st.port, st.pid, st.start_time, st.pw.pw_uid, st.mode, st.url, now()),
            )
        spawned.append(st)
    return spawned, fork


def _wait_all(course: Course, report: Report, spawned: list[Start], *, retry_ports: bool):
    """Wait for the servers together; report each. Returns those to try again on another
    port (with ``retry_ports``): their server stopped because someone else took the port
    meanwhile (another course launching at the same time, say)."""
    s = course.settings
    with ThreadPoolExecutor(max_workers=max(1, min(64, len(spawned)))) as pool:
        waits = list(pool.map(lambda st: wait_ready(s, st, s.start_timeout), spawned))
    failed = []
    for st, problem in zip(spawned, waits, strict=True):
        if problem is None:
            with course.state.transaction():
                course.state.record(
                    "launch",
                    st.username,
                    "started",
                    {"port": st.port, "pid": st.pid, "mode": st.mode},
                )
            report.done(st.username, "started", st.url)
        else:
            failed.append((st, problem))
    if not failed:
        return []
    procs = [p for st, _ in failed if (p := find_process(st.pid, st.start_time, st.pw.pw_uid))]
    stop_processes(procs, polite=2, term=2, kill=2)
    retry = []
    for st, problem in failed:
        forget(course, st.username, "launch", "start failed", {"port": st.port, "why": problem})
        if retry_ports and problem == STOPPED_EARLY and not port_free(s.ip, st.port):
            retry.append(st)
            continue
        tail = log_tail(s, st.username)
        detail = f"; its log says: {tail}" if tail else ""
        report.failed(st.username, f"{problem}{detail} (full log: {log_path(s, st.username)})")
    return retry


def _new_ports(course: Course, report: Report, retry: list[Start]) -> list[Start]:
    """Other free ports for servers whose port was taken while they started."""
    s = course.settings
    reserved = {r["port"] for r in course.state.execute("SELECT port FROM ports")}
    reserved |= {r["port"] for r in course.state.execute("SELECT port FROM servers")}
    reserved |= {s.portal_port} | {st.port for st in retry}
    again = []
    for st in retry:
        old = st.port
        try:
            st.port = choose_port(None, reserved, s.first_port, lambda p: port_free(s.ip, p))
        except StepFailed as exc:
            report.failed(st.username, f"port {old} was taken while it started, and {exc}")
            continue
        reserved.add(st.port)
        st.args = server_args(s, st.pw.pw_dir, st.port)
        st.url = server_url(s, st.port)
        st.pid = st.start_time = None
        with course.state.transaction():
            course.state.execute(
                "INSERT OR REPLACE INTO ports (username, port) VALUES (?, ?)",
                (st.username, st.port),
            )
        report.note(f"  {st.username}: port {old} was taken while it started; trying {st.port}")
        again.append(st)
    return again


def _try(func: Callable[[], object]) -> str | None:
    try:
        func()
    except StepFailed as exc:
        return str(exc)
    return None


def _print_addresses(course: Course, report: Report) -> None:
    if course.quiet:
        return
    running = running_servers(course.settings)
    if running:
        click.echo(f"{len(running)} server(s) running:")
        for username in sorted(running):
            click.echo(f"  {username}: {running[username]['url']}")


def _run_portal(course: Course) -> int:
    """Run the portal in the foreground; its exit status (0, or the portal's error's)."""
    try:
        from ..host import portal as portal_mod
    except ImportError as exc:
        if exc.name != f"{__package__}.portal":
            raise
        click.echo(
            "The portal is not available in this version: the servers run without it.", err=True
        )
        return 0
    # Let status, shutdown and retrieve run while the portal is up.
    if course.lock is not None:
        course.lock.release()
    try:
        portal_mod.serve(
            course, lookup=lambda: running_servers(course.settings), tick=reap_children
        )
    except ClassroomError as exc:
        exc.show()
        return exc.exit_code
    return 0


# --- shutdown ---------------------------------------------------------------------------------


def shutdown(course: Course, *, only=(), all_jupyter=False) -> int:
    """Stop each selected student's server and its kernels; run the post_stop hook."""
    s = course.settings
    report = course.report("shutdown")
    try:
        post_stop = hooks.parse(s.post_stop, s.config_file.parent)
    except hooks.HookFailed as exc:
        raise InvalidInput(f"{s.where('hooks', 'post_stop')}: {exc}") from None

    from ..host import accounts

    plans = []  # (username, home, row, proc, extras)
    for student in course.students(only):
        row = server_row(course.state, student.username)
        acc = accounts.inspect(course, student)
        proc = find_process(row["pid"], row["start_time"], row["uid"]) if row else None
        extras: list[psutil.Process] = []
        if all_jupyter and acc.kind == accounts.OK and acc.pw is not None:
            mine = {p.pid for p in server_tree(proc)} if proc else set()
            extras = other_jupyter(acc.pw.pw_uid, mine)
        if row is None and not extras:
            report.unchanged(student.username)
            continue
        home = acc.pw.pw_dir if acc.pw else str(s.home_base / student.username)
        plans.append((student.username, home, row, proc, extras))

    if course.dry_run:
        for username, _, row, proc, extras in plans:
            what = []
            if proc is not None:
                what.append(f"server pid {row['pid']} on port {row['port']}")
            elif row is not None:
                what.append("record of a server that is no longer running")
            if extras:
                what.append(f"{len(extras)} other Jupyter process(es)")
            report.done(username, "stopped", ", ".join(what))
        return report.finish()

    survivors = stop_processes(
        [proc for _, _, _, proc, _ in plans if proc is not None],
        [p for *_, extras in plans for p in extras],
    )
    left = {p.pid for p in survivors}
    stopped = []
    for username, home, row, proc, extras in plans:
        mine = ([proc] if proc else []) + extras
        if any(p.pid in left for p in mine):
            report.failed(
                username, "some of its processes survived SIGKILL; see the log, try again"
            )
            continue
        if row is not None:
            forget(
                course, username, "shutdown", "stopped", {"port": row["port"], "pid": row["pid"]}
            )
        stopped.append((username, home, row, proc, extras))

    hook_errors: dict[str, str | None] = {}
    if post_stop and stopped:
        with ThreadPoolExecutor(max_workers=min(16, len(stopped))) as pool:
            errors = pool.map(
                lambda p: _try(
                    lambda: run_hook(course, post_stop, p[0], p[1], p[2]["port"] if p[2] else None)
                ),
                stopped,
            )
            hook_errors = dict(zip([p[0] for p in stopped], errors, strict=True))
    for username, _, row, proc, extras in stopped:
        what = []
        if proc is not None:
            what.append(f"port {row['port']}")
        elif row is not None:
            what.append("it had already stopped; record cleared")
        if extras:
            what.append(f"{len(extras)} other Jupyter process(es)")
        if hook_errors.get(username):
            report.failed(username, f"stopped, but the post_stop {hook_errors[username]}")
        else:
            report.done(username, "stopped", ", ".join(what))
    return report.finish()
