"""retrieve: collect each student's HOME/FOLDER into DESTINATION/USERNAME/TIMESTAMP/.

Every version is kept: a snapshot is only made when something changed, files
unchanged since the previous snapshot are hard links to it, ``latest`` points
at the newest, and DESTINATION/manifest.csv gets one row per file of each new
snapshot (username, snapshot, path, size, mtime, sha256, status, late).
Each real run also writes DESTINATION/summary.csv and summary.html, one row per
student (``core.summary``, with pandas, imported here only).

The rules (caps, late, statuses) are ``core.retrieverules``; reading the home
as the student is ``host.homeread``; building the snapshot as root is
``host.snapshot``; what was collected is remembered by ``host.records``.
Repeat runs take a fast path first: if every file still has the stat it had
when collected, nothing changed and no worker is started.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd

import click

from ..core import retrieverules
from ..core.errors import InvalidInput
from ..core.paths import as_text
from ..core.retrieverules import Caps, parse_deadline
from ..host import records, snapshot, workers
from ..host.system import sudo_caller
from . import staff
from .course import Course, Report
from .homes import can_look_inside, drop_bulk, each_home, enterable, report_each

__all__ = ["owner_account", "parse_deadline", "retrieve"]


def owner_account(course: Course) -> pwd.struct_passwd:
    """Who owns what is retrieved: [retrieve] owner, else the sudo caller, else root; never a student."""
    s = course.settings
    if s.retrieve_owner:
        try:
            owner = pwd.getpwnam(s.retrieve_owner)
        except KeyError:
            raise InvalidInput(
                f"{s.where('retrieve', 'owner')}: [retrieve] owner {s.retrieve_owner!r}: no such user"
            ) from None
    else:
        owner = sudo_caller() or pwd.getpwuid(0)
    if owner.pw_name in set(course.roster.names()):
        raise InvalidInput(
            f"{s.where('retrieve', 'owner')}: the submissions would belong to {owner.pw_name}, a student; "
            "set [retrieve] owner to the teacher"
        )
    return owner


def retrieve(course: Course, *, only=(), deadline: dt.datetime | None = None) -> int:
    """Collect each selected student's folder (see the module docstring); return the exit status."""
    s = course.settings
    owner = staff.retrieve_owner(course) or owner_account(course)
    dest = s.retrieve_destination
    snapshot.ensure_destination(dest, owner)
    course.state.ensure(records.RETRIEVE_SQL)
    course.state.ensure(records.SEND_SQL)
    report = course.report("retrieve")
    students = course.students(only)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    folder = s.material_folder
    caps = Caps(s.max_file_size, s.max_total_size, deadline.timestamp() if deadline else None)
    if not can_look_inside():
        click.echo("  (not root: the homes cannot be looked into; showing what would be collected)")
    time_limit = workers.student_deadline(s.max_total_size)
    prev = records.retrieved_rows(course.state, str(dest))
    sent = records.handed_out(course.state, folder)
    tasks = []
    results: dict[str, dict] = {}
    homes = enterable(
        course,
        report,
        students,
        "collected",
        lambda st, pw: f"{pw.pw_dir}/{folder} into {dest}/{st.username}/{stamp}",
    )
    for st, pw in homes:
        job = snapshot.RetrieveJob(
            st.username,
            pw,
            folder,
            dest,
            (owner.pw_uid, owner.pw_gid),
            s.retrieve_include,
            s.retrieve_exclude,
            caps,
            stamp,
            prev.pop(st.username, []),
            handed_out=sent.pop(st.username, {}),
            time_limit=time_limit,
        )
        quick = snapshot.quick_check(job)
        if quick is not None:
            results[st.username] = {"ok": quick}
        else:
            tasks.append((st.username, snapshot.collect_home, (job,)))
    idle = snapshot.READ_TIMEOUT + 60
    # The root worker stops its student at time_limit; the pool's deadline is a backstop.
    backstop = time_limit + 60
    for username, payload in each_home(tasks, "retrieve", idle_timeout=idle, deadline=backstop):
        results[username] = payload
        if "ok" in payload:
            result = payload["ok"]
            if result["state"] == "collected":
                snapshot.append_manifest(dest, result["rows"], owner)
            records.record_retrieved(course.state, username, str(dest), folder, result)
            drop_bulk(result, "rows", "cache")
    report_each(report, students, results, lambda username, r: _report(report, username, r))
    if not report.dry_run:
        write_summary(course, owner)
        staff.share_retrieved(course)
    return report.finish()


def write_summary(course: Course, owner: pwd.struct_passwd) -> None:
    """DESTINATION/summary.csv and summary.html (SPEC §6.8): every student of the roster,
    from the manifest and what send handed out. A summary that cannot be made is a warning:
    the snapshots are made and recorded already."""
    from ..core import summary

    s = course.settings
    dest = s.retrieve_destination
    course.state.ensure(records.SEND_SQL)
    handed = {
        username: {as_text(os.fsdecode(bytes(path))): sha for path, sha, *_ in rows}
        for username, rows in records.sent_rows(course.state, s.material_folder).items()
    }
    students = [(st.username, st.full_name) for st in course.roster.students]
    try:
        table = summary.summarize(snapshot.read_manifest(dest), handed, students)
        title = f"{s.title or s.name}: {dest}"
        snapshot.write_summary(
            dest,
            owner,
            {"summary.csv": summary.to_csv(table), "summary.html": summary.to_html(table, title)},
        )
    except (ValueError, OSError, InvalidInput) as exc:
        click.echo(f"warning: {dest}/summary.csv and summary.html not written: {exc}", err=True)


def _report(report: Report, username: str, result: dict) -> None:
    """One student's line: nothing to collect, unchanged, or a new snapshot."""
    if result["state"] == "nothing":
        counts = {"skipped": result.get("counts", {}).get("skipped", 0)}
        skipped = retrieverules.detail({"skipped": result.get("skipped"), "counts": counts})
        tail = f"; {skipped}" if skipped else ""
        report.unchanged(username, f"nothing to collect: {result['why']}{tail}")
    elif result["state"] == "unchanged":
        report.unchanged(username, retrieverules.detail(result))
    else:
        report.done(username, "collected", retrieverules.detail(result))
