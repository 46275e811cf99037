"""The one place that runs external commands and changes identity.

Every external command is an argument list (never a shell), logged quoted,
with any secret fed on stdin. (``workers.as_user`` runs a function in a child
process that has dropped to a student's uid, gid and groups.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import StepFailed
from ..core.secret import Secret
from . import interrupts
from .identity import new_session_keyring, popen_identity

log = logging.getLogger("classroom")

LOGIN_DEFS = Path("/etc/login.defs")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


_dry_run = False


def set_dry_run(on: bool) -> None:
    """Dry run for this process: every change made through this module is logged, not made."""
    global _dry_run
    _dry_run = on


def dry_run() -> bool:
    """True under ``--dry-run``: the chokepoints (``run``, ``spawn``, workers, writes) change nothing."""
    return _dry_run


class CommandFailed(StepFailed):
    def __init__(self, argv: Sequence[str], returncode: int, output: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output.strip()
        detail = f": {self.output.splitlines()[-1]}" if self.output else ""
        super().__init__(f"{shlex.join(self.argv)} failed with status {returncode}{detail}")


def run(
    argv: Sequence[str],
    *,
    stdin: Secret | str | None = None,
    check: bool = True,
    timeout: float | None = 300,
    env: dict[str, str] | None = None,
    user: pwd.struct_passwd | None = None,
    cwd: str | None = None,
    changes: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (a list, no shell) and return it completed; log the command and its output.

    Under ``--dry-run`` a command that ``changes`` something is logged and not run (it
    "succeeds" with no output); read-only probes pass ``changes=False`` and really run.

    The command gets a clean environment (PATH, LANG) plus ``env`` (never a secret);
    with ``user``, it runs as that user (uid, gid and groups only).
    A ``Secret`` given as ``stdin`` is fed to the command and never logged.
    Raises ``CommandFailed`` (with the output) when ``check`` and the status is not 0.
    """
    argv = [str(a) for a in argv]
    if changes and _dry_run:
        log.debug("dry run, not run: %s", shlex.join(argv))
        return subprocess.CompletedProcess(argv, 0, "", "")
    log.debug("run: %s%s", shlex.join(argv), " (secret on stdin)" if stdin is not None else "")
    data = stdin.reveal() if isinstance(stdin, Secret) else stdin
    extra = env or {}
    if extra:
        log.debug("  with %s", " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items()))
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **extra}
    # Never cut half-way (a useradd killed between /etc/passwd and /etc/group leaves half an
    # account): the child has the stop signals blocked, and a stop signal that reaches us
    # meanwhile waits until the child is done (interrupts.shielded).
    with interrupts.shielded():
        try:
            with interrupts.blocked_for_children():
                child = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=cwd,
                    close_fds=True,
                    start_new_session=True,  # on a timeout, the whole group goes, not just argv[0]
                    **popen_identity(user),
                )
        except FileNotFoundError as exc:
            raise CommandFailed(argv, 127, f"{argv[0]}: command not found") from exc
        except subprocess.SubprocessError as exc:  # the change of identity failed in the child
            raise CommandFailed(argv, 126, f"cannot start it as {_who(user)}: {exc}") from None
        stdout, stderr = _communicate(child, argv, data, timeout)
    proc = subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)
    out = (proc.stdout or "") + (proc.stderr or "")
    if out.strip():
        log.debug("  -> %s", out.strip().replace("\n", "\n     "))
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, out)
    return proc


