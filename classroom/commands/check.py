"""check: is the config, the roster and this host ready? Changes nothing, needs no root."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import psutil

from ..core import roster as roster_mod
from ..core import settings as settings_mod
from ..core.addresses import WILDCARD_IPS, proxied, stacks
from ..core.errors import EXIT_OK, EXIT_USAGE, InvalidInput
from ..core.roster import Roster
from ..core.settings import Settings
from ..host import credentials, hooks, limits, sharedfolder
from ..host.accounts import FOREIGN, inspect
from ..host.files import world_readable_chain
from ..host.groups import check_group, sharing_gid
from ..host.ports import ipv6_available, port_free
from ..host.system import CommandFailed, is_root, login_defs, run, set_dry_run
from . import staff
from .course import Course, peek_course
from .rostercheck import roster_despite_config

PROBE_TIMEOUT = 120  # seconds for the servers' Python to import Jupyter as nobody


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    limits: dict = field(default_factory=dict)  # which mechanism enforces [limits] here
    notes: list[str] = field(default_factory=list)  # how things are, for the teacher to know


def students_can_run_python(python: Path) -> str | None:
    """None if an unprivileged user can import jupyter_server with ``python``; else the reason."""
    blocked = world_readable_chain(python)
    if blocked is not None:
        return f"{blocked} is not readable by students (install with scripts/install.sh, not under /root)"
    if not is_root():
        return None
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return None
    try:
        proc = run(
            [str(python), "-c", "import jupyter_server, ipykernel"],
            env={"HOME": "/nonexistent"},
            user=nobody,
            cwd="/",
            timeout=PROBE_TIMEOUT,
            check=False,
            changes=False,  # a read-only probe: it runs under --dry-run too
        )
    except CommandFailed as exc:
        return f"{python} cannot be run as an unprivileged user: {exc}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import jupyter_server as an unprivileged user: {last}"
    return None


def check_paths(s: Settings, found: Findings) -> None:
    """The material, the certificate, home_base, the hooks."""
    if s.material_source is None:
        found.warnings.append(
            f"{s.where('material', 'source')}: [material] source is not set: send needs it"
        )
    elif not s.material_source.is_dir():
        found.problems.append(
            f"{s.where('material', 'source')}: [material] source {s.material_source} is not a folder"
        )
    for key, path in (("certfile", s.certfile), ("keyfile", s.keyfile)):
        if path and not path.is_file():
            found.problems.append(f"{s.where('launch', key)}: [launch] {key} {path} not found")
    if not s.home_base.is_dir():
        found.warnings.append(
            f"{s.where('accounts', 'home_base')}: {s.home_base} does not exist yet (setup creates it)"
        )
    elif (blocked := world_readable_chain(s.home_base)) is not None:
        found.problems.append(
            f"{s.where('accounts', 'home_base')}: {blocked} does not "
            "let other users through (o+x): students could not reach their homes"
        )
    found.problems += sharedfolder.problems(s)  # what setup and send --shared refuse
    if s.shared_folder is not None and not shutil.which("setfacl"):
        found.problems.append(
            f"{s.where('shared', 'folder')}: setfacl is missing: install Debian's acl package"
        )
    for key, hook in (("pre_spawn", s.pre_spawn), ("post_stop", s.post_stop)):
        if hook and ":" not in hook and not os.access(hook, os.X_OK):
            found.problems.append(
                f"{s.where('hooks', key)}: [hooks] {key} {hook} is not an executable"
            )


def check_ports(s: Settings, roster: Roster | None, course: Course | None, found: Findings) -> None:
    """The portal's port (launch fails when it is taken), and the students' range as far as
    the roster needs it; ports the course's own running servers hold are as they should be."""
    if not port_free(s.ip, s.portal_port):
        where = f"{s.where('launch', 'portal_port')}: port {s.portal_port} is in use"
        holder = listener(s.portal_port)
        if holder is not None and is_course_launch(holder, s):
            pass  # the course's own portal, running
        elif holder is None and not is_root():
            found.warnings.append(
                f"{where} (by what cannot be seen without root: if it is not this course's "
                "portal, launch cannot run its portal)"
            )
        else:
            by = f" by {holder.name()} (pid {holder.pid})" if holder is not None else ""
            found.problems.append(
                f"{where}{by}: launch cannot run its portal; stop what holds it, or change "
                "[launch] portal_port"
            )
    if roster is None or proxied(s):
        return  # in proxy mode the servers listen on sockets, not ports
    own = own_server_ports(course) if course is not None else set()
    busy = [
        p
        for p in range(s.first_port, min(s.first_port + len(roster), 65536))
        if p != s.portal_port and p not in own and not port_free(s.ip, p)
    ]
    if busy:
        found.warnings.append(
            f"{s.where('launch', 'first_port')}: ports in use in the students' range "
            f"({', '.join(map(str, busy[:10]))}); launch will skip them"
        )


def check_stacks(s: Settings, found: Findings) -> None:
    """Say which addresses the class holds (a student cannot squat a port there)."""
    how = stacks(s.ip)
    if s.ip in WILDCARD_IPS and not ipv6_available():
        how = "IPv4 and IPv6 (every address; this host has no IPv6 now)"
    who = "the portal" if proxied(s) else "the portal and the servers"
    found.notes.append(f"{s.where('launch', 'ip')}: ip = {s.ip or repr('')}: {who} listen on {how}")


def check_system_accounts(roster: Roster, found: Findings) -> None:
    """Students whose name is an existing system account: setup will refuse them."""
    defs = login_defs()
    for st in roster:
        try:
            pw = pwd.getpwnam(st.username)
        except KeyError:
            continue
        if not defs.uid_min <= pw.pw_uid <= defs.uid_max:
            found.warnings.append(
                f"{roster.where(st)}: {st.username} is a system account "
                f"(uid {pw.pw_uid}); setup will refuse it"
            )


