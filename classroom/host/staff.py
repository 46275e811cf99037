"""The staff group on the host (SPEC §6.4): who is in it, and what retrieve collected, readable by it.

The group itself is made and deleted like the course group (``host.accounts``, its own
state keys ``staff_group_gid``/``staff_group_creating``); only its listed members are
managed here. The retrieve destination gets a POSIX ACL (``setfacl``, Debian's ``acl``):
the staff group reads and enters it, and default entries pass that on to what is made
in it later; other users, the students among them, get nothing.
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

from .system import dry_run, run, run_account_tool

META = "staff_group"  # the state keys of the group the course made, and its config key


def gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def listed(name: str) -> set[str]:
    """The group's listed members (nobody has the staff group as primary group)."""
    try:
        return set(grp.getgrnam(name).gr_mem)
    except KeyError:
        return set()


def add_member(group: str, username: str) -> None:
    run_account_tool(["gpasswd", "--add", username, "--", group])


def drop_member(group: str, username: str) -> None:
    run_account_tool(["gpasswd", "--delete", username, "--", group])


def acl_entries(staff_gid: int) -> str:
    """The staff group reads and enters (``X``: folders, and files executable already), now
    and in what is made later."""
    return f"g:{staff_gid}:rX,d:g:{staff_gid}:rX"


def has_entry(path: Path, staff_gid: int) -> bool:
    """Whether ``path``'s ACL names the staff group."""
    out = run(["getfacl", "--omit-header", "--numeric", "--", str(path)], changes=False)
    return f"group:{staff_gid}:r-x" in out.stdout.splitlines()


def share_destination(dest: Path, staff_gid: int) -> bool:
    """Let the staff group read what retrieve collected in ``dest``; True the first time.

    The first time the whole tree is done (earlier snapshots too); later only what is
    right in DEST (the users' folders, the manifest, the summaries), whose modes (0700,
    0600) mask the inherited entry: the snapshots under them (0755 folders, 0444 files)
    inherit a working one. Links are never followed (``-P``). Nothing under ``--dry-run``.
    """
    if dry_run() or not dest.is_dir():
        return False
    if not has_entry(dest, staff_gid):
        run(["setfacl", "-R", "-P", "-m", acl_entries(staff_gid), "--", str(dest)])
        return True
    top = [
        str(dest / name)
        for name in sorted(os.listdir(dest))
        if not name.startswith(".") and not (dest / name).is_symlink()
    ]
    if top:
        # -m recomputes the mask, which a 0700 folder or a 0600 file had set to nothing
        run(["setfacl", "-P", "-m", f"g:{staff_gid}:rX", "--", *top])
    return False
