"""launch: start every selected student's server (in parallel), then run the portal.

Plan: who is started, on which port, how (a dry run prints this and stops). Act:
prepare the homes as the students, run the pre_spawn hooks, start the servers, wait
for them together, and move a server whose port someone took meanwhile. Report.
"""

from __future__ import annotations

import shlex
from concurrent.futures import ThreadPoolExecutor

import click
import psutil

from ..core.errors import ClassroomError, Refused, StepFailed
from ..core.launchplan import assign_ports, exec_argv, server_args
from ..host import accounts, hooks
from ..host import kernels as kernel_server
from ..host.identity import server_python
from ..host.ports import port_free
from ..host.server import (
    STOPPED_EARLY,
    Forker,
    Server,
    previous_ports,
    reap_children,
    remember_ports,
    reserved_ports,
    running_servers,
    server_status,
    stop_servers,
)
from ..host.serverhome import prepare_home, read_tls
from ..host.serverlogs import ensure_log_dir, failure
from .course import Course, Report
from .shutdown import shutdown

PORT_RETRIES = 2  # times a server whose port someone took meanwhile is tried on another
FAILED_START = {"polite": 2, "term": 2, "kill": 2}  # timeouts for a server that did not answer


def launch(course: Course, *, only=(), portal=True, stop_on_exit=False) -> int:
    """Start every selected student's server (in parallel), then run the portal until stopped."""
    report = course.report("launch")
    pre_spawn = hooks.configured(course.settings, "pre_spawn")
    servers = plan(course, only, report)
    if course.dry_run:
        return _report_plan(course, report, servers, pre_spawn)
    code = _start_all(course, report, servers, pre_spawn)
    _print_addresses(course)
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
        if status["server"] == "running":
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


def assign(course: Course, servers: list[Server]) -> None:
    """Each student keeps their previous port while it is free; the others get new ones,
    in roster order (``servers`` is), so the roster's first student gets first_port."""
    s = course.settings
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
        argv = exec_argv(s, server_args(s, server.pw.pw_dir, server.port), server_python())
        steps = [f"port {server.port}", f"{s.start_mode} mode"]
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
    forker = Forker(s, report.note) if s.start_mode == "fork" else None
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
    """As each student (before any thread exists here): the root folder, the TLS copies."""
    try:
        tls = read_tls(course.settings)
    except OSError as exc:
        for server in servers:
            report.failed(
                server.username, f"cannot read {exc.filename}: {exc.strerror} (check [launch])"
            )
        return []
    if tls:
        report.note(
            "HTTPS: each student's server gets its own copy of the certificate and private key "
            "(it runs as the student); see README, 'Security'"
        )
    ready = []
    for server in servers:
        assert server.pw is not None
        try:
            prepare_home(course.settings, server.pw, tls)
        except StepFailed as exc:
            report.failed(server.username, f"preparing the home failed: {exc}")
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
            report.failed(server.username, f"the server could not be started: {exc}")
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
        waits = list(pool.map(lambda server: server.wait_ready(s, s.start_timeout), spawned))
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
        if retry_ports and problem == STOPPED_EARLY and not port_free(s.ip, server.port):
            retry.append(server)
        else:
            report.failed(server.username, failure(s, server.username, problem))
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
    from ..host import portal

    # Let status, shutdown and retrieve run while the portal is up.
    if course.lock is not None:
        course.lock.release()
    try:
        portal.serve(course, lookup=lambda: running_servers(course.settings), tick=reap_children)
    except ClassroomError as exc:
        exc.show()
        return exc.exit_code
    return 0
