"""What the teacher sees while a command runs: one progress bar at a time on stderr, the
per-student lines printed above it (never over it).

A bar is shown only when stderr is a terminal and the command is not ``-q``; otherwise
the items pass through untouched and only the plain lines are printed. ``rich`` is
imported only when a bar is actually drawn, so ``status`` and ``check`` stay quick.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import click

T = TypeVar("T")

quiet = False  # set by open_course from -q: no bar at all
_shown: Any = None  # the rich Progress on the terminal now, if any


def bars_wanted() -> bool:
    """A bar is drawn only on a terminal, and not with -q."""
    return not quiet and sys.stderr.isatty()


def echo(line: str, *, err: bool = False) -> None:
    """Print one line (stdout, or stderr with ``err``); above the bar while one is shown."""
    if _shown is not None and (err or _same_terminal()):
        _shown.console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        click.echo(line, err=err)


def _same_terminal() -> bool:
    """Does stdout go to the terminal the bar is drawn on? (Not when it is piped.)"""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return sys.stdout.isatty() and (out.st_dev, out.st_ino, out.st_rdev) == (
        err.st_dev,
        err.st_ino,
        err.st_rdev,
    )


def _console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False)


def progress(
    items: Iterable[T],
    label: str,
    length: int | None = None,
    *,
    waiting: Callable[[], str] | None = None,
) -> Iterator[T]:
    """Yield the items; on a terminal, advance a bar ``label  n/N  elapsed`` as each one is
    done (after the caller's work on it). ``waiting()``, if given, is shown after the bar
    (for example who is still awaited). ``length`` lets ``items`` be consumed lazily."""
    global _shown
    if length is None:
        items = list(items)
        length = len(items)
    if length < 2 or not bars_wanted() or _shown is not None:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[waiting]}"),
        console=_console(),
        redirect_stdout=False,
        redirect_stderr=False,
    )
    with bar:
        task = bar.add_task(label, total=length, waiting=waiting() if waiting else "")
        _shown = bar
        try:
            for item in items:
                yield item
                bar.update(task, advance=1, waiting=waiting() if waiting else "")
        finally:
            _shown = None


@contextlib.contextmanager
def working(label: str) -> Iterator[None]:
    """A spinner with ``label`` on a terminal while one long step runs (stopping servers)."""
    global _shown
    if not bars_wanted() or _shown is not None:
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=_console(),
        redirect_stdout=False,
        redirect_stderr=False,
    )
    with bar:
        bar.add_task(label, total=None)
        _shown = bar
        try:
            yield
        finally:
            _shown = None


def awaited(names: Iterable[str], shown: int = 2) -> str:
    """'waiting for ann, bob and 3 more': the ones still awaited (the slowest, as all
    started together), in the order given, for ``progress(waiting=)``."""
    names = list(names)
    if not names:
        return ""
    head = ", ".join(names[:shown])
    more = len(names) - shown
    return f"waiting for {head}" + (f" and {more} more" if more > 0 else "")
