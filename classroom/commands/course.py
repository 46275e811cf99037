"""What every command shares: the loaded course, the lock, the report it prints."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from ..core import roster as roster_mod
from ..core import settings as settings_mod
from ..core.errors import EXIT_OK, EXIT_PARTIAL, Refused
from ..core.roster import Roster, Student
from ..core.settings import Settings
from ..host import system
from ..host.state import Lock, State, ensure_private_dir
from ..host.system import is_root
from . import terminal

log = logging.getLogger("classroom")
T = TypeVar("T")


@dataclass
class Report:
    """Per-student outcome lines and the one summary line of a command."""

    command: str
    dry_run: bool = False
    quiet: bool = False
    outcomes: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def done(self, username: str, outcome: str, detail: str = "") -> None:
        """``username`` changed (``outcome`` is e.g. 'created'); print one line."""
        self.outcomes[username] = outcome
        if not self.quiet:
            tail = f" ({detail})" if detail else ""
            would = ""
            if self.dry_run:
                would = "would be " if _participle(outcome) else "would "
            terminal.echo(f"  {username}: {would}{outcome}{tail}")

    def unchanged(self, username: str, detail: str = "") -> None:
        self.outcomes[username] = "unchanged"
        if detail and not self.quiet:
            terminal.echo(f"  {username}: unchanged ({detail})")

    def failed(self, username: str, reason: str) -> None:
        self.outcomes[username] = "failed"
        self.failures[username] = reason
        terminal.echo(f"  {username}: FAILED: {reason}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        if not self.quiet:
            terminal.echo(text)

    def summary(self) -> str:
        counts = Counter(self.outcomes.values())
        would = "would be " if self.dry_run else ""
        parts = [
            f"{n} {would}{what}"
            for what, n in counts.items()
            if what not in ("unchanged", "failed")
        ]
        parts += [f"{counts['unchanged']} unchanged", f"{counts['failed']} failed"]
        head = f"{self.command} (dry run, nothing changed)" if self.dry_run else self.command
        tail = ""
        if not self.dry_run and not self.failures and set(counts) <= {"unchanged"}:
            tail = " (nothing to do)"
        return f"{head}: {', '.join(parts)}{tail}"

    def finish(self) -> int:
        if self.failures:
            click.echo(f"{len(self.failures)} student(s) failed:", err=True)
            for user, reason in self.failures.items():
                click.echo(f"  {user}: {reason}", err=True)
        click.echo(self.summary())
        return EXIT_PARTIAL if self.failures else EXIT_OK


IRREGULAR_PARTICIPLES = ("sent", "made", "kept", "set", "run", "begun", "shown", "done")


def _participle(outcome: str) -> bool:
    """'created', 'sent', 'kept beside': read as 'would be ...' in a dry run."""
    first = outcome.split(" ", 1)[0]
    return first.endswith(("ed", "ing")) or first in IRREGULAR_PARTICIPLES


def progress(
    items: Iterable[T], label: str, length: int | None = None, **options: Any
) -> Iterator[T]:
    """The items, with a progress bar on a terminal (see ``terminal.progress``)."""
    return terminal.progress(items, label, length, **options)


@dataclass
class Course:
    """The validated config and roster, the state and (for changes) the lock.

    ``state_readable`` is False when this user could not read a course state (not
    root): ``state`` is then an empty stand-in, and an account in the course group
    is taken for the course's (a dry run or ``status`` only).
    """

    settings: Settings
    roster: Roster
    state: State
    state_readable: bool = True
    yes: bool = False
    quiet: bool = False
    lock: Lock | None = None

    @property
    def dry_run(self) -> bool:
        """``--dry-run``: the chokepoints change nothing (see ``host.system.dry_run``)."""
        return system.dry_run()

    def students(self, only: tuple[str, ...] = ()) -> list[Student]:
        return self.roster.select(only)

    def report(self, command: str) -> Report:
        return Report(command, dry_run=self.dry_run, quiet=self.quiet)

    def close(self) -> None:
        if self.lock:
            self.lock.release()
            self.lock = None
        self.state.close()


def load(config_path, *, only: tuple[str, ...] = ()) -> tuple[Settings, Roster]:
    """Load and validate config and roster (and ``--only``); raise ``InvalidInput`` on any problem."""
    settings = settings_mod.load(config_path)
    roster = roster_mod.load(settings.roster, settings.roster_columns)
    roster.select(only)
    for warning in roster.warnings:
        click.echo(f"warning: {warning}", err=True)
    return settings, roster


def open_course(
    config_path,
    command: str,
    *,
    changes: bool,
    dry_run: bool = False,
    only: tuple[str, ...] = (),
    yes: bool = False,
    quiet: bool = False,
    precheck: Callable[[Settings], None] | None = None,
) -> Course:
    """Everything checked at the boundary, once: config, roster, root, state folder, lock.

    ``precheck(settings)`` runs before anything is created (raise to refuse).
    """
    settings, roster = load(config_path, only=only)
    system.set_dry_run(dry_run)
    terminal.quiet = quiet
    if precheck is not None:
        precheck(settings)
    if changes and not dry_run:
        if not is_root():
            raise Refused(
                f"{command} changes accounts and files: run it as root (sudo notebooks.py {command} ...)"
            )
        # The lock comes first: a second command must be told who holds the course,
        # not stumble on the database the first one is writing.
        ensure_private_dir(settings.state_dir)
        lock = Lock(settings.state_dir, command)
        lock.acquire()
        try:
            state = State.open(settings.state_dir)
            attach_log_file(settings)
        except BaseException:
            lock.release()
            raise
        log.info(
            "%s started by %s (pid %d)", command, os.environ.get("SUDO_USER", "root"), os.getpid()
        )
        return Course(settings, roster, state, yes=yes, quiet=quiet, lock=lock)
    state = State.peek(settings.state_dir)
    # Only root sees every state: without root, finding none proves nothing.
    readable = state.path is not None or (
        is_root() and not (settings.state_dir / State.FILE).exists()
    )
    return Course(settings, roster, state, state_readable=readable, yes=yes, quiet=quiet)


def attach_log_file(settings: Settings) -> None:
    """Full detail (every command run, its output; never a password) to STATE_DIR/classroom.log."""
    path = settings.state_dir / "classroom.log"
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == str(path):
            return
    old = os.umask(0o077)
    try:
        handler = logging.FileHandler(path, encoding="utf-8")
    finally:
        os.umask(old)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
