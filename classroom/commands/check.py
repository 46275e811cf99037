"""check: is the config, the roster and this host ready? Changes nothing, needs no root."""

from __future__ import annotations

import json
import os
import pwd
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..core import roster as roster_mod
from ..core import settings as settings_mod
from ..core.errors import EXIT_OK, EXIT_USAGE, InvalidInput
from ..core.roster import Roster
from ..core.settings import Settings
from ..host import limits
from ..host.files import world_readable_chain
from ..host.ports import port_free
from ..host.system import CommandFailed, is_root, login_defs, run

PROBE_TIMEOUT = 120  # seconds for the servers' Python to import Jupyter as nobody


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    limits: dict = field(default_factory=dict)  # which mechanism enforces [limits] here


def students_can_run_python(python: Path) -> str | None:
    """None if an unprivileged user can import jupyter_server with ``python``; else the reason."""
    blocked = world_readable_chain(python)
    if blocked is not None:
        return f"{blocked} is not readable by students (install with scripts/install.sh, not under /root)"
    if not is_root():
        return None
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return None
    try:
        proc = run(
            [str(python), "-c", "import jupyter_server, ipykernel"],
            env={"HOME": "/nonexistent"},
            user=nobody,
            cwd="/",
            timeout=PROBE_TIMEOUT,
            check=False,
            changes=False,  # a read-only probe: it runs under --dry-run too
        )
    except CommandFailed as exc:
        return f"{python} cannot be run as an unprivileged user: {exc}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import jupyter_server as an unprivileged user: {last}"
    return None


def check_paths(s: Settings, found: Findings) -> None:
    """The material, the certificate, home_base, the hooks."""
    if s.material_source is None:
        found.warnings.append(
            f"{s.where('material', 'source')}: [material] source is not set: send needs it"
        )
    elif not s.material_source.is_dir():
        found.problems.append(
            f"{s.where('material', 'source')}: [material] source {s.material_source} is not a folder"
        )
    for key, path in (("certfile", s.certfile), ("keyfile", s.keyfile)):
        if path and not path.is_file():
            found.problems.append(f"{s.where('launch', key)}: [launch] {key} {path} not found")
    if not s.home_base.is_dir():
        found.warnings.append(
            f"{s.where('accounts', 'home_base')}: {s.home_base} does not exist yet (setup creates it)"
        )
    elif (blocked := world_readable_chain(s.home_base)) is not None:
        found.problems.append(
            f"{s.where('accounts', 'home_base')}: {blocked} does not "
            "let other users through (o+x): students could not reach their homes"
        )
    for key, hook in (("pre_spawn", s.pre_spawn), ("post_stop", s.post_stop)):
        if hook and ":" not in hook and not os.access(hook, os.X_OK):
            found.problems.append(
                f"{s.where('hooks', key)}: [hooks] {key} {hook} is not an executable"
            )


def check_ports(s: Settings, roster: Roster | None, found: Findings) -> None:
    """The portal's port, and the students' range as far as the roster needs it."""
    if not port_free(s.ip, s.portal_port):
        found.warnings.append(f"{s.where('launch', 'portal_port')}: port {s.portal_port} is in use")
    if roster is None:
        return
    busy = [
        p
        for p in range(s.first_port, min(s.first_port + len(roster), 65536))
        if p != s.portal_port and not port_free(s.ip, p)
    ]
    if busy:
        found.warnings.append(
            f"{s.where('launch', 'first_port')}: ports in use in the students' range "
            f"({', '.join(map(str, busy[:10]))}); launch will skip them"
        )


def check_system_accounts(roster: Roster, found: Findings) -> None:
    """Students whose name is an existing system account: setup will refuse them."""
    defs = login_defs()
    for st in roster:
        try:
            pw = pwd.getpwnam(st.username)
        except KeyError:
            continue
        if not defs.uid_min <= pw.pw_uid <= defs.uid_max:
            found.warnings.append(
                f"{roster.where(st)}: {st.username} is a system account "
                f"(uid {pw.pw_uid}); setup will refuse it"
            )


def check_limits(s: Settings, found: Findings, host: limits.Host | None = None) -> None:
    """Which mechanism enforces [limits] on this host; a warning for each set limit it cannot."""
    host = host or limits.detect()
    wanted = limits.Limits.of(s)
    found.limits = {
        "mechanism": host.summary(),
        "enforced_by": host.enforces(),
        "set": wanted.describe(),
    }
    found.warnings += [f"{s.where('limits', '')}: {w}" for w in host.cannot(wanted)]


def check(config_path: Path, as_json: bool = False) -> int:
    """Print every problem and warning (or JSON); exit 0 when there is no problem, else 2."""
    found = Findings()
    settings = roster = None
    try:
        settings = settings_mod.load(config_path)
        roster = roster_mod.load(settings.roster, settings.roster_columns)
        found.warnings += roster.warnings
    except InvalidInput as exc:
        found.problems += exc.problems
    if settings is not None:
        check_paths(settings, found)
        check_ports(settings, roster, found)
        check_limits(settings, found)
        reason = students_can_run_python(Path(sys.executable))
        if reason:
            found.problems.append(f"servers' Python: {reason}")
        if roster is not None:
            check_system_accounts(roster, found)
    ok = not found.problems
    n = len(roster) if roster else 0
    if as_json:
        report = {
            "ok": ok,
            "problems": found.problems,
            "warnings": found.warnings,
            "students": n,
            "limits": found.limits,
        }
        click.echo(json.dumps(report, indent=2))
    else:
        if found.limits:
            click.echo(f"limits: {found.limits['mechanism']}; set: {found.limits['set']}")
        for p in found.problems:
            click.echo(f"problem: {p}")
        for w in found.warnings:
            click.echo(f"warning: {w}")
        click.echo(
            f"check: {'ok' if ok else 'NOT ok'}, {n} students, "
            f"{len(found.problems)} problems, {len(found.warnings)} warnings"
        )
    return EXIT_OK if ok else EXIT_USAGE
