"""The class's shared folder (SPEC §6.5): made by setup, linked from every home (as the
student), filled by ``send --shared``, never collected by retrieve (it is outside
HOME/FOLDER, and a link in there is skipped), archived and deleted by remove only when
the course made it.

Where the folder may be is ``host.sharedfolder.problems`` (and, for home_base,
``core.settings``); a bad place is refused before any change (exit 2).
"""

from __future__ import annotations

import pwd
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import InvalidInput, StepFailed
from ..core.roster import Student
from ..core.settings import Settings
from ..host import records, sharedfolder
from ..host.accounts import FOREIGN, Account
from ..host.system import dry_run
from .course import Course, Report
from .homes import can_look_inside
from .send import hand_out, open_source, report_sent, source_folder

MADE = "shared_folder_made"  # course meta: the folder the course created (remove may delete it)


def precheck(s: Settings) -> None:
    """Refuse (exit 2, nothing changed) a shared folder where someone else could change it."""
    found = sharedfolder.problems(s)
    if found:
        raise InvalidInput(found)


def ensure(course: Course, report: Report, accounts: Sequence[Account]) -> dict[str, str]:
    """setup's part: the folder in line, and HOME/LINK in each home that lacks it.

    Returns what changed (or would) per student: ``{username: "link ~/LINK"}``.
    """
    s = course.settings
    folder = s.shared_folder
    if folder is None:
        return {}
    label = f"shared folder {folder}"
    try:
        done = sharedfolder.ensure_folder(s)
    except StepFailed as exc:
        report.failed(label, str(exc))
        return {}
    if done:
        would = "would be " if dry_run() else ""
        what = "created" if "created" in done else "set: " + ", ".join(done)
        writers = f"root and {s.staff_group}" if sharedfolder.staff_gid(s) else "root"
        report.note(f"{label} {would}{what} ({writers} write, {s.group} reads)")
        if not dry_run():
            with course.state.transaction():
                if "created" in done:
                    course.state.set_meta(MADE, str(folder))
                course.state.record("setup", None, "shared folder", {"folder": str(folder)})
    return {u: f"link ~/{s.shared_link}" for u in _link_homes(course, report, accounts, folder)}


def _link_homes(
    course: Course, report: Report, accounts: Sequence[Account], folder: Path
) -> list[str]:
    """HOME/LINK -> the folder, made as each student who lacks it; who got (would get) one."""
    link = course.settings.shared_link
    linked = []
    for acc in accounts:
        if acc.kind == FOREIGN or acc.username in report.failures:
            continue
        try:
            pw = pwd.getpwnam(acc.username)
        except KeyError:
            continue  # a dry run: the account, and its link, are still to be made
        have = sharedfolder.link_state(pw, link, folder)
        if have == "other":
            report.note(f"  {acc.username}: ~/{link} is not the link to {folder}: left as it is")
        if have != "missing":
            continue
        try:
            sharedfolder.make_link(pw, link, folder)
        except StepFailed as exc:
            report.failed(acc.username, f"the link ~/{link} to the shared folder: {exc}")
            continue
        linked.append(acc.username)
        if not dry_run():
            with course.state.transaction():
                course.state.record("setup", acc.username, "shared link", {"link": link})
    return linked


def send_shared(
    course: Course,
    *,
    only: Sequence[str] = (),
    force: bool = False,
    source: str | None = None,
    folder: str | None = None,
) -> int:
    """``send --shared``: the material into the shared folder, once, by send's rules, as root."""
    if only or folder:
        raise InvalidInput("send --shared: --only and --folder do not apply (one shared folder)")
    s = course.settings
    root = source_folder(s, source)
    shared = s.shared_folder
    if shared is None:
        raise InvalidInput(
            f"{s.where('shared', 'folder')}: send --shared: [shared] folder is not set"
        )
    precheck(s)
    if not shared.is_dir():
        raise InvalidInput(f"send --shared: the shared folder {shared} does not exist: run setup")
    course.state.ensure(records.SEND_SQL)
    report = course.report("send")
    label = f"shared folder {shared}"
    src = open_source(course, root, where=s.where("material", "source"))
    try:
        for line in src.skipped:
            report.note(f"  source: skipped {line}")
        if not can_look_inside():
            report.done(label, "sent", f"{len(src.files)} file(s); not inspected")
            return report.finish()
        # root, with the folder's parent for a home: the engine opens PARENT/NAME as it
        # opens HOME/FOLDER, folder by folder, each root's, never through a link
        owner = pwd.struct_passwd(("root", "x", 0, 0, label, str(shared.parent), "/bin/false"))
        job = (Student(""), owner, src)
        (payload,) = hand_out(
            course, [job], shared.name, force=force, record_as=str(shared), shared=True
        ).values()
    finally:
        src.close()
    if "error" in payload:
        report.failed(label, payload["error"])
    else:
        report_sent(report, label, payload["ok"])
    return report.finish()


def remove_shared(course: Course, report: Report, only: Sequence[str]) -> None:
    """remove's part, once every account is gone: the folder the course made, archived like a
    home (``[remove] archive``) and deleted. One it did not make is left alone."""
    s = course.settings
    if only or not course.state_readable:
        return  # the class goes on; or (a dry run without root) who made it is unknown
    made = course.state.meta(MADE)
    if not made:
        if s.shared_folder is not None and s.shared_folder.exists():
            report.note(f"shared folder {s.shared_folder} kept: the course did not make it")
        return
    folder = Path(made)
    if not folder.exists():
        if not dry_run():
            with course.state.transaction():
                course.state.set_meta(MADE, None)
        return
    if report.failures:
        report.note(f"shared folder {folder} kept: not every account was removed")
        return
    archive = "archived and deleted" if s.archive else "deleted (no archive)"
    if dry_run():
        report.note(f"shared folder {folder} would be {archive}")
        return
    try:
        archived = sharedfolder.archive_and_delete(
            folder, s.archive_dir if s.archive else None, f"{s.name}-shared"
        )
    except (StepFailed, OSError) as exc:
        report.failed(f"shared folder {folder}", f"kept: {exc}")
        return
    with course.state.transaction():
        course.state.set_meta(MADE, None)
        course.state.record("remove", None, "shared folder", {"archive": str(archived or "")})
    report.note(f"shared folder {folder} {archive}" + (f": {archived}" if archived else ""))
