"""launch: start every selected student's server (in parallel), then run the portal.

Plan: who is started, on which port, how (a dry run prints this and stops). Act:
prepare the homes as the students, run the pre_spawn hooks, start the servers, wait
for them together, and move a server whose port someone took meanwhile. Report.
"""

from __future__ import annotations

import shlex
from concurrent.futures import ThreadPoolExecutor, as_completed

import click
import psutil

from ..core.addresses import https, proxied
from ..core.errors import ClassroomError, Refused, StepFailed
from ..core.launchplan import LAB_SETTINGS_APPS, assign_ports, exec_argv, server_args
from ..core.text import printable
from ..host import accounts, hooks
from ..host import kernels as kernel_server
from ..host.identity import server_python
from ..host.ports import port_free
from ..host.server import (
    STOPPED_EARLY,
    Forker,
    Server,
    forget_server,
    previous_ports,
    remember_ports,
    reserved_ports,
    running_servers,
    server_status,
    stop_servers,
)
from ..host.serverhome import ensure_lab_settings, prepare_homes, prepare_socket_dir, read_tls
from ..host.serverlogs import ensure_log_dir, failure
from ..host.workers import student_deadline
from . import portal as portal_command
from .course import Course, Report, progress
from .shutdown import shutdown
from .terminal import awaited

PORT_RETRIES = 2  # times a server whose port someone took meanwhile is tried on another
FAILED_START = {"polite": 2, "term": 2, "kill": 2}  # timeouts for a server that did not answer
PREPARE_DEADLINE = 60  # seconds for one student's home to be made ready (a few small files)

REDIRECT_WARNING = (
    "warning: access = redirect: any student can collect a classmate's login cookie "
    "(browsers do not separate cookies by port); access = proxy with HTTPS prevents it"
)
PLAIN_PROXY_WARNING = (
    "warning: access = proxy without HTTPS: passwords and session cookies cross the network "
    "in clear, and a student listening on another port can collect a classmate's session "
    "cookie; set [launch] certfile and keyfile"
)


def access_warning(settings) -> str | None:
    """The one-line warning ``check`` and ``launch`` print about how students reach their
    servers, or None when access is proxy with HTTPS."""
    if not proxied(settings):
        return REDIRECT_WARNING
    return None if https(settings) else PLAIN_PROXY_WARNING


def launch(course: Course, *, only=(), portal=True, stop_on_exit=False, detach=False) -> int:
    """Start every selected student's server (in parallel), then run the portal until stopped
    (or, with ``detach``, in the background, where it stays once launch has returned)."""
    report = course.report("launch")
    warning = access_warning(course.settings)
    if warning:
        click.echo(warning, err=True)
    pre_spawn = hooks.configured(course.settings, "pre_spawn")
    servers = plan(course, only, report)
    if course.dry_run:
        code = _report_plan(course, report, servers, pre_spawn)
        return max(code, portal_command.detach(course)) if detach else code
    code = _start_all(course, report, servers, pre_spawn)
    _print_addresses(course)
    if detach:
        return max(code, portal_command.detach(course))
    running = portal_command.background(course)
    if portal and running is not None:
        click.echo(f"Portal: {running.url}  (running in the background, pid {running.pid})")
        return code
    if not portal and running is None and proxied(course.settings):
        click.echo(
            "note: access = proxy: students reach their servers only through the portal "
            "(launch --detach, or notebooks portal)"
        )
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


# --- plan ------------------------------------------------------------------------------------


def plan(course: Course, only: tuple[str, ...], report: Report) -> list[Server]:
    """The servers to start, each placed on its port; the students who cannot be started
    (no account, a foreign one, no Jupyter password) are reported failed, those already
    running unchanged."""
    servers = []
    for student in course.students(only):
        acc = accounts.inspect(course, student)
        if acc.kind == accounts.FOREIGN:
            report.failed(student.username, acc.why)
            continue
        if acc.kind == accounts.MISSING:
            report.failed(student.username, "has no account yet: run setup first")
            continue
        status = server_status(course, student.username)
        if status["server"] == "running" and not _other_access(course, student.username):
            report.unchanged(student.username, f"already running: {status['url']}")
            continue
        row = course.state.account(student.username)
        if row is not None and not row["password_set"]:
            report.failed(student.username, "has no Jupyter password yet: run setup again first")
            continue
        servers.append(Server.of(acc.pw))
    try:
        assign(course, servers)
    except StepFailed as exc:
        for server in servers:
            report.failed(server.username, str(exc))
        return []
    return servers


def _other_access(course: Course, username: str) -> bool:
    """True if ``username``'s server runs the other way than ``[launch] access`` says (a
    port in proxy mode, a socket in redirect mode). Then it is stopped now (its post_stop
    hook runs), unless this is a dry run, so that launch starts it again as configured."""
    server = Server.recorded(course.state, username)
    if server is None or server.on_socket == proxied(course.settings):
        return False
    mode = "proxy" if proxied(course.settings) else "redirect"
    if course.dry_run:
        click.echo(f"  {username}: its server would be restarted for access = {mode}")
        return True
    forget_server(course, username)
    click.echo(f"  {username}: server stopped, to start it again for access = {mode}")
    return True


