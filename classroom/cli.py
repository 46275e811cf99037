"""The command line: thin. Each command parses options, calls one library function, echoes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from . import __version__
from .commands.course import open_course
from .core.errors import EXIT_USAGE, ClassroomError, Refused
from .core.settings import default_config_path

log = logging.getLogger("classroom")

CONFIG_HELP = "CONFIG is the course's INI file (default: $NOTEBOOKS_CONFIG, else ./notebooks.cfg)."


def config_argument(func):
    return click.argument(
        "config", required=False, type=click.Path(dir_okay=False, path_type=Path)
    )(func)


def change_options(func):
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


def resolve_config(config: Path | None) -> Path:
    return config or default_config_path()


class Obj:
    verbose = False
    quiet = False


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
      remove    archive and delete the accounts at the end of term
      status    what exists and what runs;   check   is the config and roster valid

    Commands that change something need root (sudo), except with --dry-run.
    """
    obj = ctx.ensure_object(Obj)
    obj.verbose, obj.quiet = verbose, quiet
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)


def perform(ctx: click.Context, config, command: str, action, *, changes: bool, **options) -> None:
    """Open the course (config, roster, root, lock), run ``action(course)``, exit with its status."""
    if "only" in options:
        options["only"] = tuple(options["only"])
    course = open_course(
        resolve_config(config), command, changes=changes, quiet=ctx.obj.quiet, **options
    )
    try:
        code = action(course)
    finally:
        course.close()
    ctx.exit(code)


@cli.command(epilog=CONFIG_HELP)
@config_argument
@change_options
@click.option("--reset-passwords", is_flag=True, help="Give existing students new passwords too.")
@click.option(
    "--handout",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the printable handout (HTML) to this file.",
)
@click.pass_context
def setup(ctx, config, dry_run, only, yes, reset_passwords, handout):
    """Create the course group and the students' accounts with generated passwords.

    Existing course accounts are brought in line and keep their password
    unless --reset-passwords. New passwords go to STATE_DIR/credentials.csv and
    a printable STATE_DIR/handout.html (root only).
    """
    from .commands import accounts

    perform(
        ctx,
        config,
        "setup",
        lambda course: accounts.setup(
            course, only=tuple(only), reset_passwords=reset_passwords, handout=handout
        ),
        changes=True,
        dry_run=dry_run,
        only=only,
        yes=yes,
        precheck=accounts.precheck,
    )


@cli.command(epilog=CONFIG_HELP)
@config_argument
@change_options
@click.option(
    "--force", is_flag=True, help="Overwrite edited files (the student's version is backed up)."
)
@click.option(
    "--source", type=click.Path(file_okay=False, path_type=Path), help="Send this folder instead."
)
@click.option("--folder", metavar="NAME", help="Into HOME/NAME instead of [material] folder.")
@click.pass_context
def send(ctx, config, dry_run, only, yes, force, source, folder):
    """Copy the tutorial material into every student's home, never losing an edit.

    Files the student edited are kept; the new version is written beside them
    and listed as a conflict (--force overwrites after a backup).
    """
    from .commands.send import send as send_material

    perform(
        ctx,
        config,
        "send",
        lambda course: send_material(
            course, only=tuple(only), force=force, source=source, folder=folder
        ),
        changes=True,
        dry_run=dry_run,
        only=only,
        yes=yes,
    )


@cli.command(epilog=CONFIG_HELP)
@config_argument
@change_options
@click.option("--no-portal", is_flag=True, help="Start the servers, then exit (no portal).")
@click.option("--stop-on-exit", is_flag=True, help="Stop the servers too when the portal stops.")
@click.pass_context
def launch(ctx, config, dry_run, only, yes, no_portal, stop_on_exit):
    """Start one Jupyter server per student, then run the portal until Ctrl-C.

    Ctrl-C stops the portal and leaves the servers running (unless --stop-on-exit).
    """
    from .commands import servers

    perform(
        ctx,
        config,
        "launch",
        lambda course: servers.launch(
            course, only=tuple(only), portal=not no_portal, stop_on_exit=stop_on_exit
        ),
        changes=True,
        dry_run=dry_run,
        only=only,
        yes=yes,
    )


@cli.command(epilog=CONFIG_HELP)
@config_argument
@change_options
@click.option(
    "--all-jupyter", is_flag=True, help="Also stop Jupyter processes the course did not start."
)
@click.pass_context
def shutdown(ctx, config, dry_run, only, yes, all_jupyter):
    """Stop every student's Jupyter server and its kernels."""
    from .commands import servers

    perform(
        ctx,
        config,
        "shutdown",
        lambda course: servers.shutdown(course, only=tuple(only), all_jupyter=all_jupyter),
        changes=True,
        dry_run=dry_run,
        only=only,
        yes=yes,
    )


@cli.command(epilog=CONFIG_HELP)
@config_argument
@change_options
@click.option(
    "--deadline", metavar='"YYYY-MM-DD HH:MM"', help="Mark files modified after it as late."
)
@click.pass_context
def retrieve(ctx, config, dry_run, only, yes, deadline):
    """Collect every student's work into DESTINATION/USERNAME/TIMESTAMP/ (every version kept)."""
    from .commands.retrieve import parse_deadline
    from .commands.retrieve import retrieve as collect

    deadline_at = parse_deadline(deadline) if deadline else None
    perform(
        ctx,
        config,
        "retrieve",
        lambda course: collect(course, only=tuple(only), deadline=deadline_at),
        changes=True,
        dry_run=dry_run,
        only=only,
        yes=yes,
    )


@cli.command(epilog=CONFIG_HELP)
@config_argument
@change_options
@click.pass_context
def remove(ctx, config, dry_run, only, yes):
    """Archive and delete the students' accounts and homes (asks first unless --yes)."""
    from .commands import accounts

    perform(
        ctx,
        config,
        "remove",
        lambda course: accounts.remove(course, only=tuple(only)),
        changes=True,
        dry_run=dry_run,
        only=only,
        yes=yes,
    )


@cli.command(epilog=CONFIG_HELP)
@config_argument
@click.option("--only", multiple=True, metavar="USERNAME", help="Only this student (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one object per student.")
@click.pass_context
def status(ctx, config, only, as_json):
    """Show each student's account, server, last send and last retrieve."""
    from .commands import accounts

    perform(
        ctx,
        config,
        "status",
        lambda course: accounts.status(course, only=tuple(only), as_json=as_json),
        changes=False,
        only=only,
    )


@cli.command(epilog=CONFIG_HELP)
@config_argument
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.pass_context
def check(ctx, config, as_json):
    """Check the config, the roster and this host; change nothing (no root needed)."""
    from .commands import checks

    code = checks.check(resolve_config(config), as_json=as_json)
    ctx.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``notebooks.py`` and the ``notebooks`` console script."""
    verbose = "-v" in (argv or sys.argv) or "--verbose" in (argv or sys.argv)
    try:
        code = cli.main(args=argv, prog_name="notebooks.py", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted: nothing was changed.", err=True)
        sys.exit(Refused.exit_code)
    except ClassroomError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if exc.exit_code in (1, 2) else exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:  # last resort: a message, not a traceback, unless -v
        if verbose:
            raise
        click.echo(f"Error: {type(exc).__name__}: {exc} (run with -v for details)", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
