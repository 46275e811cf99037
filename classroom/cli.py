"""The command line: thin. Each command parses options, calls one library function, echoes."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .commands.course import Course, open_course
from .core.errors import EXIT_USAGE, ClassroomError, Refused
from .core.settings import Settings, default_config_path
from .host import interrupts

log = logging.getLogger("classroom")

# Set once a command's work has returned (its summary printed): a Ctrl-C after that, while
# it closes, must not be told as "nothing was changed".
_finished_with: int | None = None

CONFIG_HELP = "CONFIG is the course's INI file (default: $NOTEBOOKS_CONFIG, else ./notebooks.cfg)."


def config_argument(func: Callable) -> Callable:
    return click.argument(
        "config", required=False, type=click.Path(dir_okay=False, path_type=Path)
    )(func)


def change_options(func: Callable) -> Callable:
    """--dry-run, --only, --yes: taken by every command that changes something."""
    func = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")(func)
    func = click.option(
        "--only",
        multiple=True,
        metavar="USERNAME",
        help="Only this student (repeatable); must be in the roster.",
    )(func)
    func = click.option(
        "--dry-run",
        "-n",
        is_flag=True,
        help="Print what would be done; change nothing (no root needed).",
    )(func)
    return func


def only_option(func: Callable) -> Callable:
    return click.option(
        "--only", multiple=True, metavar="USERNAME", help="Only this student (repeatable)."
    )(func)


def resolve_config(config: Path | None) -> Path:
    return config or default_config_path()


class Obj:
    verbose = False
    quiet = False
    handler: logging.Handler | None = None

    def set(self, verbose: bool = False, quiet: bool = False) -> None:
        """-v / -q, given before or after the command."""
        self.verbose = self.verbose or verbose
        self.quiet = self.quiet or quiet
        if self.handler is not None:
            self.handler.setLevel(logging.DEBUG if self.verbose else logging.WARNING)


def verbosity_options(func: Callable) -> Callable:
    """-v/--verbose and -q/--quiet after the command too (``notebooks status CONFIG -q``)."""

    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            ctx.ensure_object(Obj).set(**{param.name: True})

    for flags, name, text in (
        (("-q", "--quiet"), "quiet", "Only failures and the summary line."),
        (("-v", "--verbose"), "verbose", "Show every command run, and tracebacks."),
    ):
        func = click.option(
            *flags, name, is_flag=True, expose_value=False, callback=remember, help=text
        )(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="notebooks")
@click.option("-v", "--verbose", is_flag=True, help="Show every command run, and tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only failures and the summary line.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """Run a class on Jupyter from this host: accounts, material, servers, grading.

    \b
    The term, in order:
      setup     create the students' accounts and passwords (and a printable handout)
      send      copy the tutorial material into every student's home
      launch    start one Jupyter server per student, and the portal page
      shutdown  stop the students' servers
      retrieve  collect the students' work for grading (every version kept)
      return    hand each student's feedback back into their home
      remove    archive and delete the accounts at the end of term
      status    what exists and what runs;   check   is the config and roster valid

    Commands that change something need root (sudo), except with --dry-run.
    """
    obj = ctx.ensure_object(Obj)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    obj.handler = handler
    obj.set(verbose=verbose, quiet=quiet)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)


def course_command(
    *,
    changes: bool = True,
    precheck: Callable[[Settings], None] | None = None,
    options_check: Callable[[dict[str, Any]], None] | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., int]], click.Command]:
    """A command run on the opened course: CONFIG, then --dry-run, --only, --yes if it ``changes``.

    The decorated function is called as ``func(course, only=..., **its own options)`` and
    returns the exit status; opening the course (after ``options_check(options)`` and
    ``precheck(settings)``, before anything is created), closing it and exiting are the
    same for every command.
    """

    def decorate(func: Callable[..., int]) -> click.Command:
        @functools.wraps(func)
        @click.pass_context
        def command(ctx: click.Context, config, only=(), dry_run=False, yes=False, **options):
            if options_check is not None:
                options_check(options)
            # Ctrl-C, SIGTERM, a hang-up: the step in progress finishes, then the command
            # says what it did and did not do (host.interrupts).
            with interrupts.catching():
                course = open_course(
                    resolve_config(config),
                    ctx.command.name,
                    changes=changes,
                    dry_run=dry_run,
                    only=tuple(only),
                    yes=yes,
                    quiet=ctx.obj.quiet,
                    precheck=precheck,
                )
                global _finished_with
                try:
                    code = func(course, only=tuple(only), **options)
                    _finished_with = code
                except KeyboardInterrupt:
                    code = course.stopped(interrupts.stopped_by())
                finally:
                    course.close()
            ctx.exit(code)

        command = change_options(command) if changes else only_option(command)
        command = verbosity_options(command)
        return cli.command(name, epilog=CONFIG_HELP)(config_argument(command))

    return decorate


def setup_precheck(settings: Settings) -> None:
    from .commands import setup

    setup.precheck(settings)


@course_command(precheck=setup_precheck)
@click.option("--reset-passwords", is_flag=True, help="Give existing students new passwords too.")
@click.option(
    "--handout",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the printable handout (HTML) to this file.",
)
def setup(course: Course, **options: Any) -> int:
    """Create the course group and the students' accounts with generated passwords.

    Existing course accounts are brought in line and keep their password
    unless --reset-passwords. New passwords go to STATE_DIR/credentials.csv and
    a printable STATE_DIR/handout.html (root only).
    """
    from .commands import setup

    return setup.setup(course, **options)


@course_command()
@click.option(
    "--force", is_flag=True, help="Overwrite edited files (the student's version is backed up)."
)
@click.option(
    "--source", type=click.Path(file_okay=False, path_type=Path), help="Send this folder instead."
)
@click.option("--folder", metavar="NAME", help="Into HOME/NAME instead of [material] folder.")
@click.option(
    "--shared", is_flag=True, help="Into the class's shared folder instead of into every home."
)
def send(course: Course, shared: bool, **options: Any) -> int:
    """Copy the tutorial material into every student's home, never losing an edit.

    Files the student edited are kept; the new version is written beside them
    and listed as a conflict (--force overwrites after a backup). --shared copies
    it once into the class's shared folder ([shared] folder) instead.
    """
    if shared:
        from .commands.shared import send_shared

        return send_shared(course, **options)
    from .commands.send import send as send_material

    return send_material(course, **options)


@course_command(name="return")
@click.option(
    "--force", is_flag=True, help="Overwrite edited files (the student's version is backed up)."
)
@click.option(
    "--source",
    type=click.Path(file_okay=False, path_type=Path),
    help="Return DIR/USERNAME/ from this folder instead of [return] source.",
)
@click.option("--folder", metavar="NAME", help="Into HOME/NAME instead of [return] folder.")
def return_(course: Course, **options: Any) -> int:
    """Hand each student's feedback (DIR/USERNAME/) back into their home, by send's rules.

    A student with no folder in DIR is unchanged; edits are kept as with send.
    """
    from .commands.returns import return_feedback

    return return_feedback(course, **options)


def launch_options(options: dict[str, Any]) -> None:
    if options.get("detach") and (options.get("no_portal") or options.get("stop_on_exit")):
        raise click.UsageError(
            "--detach runs the portal in the background: it takes neither --no-portal "
            "nor --stop-on-exit"
        )


@course_command(options_check=launch_options)
@click.option("--no-portal", is_flag=True, help="Start the servers, then exit (no portal).")
@click.option("--stop-on-exit", is_flag=True, help="Stop the servers too when the portal stops.")
@click.option(
    "--detach",
    is_flag=True,
    help="Run the portal in the background (restarted if it dies; shutdown stops it).",
)
def launch(
    course: Course, only: tuple[str, ...], no_portal: bool, stop_on_exit: bool, detach: bool
) -> int:
    """Start one Jupyter server per student, then run the portal until Ctrl-C.

    Ctrl-C stops the portal and leaves the servers running (unless --stop-on-exit).
    With --detach the portal runs in the background instead, detached from the terminal
    (what a teacher on SSH wants): a second launch --detach finds it running.
    """
    from .commands.launch import launch as launch_servers

    return launch_servers(
        course, only=only, portal=not no_portal, stop_on_exit=stop_on_exit, detach=detach
    )


@course_command(changes=False)
@click.option("--supervise", is_flag=True, hidden=True)
def portal(course: Course, only: tuple[str, ...], supervise: bool) -> int:
    """Run only the portal, in the foreground (what a systemd unit runs; see README).

    The students' servers are started by launch and left alone here; SIGTERM or
    Ctrl-C stops the portal.
    """
    from .commands import portal as portal_command

    if supervise:
        return portal_command.supervise(course.settings.config_file)
    return portal_command.serve(course)


@course_command()
@click.option(
    "--all-jupyter", is_flag=True, help="Also stop Jupyter processes the course did not start."
)
def shutdown(course: Course, **options: Any) -> int:
    """Stop every student's Jupyter server and its kernels."""
    from .commands.shutdown import shutdown as shutdown_servers

    return shutdown_servers(course, **options)


