"""Errors that reach the teacher as a message and an exit status, never a traceback."""

from __future__ import annotations

import click

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


class ClassroomError(click.ClickException):
    """Base of every error the tool reports to the teacher."""

    exit_code = EXIT_USAGE


class InvalidInput(ClassroomError):
    """Bad usage, config or roster: nothing was changed (exit 2).

    Carries every problem found, each already prefixed with file and line.
    """

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[str] | str, heading: str = "nothing was changed"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        text = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{heading}:\n{text}" if heading else text)


class Refused(ClassroomError):
    """Refused before any change: not root, locked, declined, foreign account (exit 3)."""

    exit_code = EXIT_REFUSED


class StepFailed(Exception):
    """One student's step failed; the message says why and what to do."""


class CommandFailedForAll(ClassroomError):
    """A step every student depends on failed (the course group, say): exit 1, each fails."""

    exit_code = EXIT_PARTIAL
