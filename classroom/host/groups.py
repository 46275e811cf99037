"""The course's groups and the ids the host uses: who is in a group, choosing a free uid
or gid the course never gave, and the course group (or the staff group): checked,
created with its gid recorded first, deleted once nobody is in it.

``course`` is the opened course (``commands.course.Course``).
"""

from __future__ import annotations

import grp
import pwd
import random
from typing import Any

from ..core.errors import InvalidInput, StepFailed
from . import interrupts
from .system import login_defs, run_account_tool

ATTEMPTS = 10  # useradd / groupadd finding the id just chosen taken by another program


def primary_of(gid: int) -> list[str]:
    """The accounts whose primary gid is ``gid``."""
    return [p.pw_name for p in pwd.getpwall() if p.pw_gid == gid]


def members(group_name: str) -> set[str]:
    """Who is in ``group_name``: its listed members and the accounts whose primary group it is."""
    try:
        group = grp.getgrnam(group_name)
    except KeyError:
        return set()
    return set(group.gr_mem) | set(primary_of(group.gr_gid))


def sharing_gid(gid: int, group: str, account: str | None = None) -> list[str]:
    """Who else has ``gid``: other groups, and accounts (other than ``account``) whose
    primary gid it is. Right after making ``group`` there must be none, but Debian 12's
    ``useradd --user-group`` picks its group's gid without looking again once it holds
    the lock on /etc/group: a program making a group at the same moment can end up with
    the same gid (tried here: 16 times in 40)."""
    groups = [g.gr_name for g in grp.getgrall() if g.gr_gid == gid and g.gr_name != group]
    accounts = [name for name in primary_of(gid) if name != account]
    return list(dict.fromkeys(groups + accounts))  # an account's own group: one name


def _twin(username: str, group: grp.struct_group) -> bool:
    """Whether ``username`` is in ``group`` only because their own group got the same gid
    (``sharing_gid``'s race, lost by a program other than the course)."""
    if username in group.gr_mem:
        return False
    try:
        return grp.getgrnam(username).gr_gid == group.gr_gid == pwd.getpwnam(username).pw_gid
    except KeyError:
        return False


def ids_in_use() -> set[int]:
    """Every id the host uses: accounts' uids and primary gids, and groups' gids. A group
    deleted from under its accounts (``groupdel --force``, ``userdel --force``) still gives
    them its gid: a group made with that gid would take them in."""
    accounts = pwd.getpwall()
    return (
        {p.pw_uid for p in accounts}
        | {p.pw_gid for p in accounts}
        | {g.gr_gid for g in grp.getgrall()}
    )


def free_id(used: set[int], low: int, high: int) -> int:
    """The next id after the highest used one in ``low..high`` (as useradd picks), else the lowest free."""
    in_range = [i for i in used if low <= i <= high]
    candidate = max(in_range, default=low - 1) + 1
    if candidate <= high and candidate not in used:
        return candidate
    for i in range(low, high + 1):
        if i not in used:
            return i
    raise StepFailed(f"no free id left in {low}..{high} (see /etc/login.defs)")


def choose_id(used: set[int], given: set[int], low: int, high: int, attempt: int) -> int:
    """A free id the course never ``given``: above the highest it gave while there is one
    (as useradd takes the highest + 1), else the lowest free one it never gave.

    After a collision (``attempt`` > 0) the choice is spread out: a program creating
    accounts at the same moment also takes the highest + 1, again and again.
    """
    taken = used | given
    try:
        first = free_id(taken, max(low, max(given, default=0) + 1), high)
    except StepFailed:
        first = free_id(taken, low, high)
    for _ in range(64 if attempt else 0):
        candidate = first + random.randrange(1, 16 * attempt + 1)
        if candidate <= high and candidate not in taken:
            return candidate
    return first


def listed_members(group_name: str) -> list[str]:
    try:
        return grp.getgrnam(group_name).gr_mem
    except KeyError:
        return []


# --- the course group -------------------------------------------------------------------------


