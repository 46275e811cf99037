"""Students' Unix accounts: ownership, create, align, delete (the groups: ``groups.py``).

Ownership first: an account is the course's own (ok), missing, or foreign (never
touched). Only accounts the course created (recorded in the state, same uid, uid
inside UID_MIN..UID_MAX) are ever changed or deleted. Each uid and gid is chosen
and recorded before useradd or groupadd runs, so a run that was cut off adopts
exactly what it made, and nothing else.

``course`` is the opened course (``commands.course.Course``): its settings, roster,
state, and whether that state could be read.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import Refused, StepFailed
from ..core.roster import Student
from ..core.secret import Secret
from ..core.sizes import human_size
from . import interrupts
from .groups import (
    ATTEMPTS,
    choose_id,
    ids_in_use,
    listed_members,
    members,
    primary_of,
    sharing_gid,
)
from .processes import kill_every_process_of, running_programs
from .system import login_defs, run, run_account_tool
from .workers import as_user

OK, MISSING, FOREIGN = "ok", "missing", "foreign"
SYSTEM_SKELETON = "/etc/skel"  # what useradd copies when [accounts] skeleton is not set
SKELETON_LIMIT = 64 << 20  # bytes of skeleton a half-made home is completed with
SKELETON_TIMEOUT = 120  # seconds to copy it as the student


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


@dataclass(frozen=True)
class Change:
    """One change to an existing account: what it is, and how to make it."""

    what: str
    make: Callable[[], None]


# --- ownership --------------------------------------------------------------------------------


USERDEL_BUSY = 8  # userdel's status when a process of the account runs
BUSY_ATTEMPTS = 3
ACCOUNT_TOOLS = ("useradd", "groupadd", "usermod", "gpasswd", "userdel", "groupdel")
TOOLS_WAIT = 60.0  # seconds to wait for an account tool a killed run left running


def wait_for_account_tools(names: set[str], command: str, timeout: float = TOOLS_WAIT) -> None:
    """Wait until no account tool that names one of ``names`` (a student, the course
    group) is running; ``Refused`` (nothing changed) if one still runs after ``timeout``.

    A run of setup or remove killed outright (SIGKILL) leaves its ``useradd`` running
    (never killed half-way, by design): the next run must see what it made, not race it.
    """
    deadline = time.monotonic() + timeout
    while (left := running_programs(ACCOUNT_TOOLS, names)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        raise Refused(
            f"{command} refused, nothing was changed: account tools of an interrupted run are "
            f"still running ({'; '.join(left)}); wait for them, then run {command} again"
        )


def uid_taken(uid: int) -> bool:
    """Whether an account has ``uid`` now: after userdel, another program (another
    course's setup) may already have given it out, and what it runs is not ours to kill."""
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


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
    if row is None and not course.state_readable and pw.pw_name in members(course.settings.group):
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


# --- accounts ---------------------------------------------------------------------------------


def useradd_argv(settings: Any, student: Student) -> list[str]:
    """useradd for ``student`` as the config says (the uid is added when it is chosen)."""
    argv = [
        "useradd",
        "--create-home",
        "--home-dir",
        str(settings.home_base / student.username),
        "--shell",
        settings.shell,
        "--user-group",
        "--groups",
        settings.group,
        "--comment",
        student.gecos,
        "-K",
        f"HOME_MODE={settings.home_mode:04o}",
    ]
    if settings.skeleton:
        argv += ["--skel", str(settings.skeleton)]
    return [*argv, "--", student.username]


def create_account(course: Any, student: Student) -> pwd.struct_passwd:
    """useradd with a uid chosen and recorded first, so a cut-off run adopts exactly that account.

    The uid is one the course never gave (``choose_id``) and free as a gid too, so
    useradd gives the account's own group the same id. A stop signal
    waits until the account is made and recorded (one step).
    """
    state = course.state
    home = course.settings.home_base / student.username
    if os.path.lexists(home):
        raise StepFailed(
            f"{home} already exists and would become {student.username}'s home; "
            "move it away (or change [accounts] home_base) and run setup again"
        )
    _clear_half_made_group(course, student.username)
    defs = login_defs()
    with interrupts.shielded():
        for attempt in range(ATTEMPTS):
            uid = choose_id(ids_in_use(), state.given_ids(), defs.uid_min, defs.uid_max, attempt)
            with state.transaction():
                state.claim_account(student.username, uid, str(home))
                state.give_ids(uid)
            argv = useradd_argv(course.settings, student)
            argv[1:1] = ["--uid", str(uid)]
            try:
                run_account_tool(argv)
            except StepFailed as exc:
                with state.transaction():
                    state.forget_account(student.username)
                if "not unique" in str(exc):  # another program took that uid meanwhile
                    continue
                raise
            pw = pwd.getpwnam(student.username)
            if not sharing_gid(pw.pw_gid, student.username, student.username):
                break
            # its own group got a gid another group has too (see sharing_gid): undo, again
            run_account_tool(["userdel", "--remove", "--", student.username], check=False)
            with contextlib.suppress(KeyError):  # userdel keeps it when an account has its gid
                if grp.getgrnam(student.username).gr_gid == pw.pw_gid:
                    run_account_tool(["groupdel", "--force", "--", student.username])
            with state.transaction():
                state.forget_account(student.username)
        else:
            raise StepFailed("useradd kept finding its uid taken; try again")
        if pw.pw_uid != uid:
            raise StepFailed(f"useradd gave uid {pw.pw_uid}, not {uid}")
        with state.transaction():
            state.give_ids(pw.pw_gid)
            state.account_made(student.username)
            state.record(
                "setup", student.username, "account created", {"uid": pw.pw_uid, "gid": pw.pw_gid}
            )
    return pw


def _clear_half_made_group(course: Any, username: str) -> None:
    """A group named ``username`` without its account is left by a useradd that was cut
    off after /etc/group: delete it when the course was making that account; refuse
    any other (useradd would fail on it)."""
    try:
        group = grp.getgrnam(username)
    except KeyError:
        return
    row = course.state.account(username)
    if (
        row is None
        or row["status"] != "creating"
        or row["uid"] != group.gr_gid
        or members(username)
    ):
        raise StepFailed(
            f"a group named {username} exists (gid {group.gr_gid}) but no such account; "
            f"the course did not make it: rename the student, or remove that group yourself"
        )
    run_account_tool(["groupdel", "--", username])


def alignment(course: Any, account: Account) -> list[Change]:
    """What it takes to bring an existing course account in line (group, home, home mode).

    Raises ``StepFailed`` for what must be fixed by hand (a home that is not the
    student's folder).
    """
    settings, state = course.settings, course.state
    pw = account.pw
    assert pw is not None
    changes = []
    if account.adopt:

        def adopt() -> None:
            with state.transaction():
                state.account_made(pw.pw_name)
                state.record("setup", pw.pw_name, "account adopted", {"uid": pw.pw_uid})

        changes.append(Change("account adopted after an interrupted run", adopt))
    own = own_group_change(pw)
    if own is not None:
        changes.append(own)
    if pw.pw_name not in listed_members(settings.group):
        usermod = ["usermod", "--append", "--groups", settings.group, "--", pw.pw_name]
        changes.append(
            Change(f"added to group {settings.group}", lambda: run_account_tool(usermod))
        )
    skeleton = settings.skeleton or Path(SYSTEM_SKELETON)
    home = Path(pw.pw_dir)
    try:
        st = os.lstat(home)
    except FileNotFoundError:

        def home_with_skeleton() -> None:
            make_home(pw, settings.home_mode)
            fill_skeleton(pw, skeleton)

        return [*changes, Change("home created", home_with_skeleton)]
    if not stat.S_ISDIR(st.st_mode):
        raise StepFailed(f"home {home} is not a folder; fix it by hand")
    if st.st_uid != pw.pw_uid:
        raise StepFailed(
            f"home {home} is owned by uid {st.st_uid}, not {pw.pw_name}; fix it by hand"
        )
    if account.adopt and missing_skeleton(pw, skeleton):
        changes.append(Change("skeleton completed", lambda: fill_skeleton(pw, skeleton)))
    mode = stat.S_IMODE(st.st_mode)
    if mode != settings.home_mode:
        changes.append(
            Change(
                f"home mode {mode:04o} -> {settings.home_mode:04o}",
                lambda: _chmod_home(home, st.st_ino, settings.home_mode),
            )
        )
    return changes


def own_group_change(pw: pwd.struct_passwd) -> Change | None:
    """The account's own group (its name, the account's gid), made if a cut-off useradd
    left it out; ``StepFailed`` when something else holds that name or gid."""
    try:
        group = grp.getgrgid(pw.pw_gid)
    except KeyError:
        group = None
    if group is not None:
        if group.gr_name == pw.pw_name:
            return None
        raise StepFailed(
            f"{pw.pw_name}'s primary group is {group.gr_name} (gid {pw.pw_gid}), not its own; "
            "fix it by hand (usermod --gid)"
        )
    try:
        taken = grp.getgrnam(pw.pw_name)
    except KeyError:
        argv = ["groupadd", "--gid", str(pw.pw_gid), "--", pw.pw_name]
        return Change(f"own group {pw.pw_name} created", lambda: run_account_tool(argv))
    raise StepFailed(
        f"{pw.pw_name} has gid {pw.pw_gid}, which has no group, and the group {pw.pw_name} has "
        f"gid {taken.gr_gid}; fix it by hand (usermod --gid {pw.pw_name} {pw.pw_name})"
    )


def _skeleton_entries(folder: Path) -> list[tuple[str, int, bytes | None]]:
    """What ``folder`` holds, read by root: (relative path, mode, data or None for a
    folder); links and special files are left out, as useradd leaves them."""
    entries: list[tuple[str, int, bytes | None]] = []
    total = 0
    for top, dirs, files, top_fd in os.fwalk(folder, follow_symlinks=False):
        rel_top = os.path.relpath(top, folder)
        for name in sorted(dirs):
            st = os.stat(name, dir_fd=top_fd, follow_symlinks=False)
            entries.append((os.path.normpath(os.path.join(rel_top, name)), st.st_mode, None))
        for name in sorted(files):
            st = os.stat(name, dir_fd=top_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            total += st.st_size
            if total > SKELETON_LIMIT:
                raise StepFailed(
                    f"the skeleton {folder} holds more than {human_size(SKELETON_LIMIT)}"
                )
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=top_fd)
            with os.fdopen(fd, "rb") as f:
                data = f.read(SKELETON_LIMIT + 1)
            entries.append((os.path.normpath(os.path.join(rel_top, name)), st.st_mode, data))
    return entries


def missing_skeleton(pw: pwd.struct_passwd, folder: Path) -> bool:
    """True when a file or folder of the skeleton is not in the home (root looks, no links)."""
    if not folder.is_dir():
        return False
    for rel, _mode, _data in _skeleton_entries(folder):
        if not os.path.lexists(os.path.join(pw.pw_dir, rel)):
            return True
    return False


def fill_skeleton(pw: pwd.struct_passwd, folder: Path) -> None:
    """Copy what of the skeleton the home lacks, as the student (nothing is overwritten)."""
    if folder.is_dir():
        as_user(pw, _fill, pw.pw_dir, _skeleton_entries(folder), timeout=SKELETON_TIMEOUT)


def _fill(home: str, entries: list[tuple[str, int, bytes | None]]) -> None:
    """In a child that is the student: create each missing entry (never through a link)."""
    for rel, mode, data in entries:
        path = os.path.join(home, rel)
        if data is None:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, stat.S_IMODE(mode) | 0o700)
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            os.fchmod(out.fileno(), stat.S_IMODE(mode) & 0o755 | 0o600)


