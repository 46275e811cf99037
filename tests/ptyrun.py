"""Run ``notebooks.py`` under a pseudo-terminal, as a teacher at a terminal does."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks.py"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


@dataclass
class PtyResult:
    returncode: int
    raw: str  # everything the terminal received, escape codes included

    @property
    def text(self) -> str:
        """The output without escape codes and carriage returns."""
        return ANSI.sub("", self.raw)


def run_pty(
    *args: str,
    interrupt_when: str | None = None,
    timeout: float = 300,
    columns: int = 120,
) -> PtyResult:
    """Run ``notebooks.py ARGS`` with stdin, stdout and stderr on one pty; with
    ``interrupt_when``, send SIGINT once that text has appeared (as Ctrl-C does)."""
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "NOTEBOOKS_CONFIG"}
    env.update(TERM="xterm-256color", COLUMNS=str(columns), LINES="40")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, str(NOTEBOOKS), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    interrupted = False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            closed = False
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every child has closed the terminal
                    data = b""
                chunks.append(data)
                closed = not data
            if (
                interrupt_when
                and not interrupted
                and interrupt_when in ANSI.sub("", b"".join(chunks).decode(errors="replace"))
            ):
                proc.send_signal(signal.SIGINT)
                interrupted = True
            if proc.poll() is not None and (closed or not ready):
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(b"".join(chunks).decode(errors="replace"))
    finally:
        os.close(master)
    return PtyResult(proc.wait(), b"".join(chunks).decode(errors="replace"))
