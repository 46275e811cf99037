"""return: hand each student's feedback, DIR/USERNAME/, into their HOME/FOLDER (SPEC §6.7).

The rules are send's, and so is the engine (``send.hand_out``): a student's edit
is never lost (the new version goes beside it), a deleted file is restored, an
untouched one updated, ``--force`` backs the student's version up first. What
return wrote is recorded apart from what send wrote (``records.RETURNED``), so
neither takes the other's files for its own. A student with no folder in DIR is
unchanged; a link in DIR's place for a student is not followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import click

from ..core.errors import InvalidInput
from ..core.settings import Settings
from ..host import homesend, records, workers
from .course import Course, Report
from .homes import can_look_inside, enterable, report_each
from .send import hand_out, open_source, report_sent, target_folder


def feedback_root(s: Settings, source: str | None) -> Path:
    """``--source`` (or ``[return] source``): an existing folder of DIR/USERNAME/ folders."""
    root = Path(source).resolve() if source else s.return_source
    if not root.is_dir():
        where = "--source" if source else f"{s.where('return', 'source')}: [return] source"
        raise InvalidInput(
            f"{where} {root} is not a folder (it holds one folder per student: DIR/USERNAME/)"
        )
    return root


def student_source(course: Course, report: Report, path: Path) -> homesend.Source | None:
    """DIR/USERNAME opened, or None: nothing to return (unchanged) or it cannot be (failed)."""
    username = path.name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        report.unchanged(username, f"no folder {path}")
        return None
    except OSError as exc:
        st = os.lstat(path)
        why = "a symlink (not followed)" if stat.S_ISLNK(st.st_mode) else exc.strerror
        if not stat.S_ISLNK(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            why = "not a folder"
        report.failed(username, f"{path}: {why}; put the student's feedback folder there")
        return None
    os.close(fd)
    src = open_source(course, path, where=str(path))
    for line in src.skipped:
        report.note(f"  {path}: skipped {line}")
    return src


def return_feedback(
    course: Course,
    *,
    only: tuple[str, ...] = (),
    force: bool = False,
    source: str | None = None,
    folder: str | None = None,
) -> int:
    """Return the feedback to each selected student (see the module docstring); the exit status."""
    s = course.settings
    folder = target_folder(folder or s.return_folder)
    root = feedback_root(s, source)
    course.state.ensure(records.SEND_SQL)  # the source files' sha256 cache
    course.state.ensure(records.RETURN_SQL)
    students = course.students(only)
    report = course.report("return")
    if not can_look_inside():
        click.echo("  (not root: the homes cannot be looked into; showing what would be returned)")
    sources: dict[str, homesend.Source] = {}
    try:
        for st in students:
            src = student_source(course, report, root / st.username)
            if src is not None:
                sources[st.username] = src
                # every student's files stay open until the workers are done
                workers.raise_fd_limit(sum(len(x.files) for x in sources.values()) + 1024)
        homes = enterable(
            course,
            report,
            [st for st in students if st.username in sources],
            "returned",
            lambda st, pw: f"{len(sources[st.username].files)} file(s) into {pw.pw_dir}/{folder}",
        )
        jobs = [(st, pw, sources[st.username]) for st, pw in homes]
        results = hand_out(
            course, jobs, folder, force=force, table=records.RETURNED, label="return"
        )
    finally:
        for src in sources.values():
            src.close()
    report_each(report, students, results, lambda username, r: report_sent(report, username, r))
    return report.finish()
