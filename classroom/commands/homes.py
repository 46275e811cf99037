"""What send and retrieve share: whose home the course may enter, and one worker per home."""

from __future__ import annotations

import pwd
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..core.roster import Student
from ..core.text import escaped
from ..host import accounts, workers
from ..host.system import is_root
from .course import Course, Report, progress


def can_look_inside() -> bool:
    """Are the homes readable? Not without root, which only a dry run may lack."""
    return is_root()


def _account(course: Course, student: Student) -> tuple[pwd.struct_passwd | None, str]:
    """The student's account if the course may act on it, else (None, why).

    A dry run without root cannot read the course state; there an existing
    account is taken as the course's (nothing is changed anyway).
    """
    if not can_look_inside() and course.state.path is None:
        try:
            return pwd.getpwnam(student.username), ""
        except KeyError:
            return None, "no account: run setup first"
    acc = accounts.inspect(course, student)
    if acc.kind != accounts.OK or acc.pw is None:
        return None, acc.why or "no account: run setup first"
    return acc.pw, ""


def enterable(
    course: Course,
    report: Report,
    students: Sequence[Student],
    outcome: str,
    would: Callable[[Student, pwd.struct_passwd], str],
) -> Iterator[tuple[Student, pwd.struct_passwd]]:
    """The students whose home the command may enter, with their account. The others are
    reported here: failed (no account of the course's) or, in a dry run without root,
    ``outcome`` with ``would(student, account)``, not inspected."""
    for st in students:
        pw, why = _account(course, st)
        if pw is None:
            report.failed(st.username, why)
        elif not can_look_inside():
            report.done(st.username, outcome, f"{would(st, pw)}; not inspected")
        else:
            yield st, pw


def each_home(
    tasks: Sequence[tuple[str, Callable[..., Any], tuple]],
    label: str,
    *,
    idle_timeout: float,
    deadline: float,
    keep_fds: Sequence[int] = (),
) -> Iterator[tuple[str, dict]]:
    """Run the tasks (one per student) in workers, with a progress bar on a terminal;
    yield ``(username, payload)`` as each ends (see ``workers.fork_map``). A student's
    worker still running after ``deadline`` seconds fails that student only."""
    results = workers.fork_map(
        tasks,
        workers=workers.workers_for(len(tasks)),
        keep_fds=keep_fds,
        idle_timeout=idle_timeout,
        deadline=deadline,
    )
    yield from progress(results, label, len(tasks))


def drop_bulk(result: dict, *keys: str) -> None:
    """Once a student's result is written down (manifest, state), keep only what the report
    needs: the command's memory then grows with the workers running, not with the class."""
    for key in keys:
        result.pop(key, None)


def report_each(
    report: Report,
    students: Sequence[Student],
    results: dict[str, dict],
    ok: Callable[[str, dict], None],
) -> None:
    """In roster order: a worker's error fails that student; ``ok(username, result)`` reports
    the others. Students without a result were reported already."""
    for st in students:
        payload = results.get(st.username)
        if payload is None:
            continue
        if "error" in payload:
            report.failed(st.username, escaped(f"{payload['error']}"))
        else:
            ok(st.username, payload["ok"])
