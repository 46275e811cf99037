"""Becoming a student: the one clean environment and the one change of identity.

Every process that acts as a student (a Jupyter server in either start mode, a worker
of send or retrieve, ``system.as_user``) gets its identity and environment from here,
so they cannot drift apart.

Standard library only: the fork server runs as ``python -I forkserver.py``, without
the ``classroom`` package, and loads this file by its path; an exec-mode server is
started through it as a script (``launcher_argv``): root runs it, it becomes the
student and executes the server, so no process of root's waits on one of the student's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import sys
from typing import Any, NoReturn

# keyctl(2)'s system call number, by machine (there is no libc wrapper without libkeyutils).
_KEYCTL = {
    "x86_64": 250,
    "aarch64": 219,
    "arm64": 219,
    "riscv64": 219,
    "loongarch64": 219,
    "i386": 288,
    "i686": 288,
    "armv7l": 311,
    "armv6l": 311,
    "ppc64le": 280,
    "ppc64": 280,
    "s390x": 280,
}
KEYCTL_JOIN_SESSION_KEYRING = 1
_libc = ctypes.CDLL(None, use_errno=True)


def server_python() -> str:
    """The Python the students' servers run with: the tool's own (readable by students)."""
    return sys.executable


def student_env(pw: pwd.struct_passwd) -> dict[str, str]:
    """The student's whole environment, nothing of root's: HOME, USER, LOGNAME, SHELL, PATH, LANG.

    PATH starts with the servers' Python's folder, so kernels and terminals find
    ``python`` and ``jupyter`` there, whichever way the process was started.
    """
    bindir = os.path.dirname(server_python())
    return {
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "SHELL": pw.pw_shell or "/bin/sh",
        "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
    }


def become(pw: pwd.struct_passwd) -> None:
    """In a child process: become ``pw`` for good (groups, gid, uid), checked.

    Raises ``PermissionError`` for root, or when the ids did not all stick or root
    could be regained; the caller must then exit, never carry on.
    """
    if pw.pw_uid == 0:
        raise PermissionError("refusing to act as root on behalf of a student")
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PermissionError("setuid(0) succeeded after dropping privileges")
    if set(os.getresuid()) != {pw.pw_uid} or set(os.getresgid()) != {pw.pw_gid}:
        raise PermissionError(f"{pw.pw_name}'s user and group ids did not stick")
    new_session_keyring()


def new_session_keyring() -> None:
    """Leave the inherited session keyring (root's: Kerberos tickets, ecryptfs and AFS
    keys of the teacher's login) for a new, empty one owned by the current user.

    Call it after the change of identity (``become`` does; ``popen_identity`` has it
    run in the child), before any student code. Raises ``OSError`` when it fails; a
    kernel without keyrings (or a sandbox that forbids them all) has nothing to leak.
    """
    machine = os.uname().machine
    number = _KEYCTL.get(machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"keyctl: unknown machine {machine!r}")
    if _libc.syscall(number, KEYCTL_JOIN_SESSION_KEYRING, None) == -1:
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EPERM):
            raise OSError(code, f"cannot join a new session keyring: {os.strerror(code)}")


def popen_identity(pw: pwd.struct_passwd | None) -> dict[str, Any]:
    """``Popen`` arguments that start a program as ``pw``: its uid, gid and groups only,
    and a session keyring of its own."""
    if pw is None:
        return {}
    if pw.pw_uid == 0:
        raise PermissionError("refusing to act as root on behalf of a student")
    return {
        "user": pw.pw_uid,
        "group": pw.pw_gid,
        "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid),
        # runs in the child after the ids changed, before the program: it must not
        # inherit the session keyring of the root process that started it
        "preexec_fn": new_session_keyring,
    }


def launcher_argv(pw: pwd.struct_passwd, argv: list[str]) -> list[str]:
    """The command, run as root, that becomes ``pw`` and then executes ``argv``."""
    script = os.path.abspath(__file__)
    return [server_python(), "-I", "-S", script, pw.pw_name, str(pw.pw_uid), "--", *argv]


def exec_as(pw: pwd.struct_passwd, argv: list[str]) -> NoReturn:
    """Become ``pw`` (``become``), then execute ``argv`` in their home with their
    environment. Raises ``OSError`` or ``PermissionError`` when it cannot."""
    become(pw)
    os.chdir(pw.pw_dir)
    os.execve(argv[0], argv, student_env(pw))


def main(args: list[str]) -> int:
    """``identity.py USERNAME UID -- PROGRAM ARGS...``: ``exec_as`` the account, if its
    uid is still UID. Only returns (status 1, why on stderr) when that fails."""
    if len(args) < 4 or args[2] != "--" or not args[1].isdigit():
        sys.stderr.write("usage: identity.py USERNAME UID -- PROGRAM [ARGS...]\n")
        return 2
    name, uid, argv = args[0], int(args[1]), args[3:]
    try:
        pw = pwd.getpwnam(name)
        if pw.pw_uid != uid:
            raise PermissionError(f"{name} has uid {pw.pw_uid}, not {uid}: refused")
        exec_as(pw, argv)
    except (OSError, KeyError) as exc:
        sys.stderr.write(f"classroom: cannot start {name}'s server: {exc}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# --- what ``ps`` shows of a child that became the student without a new exec ---------------


def _overwrite_block(start_field: int, block: bytes) -> None:
    """Write ``block`` over one of our start-up blocks (argv or environment), padded with NULs.

    A forked child keeps its parent's start-up blocks (its live environment is elsewhere):
    ``ps e`` and ``/proc/PID/cmdline|environ`` would show the parent's. They are written
    over in place (no privilege needed). Cosmetic: any problem leaves them as they were.
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        start, end = int(fields[start_field]), int(fields[start_field + 1])
        size = end - start
        if start <= 0 or len(block) >= size or size > 1 << 20:
            return
        ctypes.memmove(start, block + b"\0" * (size - len(block)), size)
    except Exception:  # noqa: BLE001 - cosmetic only
        return


def show_environ(env: dict[str, str]) -> None:
    """``env`` as ``/proc/PID/environ`` (env_start, env_end: fields 50, 51 in proc(5)).

    Only after ``os.environ.clear()``: nothing points into the old strings any more.
    """
    _overwrite_block(47, b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))


def show_cmdline(argv: list[str]) -> None:
    """``argv`` as ``/proc/PID/cmdline`` (arg_start, arg_end: fields 48, 49 in proc(5))."""
    _overwrite_block(45, b"".join(a.encode() + b"\0" for a in argv))


def set_name(name: str) -> None:
    """Name the process (``ps -o comm``, 15 bytes at most)."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:  # noqa: BLE001 - cosmetic only
        return
