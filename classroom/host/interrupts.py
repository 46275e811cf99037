"""Ctrl-C, SIGTERM and a hang-up during a command: finish the step in progress, then stop.

``catching()`` (around a whole command) turns each of these signals into
``KeyboardInterrupt``. Inside ``shielded()`` -- a step that must never be cut half-way:
an external command, an account being made -- the signal is held, and raised once the
step is over, so the command stops between steps and can say what it did. Signals
reach Python's main thread only: a step run in another thread is never cut.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "a hang-up (SIGHUP)"}

_depth = 0  # shielded steps the main thread is in
_held: int | None = None  # a signal that came during a shielded step
_last: int | None = None  # the signal that stopped the command


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _say(text: str) -> None:
    """To stderr, never failing (after a hang-up the terminal is gone)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _handler(signum: int, frame: object) -> None:
    global _held, _last
    _last = signum
    if _depth > 0:
        if _held is None:
            _say(f"{NAMES.get(signum, 'signal')}: finishing the current step, then stopping")
        _held = signum
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """Around a command: SIGINT, SIGTERM and SIGHUP stop it (between steps, see ``shielded``)."""
    if not _main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(sig, handler)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A step that is never cut: a stop signal during it is raised (``KeyboardInterrupt``)
    when it ends. Nested steps hold the signal until the outermost one ends."""
    global _depth, _held
    if not _main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _held is not None:
            _held = None
            raise KeyboardInterrupt


def stopped_by() -> str:
    """What stopped the command, for its last message: 'Ctrl-C', 'SIGTERM', ..."""
    return NAMES.get(_last, "Ctrl-C") if _last is not None else "Ctrl-C"


@contextlib.contextmanager
def blocked_for_children() -> Iterator[None]:
    """Children started inside inherit the stop signals blocked: a Ctrl-C or SIGTERM sent to
    the whole group never cuts ``useradd`` or ``chpasswd`` half-way (SIGKILL still does)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
