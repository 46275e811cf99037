"""status: each student's account, server, last send and last retrieve. Changes nothing."""

from __future__ import annotations

import json
from typing import Any

import click

from ..host.accounts import FOREIGN, MISSING, OK, inspect
from .course import Course
from .portal import status_entry

HEADERS = ["username", "name", "account", "server", "last send", "last retrieve"]


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
    return 0


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
        name = r["name"] if r["in_roster"] else f"{r['name']} (not in the roster)".lstrip()
        table.append(
            [r["username"], name, r["account"], server]
            + [r["last_send"] or "-", r["last_retrieve"] or "-"]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(HEADERS, *table, strict=False)]
    for line in [HEADERS, *table]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
