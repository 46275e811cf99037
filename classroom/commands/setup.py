"""setup: the course group, the students' accounts and passwords, the printable handout.

Each step checks first and then acts, so re-running is harmless: a second run
reports nothing to do. Under ``--dry-run`` the plan is printed and nothing changes.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from ..core import passwords
from ..core.errors import EXIT_OK, CommandFailedForAll, InvalidInput, StepFailed
from ..core.secret import Secret
from ..core.settings import Settings
from ..host import credentials, interrupts, sessions, trust
from ..host.accounts import (
    FOREIGN,
    MISSING,
    Account,
    alignment,
    create_account,
    inspect,
    set_passwords,
    useradd_argv,
    wait_for_account_tools,
)
from ..host.files import world_readable_chain, write_atomic
from ..host.groups import check_group, ensure_group
from ..host.homefiles import write_student_files
from ..host.state import check_private_dir
from ..host.system import dry_run, sudo_caller
from ..host.workers import as_user
from . import shared, staff
from .course import Course, Report, progress

STUDENT_FILES_TIMEOUT = 60  # seconds to write one student's Jupyter config and profile
WORKERS = max(2, os.cpu_count() or 2)


def precheck(settings: Settings) -> None:
    """Before anything is created: refuse (``InvalidInput``, exit 2) what ``problems`` finds."""
    found = problems(settings)
    if found:
        raise InvalidInput(found)


def problems(settings: Settings) -> list[str]:
    """What setup refuses before any change (``check`` reports the same): a home base
    others could plant homes in, a state folder that is someone else's, and files that
    decide what root does (config, roster, hooks, skeleton, profile) that someone other
    than root or the teacher can change."""
    found = []
    try:
        check_home_base(settings)
    except InvalidInput as exc:
        found += exc.problems
    try:
        check_private_dir(settings.state_dir)
    except InvalidInput as exc:
        found += exc.problems
    found += trust.problems(settings)
    return found


def check_home_base(settings: Settings) -> None:
    """Refuse a home_base others could plant homes in."""
    base = settings.home_base
    where = settings.where("accounts", "home_base")
    try:
        st = os.stat(base)
    except FileNotFoundError:
        return  # setup creates it, root's, 0755
    except OSError as exc:
        raise InvalidInput(f"{where}: {base}: {exc.strerror}") from None
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise InvalidInput(
            f"{where}: {base} must belong to root and not be writable by group or others "
            f"(it is uid {st.st_uid}, mode {st.st_mode & 0o7777:04o}); other users could "
            "plant a home there"
        )
    shared.precheck(settings)


def make_home_base(course: Course, report: Report) -> None:
    """Create home_base (root's, 0755) and check it again; warn when students cannot reach it."""
    base = course.settings.home_base
    if not base.is_dir():
        base.mkdir(parents=True, exist_ok=True, mode=0o755)
        report.changed(f"{base} created")
    check_home_base(course.settings)
    blocked = world_readable_chain(base)
    if blocked is not None:
        click.echo(
            f"warning: {blocked} does not let other users through (no o+x): students will not "
            f"reach their homes under {base}, and their Jupyter servers cannot start",
            err=True,
        )


def teacher_profile(course: Course) -> dict[str, str]:
    """The teacher's IPython profile files (``*.py``, ``startup/*.py``) as {relative path: text}."""
    spec = course.settings.profile
    where = course.settings.where("accounts", "profile")
    if not spec:
        return {}
    if "/" in spec:
        folder = Path(spec)
    else:
        caller = sudo_caller()
        if caller is None:
            raise InvalidInput(f"{where}: cannot tell who the teacher is")
        folder = Path(caller.pw_dir) / ".ipython" / f"profile_{spec}"
    if not folder.is_dir():
        raise InvalidInput(f"{where}: IPython profile folder {folder} not found")
    files: dict[str, str] = {}
    for sub in ("", "startup"):
        base = folder / sub if sub else folder
        if not base.is_dir():
            continue
        for path in sorted(base.glob("*.py")):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
                rel = f"{sub}/{path.name}" if sub else path.name
                files[rel] = path.read_text(encoding="utf-8", errors="replace")
    return files


def needs_password(course: Course, acc: Account, reset_passwords: bool) -> bool:
    """An existing account gets a new password when asked, or when its last one was not set."""
    row = course.state.account(acc.username)
    return reset_passwords or (row is not None and not row["password_set"])


def setup(
    course: Course,
    *,
    only: tuple[str, ...] = (),
    reset_passwords: bool = False,
    handout: Path | None = None,
) -> int:
    """Create or align each selected student's account; write credentials and handout.

    A stop signal (Ctrl-C) ends it between steps: an account is made, or aligned, or
    given its password whole, and the report says who was done and who was not.
    """
    report = course.report("setup")
    if handout and not Path(handout).parent.is_dir():
        raise InvalidInput(f"--handout {handout}: the folder {Path(handout).parent} does not exist")
    profile = teacher_profile(course)
    group = check_group(course)
    students = course.students(only)
    report.expect(st.username for st in students)
    wait_for_account_tools({st.username for st in students} | {course.settings.group}, "setup")
    accounts = [inspect(course, st) for st in students]
    warn_dropped(course)
    if dry_run():
        return show_plan(course, report, accounts, group is None, reset_passwords, handout, only)
    make_home_base(course, report)
    try:
        with interrupts.shielded():
            if ensure_group(course):
                report.changed(f"group {course.settings.group} created")
    except StepFailed as exc:
        raise CommandFailedForAll(
            f"creating the course group {course.settings.group} failed, nothing else done: {exc}"
        ) from None
    changed, need_password = make_accounts(course, report, accounts, reset_passwords)
    with interrupts.shielded():
        new = give_passwords(course, report, need_password, profile)
        for username, what in staff.ensure(course, report, accounts, only).items():
            if changed.get(username) != ["created"]:  # a new assistant comes in the group
                changed.setdefault(username, []).append(what)
        for username, what in shared.ensure(course, report, accounts).items():
            if changed.get(username) != ["created"]:  # a new account comes with its link
                changed.setdefault(username, []).append(what)
        for username, changes in changed.items():
            if username in report.failures:
                continue
            if changes == ["created"]:
                report.done(username, "created")
            else:
                report.done(username, "updated", "; ".join(changes))
    code = restart_servers(course, report, list(new))
    # whoever logged in to the portal with an old password (a leaked slip) is logged out
    sessions.end_users(course.settings.state_dir, set(new))
    write_handouts(course, report, handout, [st.username for st in students] if only else None)
    if only:
        show_passwords(new, course.settings.notebook_password == "same")
    if need_password:
        state_dir = course.settings.state_dir
        report.note(
            f"passwords: {state_dir / 'credentials.csv'}; handout: {state_dir / 'handout.html'}"
        )
    return max(report.finish(), code)


def warn_dropped(course: Course) -> None:
    """Name the students the roster no longer has whose accounts the course keeps, and
    the command that removes them (SPEC 6.10)."""
    gone = [st.username for st in course.dropped()]
    if gone:
        click.echo(f"warning: {dropped_message(course, gone)}", err=True)


def dropped_message(course: Course, gone: list[str]) -> str:
    """One line: who was dropped from the roster, and what to run (setup and check say it)."""
    remove = " ".join(
        ["sudo notebooks remove", shlex.quote(str(course.settings.config_file))]
        + [f"--only {u}" for u in gone]
    )
    return (
        f"{len(gone)} account(s) of the course are no longer in the roster: {', '.join(gone)}; "
        f"they keep their account, home and password until you run: {remove} "
        "(or put them back in the roster)"
    )


def show_passwords(new: dict[str, tuple[Secret, Secret]], same: bool) -> None:
    """With ``--only``, the new passwords on the terminal (the teacher hands them out now)."""
    for username, (unix, notebook) in new.items():
        extra = "" if same else f", Jupyter password: {notebook.reveal()}"
        click.echo(f"  {username}: new password: {unix.reveal()}{extra}")


def restart_servers(course: Course, report: Report, usernames: list[str]) -> int:
    """Restart the running servers of students who got a new password, so the new one
    logs in at once and the old one no longer does; the exit status of that."""
    from ..host.server import Server
    from .launch import launch
    from .shutdown import shutdown

    running = []
    for username in usernames:
        server = Server.recorded(course.state, username)
        if server is not None and server.process() is not None:
            running.append(username)
    if not running:
        return EXIT_OK
    report.note(
        f"restarting the running server of {', '.join(running)}: the new password "
        "works at once, the old one no longer"
    )
    quiet = dataclasses.replace(course, quiet=True)
    code = shutdown(quiet, only=tuple(running))
    return max(code, launch(quiet, only=tuple(running), portal=False))


def show_plan(
    course: Course,
    report: Report,
    accounts: list[Account],
    new_group: bool,
    reset_passwords: bool,
    handout: Path | None,
    only: tuple[str, ...] = (),
) -> int:
    """The dry run: what setup would do to each student, and the summary line."""
    if not course.state_readable:
        report.note(
            "note: not root, so the course state cannot be read; accounts in the "
            "course group are taken for the course's"
        )
    if handout:
        report.note(f"would write the handout to {handout}")
    if new_group:
        click.echo(f"  would run: groupadd -- {course.settings.group}")
    staffed = staff.ensure(course, report, accounts, only)
    linked = shared.ensure(course, report, accounts)
    for acc in accounts:
        try:
            if acc.kind == FOREIGN:
                report.failed(acc.username, acc.why)
            elif acc.kind == MISSING:
                argv = useradd_argv(course.settings, acc.student)
                report.done(acc.username, "created", shlex.join(argv))
            else:
                changes = [c.what for c in alignment(course, acc)]
                changes += [linked[acc.username]] if acc.username in linked else []
                changes += [staffed[acc.username]] if acc.username in staffed else []
                if needs_password(course, acc, reset_passwords):
                    changes.append("new password")
                if changes:
                    report.done(acc.username, "updated", "; ".join(changes))
                else:
                    report.unchanged(acc.username)
        except StepFailed as exc:
            report.failed(acc.username, str(exc))
    return report.finish()


def make_accounts(
    course: Course, report: Report, accounts: list[Account], reset_passwords: bool
) -> tuple[dict[str, list[str]], list[tuple[Account, pwd.struct_passwd]]]:
    """Create the missing accounts, align the others: (what changed, who needs a password)."""
    need_password: list[tuple[Account, pwd.struct_passwd]] = []
    changed: dict[str, list[str]] = {}
    for acc in progress(accounts, "accounts"):
        try:
            if acc.kind == FOREIGN:
                report.failed(acc.username, acc.why)
                continue
            with interrupts.shielded():  # one account, whole
                if acc.kind == MISSING:
                    pw = create_account(course, acc.student)
                    changed[acc.username] = ["created"]
                    need_password.append((acc, pw))
                    report.progress(acc.username, "created, without a password yet")
                    continue
                changes = []
                for change in alignment(course, acc):
                    change.make()
                    changes.append(change.what)
                if needs_password(course, acc, reset_passwords):
                    changes.append("new password")
                    need_password.append((acc, pwd.getpwnam(acc.username)))
                if not changes:
                    report.unchanged(acc.username)
                    continue
                changed[acc.username] = changes
                with course.state.transaction():
                    course.state.record("setup", acc.username, "updated", {"changes": changes})
                report.progress(acc.username, "updated, without the new password yet")
        except StepFailed as exc:
            report.failed(acc.username, str(exc))
    return changed, need_password


def give_passwords(
    course: Course,
    report: Report,
    pending: list[tuple[Account, pwd.struct_passwd]],
    profile: dict[str, str],
) -> dict[str, tuple[Secret, Secret]]:
    """New passwords: credentials file first, then chpasswd (stdin), then Jupyter hash, then
    state. Returns {username: (Unix password, Jupyter password)} of those now set."""
    if not pending:
        return {}
    s = course.settings
    state = course.state
    # Until both chpasswd and the Jupyter config are done, the account has no known password:
    # a failure or a crash from here on makes the next run give it a new one.
    with state.transaction():
        for acc, _ in pending:
            state.password_known(acc.username, False)
    new: dict[str, tuple[Secret, Secret]] = {}
    for acc, _ in pending:
        unix = passwords.generate(s.password_length)
        nb = unix if s.notebook_password == "same" else passwords.generate(s.password_length)
        new[acc.username] = (unix, nb)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        hashes = dict(
            zip(new, pool.map(lambda u: passwords.jupyter_hash(new[u][1]), new), strict=True)
        )
        credentials.update(
            s.state_dir / "credentials.csv",
            {
                acc.username: {
                    "name": acc.student.full_name,
                    "email": acc.student.email,
                    "password": new[acc.username][0],
                    "notebook_password": new[acc.username][1],
                }
                for acc, _ in pending
            },
        )
        try:
            set_passwords({u: unix for u, (unix, _) in new.items()})
        except StepFailed as exc:
            for acc, _ in pending:
                report.failed(acc.username, f"setting the password failed: {exc}")
            return {}

        def write(item: tuple[Account, pwd.struct_passwd]) -> str | None:
            acc, pw = item
            hashed = hashes[acc.username].reveal()
            try:
                as_user(
                    pw,
                    write_student_files,
                    pw.pw_dir,
                    hashed,
                    profile,
                    timeout=STUDENT_FILES_TIMEOUT,
                )
            except StepFailed as exc:
                return str(exc)
            return None

        done = []
        for (acc, _), error in zip(pending, pool.map(write, pending), strict=True):
            if error:
                report.failed(acc.username, f"writing the Jupyter password failed: {error}")
            else:
                done.append(acc.username)
    with state.transaction():
        for username in done:
            state.password_known(username, True)
            state.record("setup", username, "password set")
    return {username: new[username] for username in done}


def write_handouts(
    course: Course, report: Report, handout: Path | None, selected: list[str] | None
) -> None:
    """STATE_DIR/handout.html (root's, the whole roster) and, with ``--handout``, a copy
    owned by the teacher: the ``selected`` students' slips (``--only``), else everyone's."""
    s = course.settings
    rows = credentials.read(s.state_dir / "credentials.csv")
    names = course.roster.names()  # roster order: the slips follow it
    page = credentials.handout_html(s, {u: rows[u] for u in names if u in rows})
    if warning := credentials.address_warning(s):
        click.echo(f"warning: {warning}", err=True)
    write_atomic(s.state_dir / "handout.html", page)
    if handout:
        chosen = names if selected is None else [u for u in names if u in set(selected)]
        page = credentials.handout_html(s, {u: rows[u] for u in chosen if u in rows})
        caller = sudo_caller()
        owner = (caller.pw_uid, caller.pw_gid) if caller and caller.pw_uid != 0 else None
        write_atomic(Path(handout), page, owner=owner)
        report.note(f"handout written to {handout} (0600, readable by you only)")
