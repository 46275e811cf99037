"""check: is the config, the roster and this host ready? Changes nothing, needs no root."""

from __future__ import annotations

import json
import os
import pwd
import sys
from pathlib import Path

import click

from ..core import roster as roster_mod
from ..core import settings as settings_mod
from ..core.errors import EXIT_OK, EXIT_USAGE, InvalidInput
from ..host.ports import port_free
from ..host.system import CommandFailed, login_defs, run


def world_readable_chain(path: Path) -> Path | None:
    """The first folder on the way to ``path`` that others cannot enter, or None."""
    path = path.resolve()
    for part in [*reversed(path.parents), path]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return part
        if part.is_dir() and not mode & 0o001:
            return part
    return None


def server_python() -> Path:
    return Path(sys.executable)


def students_can_run_python(python: Path) -> str | None:
    """None if an unprivileged user can import jupyter_server with ``python``; else the reason."""
    blocked = world_readable_chain(python)
    if blocked is not None:
        return f"{blocked} is not readable by students (install with scripts/install.sh, not under /root)"
    if os.geteuid() != 0:
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
            timeout=120,
            check=False,
            changes=False,  # a read-only probe: it runs under --dry-run too
        )
    except CommandFailed as exc:
        return f"{python} cannot be run as an unprivileged user: {exc}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import jupyter_server as an unprivileged user: {last}"
    return None


def check(config_path: Path, as_json: bool = False) -> int:
    problems: list[str] = []
    warnings: list[str] = []
    settings = roster = None
    try:
        settings = settings_mod.load(config_path)
    except InvalidInput as exc:
        problems += exc.problems
    if settings is not None:
        try:
            roster = roster_mod.load(settings.roster)
            warnings += roster.warnings
        except InvalidInput as exc:
            problems += exc.problems
    if settings is not None:
        s = settings
        if s.material_source is None:
            warnings.append(
                f"{s.where('material', 'source')}: [material] source is not set: send needs it"
            )
        elif not s.material_source.is_dir():
            problems.append(
                f"{s.where('material', 'source')}: [material] source {s.material_source} is not a folder"
            )
        for key, path in (("certfile", s.certfile), ("keyfile", s.keyfile)):
            if path and not path.is_file():
                problems.append(f"{s.where('launch', key)}: [launch] {key} {path} not found")
        if not s.home_base.is_dir():
            warnings.append(
                f"{s.where('accounts', 'home_base')}: {s.home_base} does not exist yet (setup creates it)"
            )
        if not port_free(s.ip, s.portal_port):
            warnings.append(f"{s.where('launch', 'portal_port')}: port {s.portal_port} is in use")
        if s.home_base.is_dir() and world_readable_chain(s.home_base) is not None:
            problems.append(
                f"{s.where('accounts', 'home_base')}: {world_readable_chain(s.home_base)} does not "
                "let other users through (o+x): students could not reach their homes"
            )
        if roster is not None:
            wanted = len(roster)
            busy = [
                p
                for p in range(s.first_port, min(s.first_port + wanted, 65536))
                if p != s.portal_port and not port_free(s.ip, p)
            ]
            if busy:
                warnings.append(
                    f"{s.where('launch', 'first_port')}: ports in use in the students' range "
                    f"({', '.join(map(str, busy[:10]))}); launch will skip them"
                )
        for key, hook in (("pre_spawn", s.pre_spawn), ("post_stop", s.post_stop)):
            if hook and ":" not in hook and not os.access(hook, os.X_OK):
                problems.append(
                    f"{s.where('hooks', key)}: [hooks] {key} {hook} is not an executable"
                )
        reason = students_can_run_python(server_python())
        if reason:
            problems.append(f"servers' Python: {reason}")
        if roster is not None:
            defs = login_defs()
            for st in roster:
                try:
                    pw = pwd.getpwnam(st.username)
                except KeyError:
                    continue
                if not defs.uid_min <= pw.pw_uid <= defs.uid_max:
                    warnings.append(
                        f"{roster.path}, line {st.line}: {st.username} is a system account "
                        f"(uid {pw.pw_uid}); setup will refuse it"
                    )
    ok = not problems
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": ok,
                    "problems": problems,
                    "warnings": warnings,
                    "students": len(roster) if roster else 0,
                },
                indent=2,
            )
        )
    else:
        for p in problems:
            click.echo(f"problem: {p}")
        for w in warnings:
            click.echo(f"warning: {w}")
        n = len(roster) if roster else 0
        click.echo(
            f"check: {'ok' if ok else 'NOT ok'}, {n} students, {len(problems)} problems, {len(warnings)} warnings"
        )
    return EXIT_OK if ok else EXIT_USAGE
