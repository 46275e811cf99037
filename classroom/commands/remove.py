"""remove: at the end of term, stop what the students run, archive each home, delete the accounts.

Only the course's own accounts are deleted; one foreign account among those
selected refuses the whole command before any change.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from ..core.errors import Refused, StepFailed
from ..host import credentials
from ..host import kernels as kernel_server
from ..host.accounts import FOREIGN, MISSING, OK, Account, delete_account, inspect
from ..host.accounts import remove_group_if_empty as remove_group
from ..host.archive import archive_home
from ..host.processes import processes_of, stop_processes
from ..host.system import dry_run
from .course import Course, Report, progress

WORKERS = max(2, os.cpu_count() or 2)


def remove(course: Course, *, only: tuple[str, ...] = ()) -> int:
    """Confirm, stop everything the students run, archive each home, delete account and home."""
    s = course.settings
    report = course.report("remove")
    accounts = [inspect(course, st) for st in course.students(only)]
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
        return report.finish()
    if present and not course.yes:
        confirm(present, s.archive)
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
    if remove_group(course):
        report.note(f"group {s.group} deleted")
    return report.finish()


def confirm(present: list[Account], archive: bool) -> None:
    """Ask before deleting; ``Refused`` (nothing changed) unless the teacher says yes."""
    names = ", ".join(a.username for a in present)
    what = "archived and deleted" if archive else "deleted WITHOUT an archive"
    click.echo(f"These {len(present)} accounts and their homes will be {what}: {names}")
    if not click.confirm("Go on?", default=False):
        raise Refused("remove declined: nothing was changed")


def stop_everything(course: Course, present: list[Account]) -> None:
    """Stop the students' recorded servers, then every process they still run."""
    from ..host import server as servers_mod

    for a in present:
        with contextlib.suppress(Exception):
            servers_mod.forget_server(course, a.username, stop=True)
    # Every process the students still run, all at once: one scan, one grace period.
    uids = {a.pw.pw_uid for a in present if a.pw}
    stop_processes([], [p for procs in processes_of(uids).values() for p in procs])
    stop_processes([], [p for procs in processes_of(uids).values() for p in procs], term=2, kill=2)
    kernel_server.stop_if_idle(course.settings, course.state)


def remove_accounts(course: Course, report: Report, present: list[Account]) -> None:
    """Archives (tar + gzip, CPU bound) in parallel; accounts deleted one by one, in order.

    An account whose archive failed is kept.
    """
    s = course.settings

    def archive(a: Account) -> Path | None:
        assert a.pw is not None
        if s.archive and Path(a.pw.pw_dir).is_dir():
            return archive_home(s.archive_dir, a.pw)
        return None

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
                delete_account(course, a)
                with course.state.transaction():
                    course.state.forget_account(a.username)
                    course.state.record("remove", a.username, "removed", detail)
                report.done(a.username, "removed", f"archive {archived}" if archived else "")
            except StepFailed as exc:
                report.failed(a.username, str(exc))
