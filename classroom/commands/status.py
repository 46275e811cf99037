"""status: each student's account, server, last send and last retrieve. Changes nothing."""

from __future__ import annotations

import json
from typing import Any

import click

from ..host import limits
from ..host.accounts import FOREIGN, MISSING, OK, inspect
from ..host.processes import tree_memory
from .course import Course
from .portal import status_entry

HEADERS = ["username", "name", "account", "server", "memory", "last send", "last retrieve"]


def status(
    course: Course, *, only: tuple[str, ...] = (), as_json: bool = False, watch: bool = False
) -> int:
    """A table (or JSON list) of account, server, last send and last retrieve per student;
    ``watch``: the live view (``commands.watch``)."""
    if watch and not as_json:
        from .watch import watch as live

        return live(course, lambda: student_rows(course, only))
    rows = student_rows(course, only)
    portal = status_entry(course)
    if as_json:
        for row in rows:  # the JSON stays a list of students; each says where the portal is
            row["portal"] = portal
        click.echo(json.dumps(rows, indent=2))
        return 0
    if not course.state_readable:
        click.echo(
            "note: the course state is root-only; run with sudo to see servers and history",
            err=True,
        )
    print_table(rows)
    counts = {k: sum(r["account"] == k for r in rows) for k in (OK, MISSING, FOREIGN)}
    running = sum(r["server"] == "running" for r in rows)
    dropped = sum(not r["in_roster"] for r in rows)
    gone = f", {dropped} no longer in the roster" if dropped else ""
    click.echo(
        f"status: {len(rows)} students, {counts[OK]} accounts ok, {counts[MISSING]} missing, "
        f"{counts[FOREIGN]} foreign, {running} servers running{gone}"
    )
    if portal is not None:
        click.echo(f"portal: running in the background, pid {portal['pid']}, {portal['url']}")
    else:
        click.echo("portal: not running in the background")
    click.echo(limits_line(course))
    return 0


def limits_line(course: Course) -> str:
    """The limits in force per student, and what enforces them on this host."""
    wanted = limits.Limits.of(course.settings)
    if not wanted.set():
        return "limits: none ([limits] is not set)"
    enforced = limits.detect().enforces()
    how = ", ".join(f"{name} by {enforced[name] or 'nothing'}" for name in wanted.set())
    return f"limits per student: {wanted.describe()} ({how})"


def memory_in_use(course: Course, username: str, pid: int | None) -> int | None:
    """Bytes a running student's server, kernels and terminals use: from their cgroup,
    else the sum over the server's process tree; None when it is not running."""
    if not pid:
        return None
    used = limits.memory_used(course.settings.name, username)
    return used if used is not None else tree_memory(pid)


def student_rows(course: Course, only: tuple[str, ...]) -> list[dict[str, Any]]:
    """One dict per selected student (the JSON of ``status --json``), students the roster
    no longer has but the course still has an account of too (``in_roster``: false)."""
    from ..host import server as servers_mod

    rows = []
    listed = set(course.roster.names())
    for st in course.students(only, dropped=True):
        acc = inspect(course, st)
        server = servers_mod.server_status(course, st.username) if acc.kind == OK else {}
        rows.append(
            {
                "username": st.username,
                "name": st.full_name,
                "in_roster": st.username in listed,
                "account": acc.kind,
                "server": server.get("server", "stopped"),
                "port": server.get("port"),
                "pid": server.get("pid"),
                "url": server.get("url"),
                "memory": memory_in_use(course, st.username, server.get("pid"))
                if server.get("server") == "running"
                else None,
                "last_send": course.state.last(st.username, "send"),
                "last_retrieve": course.state.last(st.username, "retrieve"),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as aligned columns under ``HEADERS``."""
    table = []
    for r in rows:
        server = r["server"]
        if server == "running":
            where = f":{r['port']}" if r["port"] else "(proxy)"
            server = f"running {where} pid {r['pid']}"
        memory = limits.size_text(r["memory"]) if r["memory"] is not None else "-"
        name = r["name"] if r["in_roster"] else f"{r['name']} (not in the roster)".lstrip()
        table.append(
            [r["username"], name, r["account"], server, memory]
            + [r["last_send"] or "-", r["last_retrieve"] or "-"]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(HEADERS, *table, strict=False)]
    for line in [HEADERS, *table]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
