"""Processes: find one again (same pid, start time and uid), a server's tree, a
student's processes, and the one way to stop them (SIGTERM, then SIGKILL, with named
timeouts, as JupyterHub's Spawner does)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable

import psutil

from .system import dry_run

log = logging.getLogger("classroom")

POLITE_TIMEOUT = 10.0  # SIGTERM to the server: jupyter_server's own clean stop (kernels, files)
TERM_TIMEOUT = 5.0  # SIGTERM to whatever of its processes is left (kernels, terminals)
KILL_TIMEOUT = 5.0  # SIGKILL to the rest
UID_KILL_TIMEOUT = 10.0  # kill(-1, SIGKILL) as a removed student, until none of theirs is left
SETTLE_TIMEOUT = 0.5  # for SIGKILLed processes to exit before another round
START_TIME_SLACK = 0.05  # process start times are in clock ticks
JUPYTER_WORDS = ("jupyter", "ipykernel", "ipython")


def _reap(pid: int) -> None:
    """Collect a dead child of ours (exec mode), so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def find_process(
    pid: int | None, start_time: float | None, uid: int | None
) -> psutil.Process | None:
    """The process ``pid`` if it is still the one recorded (same start time and uid) and alive."""
    if not pid or start_time is None or uid is None:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - start_time) > START_TIME_SLACK or proc.uids().real != uid:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            _reap(pid)
            return None
        return proc
    except psutil.Error:
        return None


def server_tree(proc: psutil.Process) -> list[psutil.Process]:
    """The server, its descendants and its session (kernels run in sessions of their own)."""
    uid = proc.uids().real
    found = {proc.pid: proc}
    with contextlib.suppress(psutil.Error):
        for child in proc.children(recursive=True):
            found.setdefault(child.pid, child)
    for other in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error, OSError):
            if (
                other.info["uids"]
                and other.info["uids"].real == uid
                and os.getsid(other.pid) == proc.pid
            ):
                found.setdefault(other.pid, other)
    same_user = []
    for p in found.values():
        with contextlib.suppress(psutil.Error):
            if p.uids().real == uid:
                same_user.append(p)
    return same_user


def _signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            log.debug("%s %d (%s)", signal.Signals(sig).name, p.pid, p.name())
            p.send_signal(sig)  # psutil refuses if the pid was reused


def stop_processes(
    servers: list[psutil.Process],
    extra: Iterable[psutil.Process] = (),
    *,
    polite: float = POLITE_TIMEOUT,
    term: float = TERM_TIMEOUT,
    kill: float = KILL_TIMEOUT,
) -> list[psutil.Process]:
    """Stop servers with their kernels: SIGTERM to each server (its own clean stop), then
    SIGTERM, then SIGKILL to everything of theirs left, and to ``extra``. Each step waits
    for its named timeout at most. Returns what survived (normally nothing).

    The one way the tool stops processes. Under ``--dry-run`` nothing is signalled.
    """
    extra = list(extra)
    if dry_run():
        log.debug("dry run, not stopped: %d server(s), %d other(s)", len(servers), len(extra))
        return []
    everything: dict[int, psutil.Process] = {}
    for proc in servers:
        with contextlib.suppress(psutil.Error):
            for p in server_tree(proc):
                everything.setdefault(p.pid, p)
    for p in extra:
        everything.setdefault(p.pid, p)
    _signal_all(servers, signal.SIGTERM)
    _wait_gone(servers, polite)
    for sig, timeout in ((signal.SIGTERM, term), (signal.SIGKILL, kill)):
        alive = [p for p in everything.values() if _alive(p)]
        if not alive:
            break
        _signal_all(alive, sig)
        _wait_gone(alive, timeout)
    for p in everything.values():
        _reap(p.pid)
    return [p for p in everything.values() if _alive(p)]


def _wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    """Until each has exited (a zombie counts: its parent, not us, may be the one to reap it)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        for p in procs:
            _reap(p.pid)
        if not any(_alive(p) for p in procs):
            return
        time.sleep(delay)
        delay = min(0.2, delay * 1.5)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def other_jupyter(uid: int, exclude: set[int]) -> list[psutil.Process]:
    """The student's Jupyter processes the course did not start (``--all-jupyter``)."""
    found = []
    for p in psutil.process_iter(["uids", "cmdline", "name"]):
        if p.pid in exclude or not p.info["uids"] or p.info["uids"].real != uid:
            continue
        # The name too: a forked server's command line is the fork server's, its name the app's.
        text = " ".join([*(p.info["cmdline"] or []), p.info["name"] or ""]).lower()
        if any(word in text for word in JUPYTER_WORDS):
            found.append(p)
    return found


