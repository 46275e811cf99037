"""Students' Unix accounts: setup, remove and status.

Each step checks first and then acts, so re-running is harmless. Only
accounts the course created (recorded in the state, same uid, uid inside
UID_MIN..UID_MAX) are ever changed or deleted.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import shlex
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from ..core import passwords
from ..core.errors import CommandFailedForAll, InvalidInput, Refused, StepFailed
from ..core.roster import Student
from ..core.secret import Secret
from ..host import credentials
from ..host.accounts import FOREIGN, MISSING, OK, Account, inspect
from ..host.processes import kill_all, processes_of
from ..host.state import now
from ..host.system import login_defs, run, run_account_tool, sudo_caller
from ..host.workers import as_user
from .course import Course, progress

log = logging.getLogger("classroom")


def free_id(used: set[int], low: int, high: int) -> int:
    """The next id after the highest used one in ``low..high`` (as useradd picks), else the lowest free."""
    in_range = [i for i in used if low <= i <= high]
    candidate = max(in_range, default=low - 1) + 1
    if candidate <= high and candidate not in used:
        return candidate
    for i in range(low, high + 1):
        if i not in used:
            return i
    raise StepFailed(f"no free id left in {low}..{high} (see /etc/login.defs)")


# --- setup ------------------------------------------------------------------------------------


def check_group(course: Course) -> grp.struct_group | None:
    """The course group if it exists; refuse a group that is not safe to make students join.

    A group the course did not create is refused when it is a system group, any
    account's primary group, or has members who are not in the roster: joining
    it would give the students that group's files.
    """
    settings = course.settings
    try:
        group = grp.getgrnam(settings.group)
    except KeyError:
        return None
    if course.state.meta("group_gid") == str(group.gr_gid):
        return group
    creating = course.state.meta("group_creating")
    if creating == f"{settings.group}:{group.gr_gid}":
        return group  # made by a run that was cut off; adopted by ensure_group
    where = settings.where("course", "group")
    gid_min = int(login_defs().get("GID_MIN", "1000") or 1000)
    if group.gr_gid < gid_min:
        raise InvalidInput(
            f"{where}: group '{settings.group}' is a system group (gid {group.gr_gid}); "
            "choose another [course] group"
        )
    primary = [p.pw_name for p in pwd.getpwall() if p.pw_gid == group.gr_gid]
    outsiders = sorted(set(group.gr_mem) - set(course.roster.names()))
    if primary or outsiders:
        who = ", ".join((primary + outsiders)[:5])
        raise InvalidInput(
            f"{where}: group '{settings.group}' exists, the course did not create it, and it "
            f"already belongs to others ({who}); choose another [course] group"
        )
    return group


def ensure_group(course: Course) -> bool:
    """Create the course group if it is missing (gid recorded first); True if it was created."""
    s = course.settings
    group = check_group(course)
    if group is not None:
        if course.state.meta("group_creating") == f"{s.group}:{group.gr_gid}":
            with course.state.transaction():
                course.state.set_meta("group_gid", str(group.gr_gid))
                course.state.set_meta("group_creating", None)
                course.state.record("setup", None, "group adopted", {"gid": group.gr_gid})
        return False
    defs = login_defs()
    gid_min = int(defs.get("GID_MIN", "1000") or 1000)
    gid_max = int(defs.get("GID_MAX", "60000") or 60000)
    for _attempt in range(5):
        gid = free_id({g.gr_gid for g in grp.getgrall()}, gid_min, gid_max)
        with course.state.transaction():
            course.state.set_meta("group_creating", f"{s.group}:{gid}")
        try:
            run_account_tool(["groupadd", "--gid", str(gid), "--", s.group])
            break
        except StepFailed as exc:
            with course.state.transaction():
                course.state.set_meta("group_creating", None)
            if "already exists" in str(exc) and f"'{gid}'" in str(exc):
                continue  # another program took that gid meanwhile
            raise
    else:
        raise StepFailed("groupadd kept finding its gid taken; try again")
    with course.state.transaction():
        course.state.set_meta("group_gid", str(gid))
        course.state.set_meta("group_creating", None)
        course.state.record("setup", None, "group created", {"group": s.group, "gid": gid})
    return True


def useradd_argv(course: Course, student: Student) -> list[str]:
    s = course.settings
    argv = [
        "useradd",
        "--create-home",
        "--home-dir",
        str(s.home_base / student.username),
        "--shell",
        s.shell,
        "--user-group",
        "--groups",
        s.group,
        "--comment",
        student.gecos,
        "-K",
        f"HOME_MODE={s.home_mode:04o}",
    ]
    if s.skeleton:
        argv += ["--skel", str(s.skeleton)]
    return [*argv, "--", student.username]


def create_account(course: Course, student: Student) -> pwd.struct_passwd:
    """useradd with a uid chosen and recorded first, so a cut-off run adopts exactly that account."""
    s = course.settings
    home = s.home_base / student.username
    if os.path.lexists(home):
        raise StepFailed(
            f"{home} already exists and would become {student.username}'s home; "
            "move it away (or change [accounts] home_base) and run setup again"
        )
    defs = login_defs()
    for _attempt in range(5):
        uid = free_id({p.pw_uid for p in pwd.getpwall()}, defs.uid_min, defs.uid_max)
        with course.state.transaction():
            course.state.execute(
                "INSERT OR REPLACE INTO accounts "
                "(username, uid, home, status, password_set, created_at) "
                "VALUES (?, ?, ?, 'creating', 0, ?)",
                (student.username, uid, str(home), now()),
            )
        argv = useradd_argv(course, student)
        argv[1:1] = ["--uid", str(uid)]
        try:
            run_account_tool(argv)
            break
        except StepFailed as exc:
            with course.state.transaction():
                course.state.execute("DELETE FROM accounts WHERE username = ?", (student.username,))
            if "not unique" in str(exc):  # another program took that uid meanwhile
                continue
            raise
    else:
        raise StepFailed("useradd kept finding its uid taken; try again")
    pw = pwd.getpwnam(student.username)
    if pw.pw_uid != uid:
        raise StepFailed(f"useradd gave uid {pw.pw_uid}, not {uid}")
    with course.state.transaction():
        course.state.execute(
            "UPDATE accounts SET status = 'created' WHERE username = ?", (student.username,)
        )
        course.state.record("setup", student.username, "account created", {"uid": pw.pw_uid})
    return pw


def align_account(course: Course, account: Account) -> list[str]:
    """Bring an existing course account in line (group, home mode); return what changed."""
    s = course.settings
    pw = account.pw
    assert pw is not None
    changes = []
    if account.adopt:
        changes.append("account adopted after an interrupted run")
        if not course.dry_run:
            with course.state.transaction():
                course.state.execute(
                    "UPDATE accounts SET status = 'created' WHERE username = ?", (pw.pw_name,)
                )
                course.state.record("setup", pw.pw_name, "account adopted", {"uid": pw.pw_uid})
    try:
        members = grp.getgrnam(s.group).gr_mem
    except KeyError:
        members = []
    if pw.pw_name not in members:
        changes.append(f"added to group {s.group}")
        if not course.dry_run:
            run_account_tool(["usermod", "--append", "--groups", s.group, "--", pw.pw_name])
    home = Path(pw.pw_dir)
    try:
        st = os.lstat(home)
    except FileNotFoundError:
        changes.append("home created")
        if not course.dry_run:
            make_home(course, pw)
        return changes
    if not stat.S_ISDIR(st.st_mode):
        raise StepFailed(f"home {home} is not a folder; fix it by hand")
    if st.st_uid != pw.pw_uid:
        raise StepFailed(
            f"home {home} is owned by uid {st.st_uid}, not {pw.pw_name}; fix it by hand"
        )
    if stat.S_IMODE(st.st_mode) != s.home_mode:
        changes.append(f"home mode {stat.S_IMODE(st.st_mode):04o} -> {s.home_mode:04o}")
        if not course.dry_run:
            fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_ino != st.st_ino:
                    raise StepFailed(f"home {home} changed while it was being checked")
                os.fchmod(fd, s.home_mode)
            finally:
                os.close(fd)
    return changes


def make_home(course: Course, pw: pwd.struct_passwd) -> None:
    home = Path(pw.pw_dir)
    home.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(home, course.settings.home_mode)
    os.chown(home, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    os.chmod(home, course.settings.home_mode, follow_symlinks=False)


def precheck(settings) -> None:
    """Before anything is created: refuse a home_base others could plant homes in."""
    base = settings.home_base
    try:
        st = os.stat(base)
    except FileNotFoundError:
        return  # setup creates it, root's, 0755
    except OSError as exc:
        raise InvalidInput(
            f"{settings.where('accounts', 'home_base')}: {base}: {exc.strerror}"
        ) from None
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise InvalidInput(
            f"{settings.where('accounts', 'home_base')}: {base} must belong to root and "
            f"not be writable by group or others (it is uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}); other users could plant a home there"
        )


def check_home_base(course: Course) -> None:
    """home_base must be root's and not writable by others (else they could plant homes)."""
    base = course.settings.home_base
    base.mkdir(parents=True, exist_ok=True, mode=0o755)
    precheck(course.settings)
    from .checks import world_readable_chain

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
    if not spec:
        return {}
    if "/" in spec:
        folder = Path(spec)
    else:
        caller = sudo_caller()
        if caller is None:
            raise InvalidInput(
                f"{course.settings.where('accounts', 'profile')}: cannot tell who the teacher is"
            )
        folder = Path(caller.pw_dir) / ".ipython" / f"profile_{spec}"
    if not folder.is_dir():
        raise InvalidInput(
            f"{course.settings.where('accounts', 'profile')}: IPython profile folder {folder} not found"
        )
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


