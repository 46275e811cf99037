"""The class's shared folder (SPEC §6.5) on the host: where it may be, its owner, mode and ACL,
the link to it in each home.

The folder is ``root:STAFF`` (the staff group, or root's while there is none),
mode 2770 (new files keep the group), and a POSIX ACL gives the course group
read access, also to everything made in it later (default entries): the
course reads it, root and the assistants write it, other users cannot even
enter it. ``setfacl`` is Debian's ``acl`` package.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
from pathlib import Path

from ..core.errors import StepFailed
from ..core.settings import Settings
from .archive import archive_folder
from .system import dry_run, login_defs, run
from .workers import as_user

MODE = 0o2770
LINK_TIMEOUT = 60  # seconds to make one student's link


def problems(s: Settings) -> list[str]:
    """Why the shared folder cannot be where the config puts it (nothing when it is fine).

    Every folder above it must be root's and closed to others' writes (or sticky,
    as /tmp), else someone could swap it for a link; it is never in a user's home
    (a user's, UID_MIN and up: they could change it); an existing one must be root's folder.
    """
    folder = s.shared_folder
    if folder is None:
        return []
    where = f"{s.where('shared', 'folder')}: [shared] folder {folder}"
    found = []
    uid_min = login_defs().uid_min
    for user in pwd.getpwall():
        home = Path(user.pw_dir)
        if (
            user.pw_uid >= uid_min
            and home != Path("/")
            and (folder == home or home in folder.parents)
        ):
            found.append(f"{where} is in the home of {user.pw_name}, who could change it")
            break
    for parent in folder.parents:
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            continue  # setup makes it, root's
        except OSError as exc:
            found.append(f"{where}: {parent}: {exc.strerror}")
            break
        open_to_others = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
        if stat.S_ISLNK(st.st_mode) or st.st_uid != 0 or open_to_others:
            found.append(
                f"{where}: the folder {parent} above it is not root's alone (a link, another "
                "owner, or writable by others); choose a folder under one only root can change"
            )
            break
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return found
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        found.append(
            f"{where} exists and is not a folder of root's; move it away or choose another"
        )
    return found


def staff_gid(s: Settings) -> int:
    """The staff group's id, or root's group while that group does not exist."""
    try:
        return grp.getgrnam(s.staff_group).gr_gid
    except KeyError:
        return 0


def acl(course_gid: int) -> list[str]:
    """The ACL, as ``getfacl --omit-header --numeric`` prints it: the course group reads."""
    entries = ["user::rwx", "group::rwx", f"group:{course_gid}:r-x", "mask::rwx", "other::---"]
    return entries + [f"default:{e}" for e in entries]


def current_acl(folder: Path) -> list[str]:
    out = run(
        ["getfacl", "--omit-header", "--numeric", "--absolute-names", "--", str(folder)],
        changes=False,
    ).stdout
    return [line.split("#")[0].strip() for line in out.splitlines() if line.split("#")[0].strip()]


def ensure_folder(s: Settings) -> list[str]:
    """Make the folder (or bring it in line): what was (under ``--dry-run``: would be) done.

    Raises ``StepFailed`` (setfacl missing, a filesystem without ACLs, ...).
    """
    folder = s.shared_folder
    assert folder is not None
    try:
        course_gid = grp.getgrnam(s.group).gr_gid
    except KeyError:
        if not dry_run():
            raise StepFailed(f"the course group {s.group} does not exist: run setup") from None
        course_gid = -1  # setup's dry run: the group is still to be made
    gid = staff_gid(s)
    done = []
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        st = None
        done.append("created")
        if not dry_run():
            folder.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            os.mkdir(folder, 0o700)
            st = os.lstat(folder)
    if st is not None and (st.st_uid, st.st_gid) != (0, gid):
        done.append("owner")
    if st is not None and stat.S_IMODE(st.st_mode) != MODE:
        done.append("mode")
    want = acl(course_gid)
    if st is None or current_acl(folder) != want:
        done.append("access list")
    if done and not dry_run():
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, 0, gid)
            os.fchmod(fd, MODE)
            spec = ",".join(e.replace("group:", "g:").replace("user:", "u:") for e in want)
            run(["setfacl", "--set", spec, "--", str(folder)])
            os.fchmod(fd, MODE)  # setgid again, should the ACL have dropped it
        finally:
            os.close(fd)
    return done


def link_state(pw: pwd.struct_passwd, link: str, target: Path) -> str:
    """HOME/LINK: "ok" (the link to ``target``), "missing", "other" (something else), or
    "unknown" (the home cannot be looked into: a dry run without root)."""
    path = Path(pw.pw_dir) / link
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    except PermissionError:
        return "unknown"
    except OSError:
        return "other"
    if stat.S_ISLNK(st.st_mode) and os.readlink(path) == str(target) and st.st_uid == pw.pw_uid:
        return "ok"
    return "other"


def _symlink(path: str, target: str) -> None:
    """As the student: HOME/LINK -> the shared folder."""
    os.symlink(target, path)


def make_link(pw: pwd.struct_passwd, link: str, target: Path) -> None:
    """Make HOME/LINK, as the student (so it is theirs); nothing under ``--dry-run``."""
    if dry_run():
        return
    as_user(pw, _symlink, os.path.join(pw.pw_dir, link), str(target), timeout=LINK_TIMEOUT)


def archive_and_delete(folder: Path, archive_dir: Path | None, stem: str) -> Path | None:
    """A tar.gz of the folder in ``archive_dir`` (None: no archive), then the folder deleted
    (never following a link). Returns the archive. Nothing under ``--dry-run``."""
    if dry_run():
        return None
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise StepFailed(f"{folder} is no longer a folder of root's: kept")
    archived = archive_folder(archive_dir, folder, stem) if archive_dir else None
    shutil.rmtree(folder)
    return archived
