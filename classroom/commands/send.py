"""send: copy the tutorial material into every student's HOME/FOLDER, never losing an edit.

What happens to each file is ``core.sendrules`` (the table of SPEC §4); the
file work, as the student and never through a link, is ``host.homesend``; what
was sent is remembered by ``host.records``.
"""

from __future__ import annotations

import datetime as dt
import pwd
from pathlib import Path

import click

from ..core import sendrules
from ..core.errors import InvalidInput
from ..core.roster import Student
from ..core.settings import Settings, safe_folder
from ..host import homesend, records, workers
from ..host.server import running_servers
from .course import Course, Report
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
    src = open_source(course, root, where=s.where("material", "source"))
    try:
        for line in src.skipped:
            report.note(f"  source: skipped {line}")
        n = len(src.files)
        homes = enterable(
            course, report, students, "sent", lambda _, pw: f"{n} file(s) into {pw.pw_dir}/{folder}"
        )
        results = hand_out(course, [(st, pw, src) for st, pw in homes], folder, force=force)
    finally:
        src.close()
    report_each(report, students, results, lambda username, r: report_sent(report, username, r))
    note = servers_note(course, students, results)
    if note:
        report.note(note)
    return report.finish()


def open_source(course: Course, root: Path, *, where: str) -> homesend.Source:
    """A source folder, opened (``homesend.scan_source``); new sha256s remembered."""
    src = homesend.scan_source(
        root,
        exclude=course.settings.material_exclude,
        known=records.source_hashes(course.state),
        where=where,
    )
    try:
        records.save_source_hashes(course.state, src.fresh)
    except BaseException:
        src.close()
        raise
    return src


def hand_out(
    course: Course,
    jobs: list[tuple[Student, pwd.struct_passwd, homesend.Source]],
    folder: str,
    *,
    force: bool,
    table: str = records.SENT,
    label: str = "send",
    record_as: str | None = None,
    shared: bool = False,
) -> dict[str, dict]:
    """send's engine: each (student, account, source) into HOME/FOLDER by the table of
    ``core.sendrules``, recorded in ``table``; the workers' payloads by username.

    A student whose folder is exactly what was last written there needs no worker. Each
    worker keeps only its own source's descriptors open. ``record_as``: the folder's name
    in the records, when not FOLDER; ``shared``: the shared folder (``SendJob.shared``).
    """
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    key = record_as or folder
    sent = records.sent_rows(course.state, key, table)
    tasks = []
    results: dict[str, dict] = {}
    fds: set[int] = set()
    for st, pw, src in jobs:
        rows = sent.pop(st.username, [])
        if homesend.unchanged_by_stat(pw, folder, src, rows):
            results[st.username] = {"ok": EMPTY}
        else:
            fds.update(src.fds())
            job = homesend.SendJob(pw, folder, src, rows, force, stamp, shared=shared)
            tasks.append((st.username, homesend.send_to_home, (job, fds)))
    keep = sorted(fds)
    biggest = max((sum(f.size for f in src.files) for _, _, src in jobs), default=0)
    deadline = workers.student_deadline(biggest)
    work = each_home(tasks, label, idle_timeout=600, deadline=deadline, keep_fds=keep)
    for username, payload in work:
        results[username] = payload
        if "ok" in payload:
            records.record_sent(course.state, username, key, payload["ok"], table)
            drop_bulk(payload["ok"], "records")
    return results


def report_sent(report: Report, username: str, result: dict) -> None:
    """One student's line: what send's engine did there, or unchanged."""
    names = report.dry_run  # a dry run says exactly what would be done
    limit = 20 if names else 5
    detail = sendrules.detail(result["actions"], result["skipped"], limit=limit, names=names)
    outcome = sendrules.outcome(result["actions"])
    if outcome:
        report.done(username, outcome, detail)
    else:
        report.unchanged(username, detail)


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
