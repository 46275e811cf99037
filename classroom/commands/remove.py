"""remove: at the end of term, stop what the students run, archive each home, delete the accounts.

Only the course's own accounts are deleted; one foreign account among those
selected refuses the whole command before any change.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from ..core.errors import Refused, StepFailed
from ..host import credentials, interrupts, leftovers, limits, sessions
from ..host import kernels as kernel_server
from ..host.accounts import (
    FOREIGN,
    MISSING,
    OK,
    Account,
    delete_account,
    inspect,
    uid_taken,
    wait_for_account_tools,
)
from ..host.archive import archive_home
from ..host.groups import remove_group_if_empty as remove_group
from ..host.leftovers import SHARED_TMP
from ..host.processes import kill_every_process_of, processes_of, stop_processes
from ..host.serverhome import remove_run_dir, remove_socket_dir
from ..host.system import dry_run
from . import portal as portal_command
from . import shared, staff
from .course import Course, Report, progress
from .terminal import working

WORKERS = max(2, os.cpu_count() or 2)
SCAN_LIMIT = 10_000  # entries of a home looked at for changes since the last retrieve


def remove(course: Course, *, only: tuple[str, ...] = ()) -> int:
    """Confirm, stop everything the students run, archive each home, delete account and home.

    Without ``--only``: every account the course created, the roster's and those the
    roster no longer has (named in the question).
    """
    s = course.settings
    report = course.report("remove")
    students = course.students(only, dropped=True)
    report.expect(st.username for st in students)
    wait_for_account_tools({st.username for st in students} | {s.group}, "remove")
    accounts = [inspect(course, st) for st in students]
    foreign = [a for a in accounts if a.kind == FOREIGN]
    if foreign:
        raise Refused(
            "remove refused, nothing was changed:\n"
            + "\n".join(f"  {a.username}: {a.why}" for a in foreign)
        )
    present = [a for a in accounts if a.kind == OK]
    gone = [a for a in accounts if a.kind == MISSING]
    if dry_run():
        steps = ["stop every process", "archive the home" if s.archive else "no archive"]
        for a in present:
            report.done(a.username, "removed", "; ".join([*steps, "userdel --remove"]))
        for a in gone:
            report.unchanged(a.username)
        shared.remove_shared(course, report, only)
        staff.remove_staff(course, report, only)
        return report.finish()
    warn_unretrieved(course, present)
    if present and not course.yes:
        confirm(course, present, s.archive)
    groups = {g for a in present if a.pw for g in os.getgrouplist(a.pw.pw_name, a.pw.pw_gid)}
    with working(f"stopping the processes of {len(present)} student(s)"):
        stop_everything(course, present)
    remove_accounts(course, report, present)
    for a in gone:
        if course.state.account(a.username) is not None:  # deleted outside the course
            with course.state.transaction():
                course.state.forget_account(a.username)
        report.unchanged(a.username)
    removed = {u for u, outcome in report.outcomes.items() if outcome == "removed"}
    credentials.update(
        s.state_dir / "credentials.csv", {}, drop=removed | {a.username for a in gone}
    )
    uids = {a.pw.pw_uid for a in present if a.username in removed and a.pw is not None}
    uids = {uid for uid in uids if not uid_taken(uid)}  # a uid given out again is not theirs
    left = leftovers.delete_owned(uids, groups)
    if left:
        report.note(f"{left} file(s) and folder(s) of theirs deleted in {', '.join(SHARED_TMP)}")
    sessions.end_users(s.state_dir, removed)  # a name given again later starts logged out
    for username in removed:
        remove_socket_dir(s, username)
    try:
        deleted = remove_group(course)
    except StepFailed as exc:
        report.note(str(exc))
        deleted = False
    if deleted:
        report.changed(f"group {s.group} deleted")
        line = portal_command.stop(course)  # nobody left to serve
        if line:
            report.note(line)
        remove_run_dir(s)
    shared.remove_shared(course, report, only)
    staff.remove_staff(course, report, only)
    return report.finish()


def confirm(course: Course, present: list[Account], archive: bool) -> None:
    """Ask before deleting; ``Refused`` (nothing changed) unless the teacher says yes."""
    names = ", ".join(a.username for a in present)
    listed = set(course.roster.names())
    dropped = [a.username for a in present if a.username not in listed]
    what = "archived and deleted" if archive else "deleted WITHOUT an archive"
    click.echo(f"These {len(present)} accounts and their homes will be {what}: {names}")
    if dropped:
        click.echo(
            f"Of these, {len(dropped)} are no longer in the roster (the course created them): "
            f"{', '.join(dropped)}"
        )
    if not click.confirm("Go on?", default=False):
        raise Refused("remove declined: nothing was changed")


def warn_unretrieved(course: Course, present: list[Account]) -> None:
    """Warn about homes whose work changed since the last retrieve (or never retrieved):
    what is not collected now is only in the archive afterwards."""
    s = course.settings
    late = []
    for a in present:
        if a.pw is None:
            continue
        folder = os.path.join(a.pw.pw_dir, s.material_folder)
        newest = newest_change(folder)
        if newest is None:
            continue
        last = course.state.last(a.username, "retrieve")
        if last is None:
            late.append(f"{a.username} (never retrieved)")
        elif newest > dt.datetime.fromisoformat(last).timestamp() + 1:
            late.append(f"{a.username} (changed after {last})")
    if late:
        click.echo(
            f"warning: work in HOME/{s.material_folder} changed since the last retrieve: "
            f"{', '.join(late)}; run 'sudo notebooks retrieve "
            f"{shlex.quote(str(s.config_file))}' first to grade their latest work",
            err=True,
        )


def newest_change(folder: str) -> float | None:
    """The newest mtime of any file or folder under ``folder`` (root looks, never through a
    link, at most ``SCAN_LIMIT`` entries); None when there is no such folder or it is empty."""
    newest = None
    seen = 0
    try:
        for _top, dirs, files, top_fd in os.fwalk(folder, follow_symlinks=False):
            for name in dirs + files:
                seen += 1
                with contextlib.suppress(OSError):
                    mtime = os.stat(name, dir_fd=top_fd, follow_symlinks=False).st_mtime
                    newest = mtime if newest is None else max(newest, mtime)
            if seen >= SCAN_LIMIT:
                break
    except OSError:
        return None
    return newest


def stop_everything(course: Course, present: list[Account]) -> None:
    """Stop the students' recorded servers, then every process they still run: politely
    first, then ``kill(-1, SIGKILL)`` as each of them, which no forking loop escapes."""
    from ..host import server as servers_mod

    for a in present:
        with contextlib.suppress(Exception):
            servers_mod.forget_server(course, a.username, stop=True)
    uids = {a.pw.pw_uid for a in present if a.pw}
    stop_processes([], [p for procs in processes_of(uids).values() for p in procs], term=2, kill=2)
    kill_every_process_of((a.pw.pw_uid, a.pw.pw_gid) for a in present if a.pw is not None)
    kernel_server.stop_if_idle(course.settings, course.state)


def remove_accounts(course: Course, report: Report, present: list[Account]) -> None:
    """Archives (tar + gzip, CPU bound) in parallel; accounts deleted one by one, in order;
    then nothing of theirs outlives them (``sweep_deleted``, also when interrupted).

    An account whose archive failed is kept.
    """
    s = course.settings

    def archive(a: Account) -> Path | None:
        assert a.pw is not None
        if s.archive and Path(a.pw.pw_dir).is_dir():
            return archive_home(s.archive_dir, a.pw)
        return None

    deleted: list[Account] = []
    try:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            futures = [(a, pool.submit(archive, a)) for a in present]
            for a, future in progress(futures, "removing"):
                try:
                    try:
                        archived = future.result()
                    except StepFailed as exc:
                        raise StepFailed(f"archive failed, account kept: {exc}") from None
                    except OSError as exc:
                        raise StepFailed(
                            f"archive failed, account kept: {exc.strerror}: {exc.filename}"
                        ) from None
                    detail = {"archive": str(archived or "")}
                    with course.state.transaction():
                        course.state.record("remove", a.username, "archived", detail)
                    with interrupts.shielded():  # deleted and forgotten, or neither
                        delete_account(course, a)
                        deleted.append(a)
                        with course.state.transaction():
                            course.state.forget_account(a.username)
                            course.state.record("remove", a.username, "removed", detail)
                    report.done(a.username, "removed", f"archive {archived}" if archived else "")
                except StepFailed as exc:
                    report.failed(a.username, str(exc))
    finally:
        with interrupts.shielded():
            sweep_deleted(course, report, deleted)


def sweep_deleted(course: Course, report: Report, deleted: list[Account]) -> None:
    """After userdel: SIGKILL whatever of those uids still runs (a process started between
    userdel's look and the deletion), unless the uid already went to a new account
    elsewhere (then it is theirs); then release their cgroups (``[limits]``), SIGKILLing
    what is left there. One sweep for the class, not one per account."""
    ids = {a.pw.pw_uid: a.pw.pw_gid for a in deleted if a.pw is not None}
    ids = {uid: gid for uid, gid in ids.items() if not uid_taken(uid)}
    survivors = kill_every_process_of(ids.items()) if ids else {}
    for a in deleted:
        assert a.pw is not None
        left = survivors.get(a.pw.pw_uid)
        if left:
            report.failed(
                a.username,
                f"account deleted, but processes of uid {a.pw.pw_uid} survived "
                f"SIGKILL: {', '.join(map(str, left))}; stop them by hand",
            )
        elif not (dry_run() or limits.release(course.settings.name, a.username)):
            report.failed(a.username, "account deleted, but its cgroup is not empty; remove again")