def _communicate(
    child: subprocess.Popen, argv: list[str], data: str | None, timeout: float | None
) -> tuple[str, str]:
    """The child's output once it has exited; killed (its whole group) only on a timeout.

    A ``KeyboardInterrupt`` (outside ``interrupts.catching``) waits for the child, then
    goes on.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    interrupted = False
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            stdout, stderr = child.communicate(data, timeout=left)
            break
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            raise CommandFailed(argv, -1, f"timed out after {timeout} s") from None
        except KeyboardInterrupt:
            interrupted = True
            data = None  # communicate() does not send the input twice
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise
    if interrupted:
        raise KeyboardInterrupt
    return stdout, stderr


def spawn(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    user: pwd.struct_passwd | None = None,
    before: Callable[[], None] | None = None,
    **popen: Any,
) -> subprocess.Popen | None:
    """Start a long-running child (a student's server): logged, no shell, its own session
    (unless ``start_new_session=False``, as for the portal under its supervisor).

    ``env`` is the child's whole environment; ``popen`` passes stdio, cwd and umask.
    ``before`` runs in the child, still as root, before it becomes ``user`` (joining the
    student's cgroup). Under ``--dry-run`` nothing is started and the answer is None.
    """
    argv = [str(a) for a in argv]
    who = f" as {user.pw_name}" if user else ""
    if _dry_run:
        log.debug("dry run, not started%s: %s", who, shlex.join(argv))
        return None
    log.debug("spawn%s: %s", who, shlex.join(argv))
    ids = popen_identity(user)
    if before is not None and ids:
        popen["preexec_fn"] = _then_become(before, ids["user"], ids["group"], ids["extra_groups"])
        ids = {}
    elif before is not None:
        popen["preexec_fn"] = before
    try:
        popen.setdefault("start_new_session", True)
        return subprocess.Popen(argv, env=env, close_fds=True, **ids, **popen)
    except subprocess.SubprocessError as exc:  # the change of identity failed in the child
        raise OSError(f"cannot start it as {_who(user)}: {exc}") from None


def _who(user: pwd.struct_passwd | None) -> str:
    return user.pw_name if user else "root"


def _then_become(
    before: Callable[[], None], uid: int, gid: int, groups: list[int]
) -> Callable[[], None]:
    """A ``preexec_fn``: ``before()`` as root, then the ids ``Popen(user=...)`` would set
    (computed in the parent: no lookup in the child), checked, and a session keyring of
    the user's own (as ``popen_identity``'s)."""

    def run() -> None:
        before()
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        if set(os.getresuid()) != {uid} or set(os.getresgid()) != {gid}:
            raise PermissionError("the user and group ids did not stick")
        new_session_keyring()

    return run


def run_account_tool(
    argv: Sequence[str],
    *,
    stdin: Secret | str | None = None,
    check: bool = True,
    attempts: int = 40,
) -> subprocess.CompletedProcess[str]:
    """``run`` for useradd, usermod, chpasswd, userdel, groupadd, groupdel.

    These fail at once when another program holds the lock on /etc/passwd or
    /etc/group; that is retried for a while instead of failing the student.
    """
    import random

    for attempt in range(attempts):
        proc = run(argv, stdin=stdin, check=False)
        text = (proc.stdout or "") + (proc.stderr or "")
        locked = "cannot lock" in text or "try again later" in text
        if proc.returncode != 0 and locked and attempt < attempts - 1:
            time.sleep(0.05 + random.random() * 0.25)
            continue
        if check and proc.returncode != 0:
            raise CommandFailed(list(argv), proc.returncode, text)
        return proc
    raise AssertionError("unreachable")


def is_root() -> bool:
    return os.geteuid() == 0


def sudo_caller() -> pwd.struct_passwd | None:
    """The account that ran ``sudo`` (or the current one when not under sudo)."""
    name = os.environ.get("SUDO_USER")
    try:
        if name:
            return pwd.getpwnam(name)
        return pwd.getpwuid(os.getuid())
    except KeyError:
        return None


@dataclass(frozen=True)
class LoginDefs:
    uid_min: int = 1000
    uid_max: int = 60000
    encrypt_method: str = "SHA512"
    values: tuple[tuple[str, str], ...] = ()

    def get(self, key: str, default: str | None = None) -> str | None:
        return dict(self.values).get(key, default)


def login_defs(path: Path = LOGIN_DEFS) -> LoginDefs:
    """Read the UID range and password hashing policy of ``/etc/login.defs``."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) == 2:
            values[parts[0]] = parts[1].strip()

    def num(key: str, default: int) -> int:
        try:
            return int(values.get(key, default))
        except ValueError:
            return default

    return LoginDefs(
        uid_min=num("UID_MIN", 1000),
        uid_max=num("UID_MAX", 60000),
        encrypt_method=values.get("ENCRYPT_METHOD", "SHA512").upper(),
        values=tuple(sorted(values.items())),
    )
