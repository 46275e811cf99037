"""send: copy the tutorial material into every student's HOME/FOLDER, never losing an edit.

What happens to each file is ``core.sendrules`` (the table of SPEC §4); the
file work, as the student and never through a link, is ``host.homesend``; what
was sent is remembered by ``host.records``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from ..core import sendrules
from ..core.errors import InvalidInput
from ..core.settings import Settings, safe_folder
from ..host import homesend, records, workers
from ..host.server import running_servers
from .course import Course
from .homes import can_look_inside, drop_bulk, each_home, enterable, report_each

EMPTY = {"actions": {}, "skipped": [], "records": []}


def target_folder(folder: str) -> str:
    """``--folder`` (or ``[material] folder``): a relative path inside the home."""
    folder = folder.strip("/")
    if not safe_folder(folder):
        raise InvalidInput(
            f"--folder {folder!r}: must be a relative path inside the home, without '..'"
        )
    return folder


def source_folder(s: Settings, source: str | None) -> Path:
    """``--source`` (or ``[material] source``): an existing folder."""
    root = Path(source).resolve() if source else s.material_source
    if root is None:
        raise InvalidInput(
            f"{s.where('material', 'source')}: [material] source is not set (or give --source DIR)"
        )
    if not root.is_dir():
        where = "--source" if source else s.where("material", "source")
        raise InvalidInput(f"{where}: material source {root} is not a folder")
    return root


def send(course: Course, *, only=(), force=False, source=None, folder=None) -> int:
    """Send the material to each selected student (see the module docstring); return the exit status."""
    s = course.settings
    folder = target_folder(folder or s.material_folder)
    root = source_folder(s, source)
    course.state.ensure(records.SEND_SQL)
    students = course.students(only)
    report = course.report("send")
    if not can_look_inside():
        click.echo("  (not root: the homes cannot be looked into; showing what would be sent)")
    src = homesend.scan_source(
        root,
        exclude=s.material_exclude,
        known=records.source_hashes(course.state),
        where=s.where("material", "source"),
    )
    try:
        records.save_source_hashes(course.state, src.fresh)
        for line in src.skipped:
            report.note(f"  source: skipped {line}")
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
        sent = records.sent_rows(course.state, folder)
        tasks = []
        results: dict[str, dict] = {}
        n = len(src.files)
        homes = enterable(
            course, report, students, "sent", lambda _, pw: f"{n} file(s) into {pw.pw_dir}/{folder}"
        )
        for st, pw in homes:
            rows = sent.pop(st.username, [])
            if homesend.unchanged_by_stat(pw, folder, src, rows):
                results[st.username] = {"ok": EMPTY}
            else:
                job = homesend.SendJob(pw, folder, src, rows, force, stamp)
                tasks.append((st.username, homesend.send_to_home, (job,)))
        deadline = workers.student_deadline(sum(f.size for f in src.files))
        work = each_home(tasks, "send", idle_timeout=600, deadline=deadline, keep_fds=src.fds())
        for username, payload in work:
            results[username] = payload
            if "ok" in payload:
                records.record_sent(course.state, username, folder, payload["ok"])
                drop_bulk(payload["ok"], "records")
    finally:
        src.close()

    def ok(username: str, result: dict) -> None:
        names = report.dry_run  # a dry run says exactly what would be done
        limit = 20 if names else 5
        detail = sendrules.detail(result["actions"], result["skipped"], limit=limit, names=names)
        outcome = sendrules.outcome(result["actions"])
        if outcome:
            report.done(username, outcome, detail)
        else:
            report.unchanged(username, detail)

    report_each(report, students, results, ok)
    note = servers_note(course, students, results)
    if note:
        report.note(note)
    return report.finish()


IN_PLACE = (sendrules.UPDATE, sendrules.OVERWRITE)  # what an open notebook sees change on disk


def servers_note(course: Course, students: list, results: dict[str, dict]) -> str:
    """How many of the students have a running server, and what they see ("File Changed" in
    JupyterLab for an open file that send changed in place) and should click; or ""."""
    running = set(running_servers(course.settings)) & {st.username for st in students}
    if not running:
        return ""
    changed = [
        u
        for u in running
        if any(results.get(u, {}).get("ok", EMPTY)["actions"].get(a) for a in IN_PLACE)
    ]
    return (
        f"  note: {len(running)} of these students have a running server"
        f" ({len(changed)} got a file changed in place). Whoever has such a file open sees"
        ' "File Changed" when saving: "Revert" loads the new version (what they typed since'
        ' their last save is lost), "Overwrite" keeps theirs (the new version then comes'
        " beside it at the next send)."
    )
