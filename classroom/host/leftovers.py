"""What a removed student leaves in the shared temporary folders (``/tmp``, ``/var/tmp``,
``/dev/shm``): found and deleted by root, through directory descriptors, never following
a link and never leaving the folder's file system.

Run once the student's processes are gone and the account deleted: what they owned
would otherwise belong to whoever gets their uid next.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from .system import dry_run

log = logging.getLogger("classroom")

SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")
MAX_DEPTH = 64  # folders deeper than this are left (and logged)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def delete_owned(
    uids: Iterable[int], gids: Iterable[int] = (), folders: Iterable[str] = SHARED_TMP
) -> int:
    """Delete every entry owned by one of ``uids`` under ``folders`` (a folder of theirs
    with all it holds); the number of entries deleted. Under ``--dry-run``, nothing.

    Only folders those users could pass through (with their groups ``gids``) are looked
    into: nothing of theirs can be made where they cannot go (a 0700 folder of root's
    with thousands of entries is skipped at once).
    """
    uids = set(uids)
    reach = Reach(uids, set(gids))
    if not uids or dry_run():
        return 0
    if 0 in uids:
        raise ValueError("refusing to delete root's files")
    deleted = 0
    for top in folders:
        try:
            fd = os.open(top, DIR_FLAGS)
        except OSError:
            continue
        try:
            deleted += _sweep(fd, top, reach, os.fstat(fd).st_dev, 0)
        finally:
            os.close(fd)
    if deleted:
        log.info("deleted %d entries of uid(s) %s in %s", deleted, sorted(uids), ", ".join(folders))
    return deleted


@dataclass(frozen=True)
class Reach:
    """The removed users and their groups: whose entries go, which folders they could enter."""

    uids: set[int]
    gids: set[int]

    def can_enter(self, st: os.stat_result) -> bool:
        if st.st_uid in self.uids:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid in self.gids:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)


def _sweep(dir_fd: int, where: str, reach: Reach, dev: int, depth: int) -> int:
    """In the folder ``dir_fd``: delete what they own, look into the others' folders
    they could enter."""
    deleted = 0
    for name in _names(dir_fd):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if st.st_dev != dev:
            continue  # a mount point: another file system
        if st.st_uid in reach.uids:
            deleted += _delete(dir_fd, name, st, dev, depth)
        elif stat.S_ISDIR(st.st_mode) and reach.can_enter(st):
            if depth >= MAX_DEPTH:
                log.warning(
                    "%s/%s: deeper than %d folders, not looked into", where, name, MAX_DEPTH
                )
                continue
            sub = _open_dir(dir_fd, name, st)
            if sub is None:
                continue
            try:
                deleted += _sweep(sub, f"{where}/{name}", reach, dev, depth + 1)
            finally:
                os.close(sub)
    return deleted


def _delete(dir_fd: int, name: str, st: os.stat_result, dev: int, depth: int) -> int:
    """Delete ``name`` in ``dir_fd`` (a folder with everything in it, whoever's it is)."""
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
            return 1
        return 0
    sub = _open_dir(dir_fd, name, st)
    if sub is None:
        return 0
    deleted = 0
    try:
        for child in _names(sub):
            try:
                cst = os.stat(child, dir_fd=sub, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if cst.st_dev != dev or depth >= MAX_DEPTH:
                continue
            deleted += _delete(sub, child, cst, dev, depth + 1)
    finally:
        os.close(sub)
    try:
        os.rmdir(name, dir_fd=dir_fd)
        deleted += 1
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY):
            raise
    return deleted


def _open_dir(dir_fd: int, name: str, st: os.stat_result) -> int | None:
    """Open the folder that was looked at (same inode), never a link put in its place."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        return None
    return fd


def _names(dir_fd: int) -> list[str]:
    try:
        return os.listdir(dir_fd)
    except OSError:
        return []