def _chmod_home(home: Path, ino: int, mode: int) -> None:
    """chmod the home that was inspected (same inode), never a link put in its place."""
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_ino != ino:
            raise StepFailed(f"home {home} changed while it was being checked")
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def make_home(pw: pwd.struct_passwd, mode: int) -> None:
    """Create a missing home: the student's, ``mode``."""
    home = Path(pw.pw_dir)
    home.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(home, mode)
    os.chown(home, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    os.chmod(home, mode, follow_symlinks=False)


def chpasswd_argv() -> list[str]:
    """chpasswd hashing as /etc/login.defs says (ENCRYPT_METHOD; chpasswd reads the rounds).

    ``--crypt-method`` also keeps Debian's chpasswd from handing the hashing to PAM,
    whose policy may differ from login.defs.
    """
    method = login_defs().encrypt_method
    if method not in ("SHA512", "SHA256", "YESCRYPT", "MD5"):
        method = "SHA512"
    return ["chpasswd", "--crypt-method", method]


def set_passwords(passwords: dict[str, Secret]) -> None:
    """Set each account's Unix password: one chpasswd, the batch on its stdin, never in argv."""
    batch = Secret("".join(f"{u}:{p.reveal()}\n" for u, p in passwords.items()))
    run_account_tool(chpasswd_argv(), stdin=batch)


def delete_account(course: Any, account: Account) -> None:
    """userdel (the home too when it is the one the course made), then forget the account.

    Looks again just before deleting: the account must still be the one inspected. userdel
    refuses while a process of the account runs (one started since they were stopped):
    those are killed and userdel runs again.
    """
    settings, state = course.settings, course.state
    now_acc = inspect(course, account.student)
    if now_acc.kind == MISSING:
        raise StepFailed("the account vanished while it was being removed; nothing deleted")
    was = account.pw
    if now_acc.kind != OK or now_acc.pw is None or was is None or now_acc.pw.pw_uid != was.pw_uid:
        raise StepFailed(
            f"the account changed while it was being removed; not deleted: {now_acc.why}"
        )
    username = account.username
    row = state.account(username)
    home = Path(now_acc.pw.pw_dir)
    own_home = row is not None and Path(row["home"]) == home and home.parent == settings.home_base
    argv = ["userdel", "--remove", "--", username] if own_home else ["userdel", "--", username]
    ids = [(now_acc.pw.pw_uid, now_acc.pw.pw_gid)]
    for _ in range(BUSY_ATTEMPTS):
        result = run_account_tool(argv, check=False)
        if result.returncode != USERDEL_BUSY:
            break
        kill_every_process_of(ids)  # a login since the processes were stopped: again
    if result.returncode not in (0, 12):
        raise StepFailed(f"userdel failed with status {result.returncode}: {result.stderr.strip()}")
    if own_home and home.is_dir() and not home.is_symlink():
        run(["rm", "-rf", "--one-file-system", "--", str(home)])
    _delete_own_group(username, now_acc.pw.pw_gid)


def _delete_own_group(username: str, gid: int) -> None:
    """userdel leaves the account's own group when its gid was not the account's (a
    half-made account): delete it once no one uses it."""
    try:
        group = grp.getgrnam(username)
    except KeyError:
        return
    if group.gr_gid != gid or group.gr_mem or primary_of(gid):
        return
    run_account_tool(["groupdel", "--", username])
