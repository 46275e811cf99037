"""Forked workers: one protocol for running a function in a child and getting its result.

A worker is a forked child that keeps no descriptor of its parent's but its result
pipe (and those it is told to keep), runs ``func(*args)`` and writes one JSON object
to the pipe: ``{"ok": result}`` or ``{"error": message}``. While it works it may call
``beat()``, which writes a dot, so that the parent knows it is not stuck; a worker
silent for ``idle_timeout`` seconds is killed. ``fork_map`` runs many workers (send,
retrieve); ``as_user`` runs one that has become a student and returns its result.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import pwd
import resource
import select
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import StepFailed
from .identity import become as become_student
from .identity import student_env
from .interrupts import STOP_SIGNALS

log = logging.getLogger("classroom")

# Each student's part of a command has an overall deadline (SPEC §6.11 rule 14): after it
# that student fails and the others go on, whatever the student does to their own worker
# (SIGSTOP it, feed it a trickle). At least STUDENT_DEADLINE seconds, plus the time the data
# it may move takes at SLOWEST_RATE. The teacher (root) may set $CLASSROOM_STUDENT_DEADLINE
# (seconds) to give the whole deadline instead; sudo's env_reset keeps it from anyone else.
STUDENT_DEADLINE = 300.0
SLOWEST_RATE = 4 << 20  # bytes per second
DEADLINE_ENV = "CLASSROOM_STUDENT_DEADLINE"


def student_deadline(nbytes: int = 0, base: float | None = None) -> float:
    """The overall deadline, in seconds, of one student's part of a command that moves up to
    ``nbytes`` bytes (send: the material; retrieve: ``max_total_size``): ``base`` (default
    STUDENT_DEADLINE) plus the data's time, or ``$CLASSROOM_STUDENT_DEADLINE`` when that is
    set to a positive number of seconds."""
    try:
        override = float(os.environ.get(DEADLINE_ENV, ""))
    except ValueError:
        override = 0.0
    if override > 0:
        return override
    return (STUDENT_DEADLINE if base is None else base) + nbytes / SLOWEST_RATE


_beat_fd: int | None = None
_last_beat = 0.0


def beat() -> None:
    """In a worker: tell the parent it is still making progress (at most twice a second)."""
    global _last_beat
    now = time.monotonic()
    if _beat_fd is not None and now - _last_beat > 0.5:
        _last_beat = now
        with contextlib.suppress(OSError):
            os.write(_beat_fd, b".")


def become(user: pwd.struct_passwd, *, umask: int = 0o077) -> None:
    """In a worker: become ``user`` for good (uid, gid, groups), with a clean environment and cwd /."""
    become_student(user)
    os.environ.clear()
    os.environ.update(student_env(user))
    os.umask(umask)
    os.chdir("/")


def close_fds_except(keep: set[int]) -> None:
    """In a child: close every inherited descriptor but ``keep``; 0, 1, 2 become /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        if std not in keep:
            os.dup2(null, std)
    keep = keep | {0, 1, 2}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def raise_fd_limit(needed: int) -> None:
    """Make room for ``needed`` more open descriptors (the source files are kept open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def workers_for(n_tasks: int) -> int:
    """How many workers to run at once: enough to keep the disks and CPUs busy."""
    wanted = os.environ.get("CLASSROOM_WORKERS", "")
    if wanted.isdigit() and int(wanted) > 0:
        return min(n_tasks, int(wanted))
    return max(1, min(n_tasks, max(8, 2 * (os.cpu_count() or 2)), 16))


def fork_child(body: Callable[[], None], keep_fds: set[int]) -> int:
    """Fork a child that runs ``body()`` with only ``keep_fds`` open, then exits; return its pid.

    The child never returns into the parent's code: it exits 0 when ``body`` returns
    and 1 on any exception.
    """
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        gc.disable()  # the child only reads the parent's objects: no copying of the heap
        for sig in STOP_SIGNALS:  # the parent's "stop between steps" handlers are not ours
            signal.signal(sig, signal.SIG_DFL)
        close_fds_except(keep_fds)
        body()
    except BaseException:  # noqa: BLE001 - a child never returns into the parent
        code = 1
    finally:
        os._exit(code)


def _run_and_report(wfd: int, func: Callable[..., Any], args: tuple) -> None:
    """The worker's body: ``func(*args)``, its result or error as JSON on ``wfd``."""
    global _beat_fd
    _beat_fd = wfd
    try:
        payload: dict[str, Any] = {"ok": func(*args)}
    except Exception as exc:  # reported to the parent, never as a traceback
        payload = {"error": str(exc) or type(exc).__name__}
        if log.isEnabledFor(logging.DEBUG):
            payload["trace"] = traceback.format_exc()
    view = memoryview(json.dumps(payload).encode())
    while view:
        view = view[os.write(wfd, view) :]


