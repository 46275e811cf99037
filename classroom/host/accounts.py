"""Ownership: is a student's account the course's own (ok), missing, or foreign (never touched)."""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.roster import Student
from .system import login_defs

OK, MISSING, FOREIGN = "ok", "missing", "foreign"


@dataclass(frozen=True)
class Account:
    """What exists for one student, and whether the course owns it."""

    student: Student
    kind: str  # ok | missing | foreign
    why: str = ""
    pw: pwd.struct_passwd | None = None
    adopt: bool = False  # the course was creating it when a run was cut off

    @property
    def username(self) -> str:
        return self.student.username


def inspect(course: Any, student: Student) -> Account:
    """Classify a student's account: the course's own (ok), missing, or foreign (never touched)."""
    defs = login_defs()
    row = course.state.account(student.username)
    try:
        pw = pwd.getpwnam(student.username)
    except KeyError:
        return Account(student, MISSING)
    if pw.pw_uid == 0 or not defs.uid_min <= pw.pw_uid <= defs.uid_max:
        return Account(
            student,
            FOREIGN,
            f"{student.username} is a system account (uid {pw.pw_uid}, outside "
            f"UID_MIN..UID_MAX {defs.uid_min}..{defs.uid_max}); it is never touched: "
            f"rename the student in the roster",
            pw,
        )
    # Without root the state cannot be read: a member of the course group in the
    # UID range is taken for the course's (for a dry run or status only).
    if row is None and course.state.unreadable and _in_course_group(course, pw):
        return Account(student, OK, pw=pw, why="not verified: the course state is root-only")
    if row is None:
        return Account(
            student,
            FOREIGN,
            f"account {student.username} (uid {pw.pw_uid}) exists but the course did not create it; "
            "it is never touched: rename the student in the roster or remove that account yourself",
            pw,
        )
    if row["uid"] != pw.pw_uid:
        return Account(
            student,
            FOREIGN,
            f"account {student.username} has uid {pw.pw_uid}, not the uid {row['uid']} the course "
            "gave it; it was made outside the course and is never touched",
            pw,
        )
    if row["status"] == "creating":
        if Path(pw.pw_dir) == Path(row["home"]):
            return Account(student, OK, pw=pw, adopt=True)
        return Account(student, FOREIGN, f"account {student.username} exists with another home", pw)
    return Account(student, OK, pw=pw)


def _in_course_group(course: Any, pw: pwd.struct_passwd) -> bool:
    try:
        group = grp.getgrnam(course.settings.group)
    except KeyError:
        return False
    return pw.pw_name in group.gr_mem or pw.pw_gid == group.gr_gid
