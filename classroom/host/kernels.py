"""The course's kernel server (``kernel_mode = fork``), as launch and shutdown see it.

One per course, started by launch as root (``kernelserver.py``), so the whole class shares
its pre-imported modules copy-on-write; it outlives launch, and shutdown stops it (and
the kernels it forked) once no server of the course runs. The students' servers reach it
through a Unix socket in ``RUN_BASE/NAME/kernels/`` (root's, group: the course's, 0750).
The course state keeps the least that finds it again: pid and start time.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..core.launchplan import kernel_socket, provisioners_installed
from ..core.settings import Settings
from . import kernelserver
from .identity import server_python
from .processes import find_process, stop_processes
from .server import Server
from .serverlogs import log_dir
from .state import State
from .system import dry_run, spawn

RECORD = "kernelserver"  # the course state's meta key
READY_POLL = 0.1  # seconds between looks at the socket while it imports


def log_path(settings: Settings) -> Path:
    return log_dir(settings) / "kernelserver.log"


def home(settings: Settings) -> Path:
    """The kernel server's HOME: empty, root's; what imports compute from it stays there."""
    return settings.state_dir / "kernelserver-home"


@dataclass
class KernelServer:
    """The course's kernel server: the least state that finds its process again."""

    pid: int
    start_time: float

    @classmethod
    def recorded(cls, state: State) -> KernelServer | None:
        value = state.meta(RECORD)
        if not value:
            return None
        with contextlib.suppress(ValueError, KeyError, TypeError):
            record = json.loads(value)
            return cls(int(record["pid"]), float(record["start_time"]))
        return None

    def save(self, state: State) -> None:
        if dry_run():
            return
        with state.transaction():
            state.set_meta(RECORD, json.dumps({"pid": self.pid, "start_time": self.start_time}))

    def process(self) -> psutil.Process | None:
        """Its process, if it still runs and is still the one recorded."""
        return find_process(self.pid, self.start_time, 0)

    @classmethod
    def start(cls, settings: Settings) -> KernelServer | None:
        """Start it (it imports in the background: ``wait_ready``); None under ``--dry-run``."""
        socket_path = kernel_socket(settings)
        gid = grp.getgrnam(settings.group).gr_gid
        _ensure_folder(socket_path.parent.parent, 0o711, 0)
        _ensure_folder(socket_path.parent, 0o750, gid)
        _ensure_folder(home(settings), 0o700, 0)
        log_fd = os.open(
            log_path(settings), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600
        )
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(home(settings)),
            kernelserver.ENV_PAD: "-" * kernelserver.ENV_PAD_SIZE,
        }
        argv = [
            server_python(),
            os.path.abspath(kernelserver.__file__),
            str(socket_path),
            settings.group,
            *settings.preload,
            kernelserver.ARGV_PAD,  # room for each kernel's command line
        ]
        try:
            proc = spawn(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                cwd="/",
                umask=0o077,
            )
        finally:
            os.close(log_fd)
        if proc is None:
            return None
        return cls(proc.pid, psutil.Process(proc.pid).create_time())

    def wait_ready(self, settings: Settings, timeout: float) -> str | None:
        """None once it accepts connections; else why not (it stopped, or timed out)."""
        deadline = time.monotonic() + timeout
        path = str(kernel_socket(settings))
        while True:
            if self.process() is None:
                return f"it stopped while importing (see {log_path(settings)})"
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
                return None
            if time.monotonic() >= deadline:
                return f"it was not ready within {timeout:g} s (see {log_path(settings)})"
            time.sleep(READY_POLL)

    def stop(self) -> bool:
        """Stop it; it stops the kernels it forked. True once it is gone."""
        proc = self.process()
        return proc is None or not stop_processes([proc])


def ensure(settings: Settings, state: State, note: Callable[[str], None]) -> KernelServer | None:
    """The course's running kernel server, started if need be (``kernel_mode = fork``).

    A running one is kept (its kernels with it): a changed ``preload`` applies after
    shutdown. None when kernels start by exec.
    """
    if settings.kernel_mode != "fork":
        return None
    if not provisioners_installed():
        note(
            "kernel_mode = fork: the classroom package is not installed in the servers' Python "
            "(pip install it): kernels start by exec"
        )
        return None
    running = KernelServer.recorded(state)
    if running is not None and running.process() is not None:
        return running
    try:
        server = KernelServer.start(settings)
    except (OSError, KeyError) as exc:
        note(f"the kernel server could not start ({exc}): kernels start by exec")
        return None
    if server is not None:
        server.save(state)
    return server


def stop_if_idle(settings: Settings, state: State) -> bool:
    """Stop the kernel server once no server of the course runs; True if it was stopped."""
    running = KernelServer.recorded(state)
    if running is None:
        return False
    if any(s.process() is not None for s in Server.all_recorded(state)):
        return False
    stopped = running.stop()
    if stopped and not dry_run():
        with state.transaction():
            state.set_meta(RECORD, None)
        folder = kernel_socket(settings).parent
        for empty in (folder, folder.parent):  # the course's folder may hold others' sockets
            with contextlib.suppress(OSError):
                empty.rmdir()
    return stopped


def _ensure_folder(path: Path, mode: int, gid: int) -> None:
    """``path``: a folder of root's with ``mode`` and group ``gid``; never a link."""
    with contextlib.suppress(FileExistsError):
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.mkdir(mode=mode)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a folder")
    if st.st_uid != 0 or st.st_gid != gid:
        os.chown(path, 0, gid, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode, follow_symlinks=False)