def assign(course: Course, servers: list[Server]) -> None:
    """Each student keeps their previous port while it is free; the others get new ones,
    in roster order (``servers`` is), so the roster's first student gets first_port.
    In proxy mode nobody gets a port: the servers listen on sockets."""
    s = course.settings
    if proxied(s):
        for server in servers:
            server.place(s, 0)
        return
    ports = assign_ports(
        [server.username for server in servers],
        previous_ports(course.state),
        reserved_ports(course.state, s),
        s,
        lambda port: port_free(s.ip, port),
    )
    for server in servers:
        server.place(s, ports[server.username])


def _report_plan(course: Course, report: Report, servers: list[Server], pre_spawn) -> int:
    s = course.settings
    if not course.state_readable:
        report.note(
            "note: the course state is root-only, so servers already running cannot be "
            "seen and ports are guessed; run the dry run with sudo for the exact plan"
        )
    for server in servers:
        assert server.pw is not None
        args = server_args(s, server.pw.pw_dir, server.port, server.username)
        argv = exec_argv(s, args, server_python())
        where = "socket (access = proxy)" if server.on_socket else f"port {server.port}"
        steps = [where, f"{s.start_mode} mode"]
        if pre_spawn:
            steps.insert(0, f"pre_spawn hook {pre_spawn}")
        report.done(server.username, "started", "; ".join(steps) + f": {shlex.join(argv)}")
    if servers and s.kernel_mode == "fork":
        report.note(
            f"kernels: forked by the course's kernel server, preloading {', '.join(s.preload)}"
        )
    return report.finish()


# --- act -------------------------------------------------------------------------------------


def _start_all(course: Course, report: Report, servers: list[Server], pre_spawn) -> int:
    s = course.settings
    ensure_log_dir(s)
    kernels = None  # the course's kernel server, while any server is to run; it imports meanwhile
    if servers or running_servers(s):
        kernels = kernel_server.ensure(s, course.state, report.note)
    if kernels is None and s.kernel_mode == "fork":
        course.settings = s = s.replace(kernel_mode="exec")  # the servers' kernels as Jupyter's
    if not servers:
        _wait_kernel_server(course, report, kernels)
        return report.finish()
    forker = Forker(s, report.note)  # the servers' supervisor (and fork server), both modes
    remember_ports(course.state, servers)
    try:
        ready = _run_pre_spawn(course, report, pre_spawn, _prepare_homes(course, report, servers))
        if forker is not None:
            forker.wait_ready(s.start_timeout)
        spawned = _spawn_all(course, report, ready, forker)
        for attempt in range(PORT_RETRIES + 1):
            retry = _wait_all(course, report, spawned, retry_ports=attempt < PORT_RETRIES)
            if not retry:
                break
            retry = _run_pre_spawn(course, report, pre_spawn, _new_ports(course, report, retry))
            spawned = _spawn_all(course, report, retry, forker)
        _wait_kernel_server(course, report, kernels)
    finally:
        if forker is not None:
            forker.close()
    _post_stop_failed_starts(course, report, ready)
    return report.finish()


def _wait_kernel_server(course: Course, report: Report, kernels) -> None:
    s = course.settings
    if kernels is not None and (problem := kernels.wait_ready(s, s.start_timeout)):
        report.note(f"the kernel server is not running: {problem}; kernels start by exec")


def _prepare_homes(course: Course, report: Report, servers: list[Server]) -> list[Server]:
    """As each student, all at once (before any thread exists here): the root folder, the
    TLS copies (none in proxy mode: earlier copies are deleted); a student whose part takes
    longer than the deadline fails alone. As root: JupyterLab's settings overrides and, in
    proxy mode, the folder of each student's socket."""
    s = course.settings
    try:
        tls = read_tls(s)
        if s.app in LAB_SETTINGS_APPS:
            ensure_lab_settings(s)
    except OSError as exc:
        for server in servers:
            report.failed(
                server.username, f"cannot read {exc.filename}: {exc.strerror} (check [launch])"
            )
        return []
    if tls:
        report.note(
            "HTTPS: each student's server gets its own copy of the certificate and private key "
            "(it runs as the student); access = proxy keeps the key with root; see README, "
            "'Security'"
        )
    ready = []
    pws = [server.pw for server in servers]
    errors = prepare_homes(s, pws, tls, student_deadline(base=PREPARE_DEADLINE))
    for server, error in zip(servers, errors, strict=True):
        if error:
            report.failed(server.username, f"preparing the home failed: {printable(error)}")
            continue
        if server.on_socket:
            assert server.pw is not None
            try:
                prepare_socket_dir(s, server.pw)
            except OSError as exc:
                report.failed(server.username, f"preparing its socket's folder failed: {exc}")
                continue
        ready.append(server)
    return ready


