"""The log writer: a small root process that writes one server's output into its log.

A student's server (and every kernel it starts) writes its stdout and stderr into a
pipe; this process, not the student's, reads the pipe and appends to the root-owned
log, at most ``limit`` bytes per start (a note says where it stopped; the rest is read
and dropped, so the server never blocks). The student holds only the pipe's end: no
descriptor of root's, nothing to truncate, no disk of root's to fill (SPEC §6.11
rule 13). It ends when the last holder of the pipe does.

Standard library only: the fork server starts it too (``spawn_writer``), and it runs
as ``python -I -S logwriter.py LIMIT`` with the pipe on stdin and the log on stdout.
"""

from __future__ import annotations

import os
import signal
import sys

LIMIT = 10 * 1024 * 1024  # bytes of one start's output kept in the log
CHUNK = 65536


def argv(python: str, limit: int = LIMIT) -> list[str]:
    """The command that runs the writer with ``python``."""
    return [python, "-I", "-S", os.path.abspath(__file__), str(limit)]


def spawn_writer(python: str, log_fd: int, limit: int = LIMIT) -> tuple[int, int]:
    """Start a writer appending to ``log_fd``; (its pid, the pipe's write end).

    For a single-threaded caller that is not a Popen user (the fork server's child):
    the writer runs in a session of its own, cwd ``/``, with an empty environment and
    no descriptor but the pipe, the log and /dev/null.
    """
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawn(
            python,
            argv(python, limit),
            {},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read_end, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
            setsid=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return pid, write_end


def copy(limit: int, source: int = 0, log: int = 1) -> None:
    """Append what comes from ``source`` to ``log`` until EOF, at most ``limit`` bytes."""
    left = limit
    while chunk := _read(source):
        if left <= 0:
            continue
        part = chunk[:left]
        left -= len(part)
        try:
            _write_all(log, part)
            if left <= 0:
                _write_all(log, _note(limit))
        except OSError:  # a full disk: drop the rest rather than stall the server
            left = 0


def _note(limit: int) -> bytes:
    mb = limit / (1024 * 1024)
    return (
        f"\n[classroom: this start wrote more than {mb:g} MB; the rest was not logged]\n".encode()
    )


def _read(fd: int) -> bytes:
    while True:
        try:
            return os.read(fd, CHUNK)
        except InterruptedError:
            continue


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(args: list[str]) -> int:
    if len(args) != 1 or not args[0].isdigit():
        sys.stderr.write("usage: logwriter.py LIMIT  (pipe on stdin, log on stdout)\n")
        return 2
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.chdir("/")
    copy(int(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
