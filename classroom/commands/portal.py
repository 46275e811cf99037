"""The portal on its own: in the foreground (``notebooks portal CONFIG``, what a systemd unit
runs), or in the background under a supervisor (``launch --detach``), recorded for
``status`` and stopped by ``shutdown``."""

from __future__ import annotations

import http.client
import ssl
import time
from pathlib import Path

import click

from ..core.addresses import https, portal_url, probe_host
from ..core.errors import EXIT_OK, EXIT_PARTIAL, ClassroomError, Refused
from ..host import daemon
from ..host.server import reap_children, running_servers
from ..host.system import is_root
from .course import Course

READY_TIMEOUT = 30.0  # seconds the background portal gets to answer /healthz
LOG_LINES = 15  # lines of the portal's log shown when it did not start


def serve(course: Course) -> int:
    """Run the portal in the foreground until SIGTERM or Ctrl-C (the servers are left alone)."""
    from ..host import portal

    if not is_root():
        raise Refused(
            "the portal reads the course state and reaches the students' servers: "
            "run it as root (sudo notebooks portal ...)"
        )
    try:
        portal.serve(course, lookup=lambda: running_servers(course.settings), tick=reap_children)
    except ClassroomError as exc:
        exc.show()
        return exc.exit_code
    return EXIT_OK


def supervise(config: Path) -> int:
    """Run ``notebooks portal CONFIG`` and start it again whenever it dies (until SIGTERM)."""
    return daemon.supervise(daemon.command("portal", str(config)))


def background(course: Course) -> daemon.Record | None:
    """The portal running in the background for this course, if any."""
    return daemon.running(course.state)


def status_entry(course: Course) -> dict | None:
    """``{"pid", "url"}`` of the background portal, or None (``status``'s ``portal``)."""
    entry = background(course)
    return None if entry is None else {"pid": entry.pid, "url": entry.url}


def detach(course: Course) -> int:
    """Start the portal in the background (unless it runs already); wait until it answers."""
    s = course.settings
    running = background(course)
    if running is not None:
        click.echo(f"Portal: {running.url}  (already running in the background, pid {running.pid})")
        return EXIT_OK
    if course.dry_run:
        click.echo(f"Portal: {portal_url(s)} would be started in the background")
        return EXIT_OK
    pid = daemon.start(s.config_file, s.state_dir)
    assert pid is not None
    url = portal_url(s)
    if not _answers(s, pid):
        entry = daemon.Record(pid, _start_time(pid), url)
        daemon.stop(entry)
        click.echo(
            f"The portal did not start in the background; the end of "
            f"{daemon.log_path(s.state_dir)}:\n{_tail(daemon.log_path(s.state_dir))}",
            err=True,
        )
        return EXIT_PARTIAL
    entry = daemon.record(course.state, pid, url)
    click.echo(
        f"Portal: {url}  (in the background, pid {entry.pid}; restarted if it dies; "
        "'notebooks shutdown' stops it)"
    )
    return EXIT_OK


def stop(course: Course) -> str | None:
    """Stop the background portal, if one runs; a line saying what was done, else None."""
    entry = background(course)
    if entry is None:
        if not course.dry_run and daemon.recorded(course.state) is not None:
            daemon.forget(course.state)
        return None
    if course.dry_run:
        return f"portal: would be stopped (pid {entry.pid})"
    if not daemon.stop(entry):
        return f"portal: pid {entry.pid} survived SIGKILL; see the log"
    daemon.forget(course.state)
    return f"portal: stopped (pid {entry.pid})"


def _start_time(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _answers(settings, pid: int) -> bool:
    """True once the portal answers /healthz for this course; False if the supervisor
    gave up or nothing answered within READY_TIMEOUT."""
    import psutil

    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            return False
        if _healthy(settings):
            return True
        time.sleep(0.2)
    return False


def _healthy(settings) -> bool:
    host, port = probe_host(settings.ip), settings.portal_port
    try:
        if https(settings):
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # only asking our own portal "are you there?"
            conn = http.client.HTTPSConnection(host, port, timeout=2, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            body = response.read(4096)
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False
    return response.status == 200 and f'"{settings.name}"'.encode() in body


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join("  " + line for line in lines[-LOG_LINES:])
