"""shutdown: stop each selected student's server and its kernels; run the post_stop hook;
without ``--only``, also the portal running in the background (``launch --detach``).

Plan: each student's recorded server (still running, or a record to clear) and, with
``--all-jupyter``, their other Jupyter processes. Act: stop everything together
(SIGTERM, then SIGKILL, with named timeouts), forget the records, run the post_stop
hooks in parallel. Report. A dry run takes the same path: signals, records and hooks
are its chokepoints (``processes``, ``server``, ``hooks``), which change nothing then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil

from ..core.roster import Student
from ..host import accounts, hooks, limits
from ..host import kernels as kernel_server
from ..host.processes import other_jupyter, server_tree
from ..host.server import Server, stop_servers
from ..host.serverhome import remove_socket_dir
from . import portal as portal_command
from .course import Course, Report
from .terminal import working


@dataclass
class Stop:
    """One student's processes to stop."""

    username: str
    home: str
    server: Server | None  # the course's record of their server, if any
    running: bool = False  # that server's process is still there
    extras: list[psutil.Process] = field(default_factory=list)  # --all-jupyter
    cgroup: bool = False  # the student's cgroup ([limits]) exists: emptied and removed

    def describe(self, dry_run: bool) -> str:
        what = []
        if self.server is not None and self.running:
            port = self.server.port
            what.append(
                f"server pid {self.server.pid} on port {port}" if dry_run else f"port {port}"
            )
        elif self.server is not None:
            what.append(
                "record of a server that is no longer running"
                if dry_run
                else "it had already stopped; record cleared"
            )
        if self.extras:
            what.append(f"{len(self.extras)} other Jupyter process(es)")
        if self.cgroup and not what:
            what.append("what was left in its cgroup")
        return ", ".join(what)


def shutdown(course: Course, *, only=(), all_jupyter=False) -> int:
    """Stop each selected student's server and its kernels; run the post_stop hook."""
    report = course.report("shutdown")
    post_stop = hooks.configured(course.settings, "post_stop")
    stops = plan(course, only, all_jupyter, report)
    with working(f"stopping {len(stops)} student(s)' servers"):
        stopped = _stop_all(
            course, report, stops
        )  # under --dry-run, the chokepoints change nothing
        stopped = _release_cgroups(course, report, stopped)
        students = [(st.username, st.home, st.server.port if st.server else None) for st in stopped]
        errors = hooks.run_all(course.settings, post_stop, students)
    for stop, error in zip(stopped, errors, strict=True):
        if error:
            report.failed(stop.username, f"stopped, but the post_stop {error}")
        else:
            report.done(stop.username, "stopped", stop.describe(course.dry_run))
        if not error and stop.server is not None and stop.server.on_socket:
            remove_socket_dir(course.settings, stop.username)
    if not only:  # the whole class: the portal in the background goes too
        line = portal_command.stop(course)
        if line:
            report.note(line)
    if not course.dry_run and kernel_server.stop_if_idle(course.settings, course.state):
        report.note("the kernel server stopped (no server of the course runs)")
    return report.finish()


def plan(course: Course, only: tuple[str, ...], all_jupyter: bool, report: Report) -> list[Stop]:
    """What to stop for each selected student; those with nothing to stop are unchanged."""
    stops = []
    students = course.students(only, dropped=True)
    if not only:  # every server the course started, whoever's it is now
        named = {st.username for st in students}
        students += [
            Student(server.username)
            for server in Server.all_recorded(course.state)
            if server.username not in named
        ]
    for student in students:
        server = Server.recorded(course.state, student.username)
        acc = accounts.inspect(course, student)
        proc = server.process() if server else None
        extras: list[psutil.Process] = []
        if all_jupyter and acc.kind == accounts.OK and acc.pw is not None:
            mine = {p.pid for p in server_tree(proc)} if proc else set()
            extras = other_jupyter(acc.pw.pw_uid, mine)
        cgroup = bool(limits.locate(course.settings.name, student.username))
        if server is None and not extras and not cgroup:
            report.unchanged(student.username)
            continue
        home = acc.pw.pw_dir if acc.pw else str(course.settings.home_base / student.username)
        stops.append(Stop(student.username, home, server, proc is not None, extras, cgroup))
    return stops


def _stop_all(course: Course, report: Report, stops: list[Stop]) -> list[Stop]:
    """Stop everything at once (one grace period for all); forget the stopped servers.
    Returns the students whose processes are all gone; the others failed."""
    left = stop_servers(
        [st.server for st in stops if st.server is not None and st.running],
        [p for st in stops for p in st.extras],
    )
    stopped = []
    for stop in stops:
        pids = {p.pid for p in stop.extras}
        if stop.server is not None and stop.running:
            pids.add(stop.server.pid or 0)
        if pids & left:
            report.failed(
                stop.username, "some of its processes survived SIGKILL; see the log, try again"
            )
            continue
        if stop.server is not None:
            detail = {"port": stop.server.port, "pid": stop.server.pid}
            stop.server.forget(course.state, "shutdown", "stopped", detail)
        stopped.append(stop)
    return stopped


def _release_cgroups(course: Course, report: Report, stopped: list[Stop]) -> list[Stop]:
    """Empty (SIGKILL what is left: a process started from a terminal, say) and remove each
    stopped student's cgroup; those where something survived failed."""
    if course.dry_run:
        return stopped
    released = []
    for stop in stopped:
        if stop.cgroup and not limits.release(course.settings.name, stop.username):
            report.failed(stop.username, "processes survived SIGKILL in its cgroup; try again")
            continue
        released.append(stop)
    return released
