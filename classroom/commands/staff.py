"""Teaching assistants (SPEC §6.4): the staff group, its sudoers file, its read access to
what retrieve collected; and the check that nobody but root can change what root runs.

The staff group and the sudoers file exist while the roster has assistants: setup makes
them, puts each assistant (an account of the course) in the group and takes out anyone
else (a student who was an assistant before), and deletes both once no assistant is
left; remove deletes both. Students never get any of it. The system edges are
``host.staff``, ``host.sudoers`` and ``host.trust``.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import StepFailed
from ..core.settings import Settings
from ..host import staff, sudoers
from ..host.accounts import MISSING, OK, Account
from ..host.groups import check_group, ensure_group, remove_group_if_empty
from ..host.system import dry_run, run, sudo_caller
from .course import Course, Report

MODULE = re.compile(r"^[A-Za-z_][\w.]*$")
PROBE_TIMEOUT = 120  # seconds for the servers' Python to import one module as nobody


def ensure(
    course: Course, report: Report, accounts: Sequence[Account], only: Sequence[str] = ()
) -> dict[str, str]:
    """setup's part: the staff group, its members and the sudoers file in line with the roster.

    Returns what changed (or would) per person: ``{username: "staff group: added"}``.
    A failure of the group or the sudoers file fails the assistants, not the students.
    """
    s = course.settings
    name = s.staff_group
    assistants = {st.username for st in course.roster.assistants()}
    changed: dict[str, str] = {}
    would = "would be " if dry_run() else ""
    try:
        made = course.state.meta(f"{staff.META}_gid")
        if assistants:
            group = check_group(course, name, staff.META)  # refuses a group the course did not make
        else:  # nothing to give: a group of that name the course did not make is not its business
            group = grp.getgrgid(int(made)) if made and staff.gid(name) == int(made) else None
        if assistants and group is None:
            if not dry_run():
                ensure_group(course, name, staff.META)
            report.note(f"staff group {name} {would}created")
        present = group is not None or bool(assistants)
        for acc in accounts:
            if not present or acc.kind != OK or acc.username in report.failures:
                continue
            member = acc.username in staff.listed(name)
            if acc.username in assistants and not member:
                if not dry_run():
                    staff.add_member(name, acc.username)
                changed[acc.username] = f"{would}added to {name}"
            elif acc.username not in assistants and member:
                if not dry_run():
                    staff.drop_member(name, acc.username)
                changed[acc.username] = f"{would}taken out of {name}"
        for acc in accounts:  # a new assistant: the account is made by now (or will be)
            if acc.kind == MISSING and acc.username in assistants:
                if acc.username in report.failures:
                    continue
                if dry_run():
                    changed[acc.username] = f"would be added to {name}"
                elif acc.username not in staff.listed(name):
                    staff.add_member(name, acc.username)
                    changed[acc.username] = f"added to {name}"
        if not only and present:
            for username in sorted(staff.listed(name) - assistants):  # no longer in the roster
                if not dry_run():
                    staff.drop_member(name, username)
                report.note(f"{username} {would}taken out of {name} (not an assistant any more)")
        _sudoers(course, report, bool(assistants))
        if not assistants and group is not None:
            if dry_run():
                report.note(f"staff group {name} would be deleted (no assistant left)")
            else:
                try:
                    if remove_group_if_empty(course, name, staff.META):
                        report.note(f"staff group {name} deleted (no assistant left)")
                except StepFailed as exc:
                    report.note(str(exc))
    except (StepFailed, OSError) as exc:
        for username in sorted(assistants):
            report.failed(username, f"the staff group or its sudoers file: {exc}")
        return {}
    if not dry_run():
        with course.state.transaction():
            for username, what in changed.items():
                course.state.record("setup", username, "staff", {"change": what})
    return changed


def _sudoers(course: Course, report: Report, wanted: bool) -> None:
    """The sudoers file: written (checked first) while there are assistants, else deleted."""
    s = course.settings
    target = sudoers.path_for(s.name)
    would = "would be " if dry_run() else ""
    if not wanted:
        if sudoers.delete(s.name):
            report.note(f"{target} {would}deleted (no assistant left)")
        return
    text = sudoers.render(s.staff_group, s.config_file)
    if not os.path.isdir(sudoers.SUDOERS_D) or not shutil.which("visudo"):
        raise StepFailed(f"{sudoers.SUDOERS_D} or visudo is missing: install Debian's sudo")
    if sudoers.install(s.name, text):
        report.note(
            f"{target} {would}written: {s.staff_group} may run "
            f"sudo {sudoers.NOTEBOOKS} {'|'.join(sudoers.COMMANDS)} {s.config_file}"
        )


def remove_staff(course: Course, report: Report, only: Sequence[str]) -> None:
    """remove's part, once the accounts are gone: the sudoers file and the staff group."""
    s = course.settings
    if only or report.failures:
        return  # the class goes on
    would = "would be " if dry_run() else ""
    try:
        if sudoers.delete(s.name):
            report.note(f"{sudoers.path_for(s.name)} {would}deleted")
        if not course.state_readable or not course.state.meta(f"{staff.META}_gid"):
            return
        if dry_run():
            report.note(f"staff group {s.staff_group} would be deleted")
            return
        for username in sorted(staff.listed(s.staff_group)):
            staff.drop_member(s.staff_group, username)  # accounts the course did not delete
        if remove_group_if_empty(course, s.staff_group, staff.META):
            report.note(f"staff group {s.staff_group} deleted")
    except (StepFailed, OSError) as exc:
        report.failed(f"staff group {s.staff_group}", str(exc))