def _run_pre_spawn(course: Course, report: Report, pre_spawn, ready: list[Server]) -> list[Server]:
    """Run the pre_spawn hooks in parallel; those whose hook failed are not started."""
    if not pre_spawn or not ready:
        return ready
    errors = hooks.run_all(course.settings, pre_spawn, _students(ready))
    kept = []
    for server, error in zip(ready, errors, strict=True):
        if error:
            report.failed(server.username, f"pre_spawn {error}; not started")
        else:
            kept.append(server)
    return kept


def _post_stop_failed_starts(course: Course, report: Report, hooked: list[Server]) -> None:
    """Run post_stop for students whose pre_spawn ran but whose server did not start.

    JupyterHub does the same, so a hook pair that sets something up and tears it
    down stays balanced.
    """
    s = course.settings
    failed = [server for server in hooked if server.username in report.failures]
    if not s.post_stop or not s.pre_spawn or not failed:
        return
    try:
        post_stop = hooks.configured(s, "post_stop")
    except ClassroomError:
        return
    errors = hooks.run_all(s, post_stop, _students(failed), workers=1)
    for server, error in zip(failed, errors, strict=True):
        if error:
            report.note(f"  {server.username}: post_stop after the failed start: {error}")


def _students(servers: list[Server]) -> list[tuple[str, str, int | None]]:
    """(username, home, port) of each server's student, for their hooks."""
    return [(s.username, s.pw.pw_dir if s.pw else "", s.port) for s in servers]


def _spawn_all(
    course: Course, report: Report, ready: list[Server], forker: Forker | None
) -> list[Server]:
    """Start each server and record it (before it counts); the servers started."""
    spawned = []
    for server in ready:
        try:
            server.start(course.settings, forker)
        except (OSError, ValueError, psutil.Error) as exc:
            report.failed(
                server.username, f"the server could not be started: {printable(str(exc))}"
            )
            continue
        server.save(course.state)
        spawned.append(server)
    return spawned


def _wait_all(
    course: Course, report: Report, spawned: list[Server], *, retry_ports: bool
) -> list[Server]:
    """Wait for the servers together; report each. Returns those to try again on another
    port (with ``retry_ports``): their server stopped because someone else took the port
    meanwhile (another course launching at the same time, say)."""
    s = course.settings
    with ThreadPoolExecutor(max_workers=max(1, min(64, len(spawned)))) as pool:
        futures = {pool.submit(server.wait_ready, s, s.start_timeout): server for server in spawned}
        waiting = {server.username: None for server in spawned}  # in roster order
        answered = as_completed(futures)
        for done in progress(
            answered, "servers answering", len(futures), waiting=lambda: awaited(waiting)
        ):
            waiting.pop(futures[done].username)
        waits = [future.result() for future in futures]
    failed = []
    for server, problem in zip(spawned, waits, strict=True):
        if problem is None:
            detail = {"port": server.port, "pid": server.pid, "mode": server.mode}
            with course.state.transaction():
                course.state.record("launch", server.username, "started", detail)
            report.done(server.username, "started", server.url)
        else:
            failed.append((server, problem))
    stop_servers([server for server, _ in failed], **FAILED_START)
    retry = []
    for server, problem in failed:
        server.forget(course.state, "launch", "start failed", {"port": server.port, "why": problem})
        taken = not server.on_socket and not port_free(s.ip, server.port)
        if retry_ports and problem == STOPPED_EARLY and taken:
            retry.append(server)
        else:
            report.failed(server.username, failure(s, server.username, problem, server.log_offset))
    return retry


def _new_ports(course: Course, report: Report, retry: list[Server]) -> list[Server]:
    """Other free ports for servers whose port was taken while they started."""
    s = course.settings
    old = {server.username: server.port for server in retry}
    reserved = reserved_ports(course.state, s) | set(old.values())
    again = []
    for server in retry:
        try:
            ports = assign_ports([server.username], {}, reserved, s, lambda p: port_free(s.ip, p))
        except StepFailed as exc:
            taken = old[server.username]
            report.failed(server.username, f"port {taken} was taken while it started, and {exc}")
            continue
        server.place(s, ports[server.username])
        reserved.add(server.port)
        remember_ports(course.state, [server])
        report.note(
            f"  {server.username}: port {old[server.username]} was taken while it started; "
            f"trying {server.port}"
        )
        again.append(server)
    return again


# --- report ----------------------------------------------------------------------------------


def _print_addresses(course: Course) -> None:
    if course.quiet:
        return
    running = running_servers(course.settings)
    if running:
        click.echo(f"{len(running)} server(s) running:")
        for username in sorted(running):
            click.echo(f"  {username}: {running[username]['url']}")


def _run_portal(course: Course) -> int:
    """Run the portal in the foreground; its exit status (0, or the portal's error's)."""
    # Let status, shutdown and retrieve run while the portal is up.
    if course.lock is not None:
        course.lock.release()
    return portal_command.serve(course)
