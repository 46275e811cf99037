"""What every command shares: the loaded course, the lock, the report it prints."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import pwd
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from ..core import roster as roster_mod
from ..core import settings as settings_mod
from ..core.errors import EXIT_OK, EXIT_PARTIAL, InvalidInput, Refused
from ..core.roster import Roster, Student
from ..core.settings import Settings
from ..host import system
from ..host.state import Lock, State, ensure_private_dir
from ..host.system import is_root
from . import terminal

log = logging.getLogger("classroom")
T = TypeVar("T")
EXIT_INTERRUPTED = 130  # as a shell reports a command stopped by Ctrl-C


@dataclass
class Report:
    """Per-student outcome lines and the one summary line of a command."""

    command: str
    dry_run: bool = False
    quiet: bool = False
    outcomes: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)  # who the command is for
    partial: dict[str, str] = field(default_factory=dict)  # done so far, not yet reported
    course_changes: list[str] = field(default_factory=list)  # not a student's: "group created"

    def changed(self, text: str) -> None:
        """A change made for the whole course (printed as a note)."""
        self.course_changes.append(text)
        self.note(text)

    def expect(self, usernames: Iterable[str]) -> None:
        """The students the command is for: those it stops before are named 'not done'."""
        self.selected = list(usernames)

    def progress(self, username: str, what: str) -> None:
        """A change made for ``username`` that is not the whole of their part yet."""
        self.partial[username] = what

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

    def stopped(self, by: str) -> int:
        """The command was stopped (``by``: 'Ctrl-C', ...) between steps: say what was done
        and what was not; exit status 130."""
        done = {u: o for u, o in self.outcomes.items() if o not in ("unchanged", "failed")}
        part = {u: w for u, w in self.partial.items() if u not in self.outcomes}
        left = [u for u in self.selected if u not in self.outcomes and u not in part]
        lines = [f"{self.command} stopped by {by} before it finished."]
        if not done and not part and not self.course_changes:
            lines.append("  done: nothing was changed")
        lines += [f"  done: {what}" for what in self.course_changes]
        for what in sorted(set(done.values())):
            names = [u for u, o in done.items() if o == what]
            lines.append(f"  done: {len(names)} {what}: {', '.join(names)}")
        for what in sorted(set(part.values())):
            names = [u for u, w in part.items() if w == what]
            lines.append(f"  done: {len(names)} {what}: {', '.join(names)}")
        if self.failures:
            lines.append(f"  failed: {len(self.failures)}: {', '.join(self.failures)}")
        unchanged = [u for u, o in self.outcomes.items() if o == "unchanged"]
        if unchanged:
            lines.append(f"  unchanged: {len(unchanged)}")
        if left:
            lines.append(f"  not done: {len(left)}: {', '.join(left)}")
        lines.append(f"Run {self.command} again to finish.")
        with contextlib.suppress(OSError):  # after a hang-up there is no terminal
            click.echo("\n".join(lines), err=True)
        return EXIT_INTERRUPTED

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
    reports: list[Report] = field(default_factory=list)

    @property
    def dry_run(self) -> bool:
        """``--dry-run``: the chokepoints change nothing (see ``host.system.dry_run``)."""
        return system.dry_run()

    def students(self, only: tuple[str, ...] = (), *, dropped: bool = False) -> list[Student]:
        """The roster's students (``--only``: those named), in roster order.

        With ``dropped`` also the accounts the course created that the roster no longer
        has (status, shutdown and remove work on them: SPEC 6.10). ``--only`` names are
        matched ignoring case; an unknown name is an error with a did-you-mean, and so is
        a dropped student's name when ``dropped`` is not asked for.
        """
        listed = list(self.roster)
        gone = self.dropped()
        everyone = listed + gone if dropped else listed
        if not only:
            return everyone
        by_name = {st.username.lower(): st for st in everyone}
        gone_names = {st.username.lower() for st in gone}
        problems, chosen = [], []
        for name in only:
            key = name.lower()
            if key in by_name:
                if by_name[key] not in chosen:
                    chosen.append(by_name[key])
            elif key in gone_names:
                problems.append(
                    f"--only {name}: no longer in the roster {self.roster.path}; the course "
                    f"still has the account (status shows it; remove --only {key} removes it)"
                )
            else:
                known = [st.username for st in listed + gone]
                hint = difflib.get_close_matches(key, known, n=1)
                mean = f" (did you mean {hint[0]}?)" if hint else ""
                problems.append(f"--only {name}: not in the roster {self.roster.path}{mean}")
        if problems:
            raise InvalidInput(problems)
        return chosen

    def dropped(self) -> list[Student]:
        """Accounts the course created that the roster no longer has, by name."""
        listed = set(self.roster.names())
        return [
            Student(username, name=_gecos(username), line=0)
            for username in sorted(self.state.accounts())
            if username not in listed
        ]

    def report(self, command: str) -> Report:
        report = Report(command, dry_run=self.dry_run, quiet=self.quiet)
        self.reports.append(report)
        return report

    def stopped(self, by: str) -> int:
        """After a stop signal: what the command did and did not do (exit status 130)."""
        if self.reports:
            return self.reports[-1].stopped(by)
        with contextlib.suppress(OSError):
            click.echo(f"Stopped by {by} before anything was changed.", err=True)
        return EXIT_INTERRUPTED

    def close(self) -> None:
        if self.lock:
            self.lock.release()
            self.lock = None
        self.state.close()


def _gecos(username: str) -> str:
    try:
        return pwd.getpwnam(username).pw_gecos.split(",")[0]
    except KeyError:
        return ""


def load(config_path) -> tuple[Settings, Roster]:
    """Load and validate config and roster; raise ``InvalidInput`` on any problem."""
    settings = settings_mod.load(config_path)
    roster = roster_mod.load(settings.roster, settings.roster_columns)
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

    ``precheck(settings)`` runs before anything is created (raise to refuse); ``--only``
    names are checked once the state is open (a dropped student's name is one).
    """
    settings, roster = load(config_path)
    if only:  # a name neither the roster nor the course knows: refused before anything else
        peek = State.peek(settings.state_dir)
        try:
            Course(settings, roster, peek).students(only, dropped=True)
        finally:
            peek.close()
    system.set_dry_run(dry_run)
    terminal.quiet = quiet
    if precheck is not None:
        precheck(settings)
    if changes and not dry_run:
        if not is_root():
            raise Refused(
                f"{command} changes accounts and files: run it as root "
                f"(sudo notebooks {command} ...)"
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
    return peek_course(settings, roster, yes=yes, quiet=quiet)


def peek_course(settings: Settings, roster: Roster, **options: bool) -> Course:
    """The course as a command that changes nothing sees it: the state opened read-only
    (or an empty stand-in), no lock."""
    state = State.peek(settings.state_dir)
    # Only root sees every state: without root, finding none proves nothing.
    readable = state.path is not None or (
        is_root() and not (settings.state_dir / State.FILE).exists()
    )
    return Course(settings, roster, state, state_readable=readable, **options)


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
