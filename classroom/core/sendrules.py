"""send's decision table (SPEC §4): what to do with one file, from what is known about it.

Each file is decided by content (sha256) against the source and against what
the course last sent to that place (kept in the state):

==============================================  =========================================
the file at the student                         what send does
==============================================  =========================================
missing, never sent                             copy
missing, sent before (the student deleted it)   restore it
same as the source                              nothing
same as what was last sent, source changed      update it
edited, or a student's own file of that name    keep it; write the new version beside it
                                                (``NAME.new.EXT``) and list a conflict;
                                                ``--force``: move the student's version to
                                                FOLDER/.backup/TIMESTAMP/ and write the new
==============================================  =========================================

Everything here is a plain function of plain values: no file is looked at.
"""

from __future__ import annotations

import os
from typing import NamedTuple

# What send does to one file (the words of its report).
COPY = "copied"
RESTORE = "restored"
UPDATE = "updated"
OVERWRITE = "overwritten"  # --force: the student's version is moved to .backup first
CONFLICT = "conflict"  # the student's version is kept; the new one goes beside it
KEPT = "kept"  # a conflict from before: the new version is already beside it
NOTHING = ""

# What the student has, besides a sha256: nothing there (None), or ...
OTHER = "other"  # something that is neither the source nor what was sent (edited, a link, ...)
FOLDER = "folder"  # a folder, where the source has a folder

# Beside an edited file, for each candidate name:
WRITE = "write"  # write the new version under this name
NEXT = "next"  # this name is taken by something else: try the next one

OUTCOME_ORDER = (CONFLICT, OVERWRITE, UPDATE, RESTORE, COPY)
MAX_BESIDE = 99


class Sent(NamedTuple):
    """What the course last wrote to one place: its content and the stat of the file it made."""

    sha256: str
    size: int
    stat_key: str | None


def decide(sent: str | None, student: str | None, source: str, *, force: bool) -> str:
    """What send does to one file (SPEC §4).

    ``sent``: the sha256 the course last wrote there (None: never); ``student``: what
    is there now (None: nothing; a sha256; ``OTHER``); ``source``: the sha256 of the
    source. For a folder of the source, pass ``sent=None`` and ``source=FOLDER`` (and
    ``FOLDER`` for a folder at the student): COPY means make it.
    """
    if student is None:
        return RESTORE if sent is not None else COPY
    if student == source:
        return NOTHING
    if sent is not None and student == sent:
        return UPDATE
    return OVERWRITE if force else CONFLICT


def decide_beside(sent: str | None, student: str | None, source: str) -> str:
    """For one candidate name beside an edited file (``sent`` and ``student`` as in ``decide``):
    ``WRITE`` the new version there, it is ``KEPT`` there already, or try the ``NEXT`` name."""
    if student is None:
        return WRITE
    if student == source:
        return KEPT
    if sent is not None and student == sent:
        return WRITE  # an earlier new version, not edited: it follows the source
    return NEXT


def beside_name(name: str, n: int) -> str:
    """Where the new version goes when the student's file is kept: lesson.ipynb -> lesson.new.ipynb."""
    tag = "new" if n == 1 else f"new{n}"
    stem, ext = os.path.splitext(name)
    if not stem or stem.startswith(".") and not ext:
        return f"{name}.{tag}"
    return f"{stem}.{tag}{ext}"


def stale(sent: Sent | None, sha256: str, stat_key: str) -> bool:
    """Does the state need a new record for a file that is already right at the student?

    Yes when it was never recorded, or recorded with other content or another stat
    (then the next run would have to read it again).
    """
    return sent is None or sent.sha256 != sha256 or sent.stat_key != stat_key


def outcome(actions: dict[str, list[str]]) -> str | None:
    """One word for what send did to a student: the weightiest action, or None for nothing."""
    for what in OUTCOME_ORDER:
        if actions.get(what):
            return what
    return None


def _listed(items: list[str], limit: int, sep: str) -> str:
    more = f"{sep}... {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def detail(
    actions: dict[str, list[str]], skipped: list[str], limit: int = 5, names: bool = False
) -> str:
    """What was done to one student; ``names``: list the files of every action (a dry run)."""
    parts = []
    for what in (COPY, RESTORE, UPDATE, OVERWRITE, CONFLICT, KEPT):
        items = actions.get(what) or []
        if not items:
            continue
        label = {CONFLICT: "conflict", KEPT: "conflict kept"}.get(what, what)
        if names or what in (CONFLICT, KEPT, OVERWRITE) or len(items) <= 2:
            parts.append(f"{len(items)} {label}: {_listed(items, limit, ', ')}")
        else:
            parts.append(f"{len(items)} {label}")
    if skipped:
        parts.append(f"{len(skipped)} skipped: {_listed(skipped, limit, '; ')}")
    return "; ".join(parts)