def share_retrieved(course: Course) -> None:
    """retrieve's part: the staff group reads the destination (when the group exists)."""
    s = course.settings
    gid = staff.gid(s.staff_group)
    if gid is None or dry_run() or not course.state_readable:
        return
    if not course.state.meta(f"{staff.META}_gid"):
        return  # a group of that name the course did not make: no access for it
    staff.share_destination(s.retrieve_destination, gid)


def retrieve_owner(course: Course) -> pwd.struct_passwd | None:
    """Who owns what an assistant retrieves: the destination's owner (the teacher) or root;
    None when the caller is not an assistant (retrieve's own rule then applies)."""
    caller = sudo_caller()
    assistants = {st.username for st in course.roster.assistants()}
    if caller is None or caller.pw_name not in assistants:
        return None
    try:
        return pwd.getpwuid(os.stat(course.settings.retrieve_destination).st_uid)
    except (FileNotFoundError, KeyError):
        return pwd.getpwuid(0)


def preload_problems(s: Settings, python: Path) -> list[str]:
    """``[launch] preload`` (when the config has that key): each module importable by students
    (as ``nobody``, with ``python``, the servers' environment). Only as root."""
    modules = getattr(s, "preload", None) or ()
    if isinstance(modules, str):
        modules = tuple(m.strip() for m in modules.split(",") if m.strip())
    if not modules or os.geteuid() != 0:
        return []
    found = []
    for module in modules:
        why = can_import(python, module)
        if why:
            found.append(f"{s.where('launch', 'preload')}: [launch] preload {module}: {why}")
    return found


def can_import(python: Path, module: str) -> str | None:
    """None if ``nobody`` can ``import module`` with ``python``; else the reason."""
    if not MODULE.match(module):
        return "not a module name"
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return None
    proc = run(
        [str(python), "-c", f"import {module}"],
        env={"HOME": "/nonexistent"},
        user=nobody,
        cwd="/",
        timeout=PROBE_TIMEOUT,
        check=False,
        changes=False,  # a read-only probe
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return (
            f"students cannot import it: {last} "
            "(install it for them: scripts/install-packages.sh config/student-packages.txt)"
        )
    return None