def check_group(
    course: Any, name: str | None = None, meta: str = "group"
) -> grp.struct_group | None:
    """The course group (or another group the course owns: ``name``, its state keys
    ``META_gid``/``META_creating``, its config key ``[course] META``) if it exists; refuse a
    group that is not safe to make students join.

    A group the course did not create is refused when it is a system group, any
    account's primary group, or has members who are not in the roster: joining
    it would give the students that group's files.
    """
    settings = course.settings
    name = name or settings.group
    try:
        group = grp.getgrnam(name)
    except KeyError:
        return None
    if course.state.meta(f"{meta}_gid") == str(group.gr_gid):
        return group
    if course.state.meta(f"{meta}_creating") == f"{name}:{group.gr_gid}":
        return group  # made by a run that was cut off; adopted by ensure_group
    key = meta
    where = settings.where("course", key)
    gid_min = int(login_defs().get("GID_MIN", "1000") or 1000)
    if group.gr_gid < gid_min:
        raise InvalidInput(
            f"{where}: group '{name}' is a system group (gid {group.gr_gid}); "
            f"choose another [course] {key}"
        )
    primary = primary_of(group.gr_gid)
    outsiders = sorted(set(group.gr_mem) - set(course.roster.names()))
    if primary or outsiders:
        who = ", ".join((primary + outsiders)[:5])
        raise InvalidInput(
            f"{where}: group '{name}' exists, the course did not create it, and it "
            f"already belongs to others ({who}); choose another [course] {key}"
        )
    if meta != "group":
        raise InvalidInput(
            f"{where}: group '{name}' exists and the course did not create it; it gives "
            f"its members sudo for this course: choose another [course] {key}"
        )
    return group


def ensure_group(course: Any, name: str | None = None, meta: str = "group") -> bool:
    """Create the course group (or ``name``, see ``check_group``) if it is missing (gid recorded
    first); True if it was created."""
    name = name or course.settings.group
    state = course.state
    group = check_group(course, name, meta)
    if group is not None:
        if state.meta(f"{meta}_creating") == f"{name}:{group.gr_gid}":
            with state.transaction():
                state.set_meta(f"{meta}_gid", str(group.gr_gid))
                state.set_meta(f"{meta}_creating", None)
                state.record("setup", None, "group adopted", {"gid": group.gr_gid})
        return False
    defs = login_defs()
    gid_min = int(defs.get("GID_MIN", "1000") or 1000)
    gid_max = int(defs.get("GID_MAX", "60000") or 60000)
    for attempt in range(ATTEMPTS):
        gid = choose_id(ids_in_use(), state.given_ids(), gid_min, gid_max, attempt)
        with state.transaction():
            state.set_meta(f"{meta}_creating", f"{name}:{gid}")
            state.give_ids(gid)
        try:
            with interrupts.shielded():
                run_account_tool(["groupadd", "--gid", str(gid), "--", name])
                if not sharing_gid(gid, name):
                    break
                # just made, so nobody is in it; --force: the other program's account
                # has that gid as its primary one, and keeps its own group of that gid
                run_account_tool(["groupdel", "--force", "--", name])
            with state.transaction():
                state.set_meta(f"{meta}_creating", None)
        except StepFailed as exc:
            with state.transaction():
                state.set_meta(f"{meta}_creating", None)
            if "already exists" in str(exc) and f"'{gid}'" in str(exc):
                continue  # another program took that gid meanwhile
            raise
    else:
        raise StepFailed("groupadd kept finding its gid taken; try again")
    with state.transaction():
        state.set_meta(f"{meta}_gid", str(gid))
        state.set_meta(f"{meta}_creating", None)
        state.record("setup", None, "group created", {"group": name, "gid": gid})
    return True


def remove_group_if_empty(course: Any, name: str | None = None, meta: str = "group") -> bool:
    """Delete the course group (or ``name``, see ``check_group``) once nobody is in it (only
    the one the course made); True if deleted. StepFailed says who keeps it."""
    name = name or course.settings.group
    state = course.state
    gid = state.meta(f"{meta}_gid")
    try:
        group = grp.getgrnam(name)
    except KeyError:
        if gid:
            with state.transaction():
                state.set_meta(f"{meta}_gid", None)
        return False
    if gid is None:
        return False  # not the course's: it was there before
    if gid != str(group.gr_gid):
        raise StepFailed(
            f"group {name} kept: its gid is {group.gr_gid}, not the {gid} the course made it "
            "with (another program replaced it)"
        )
    left = sorted(members(name))
    keeping = [who for who in left if not _twin(who, group)]
    if keeping:
        raise StepFailed(
            f"group {name} kept: {', '.join(keeping[:5])}{' …' if len(keeping) > 5 else ''} "
            "still in it"
        )
    # --force: an account in it only through a twin gid keeps its own group of that gid
    run_account_tool(["groupdel", "--force", "--", name] if left else ["groupdel", "--", name])
    with state.transaction():
        state.set_meta(f"{meta}_gid", None)
        state.record("remove", None, "group deleted", {"group": name})
    return True