def running_programs(programs: tuple[str, ...], naming: set[str]) -> list[str]:
    """'PID command line' of each running ``programs`` (by name) with an argument in ``naming``."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        argv = proc.info["cmdline"] or []
        if proc.info["name"] in programs and naming & set(argv):
            found.append(f"{proc.pid} {' '.join(argv)[:200]}")
    return found


def processes_of(uids: set[int]) -> dict[int, list[psutil.Process]]:
    """{uid: every process running as that uid (real, effective or saved)}."""
    found: dict[int, list[psutil.Process]] = {u: [] for u in uids}
    for proc in psutil.process_iter(["uids"]):
        try:
            uids_of = proc.info["uids"]
            if uids_of is None:
                continue
            for uid in {uids_of.real, uids_of.effective, uids_of.saved}:
                if uid in found:
                    found[uid].append(proc)
                    break
        except psutil.Error:
            continue
    return found


def tree_memory(pid: int) -> int | None:
    """Bytes a server's tree (``server_tree``) uses: the sum of each process's unique memory
    (USS; RSS where that cannot be read). None if the process is gone."""
    try:
        procs = server_tree(psutil.Process(pid))
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            try:
                total += p.memory_full_info().uss
            except psutil.AccessDenied:
                total += p.memory_info().rss
    return total


def kill_every_process_of(
    ids: Iterable[tuple[int, int]], timeout: float = UID_KILL_TIMEOUT
) -> dict[int, list[int]]:
    """SIGKILL every process running as each (uid, gid) of ``ids``, whatever it does to
    dodge it; {uid: pids a scan of /proc still finds afterwards} (normally empty lists).

    A scan-then-signal misses a loop that forks and exits (every pid seen is gone by the
    time it is signalled). So a child that has become the uid calls ``kill(-1, SIGKILL)``:
    the kernel signals every process of that uid in one pass that no fork can slip past,
    and a process with SIGKILL pending cannot fork, so a scan of /proc after it is
    conclusive. Rounds repeat while the scan finds one, within ``timeout``. Under
    ``--dry-run`` nothing is signalled.
    """
    todo = dict(ids)
    if 0 in todo:
        raise ValueError("refusing to kill every process of root")
    if dry_run():
        log.debug("dry run, not killed: every process of uid(s) %s", sorted(todo))
        return {uid: [] for uid in todo}
    left: dict[int, list[int]] = {uid: [] for uid in todo}
    deadline = time.monotonic() + timeout
    # Always a first round: a scan that finds nothing proves nothing (the loop's pids
    # come and go).
    while todo:
        for uid, gid in todo.items():
            _kill_all_as(uid, gid)
        left = _live_pids(set(left))
        settle = time.monotonic() + SETTLE_TIMEOUT
        while any(left.get(uid) for uid in todo) and time.monotonic() < settle:
            time.sleep(0.01)  # SIGKILLed processes take a moment to exit
            left = _live_pids(set(left))
        todo = {uid: gid for uid, gid in todo.items() if left.get(uid)}
        if time.monotonic() > deadline:
            break
    for uid in todo:  # what a process of that uid could not signal (a set-uid program's)
        for pid in left[uid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    if todo:
        time.sleep(0.1)
        left = _live_pids(set(left))
    for uid, pids in left.items():
        if pids:
            log.warning("uid %d: processes survived SIGKILL: %s", uid, pids)
    return left


def _kill_all_as(uid: int, gid: int) -> None:
    """One ``kill(-1, SIGKILL)`` from a child that has become ``uid`` (and ``gid``)."""
    pid = os.fork()
    if pid == 0:  # the child: system calls only, then _exit
        code = 1
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)  # every process of uid but this one
            code = 0
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def _live_pids(uids: set[int]) -> dict[int, list[int]]:
    """{uid: pids in /proc running as it (real, effective or saved), not zombies}."""
    found: dict[int, list[int]] = {uid: [] for uid in uids}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{entry}/status", os.O_RDONLY)
        except OSError:
            continue
        try:
            status = os.read(fd, 4096)
        except OSError:
            continue
        finally:
            os.close(fd)
        head, _, rest = status.partition(b"\nUid:")
        state = head.partition(b"\nState:")[2].split(None, 1)[:1]
        if state in ([b"Z"], [b"X"]):
            continue
        for uid in {int(x) for x in rest.split(None, 4)[:3] if x.isdigit()} & uids:
            found[uid].append(int(entry))
    return found