def check_limits(s: Settings, found: Findings, host: limits.Host | None = None) -> None:
    """Which mechanism enforces [limits] on this host; a warning for each set limit it cannot."""
    host = host or limits.detect()
    wanted = limits.Limits.of(s)
    found.limits = {
        "mechanism": host.summary(),
        "enforced_by": host.enforces(),
        "set": wanted.describe(),
    }
    found.warnings += [f"{s.where('limits', '')}: {w}" for w in host.cannot(wanted)]


def own_server_ports(course: Course) -> set[int]:
    """The ports the course's running servers hold."""
    from ..host.server import Server

    return {srv.port for srv in Server.all_recorded(course.state) if srv.poll() is None}


def listener(port: int) -> psutil.Process | None:
    """The process listening on TCP ``port``, when it can be seen (root sees all)."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="inet"):
            listening = conn.status == psutil.CONN_LISTEN and conn.laddr
            if listening and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    return None


def is_course_launch(proc: psutil.Process, s: Settings) -> bool:
    """True if ``proc`` is ``notebooks launch`` (or ``notebooks portal``, as ``launch
    --detach`` runs it) run with this course's config."""
    with contextlib.suppress(psutil.Error, OSError):
        args = proc.cmdline()
        if "launch" not in args and "portal" not in args:
            return False
        cwd = proc.cwd()
        if any(Path(cwd, arg).resolve() == s.config_file for arg in args[1:]):
            return True
        env = proc.environ().get("NOTEBOOKS_CONFIG")
        return bool(env) and Path(cwd, env).resolve() == s.config_file
    return False


def check_course(course: Course, found: Findings) -> None:
    """What setup, retrieve, launch and remove refuse before any change (the same checks
    they make), and the students the roster dropped."""
    from ..host import snapshot
    from . import retrieve, setup

    s = course.settings
    for command, probe in (
        ("setup", lambda: setup.teacher_profile(course)),
        ("setup", lambda: check_group(course) if course.state_readable else None),
        (
            "retrieve",
            lambda: snapshot.ensure_destination(
                s.retrieve_destination, retrieve.owner_account(course)
            ),
        ),
        ("launch", lambda: hooks.configured(s, "pre_spawn")),
        ("shutdown", lambda: hooks.configured(s, "post_stop")),
    ):
        try:
            probe()
        except InvalidInput as exc:
            found.problems += [f"{p} ({command} refuses this)" for p in exc.problems]
    foreign = []
    for st in course.students(dropped=True):
        acc = inspect(course, st)
        if acc.kind == FOREIGN:
            foreign.append(acc)
    for acc in foreign:
        where = course.roster.where(acc.student) if acc.student.line else "course state"
        found.problems.append(
            f"{where}: {acc.why} (setup fails this student; remove refuses to run)"
        )
    gone = [st.username for st in course.dropped()]
    if gone:
        found.warnings.append(setup.dropped_message(course, gone))
    gid = course.state.meta("group_gid") if course.state_readable else None
    others = sharing_gid(int(gid), s.group) if gid else []
    if others:  # another program's useradd that raced setup's groupadd (see sharing_gid)
        found.warnings.append(
            f"group {s.group} (gid {gid}) shares its gid with {', '.join(others[:5])}: "
            "they have the course group's access to the course's files; give them another gid"
        )


def check(config_path: Path, as_json: bool = False) -> int:
    """Print every problem and warning (or JSON); exit 0 when there is no problem, else 2."""
    from . import setup

    set_dry_run(True)  # check changes nothing, whatever it calls
    found = Findings()
    settings = roster = course = None
    try:
        settings = settings_mod.load(config_path)
        roster = roster_mod.load(settings.roster, settings.roster_columns)
        found.warnings += roster.warnings
    except InvalidInput as exc:
        found.problems += exc.problems
    if settings is None:  # the roster's problems too, all at once
        roster, problems = roster_despite_config(config_path)
        found.problems += problems
        if roster is not None:
            found.warnings += roster.warnings
            check_system_accounts(roster, found)
    if settings is not None:
        check_paths(settings, found)
        found.problems += setup.problems(settings)
        found.problems += staff.preload_problems(settings, Path(sys.executable))
        if warning := credentials.address_warning(settings):
            found.warnings.append(warning)
        check_stacks(settings, found)
        check_limits(settings, found)
        if roster is not None:
            check_system_accounts(roster, found)
            course = peek_course(settings, roster)
        from .launch import access_warning

        if warning := access_warning(settings):
            found.warnings.append(warning.removeprefix("warning: "))
        try:
            check_ports(settings, roster, course, found)
            reason = students_can_run_python(Path(sys.executable))
            if reason:
                found.problems.append(f"servers' Python: {reason}")
            if course is not None:
                check_course(course, found)
        finally:
            if course is not None:
                course.close()
    ok = not found.problems
    n = len(roster) if roster else 0
    if as_json:
        report = {
            "ok": ok,
            "problems": found.problems,
            "warnings": found.warnings,
            "students": n,
            "limits": found.limits,
            "notes": found.notes,
        }
        click.echo(json.dumps(report, indent=2))
    else:
        if found.limits:
            click.echo(f"limits: {found.limits['mechanism']}; set: {found.limits['set']}")
        for note in found.notes:
            click.echo(f"note: {note}")
        for p in found.problems:
            click.echo(f"problem: {p}")
        for w in found.warnings:
            click.echo(f"warning: {w}")
        click.echo(
            f"check: {'ok' if ok else 'NOT ok'}, {n} students, "
            f"{len(found.problems)} problems, {len(found.warnings)} warnings"
        )
    return EXIT_OK if ok else EXIT_USAGE