def _payload(raw: bytes) -> dict:
    """The worker's JSON (after its beats), or {} when it wrote none."""
    raw = raw.lstrip(b".")
    try:
        payload = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    if "trace" in payload:
        log.debug("%s", payload.pop("trace"))
    return payload if "ok" in payload or "error" in payload else {}


@dataclass
class _Worker:
    pid: int
    key: str
    chunks: list[bytes] = field(default_factory=list)
    last: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)


class _Pool:
    """The running workers, by the read end of their pipe."""

    def __init__(self, idle_timeout: float, keep_fds: Sequence[int], deadline: float | None):
        self.idle_timeout = idle_timeout
        self.deadline = deadline
        self.keep_fds = set(keep_fds)
        self.running: dict[int, _Worker] = {}
        self.exited: list[int] = []  # pids that reported: reaped without waiting for them
        self.poller = select.poll()

    def start(self, key: str, func: Callable[..., Any], args: tuple) -> None:
        rfd, wfd = os.pipe()
        pid = fork_child(lambda: _run_and_report(wfd, func, args), {wfd, *self.keep_fds})
        os.close(wfd)
        self.running[rfd] = _Worker(pid, key)
        self.poller.register(rfd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def _forget(self, fd: int) -> _Worker:
        self.poller.unregister(fd)
        os.close(fd)
        return self.running.pop(fd)

    def wait(self) -> Iterator[tuple[str, dict]]:
        """Read what the workers wrote for up to a second; yield those that ended or were stopped."""
        for fd, _event in self.poller.poll(1000):
            worker = self.running[fd]
            data = os.read(fd, 1 << 16)
            worker.last = time.monotonic()
            if data:
                worker.chunks.append(data)
                continue
            self._forget(fd)
            payload = _payload(b"".join(worker.chunks))
            if payload:
                self.exited.append(worker.pid)
            else:
                _, status = os.waitpid(worker.pid, 0)
                payload = {"error": f"the worker process died (status {status})", "status": status}
            yield worker.key, payload
        now = time.monotonic()
        for fd, worker in list(self.running.items()):
            stopped = self._overdue(worker, now)
            if stopped is not None:
                _kill(worker.pid)
                self._forget(fd)
                yield worker.key, stopped
        self.exited[:] = [pid for pid in self.exited if os.waitpid(pid, os.WNOHANG)[0] == 0]

    def _overdue(self, worker: _Worker, now: float) -> dict | None:
        """The error payload of a worker to stop now (silent too long, or past its deadline)."""
        if self.deadline is not None and now - worker.started > self.deadline:
            why = f"not done within {self.deadline:.0f} s: stopped (the others went on)"
            return {"error": why, "timeout": self.deadline}
        if now - worker.last > self.idle_timeout:
            why = f"no progress for {self.idle_timeout:.0f} s: stopped"
            return {"error": why, "timeout": self.idle_timeout}
        return None

    def close(self) -> None:
        for fd, worker in list(self.running.items()):
            _kill(worker.pid)
            with contextlib.suppress(OSError):
                self._forget(fd)
        for pid in self.exited:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def fork_map(
    tasks: Sequence[tuple[str, Callable[..., Any], Any]],
    *,
    workers: int,
    idle_timeout: float = 300.0,
    keep_fds: Sequence[int] = (),
    deadline: float | None = None,
) -> Iterator[tuple[str, dict]]:
    """Run each ``(key, func, args)`` as ``func(*args)`` in its own worker.

    ``args`` may be a function returning them, called just before the fork. At most
    ``workers`` run at once. Yields ``(key, payload)`` as each one ends: ``{"ok": result}``
    (the JSON-able return value) or ``{"error": message}`` (with ``"timeout"`` when it
    was stopped for making no progress for ``idle_timeout`` seconds or for running longer
    than ``deadline`` seconds, ``"status"`` when it died without a word). A stopped worker
    frees its place at once: the others never wait for it. The workers inherit
    ``keep_fds`` and no other descriptor.
    """
    pending = list(tasks)
    pending.reverse()
    freeze = len(pending) > 1
    if freeze:
        # The children only read the parent's objects: keep the collector from walking (and
        # so copying) the whole inherited heap in each of them.
        gc.collect()
        gc.freeze()
    pool = _Pool(idle_timeout, keep_fds, deadline)
    try:
        while pending or pool.running:
            while pending and len(pool.running) < max(1, workers):
                key, func, args = pending.pop()
                # built now, so the parent holds one job's data at a time
                pool.start(key, func, args() if callable(args) else args)
            yield from pool.wait()
    finally:
        pool.close()
        if freeze:
            gc.unfreeze()


def _as(user: pwd.struct_passwd, func: Callable[..., Any], args: tuple) -> Any:
    become(user)
    return func(*args)


def as_user(
    user: pwd.struct_passwd, func: Callable[..., Any], *args: Any, timeout: float = 600
) -> Any:
    """Run ``func(*args)`` in a worker that has become ``user``; return its JSON-able result.

    The worker has the student's uid, gid and groups, a clean environment, umask
    077, cwd ``/`` and no inherited descriptor but its result pipe. An exception in
    it is raised here as ``StepFailed`` with its message; a worker still running
    after ``timeout`` seconds without progress (a student's FIFO, say) is killed
    and reported.
    """
    (result,) = as_users([(user, func, args)], timeout=timeout)
    if isinstance(result, StepFailed):
        raise result
    return result


def as_users(
    jobs: Sequence[tuple[pwd.struct_passwd, Callable[..., Any], tuple]],
    *,
    timeout: float = 600,
    workers: int = 16,
) -> list[Any]:
    """Run each ``(user, func, args)`` as ``as_user`` does, up to ``workers`` at once.

    ``func`` never reports progress, so ``timeout`` is each job's overall deadline: one
    student who stops their worker delays no one past it. Returns, in the order of
    ``jobs``, each result, or the ``StepFailed`` that ``as_user`` would have raised.
    """
    tasks = [(str(i), _as, (user, func, args)) for i, (user, func, args) in enumerate(jobs)]
    results: list[Any] = [None] * len(jobs)
    for key, payload in fork_map(tasks, workers=workers, idle_timeout=timeout):
        user = jobs[int(key)][0]
        results[int(key)] = _as_result(user, payload, timeout)
    return results


def _as_result(user: pwd.struct_passwd, payload: dict, timeout: float) -> Any:
    if "ok" in payload:
        return payload["ok"]
    if "timeout" in payload:
        return StepFailed(
            f"as {user.pw_name}: gave up after {timeout:.0f} s "
            "(the helper was stopped, or hung on a FIFO or a file)"
        )
    if "status" in payload:
        return StepFailed(
            f"as {user.pw_name}: the helper process failed (status {payload['status']})"
        )
    return StepFailed(f"as {user.pw_name}: {payload['error']}")