def deadline_value(ctx: click.Context, param: click.Parameter, value: str | None):
    """--deadline as a datetime, checked before the course is opened."""
    from .core.retrieverules import parse_deadline

    return parse_deadline(value) if value else None


@course_command()
@click.option(
    "--deadline",
    metavar='"YYYY-MM-DD HH:MM"',
    callback=deadline_value,
    help="Mark files the student changed after it as late (a date alone: the end of that day).",
)
def retrieve(course: Course, **options: Any) -> int:
    """Collect every student's work into DESTINATION/USERNAME/TIMESTAMP/ (every version kept)."""
    from .commands.retrieve import retrieve as collect

    return collect(course, **options)


@course_command()
def remove(course: Course, **options: Any) -> int:
    """Archive and delete the students' accounts and homes (asks first unless --yes)."""
    from .commands import remove

    return remove.remove(course, **options)


@course_command(changes=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one object per student.")
@click.option("--watch", is_flag=True, help="A live table, every 2 s until Ctrl-C.")
def status(course: Course, **options: Any) -> int:
    """Show each student's account, server, last send and last retrieve."""
    from .commands import status

    return status.status(course, **options)


@cli.command(epilog=CONFIG_HELP)
@config_argument
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@verbosity_options
@click.pass_context
def check(ctx: click.Context, config: Path | None, as_json: bool) -> None:
    """Check the config, the roster and this host; change nothing (no root needed)."""
    from .commands import check

    ctx.exit(check.check(resolve_config(config), as_json=as_json))


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``notebooks.py`` and the ``notebooks`` console script."""
    verbose = "-v" in (argv or sys.argv) or "--verbose" in (argv or sys.argv)
    try:
        code = cli.main(args=argv, prog_name="notebooks.py", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C at a question (before any change), or late
        if _finished_with is not None:  # the command had done its work: its summary stands
            with contextlib.suppress(OSError):
                click.echo(
                    "Interrupted after the command finished: its summary above stands.", err=True
                )
            sys.exit(130)
        click.echo("Aborted: nothing was changed.", err=True)
        sys.exit(Refused.exit_code)
    except click.ClickException as exc:  # our domain errors are click exceptions too
        exc.show()
        own = isinstance(exc, ClassroomError)
        sys.exit(exc.exit_code if own or exc.exit_code not in (1, 2) else EXIT_USAGE)
    except KeyboardInterrupt:  # before the command began its work, or while it closed
        with contextlib.suppress(OSError):
            click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:  # last resort: a message, not a traceback, unless -v
        if verbose:
            raise
        click.echo(f"Error: {type(exc).__name__}: {exc} (run with -v for details)", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


@cli.command(epilog=CONFIG_HELP)
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.argument("outdir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Choice(["jupyterhub", "z2jh"]),
    help="jupyterhub: jupyterhub_config.py for a hub on a host; z2jh: values.yaml for the Helm chart.",
)
@verbosity_options
@click.pass_context
def export(ctx, config, outdir, target):
    """Write the class as a JupyterHub (or Zero to JupyterHub) configuration into OUTDIR.

    \b
    notebooks.py export CONFIG --to jupyterhub|z2jh OUTDIR
    Needs no root and changes nothing on the host; never writes a password.
    Exporting again overwrites only the files it writes.
    """
    from .commands import export as export_command

    if outdir is None:  # one argument: it is OUTDIR, the config comes from the default
        config, outdir = None, config
    if outdir is None:
        raise click.UsageError("give the folder to export into: export CONFIG --to TARGET OUTDIR")
    ctx.exit(export_command.export(resolve_config(config), target, outdir))