def _write_student_files(home: str, hashed: str | None, profile: dict[str, str]) -> list[str]:
    """As the student: set the Jupyter password hash and copy the IPython profile."""
    written = []

    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.classroom-tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
        written.append(str(path))

    if hashed is not None:
        config_path = Path(home) / ".jupyter" / "jupyter_server_config.json"
        config: dict = {}
        try:
            # Non-blocking and no symlink: a FIFO or a link planted there is not followed.
            fd = os.open(config_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as inp:
                if stat.S_ISREG(os.fstat(inp.fileno()).st_mode):
                    loaded = json.loads(inp.read(1 << 20) or b"{}")
                    if isinstance(loaded, dict):
                        config = loaded
        except (OSError, ValueError):
            config = {}
        section = config.get("IdentityProvider")
        if not isinstance(section, dict):
            section = config["IdentityProvider"] = {}
        section["hashed_password"] = hashed
        write(config_path, json.dumps(config, indent=2) + "\n")  # 0600, as write() makes it
    profile_dir = Path(home) / ".ipython" / "profile_default"
    for rel, text in profile.items():
        target = profile_dir / rel
        if not target.exists():
            write(target, text)
    return written


def setup(
    course: Course,
    *,
    only: tuple[str, ...] = (),
    reset_passwords: bool = False,
    handout: Path | None = None,
) -> int:
    """Create or align each selected student's account; write credentials and handout."""
    s = course.settings
    report = course.report("setup")
    students = course.students(only)
    if handout and not Path(handout).parent.is_dir():
        raise InvalidInput(f"--handout {handout}: the folder {Path(handout).parent} does not exist")
    profile = teacher_profile(course)
    check_group(course)
    accounts = [inspect(course, st) for st in students]

    if course.dry_run:
        if course.state.unreadable:
            report.note(
                "note: not root, so the course state cannot be read; accounts in the "
                "course group are taken for the course's"
            )
        if handout:
            report.note(f"would write the handout to {handout}")
        if check_group(course) is None:
            click.echo(f"  would run: groupadd -- {s.group}")
        for acc in accounts:
            if acc.kind == FOREIGN:
                report.failed(acc.username, acc.why)
            elif acc.kind == MISSING:
                report.done(acc.username, "created", shlex.join(useradd_argv(course, acc.student)))
            else:
                changes = align_account(course, acc)
                row = course.state.account(acc.username)
                if reset_passwords or (row is not None and not row["password_set"]):
                    changes.append("new password")
                if changes:
                    report.done(acc.username, "updated", "; ".join(changes))
                else:
                    report.unchanged(acc.username)
        return report.finish()

    check_home_base(course)
    try:
        if ensure_group(course):
            report.note(f"group {s.group} created")
    except StepFailed as exc:
        raise CommandFailedForAll(
            f"creating the course group {s.group} failed, nothing else done: {exc}"
        ) from None

    need_password: list[tuple[Account, pwd.struct_passwd]] = []
    changed: dict[str, list[str]] = {}
    for acc in progress(accounts, "accounts"):
        try:
            if acc.kind == FOREIGN:
                report.failed(acc.username, acc.why)
                continue
            if acc.kind == MISSING:
                pw = create_account(course, acc.student)
                changed[acc.username] = ["created"]
                need_password.append((acc, pw))
                continue
            changes = align_account(course, acc)
            pw = pwd.getpwnam(acc.username)
            row = course.state.account(acc.username)
            if reset_passwords or not row["password_set"]:
                changes.append("new password")
                need_password.append((acc, pw))
            if changes:
                changed[acc.username] = changes
                with course.state.transaction():
                    course.state.record("setup", acc.username, "updated", {"changes": changes})
            else:
                report.unchanged(acc.username)
        except StepFailed as exc:
            report.failed(acc.username, str(exc))

    set_passwords(course, report, need_password, profile)
    for username, changes in changed.items():
        if username in report.failures:
            continue
        if changes == ["created"]:
            report.done(username, "created")
        else:
            report.done(username, "updated", "; ".join(changes))

    rows = credentials.read(s.state_dir / "credentials.csv")
    rows = {u: r for u, r in rows.items() if u in set(course.roster.names())}
    credentials.write_private(s.state_dir / "handout.html", credentials.handout_html(s, rows))
    if handout:
        caller = sudo_caller()
        owner = (caller.pw_uid, caller.pw_gid) if caller and caller.pw_uid != 0 else None
        credentials.write_private(Path(handout), credentials.handout_html(s, rows), owner=owner)
        report.note(f"handout written to {handout} (0600, readable by you only)")
    if need_password:
        report.note(
            f"passwords: {s.state_dir / 'credentials.csv'}; handout: {s.state_dir / 'handout.html'}"
        )
    return report.finish()


def chpasswd_argv() -> list[str]:
    """chpasswd hashing as /etc/login.defs says (ENCRYPT_METHOD; chpasswd reads the rounds).

    ``--crypt-method`` also keeps Debian's chpasswd from handing the hashing to PAM,
    whose policy may differ from login.defs.
    """
    method = login_defs().encrypt_method
    if method not in ("SHA512", "SHA256", "YESCRYPT", "MD5"):
        method = "SHA512"
    return ["chpasswd", "--crypt-method", method]


def set_passwords(
    course: Course,
    report,
    pending: list[tuple[Account, pwd.struct_passwd]],
    profile: dict[str, str],
) -> None:
    """New passwords: credentials file first, then chpasswd (stdin), then Jupyter hash, then state."""
    if not pending:
        return
    s = course.settings
    # Until both chpasswd and the Jupyter config are done, the account has no known password:
    # a failure or a crash from here on makes the next run give it a new one.
    with course.state.transaction():
        for acc, _ in pending:
            course.state.execute(
                "UPDATE accounts SET password_set = 0 WHERE username = ?", (acc.username,)
            )
    new: dict[str, tuple[Secret, Secret]] = {}
    for acc, _ in pending:
        unix = passwords.generate(s.password_length)
        nb = unix if s.notebook_password == "same" else passwords.generate(s.password_length)
        new[acc.username] = (unix, nb)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
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
        batch = Secret("".join(f"{u}:{p.reveal()}\n" for u, (p, _) in new.items()))
        try:
            run_account_tool(chpasswd_argv(), stdin=batch)
        except StepFailed as exc:
            for acc, _ in pending:
                report.failed(acc.username, f"setting the password failed: {exc}")
            return

        def write(item: tuple[Account, pwd.struct_passwd]) -> str | None:
            acc, pw = item
            try:
                as_user(
                    pw,
                    _write_student_files,
                    pw.pw_dir,
                    hashes[acc.username].reveal(),
                    profile,
                    timeout=60,
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
        with course.state.transaction():
            for username in done:
                course.state.execute(
                    "UPDATE accounts SET password_set = 1 WHERE username = ?", (username,)
                )
                course.state.record("setup", username, "password set")


# --- remove -----------------------------------------------------------------------------------


def archive_home(course: Course, pw: pwd.struct_passwd) -> Path:
    """tar.gz of the home into archive_dir (0600 root); the name says who and when."""
    folder = course.settings.archive_dir
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.stat(folder)
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise StepFailed(
            f"archive_dir {folder} must belong to root and not be writable by others "
            f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder / f"{pw.pw_name}-{stamp}.tar.gz"
    tmp = folder / f".{pw.pw_name}-{stamp}.tar.gz.part"
    home = Path(pw.pw_dir)
    try:
        run(
            [
                "tar",
                "--create",
                "--gzip",
                "--sparse",
                "--one-file-system",
                "--file",
                str(tmp),
                "--directory",
                str(home.parent),
                "--",
                home.name,
            ],
            timeout=3600,
        )
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def remove(course: Course, *, only: tuple[str, ...] = ()) -> int:
    """Confirm, stop everything the students run, archive each home, delete account and home."""
    s = course.settings
    report = course.report("remove")
    accounts = [inspect(course, st) for st in course.students(only)]
    foreign = [a for a in accounts if a.kind == FOREIGN]
    if foreign:
        raise Refused(
            "remove refused, nothing was changed:\n"
            + "\n".join(f"  {a.username}: {a.why}" for a in foreign)
        )
    present = [a for a in accounts if a.kind == OK]
    gone = [a for a in accounts if a.kind == MISSING]
    if present and not course.dry_run and not course.yes:
        names = ", ".join(a.username for a in present)
        what = "archived and deleted" if s.archive else "deleted WITHOUT an archive"
        click.echo(f"These {len(present)} accounts and their homes will be {what}: {names}")
        if not click.confirm("Go on?", default=False):
            raise Refused("remove declined: nothing was changed")
    if course.dry_run:
        for a in present:
            steps = [
                "stop every process",
                "archive the home" if s.archive else "no archive",
                "userdel --remove",
            ]
            report.done(a.username, "removed", "; ".join(steps))
        for a in gone:
            report.unchanged(a.username)
        return report.finish()

    from ..host import server as servers_mod

    for a in present:
        with contextlib.suppress(Exception):
            servers_mod.forget_server(course, a.username, stop=True)
    # Every process the students still run, all at once: one scan, one grace period.
    uids = {a.pw.pw_uid for a in present if a.pw}
    kill_all([p for procs in processes_of(uids).values() for p in procs])
    kill_all([p for procs in processes_of(uids).values() for p in procs], timeout=2)

    def archive(a: Account) -> Path | None:
        assert a.pw is not None
        if s.archive and Path(a.pw.pw_dir).is_dir():
            return archive_home(course, a.pw)
        return None

    # Archives (tar + gzip, CPU bound) in parallel; accounts deleted one by one, in order.
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = [(a, pool.submit(archive, a)) for a in present]
        for a, future in progress(futures, "removing"):
            try:
                try:
                    archived = future.result()
                except StepFailed as exc:
                    raise StepFailed(f"archive failed, account kept: {exc}") from None
                except OSError as exc:
                    raise StepFailed(
                        f"archive failed, account kept: {exc.strerror}: {exc.filename}"
                    ) from None
                delete_account(course, a, archived)
                report.done(a.username, "removed", f"archive {archived}" if archived else "")
            except StepFailed as exc:
                report.failed(a.username, str(exc))
    for a in gone:
        if course.state.account(a.username) is not None:
            with course.state.transaction():
                course.state.execute("DELETE FROM accounts WHERE username = ?", (a.username,))
        report.unchanged(a.username)
    removed = {u for u, outcome in report.outcomes.items() if outcome == "removed"}
    credentials.update(
        s.state_dir / "credentials.csv", {}, drop=removed | {a.username for a in gone}
    )
    remove_group_if_empty(course, report)
    return report.finish()


def delete_account(course: Course, a: Account, archived: Path | None) -> None:
    """userdel (home included), then forget the account; the archive is recorded first."""
    s = course.settings
    with course.state.transaction():
        course.state.record("remove", a.username, "archived", {"archive": str(archived or "")})
    # Look again just before deleting: the account must still be the one the course made.
    now_acc = inspect(course, a.student)
    if now_acc.kind == MISSING:
        raise StepFailed("the account vanished while it was being removed; nothing deleted")
    if now_acc.kind != OK or now_acc.pw is None or a.pw is None or now_acc.pw.pw_uid != a.pw.pw_uid:
        raise StepFailed(
            f"the account changed while it was being removed; not deleted: {now_acc.why}"
        )
    pw = now_acc.pw
    row = course.state.account(a.username)
    home = Path(pw.pw_dir)
    own_home = row is not None and Path(row["home"]) == home and home.parent == s.home_base
    argv = ["userdel", "--remove", "--", a.username] if own_home else ["userdel", "--", a.username]
    result = run_account_tool(argv, check=False)
    if result.returncode not in (0, 12):
        raise StepFailed(f"userdel failed with status {result.returncode}: {result.stderr.strip()}")
    if own_home and home.is_dir() and not home.is_symlink():
        run(["rm", "-rf", "--one-file-system", "--", str(home)])
    with course.state.transaction():
        course.state.execute("DELETE FROM accounts WHERE username = ?", (a.username,))
        course.state.execute("DELETE FROM servers WHERE username = ?", (a.username,))
        course.state.record("remove", a.username, "removed", {"archive": str(archived or "")})


def remove_group_if_empty(course: Course, report) -> None:
    s = course.settings
    gid = course.state.meta("group_gid")
    try:
        group = grp.getgrnam(s.group)
    except KeyError:
        if gid:
            with course.state.transaction():
                course.state.set_meta("group_gid", None)
        return
    if gid != str(group.gr_gid):
        return
    if group.gr_mem or any(p.pw_gid == group.gr_gid for p in pwd.getpwall()):
        return
    run_account_tool(["groupdel", "--", s.group])
    with course.state.transaction():
        course.state.set_meta("group_gid", None)
        course.state.record("remove", None, "group deleted", {"group": s.group})
    report.note(f"group {s.group} deleted")


# --- status -----------------------------------------------------------------------------------


def status(course: Course, *, only: tuple[str, ...] = (), as_json: bool = False) -> int:
    """A table (or JSON list) of account, server, last send and last retrieve per student."""
    from ..host import server as servers_mod

    rows = []
    for st in course.students(only):
        acc = inspect(course, st)
        server = servers_mod.server_status(course, st.username) if acc.kind == OK else {}
        rows.append(
            {
                "username": st.username,
                "name": st.full_name,
                "account": acc.kind,
                "server": server.get("server", "stopped"),
                "port": server.get("port"),
                "pid": server.get("pid"),
                "url": server.get("url"),
                "last_send": course.state.last(st.username, "send"),
                "last_retrieve": course.state.last(st.username, "retrieve"),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return 0
    if course.state.path is None and os.geteuid() != 0:
        click.echo(
            "note: the course state is root-only; run with sudo to see servers and history",
            err=True,
        )
    headers = ["username", "name", "account", "server", "last send", "last retrieve"]
    table = []
    for r in rows:
        server = r["server"]
        if r["server"] == "running":
            server = f"running :{r['port']} pid {r['pid']}"
        table.append(
            [
                r["username"],
                r["name"],
                r["account"],
                server,
                r["last_send"] or "-",
                r["last_retrieve"] or "-",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *table, strict=False)]
    for line in [headers, *table]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
    counts = {k: sum(r["account"] == k for r in rows) for k in (OK, MISSING, FOREIGN)}
    running = sum(r["server"] == "running" for r in rows)
    click.echo(
        f"status: {len(rows)} students, {counts[OK]} accounts ok, {counts[MISSING]} missing, "
        f"{counts[FOREIGN]} foreign, {running} servers running"
    )
    return 0
