"""The portal in the background: started detached from the terminal, watched over by a small
supervisor that starts it again when it dies, recorded in the course state.

``start`` runs ``notebooks portal CONFIG --supervise`` in a session of its own (``setsid``:
no controlling terminal, so closing the teacher's SSH session does not reach it), stdin
from /dev/null, stdout and stderr appended to ``STATE_DIR/portal.log``, no descriptor of
the launching process. The supervisor (``supervise``) runs ``notebooks portal CONFIG``
as its child and starts it again after it exits, unless it was told to stop (SIGTERM,
SIGINT) or the portal keeps dying at once (``GIVE_UP`` times in a row).
The record (``portal`` in the state's meta table) is the supervisor's pid and start time,
and the portal's address: ``running`` finds it again only while all still match.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from .processes import find_process, stop_processes
from .state import State
from .system import SAFE_PATH, spawn

log = logging.getLogger("classroom")

LOG_FILE = "portal.log"
META_KEY = "portal"
QUICK_EXIT = 10.0  # seconds: a portal that dies sooner than this "died at once"
GIVE_UP = 5  # quick deaths in a row after which the supervisor stops trying
MAX_DELAY = 30.0  # seconds between restarts, at most
STOP_TIMEOUT = 10.0  # seconds the portal gets to stop when the supervisor is told to
BOOT = "import sys; sys.path.insert(0, sys.argv.pop(1)); from classroom.cli import main; main()"


@dataclass(frozen=True)
class Record:
    """The background portal as the course state records it."""

    pid: int
    start_time: float
    url: str

    def process(self) -> psutil.Process | None:
        """The supervisor, if it still runs and is still the one recorded (root's)."""
        return find_process(self.pid, self.start_time, 0)


def command(*args: str) -> list[str]:
    """``notebooks ARGS`` as this very code runs it (the package's folder first on sys.path)."""
    package_parent = str(Path(__file__).resolve().parent.parent.parent)
    return [sys.executable, "-c", BOOT, package_parent, *args]


def log_path(state_dir: Path) -> Path:
    return Path(state_dir) / LOG_FILE


def recorded(state: State) -> Record | None:
    """The recorded background portal, whether it still runs or not."""
    raw = state.meta(META_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return Record(int(data["pid"]), float(data["start_time"]), str(data["url"]))
    except (ValueError, KeyError, TypeError):
        return None


def running(state: State) -> Record | None:
    """The background portal if it runs now, else None."""
    record = recorded(state)
    return record if record is not None and record.process() is not None else None


def record(state: State, pid: int, url: str) -> Record:
    start_time = psutil.Process(pid).create_time()
    entry = Record(pid, start_time, url)
    with state.transaction():
        state.set_meta(META_KEY, json.dumps({"pid": pid, "start_time": start_time, "url": url}))
    return entry


def forget(state: State) -> None:
    with state.transaction():
        state.set_meta(META_KEY, None)


def start(config: Path, state_dir: Path) -> int | None:
    """Start the supervisor in the background; its pid (None under --dry-run)."""
    fd = os.open(log_path(state_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        proc = spawn(
            command("portal", str(config), "--supervise"),
            env={"PATH": SAFE_PATH, "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            cwd="/",
        )
    finally:
        os.close(fd)
    return None if proc is None else proc.pid


def stop(entry: Record) -> bool:
    """Stop the supervisor and its portal (SIGTERM, then SIGKILL); True once both are gone."""
    proc = entry.process()
    if proc is None:
        return True
    # SIGTERM to the supervisor (it stops its portal), then to whatever of theirs is left
    return not stop_processes([proc], polite=STOP_TIMEOUT + 2)


# --- the supervisor (runs as ``notebooks portal CONFIG --supervise``) -------------------------


def supervise(argv: Sequence[str]) -> int:
    """Run ``argv`` (the portal) until told to stop; start it again each time it exits."""
    stopping = False
    child: subprocess.Popen | None = None

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            with contextlib.suppress(OSError):
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    quick, delay = 0, 1.0
    while not stopping:
        started = time.monotonic()
        # the portal stays in the supervisor's session: a SIGTERM to the group reaches both
        child = spawn(argv, env=dict(os.environ), stdin=subprocess.DEVNULL, start_new_session=False)
        assert child is not None  # the supervisor never runs under --dry-run
        _note(f"portal started (pid {child.pid})")
        code = _wait(child)
        if stopping:
            break
        ran = time.monotonic() - started
        quick = quick + 1 if ran < QUICK_EXIT else 0
        if quick >= GIVE_UP:
            _note(f"portal exited with status {code} {quick} times at once; giving up")
            return 1
        delay = min(MAX_DELAY, delay * 2) if quick else 1.0
        _note(f"portal exited with status {code}; starting it again in {delay:g} s")
        deadline = time.monotonic() + delay
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
    if child is not None and child.poll() is None:
        try:
            child.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    _note("supervisor stopped")
    return 0


def _wait(child: subprocess.Popen) -> int:
    while True:
        try:
            return child.wait()
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue


def _note(text: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} supervisor: {text}", flush=True)
